"""The test run type-checks the package (jaxtyping's import hook with `typecheck_hook`): public
functions reject wrong shapes; functions defined inside functions get no beartype checker."""

from __future__ import annotations

import jaxtyping
import pytest
import torch
from typecheck_hook import beartype_outside_locals

from icl_kernels.families.function_vectors import random_function_vectors


def test_a_public_function_rejects_a_tensor_of_the_wrong_rank():
    writes = torch.randn(2, 3, 8)  # [layer head_index d_model]
    assert random_function_vectors(writes, k=2, draws=1, norm=1.0)[0].shape == (1, 8)
    with pytest.raises(jaxtyping.TypeCheckError):
        random_function_vectors(writes[0], k=2, draws=1, norm=1.0)


def _top_level(x: int) -> int:
    return x


def test_only_functions_outside_other_functions_get_a_beartype_checker():
    def nested(x: int) -> int:
        return x

    assert beartype_outside_locals(nested) is nested
    checked = beartype_outside_locals(_top_level)
    assert checked is not _top_level and checked(3) == 3
    with pytest.raises(Exception, match="violates type hint"):
        checked("three")
