"""Shared-prefix reuse equals the full-prompt forward (float64, every tiny architecture, both backends)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from icl_kernels.data.prompts import IclPrompt, PromptBatch
from icl_kernels.engine.capture import capture
from icl_kernels.engine.label_scoring import label_log_probs, shared_label_log_probs
from icl_kernels.engine.prefix_cache import (
    common_prefix_length,
    encode_prefix,
    reuse_reason,
    shared_capture,
)
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5


def _prompt(tokens) -> IclPrompt:
    tokens = tuple(int(t) for t in tokens)
    return IclPrompt(tokens=tokens, demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                     demo_labels=(), query_span=(len(tokens) - 1, len(tokens)))


def _prompts(n: int = 4, demo_len: int = 30, seed: int = 0) -> list[IclPrompt]:
    """Identical demonstrations (longer than the tiny models' window of 8), queries of 2..2+n-1 tokens."""
    g = torch.Generator().manual_seed(seed)
    demos = [50256, *torch.randint(10, 5000, (demo_len,), generator=g).tolist()]
    return [_prompt(demos + torch.randint(10, 5000, (2 + i * 3,), generator=g).tolist()) for i in range(n)]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # one token is left to each query
    assert common_prefix_length([[1], [1, 2]]) == 0
    assert common_prefix_length([]) == 0


def test_prediction_rows_scores_and_residual_equal_full_forward(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _prompts()
    assert reuse_reason(model, 31) is None
    batch = PromptBatch.from_prompts(prompts, 0)
    full = capture(model, batch.tokens, batch.prediction_positions)
    shared = shared_capture(model, [p.tokens for p in prompts], batch_size=3)
    assert shared.reused
    assert shared.attention.shape == full.attention.shape
    assert (shared.attention - full.attention).abs().max() < TOL
    assert (shared.final_residual - full.final_residual).abs().max() < TOL
    assert torch.equal(shared.prediction_positions, full.prediction_positions)
    # rows are real distributions over the prompt's own keys
    assert torch.allclose(shared.attention.sum(-1), torch.ones_like(shared.attention.sum(-1)))

    single = [[50256]]  # one-token labels
    multi = [[311, 2000], [4000], [17, 18, 19]]  # a multi-token continuation per class
    for labels in (single + [[220]], multi):
        want = label_log_probs(model, prompts, labels, batch_size=2)
        got = shared_label_log_probs(model, prompts, labels, batch_size=2)
        assert got.shape == want.shape
        assert (got - want).abs().max() < TOL, labels


def test_prefix_state_is_not_changed_by_queries(backend):
    model = load_tiny("gpt-neo", backend, torch.float64)
    prompts = _prompts(3)
    prefix = encode_prefix(model, prompts[0].tokens[:31])
    first = shared_capture(model, [p.tokens for p in prompts], prefix=prefix)
    again = shared_capture(model, [p.tokens for p in prompts[::-1]], prefix=prefix)
    assert torch.equal(first.final_residual, again.final_residual.flip(0))


@pytest.mark.skipif("bridge" not in tl_backend.AVAILABLE_BACKENDS, reason="needs TransformerBridge")
def test_bridge_whose_model_takes_only_cache_is_refused_and_falls_back_exactly():
    """transformers >= 5.24 takes ``cache``; the 3.9 bridge would ignore it on rotary models."""
    model = load_tiny("llama", "bridge", torch.float64)
    prompts = _prompts(3)
    hf = model.original_model
    plain = hf.forward

    def forward_taking_cache(input_ids=None, cache=None, attention_mask=None, **kwargs):
        return plain(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    hf.forward = forward_taking_cache
    try:
        reason = reuse_reason(model, 31)
        assert reason is not None and "transformers<5.24" in reason
        shared = shared_capture(model, [p.tokens for p in prompts])
    finally:
        del hf.forward
    assert not shared.reused
    batch = PromptBatch.from_prompts(prompts, 0)
    full = capture(model, batch.tokens, batch.prediction_positions)
    assert (shared.final_residual - full.final_residual).abs().max() < TOL


def test_falls_back_to_the_full_forward_without_a_common_prefix():
    model = load_tiny("gpt-neo", None, torch.float64)
    prompts = [_prompt([5, 6, 7, 8]), _prompt([9, 6, 7])]
    assert reuse_reason(model, common_prefix_length([p.tokens for p in prompts])) is not None
    shared = shared_capture(model, [p.tokens for p in prompts])
    assert not shared.reused
    batch = PromptBatch.from_prompts(prompts, 0)
    full = capture(model, batch.tokens, batch.prediction_positions)
    assert torch.equal(shared.final_residual, full.final_residual)
    labels = [[10], [11]]
    assert torch.allclose(shared_label_log_probs(model, prompts, labels), label_log_probs(model, prompts, labels),
                          atol=TOL)
    with pytest.raises(ValueError, match="Cannot reuse"):
        encode_prefix(model, [])


@pytest.mark.skipif("hooked" not in tl_backend.AVAILABLE_BACKENDS, reason="needs HookedTransformer")
def test_unsupported_positional_embedding_falls_back(monkeypatch):
    model = load_tiny("gpt-neo", "hooked", torch.float64)
    monkeypatch.setattr(model.cfg, "positional_embedding_type", "alibi")
    assert "alibi" in reuse_reason(model, 30)


def test_float32_is_close(arch):
    model = load_tiny(arch, None, torch.float32)
    prompts = _prompts(3)
    batch = PromptBatch.from_prompts(prompts, 0)
    full = capture(model, batch.tokens, batch.prediction_positions)
    shared = shared_capture(model, [p.tokens for p in prompts])
    assert (shared.attention - full.attention).abs().max() < 1e-4
    assert (shared.final_residual - full.final_residual).abs().max() < 1e-4


@pytest.mark.slow
def test_gemma_3_270m_exact():
    model = load_model("gemma-3-270m", device="cpu", dtype=torch.float64)
    tok = model.tokenizer
    demos = tok("Review: a gripping, moving film. Sentiment: positive\nReview: dull and far too long. "
                "Sentiment: negative\nReview: ")["input_ids"]
    queries = ["an instant classic. Sentiment:", "I walked out after twenty minutes, bored. Sentiment:"]
    prompts = [_prompt(list(demos) + tok(q, add_special_tokens=False)["input_ids"]) for q in queries]
    batch = PromptBatch.from_prompts(prompts, 0)
    full = capture(model, batch.tokens, batch.prediction_positions)
    shared = shared_capture(model, [p.tokens for p in prompts])
    assert shared.reused
    assert (shared.attention - full.attention).abs().max() < 1e-4
    assert (shared.final_residual - full.final_residual).abs().max() < 1e-4
    labels = [tok(" positive", add_special_tokens=False)["input_ids"], tok(" negative", add_special_tokens=False)["input_ids"]]
    assert (shared_label_log_probs(model, prompts, labels) - label_log_probs(model, prompts, labels)).abs().max() < 1e-4
