"""CUDA paths in bf16: loading, eval, heads, compare (with finetuning), momentum, patching, prefix reuse.

Marked ``gpu``: conftest skips them where CUDA is absent. Tolerances as in tests/integration/test_dtypes.py.
"""

from __future__ import annotations

import pytest
import torch
from test_dtypes import CONFIGS, _numbers, _prompts

from icl_kernels.engine.hooks import active_hook_count
from icl_kernels.engine.label_scoring import label_log_probs, shared_label_log_probs
from icl_kernels.finetuning.momentum_attention import momentum_attention
from icl_kernels.models.loading import load_model
from icl_kernels.studies import get_study

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model():
    return load_model("tiny-gpt-neo", device="cuda", dtype=torch.bfloat16)


def test_loads_on_cuda_in_bf16(cuda_model):
    p = next(cuda_model.parameters())
    assert p.device.type == "cuda" and p.dtype == torch.bfloat16


def test_label_scores_and_prefix_reuse_match_cpu_float32(cuda_model):
    ref = load_model("tiny-gpt-neo", device="cpu", dtype=torch.float32)
    prompts, labels = _prompts(), [[50256], [220], [11]]
    want = label_log_probs(ref, prompts, labels)
    got = label_log_probs(cuda_model, prompts, labels)
    shared = shared_label_log_probs(cuda_model, prompts, labels)
    assert (got - want).abs().max() < 0.15
    assert (shared - want).abs().max() < 0.15


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_study_runs_on_cuda_in_bf16(name, cuda_model):
    report = get_study(name)(dict(CONFIGS[name], dtype="bf16", device="cuda"), model=cuda_model, progress=False)
    assert _numbers(report)
    assert active_hook_count(cuda_model) == 0


def test_momentum_patch_on_cuda(cuda_model):
    tokens = torch.randint(10, 5000, (2, 64), device="cuda")
    with torch.no_grad():
        plain = cuda_model(tokens)
        with momentum_attention(cuda_model, 0.0):
            same = cuda_model(tokens)
        with momentum_attention(cuda_model, 0.3):
            patched = cuda_model(tokens)
    assert torch.equal(plain, same)
    assert torch.isfinite(patched).all() and not torch.equal(plain, patched)
    assert active_hook_count(cuda_model) == 0
