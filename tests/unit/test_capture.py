"""Prediction-row attention and features at chosen positions equal those of a full activation cache."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from icl_kernels.engine import capture as capture_module
from icl_kernels.engine import hooks as H
from icl_kernels.engine.capture import capture
from icl_kernels.engine.label_scoring import unembed

LENGTHS = (20, 13, 17)  # right-padded rows of different lengths; local windows (8) hide early keys


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(model):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (len(LENGTHS), max(LENGTHS)), generator=gen)
    lengths = torch.tensor(LENGTHS)
    for row, n in enumerate(LENGTHS):
        tokens[row, n:] = model.tokenizer.pad_token_id
    positions = torch.tensor([[1, 5, -1], [2, 3, 12], [0, -1, -1]])
    return tokens, lengths - 1, positions


@pytest.mark.parametrize("method", ["pattern", "qk"])
def test_rows_and_features_equal_full_cache(arch, backend, method):
    model = load_tiny(arch, backend)
    tokens, pred, positions = _batch(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    before = H.active_hook_count(model)
    got = capture(model, tokens, pred, method=method, features=("q", "k", "v", "resid_post"),
                  feature_positions=positions, rotate=False)
    assert H.active_hook_count(model) == before
    rows = torch.arange(len(LENGTHS))
    tol = 0.0 if method == "pattern" else 1e-6
    for layer in range(model.cfg.n_layers):
        want = cache[H.act_name("pattern", layer)][rows, :, pred]  # [batch head key]
        torch.testing.assert_close(got.attention[:, layer], want, atol=tol, rtol=0)
        for kind in ("q", "k", "v", "resid_post"):
            full = cache[H.act_name(kind, layer)]
            torch.testing.assert_close(got.query_features[kind][:, layer], full[rows, pred], atol=0, rtol=0)
            for row in range(len(LENGTHS)):
                for j, p in enumerate(positions[row].tolist()):
                    value = got.features[kind][row, j, layer]
                    if p < 0:
                        assert not value.any()
                    else:
                        torch.testing.assert_close(value, full[row, p], atol=0, rtol=0)
    # keys after a row's prediction position get exactly zero weight
    for row, p in enumerate(pred.tolist()):
        assert not got.attention[row, :, :, p + 1 :].any()
    torch.testing.assert_close(got.final_residual, cache[H.STOP_HOOK][rows, pred], atol=0, rtol=0)


def test_rotated_q_k_reproduce_scores(arch, backend):
    """With rotate=True the captured q, k dot products (over the model's scale) are the scores."""
    model = load_tiny(arch, backend)
    tokens, pred, _ = _batch(model)
    n = tokens.shape[1]
    every = torch.arange(n).expand(len(LENGTHS), n).clone()
    got = capture(model, tokens, pred, features=("q", "k"), feature_positions=every, rotate=True)
    for layer in range(model.cfg.n_layers):
        spec = H.attention_spec(model, layer)
        q = got.query_features["q"][:, layer]  # [batch head d]
        k = H.repeat_kv(got.features["k"][:, :, layer], spec.group_size)  # [batch key head d]
        scores = torch.einsum("bhd,bkhd->bhk", q, k) / spec.scale
        keys = torch.arange(n)[None]
        visible = keys <= pred[:, None]
        if spec.window is not None:
            visible &= keys > pred[:, None] - spec.window
        recomputed = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
        torch.testing.assert_close(recomputed, got.attention[:, layer], atol=2e-6, rtol=0)


def test_no_hook_remains_after_errors(backend, monkeypatch):
    model = load_tiny("gemma-3", backend)
    tokens, pred, positions = _batch(model)
    capture(model, tokens, pred)  # warm-up: a bridge adds its permanent hooks on first use
    before = H.active_hook_count(model)

    def broken_spec(*args, **kwargs):
        raise RuntimeError("spec exploded inside a hook")

    monkeypatch.setattr(capture_module, "attention_spec", broken_spec)
    with pytest.raises(RuntimeError, match="exploded"):
        capture(model, tokens, pred, method="qk")
    assert H.active_hook_count(model) == before
    monkeypatch.undo()
    bad_tokens = tokens.clone()
    bad_tokens[0, 0] = 10**7  # outside the vocabulary: the model itself raises mid-forward
    with pytest.raises((IndexError, RuntimeError)):
        capture(model, bad_tokens, pred, features=("v",), feature_positions=positions)
    assert H.active_hook_count(model) == before
    # and the model still works, unhooked
    again = capture(model, tokens, pred)
    assert again.attention.shape[:2] == (len(LENGTHS), model.cfg.n_layers)


def test_bad_inputs_raise_clear_errors():
    model = load_tiny("gpt-neo")
    tokens, pred, positions = _batch(model)
    with pytest.raises(ValueError, match="prediction_positions"):
        capture(model, tokens, pred + 10)
    with pytest.raises(ValueError, match="feature_positions"):
        capture(model, tokens, pred, features=("v",), feature_positions=positions + 100)
    with pytest.raises(ValueError, match="Unknown feature kind"):
        capture(model, tokens, pred, features=("nope",))
    with pytest.raises(ValueError, match="method"):
        capture(model, tokens, pred, method="full")
    with pytest.raises(ValueError, match="Layers"):
        capture(model, tokens, pred, layers=[7])


def test_memory_grows_linearly_in_prompt_length():
    """Rows cost layers x heads x pos; a full pattern cache costs that times pos."""
    model = load_tiny("gpt-neo")
    tokens = torch.randint(0, 1000, (1, 200))
    got = capture(model, tokens, torch.tensor([199]), final_residual=False)
    cfg = model.cfg
    assert got.nbytes == cfg.n_layers * cfg.n_heads * 200 * 4
    full = cfg.n_layers * cfg.n_heads * 200 * 200 * 4
    assert full / got.nbytes == 200


def test_unembed_equals_the_model_unembedding(backend):
    """`unembed` (W_U columns only, soft-capped) equals TransformerLens' own unembedding."""
    model = load_tiny("gemma-3", backend)
    resid = torch.randn(3, model.cfg.d_model)
    want = model.unembed(resid).detach()
    cap = model.cfg.output_logits_soft_cap
    if cap and cap > 0:
        want = cap * torch.tanh(want / cap)
    with torch.no_grad():
        torch.testing.assert_close(unembed(model, resid), want, atol=1e-5, rtol=1e-5)
        ids = torch.tensor([5, 17])
        torch.testing.assert_close(unembed(model, resid, ids), want[:, ids], atol=1e-5, rtol=1e-5)
