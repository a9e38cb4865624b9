"""Length-bucketed batches: padding never changes a result; batch sizes follow the memory budget."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.batching import auto_batch_size, bucketed_batches, bucketed_label_log_probs, row_bytes
from icl_kernels.engine.label_scoring import label_log_probs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(n: int = 7) -> list[IclPrompt]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        tokens = tuple([50256, *torch.randint(10, 5000, (3 + (i * 5) % 17,), generator=g).tolist()])
        out.append(IclPrompt(tokens=tokens, demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                             demo_labels=(), query_span=(len(tokens) - 1, len(tokens))))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bucketed_scores_equal_one_by_one(arch, backend, dtype):
    """1e-6 absolute in float64; in float32 a batch's matrix shapes change the rounding (not the
    padding), so there the bound is 1e-6 relative (scores are ~-20: one float32 ulp is 1.9e-6)."""
    model = load_tiny(arch, backend, dtype)
    tol = (lambda x: 1e-6) if dtype == torch.float64 else (lambda x: 1e-6 * x.abs().max())
    prompts = _prompts()
    for labels in ([[50256], [220], [11]], [[311, 2000], [4000]]):
        alone = torch.cat([label_log_probs(model, [p], labels, batch_size=1) for p in prompts])
        bucketed = bucketed_label_log_probs(model, prompts, labels, batch_size=3)
        auto = bucketed_label_log_probs(model, prompts, labels, budget=10 * row_bytes(model, 20))
        assert (bucketed - alone).abs().max() < tol(alone)
        assert (auto - alone).abs().max() < tol(alone)


def test_buckets_cover_every_prompt_once_longest_first():
    prompts = _prompts(9)
    seen = []
    widths = []
    for indices, batch in bucketed_batches(prompts, 0, batch_size=4):
        seen += indices
        widths.append(batch.tokens.shape[1])
        assert batch.tokens.shape[1] == max(len(prompts[i]) for i in indices)
    assert sorted(seen) == list(range(9))
    assert widths == sorted(widths, reverse=True)
    with pytest.raises(ValueError, match="batch_size"):
        next(bucketed_batches(prompts, 0))


def test_auto_batch_size_follows_the_budget():
    model = load_tiny("gpt-neo")
    one = row_bytes(model, 100)
    assert auto_batch_size(model, 100, budget=one * 5) == 5
    assert auto_batch_size(model, 100, budget=1) == 1
    assert auto_batch_size(model, 10, budget=one * 5) > 5  # shorter rows, more of them
    assert auto_batch_size(model, 10, budget=1 << 40, cap=64) == 64
