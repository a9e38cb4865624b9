"""Linear relaxation: (W_ZSL + dW_ICL) q equals the relaxed attention output, on every architecture."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import TINY_PARAMS, load_tiny

from icl_kernels.data.synthetic_world import make_world
from icl_kernels.engine import hooks as H
from icl_kernels.engine.hooks import rotate_by
from icl_kernels.finetuning.dai_metrics import demo_token_mask
from icl_kernels.finetuning.recording import record
from icl_kernels.finetuning.relaxation import (
    decompose,
    dual_form_toy,
    relaxed_attention,
    relaxed_z,
    spectrum,
    stable_rank,
)
from icl_kernels.models.loading import ASSETS, build_tiny_hf_model, load_model
from icl_kernels.studies.compare import CompareConfig, synthetic_episodes

LENGTHS = (20, 14)
IDENTITY_ATOL = 1e-5  # float64; observed ~1e-13 on values of size ~50


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def _hf_params(arch: str) -> int:
    return sum(p.numel() for p in build_tiny_hf_model(arch)[0].parameters())


def assert_tiny(arch: str, model) -> None:
    """TINY_PARAMS counts the Hugging Face model; TransformerLens may untie the unembedding and add zero biases."""
    assert _hf_params(arch) == TINY_PARAMS[arch]
    n_params = sum(p.numel() for p in model.parameters())
    assert TINY_PARAMS[arch] <= n_params <= TINY_PARAMS[arch] + 50257 * 65 + 50_000


def _tokens(model, lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (len(lengths), max(lengths)), generator=gen)
    for row, n in enumerate(lengths):
        tokens[row, n:] = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    return tokens, torch.tensor(lengths) - 1


def _demo_mask(width: int) -> torch.Tensor:
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.bool)
    mask[:, 1:10] = True  # BOS, then "demonstrations", then the query's own tokens
    return mask


def _check_identity(model, tokens, pred, demo_mask) -> float:
    recorded: dict = {}
    grabbed: dict = {}
    last = model.cfg.n_layers - 1

    def grab(z, hook):
        grabbed["z"] = z.detach().clone()

    before = H.active_hook_count(model)
    with relaxed_attention(model, record=recorded), H.hooks_on(model, [(H.act_name("z", last), grab)]):
        with torch.no_grad():
            model(tokens)
    assert H.active_hook_count(model) == before
    # the relaxed z is what the model used downstream of the hook
    torch.testing.assert_close(grabbed["z"], recorded[("z", last)], atol=0, rtol=0)
    rows = torch.arange(len(pred))
    worst = 0.0
    for layer in range(model.cfg.n_layers):
        spec = H.attention_spec(model, layer)
        q, k, v = (recorded[(kind, layer)] for kind in ("q", "k", "v"))
        parts = decompose(q, k, v, spec, pred, demo_mask)
        want = recorded[("z", layer)][rows, pred]
        worst = max(worst, float((parts.output() - want).abs().max()))
        # the split does not change the sum
        other = decompose(q, k, v, spec, pred, torch.zeros_like(demo_mask))
        torch.testing.assert_close(other.w_zsl, parts.w_zsl + parts.dw_icl, atol=1e-9, rtol=1e-9)
        assert not other.dw_icl.any()
    return worst


def test_identity_on_every_tiny_architecture(arch, backend):
    model = load_tiny(arch, backend, dtype=torch.float64)
    assert_tiny(arch, model)
    tokens, pred = _tokens(model)
    worst = _check_identity(model, tokens, pred, _demo_mask(tokens.shape[1]))
    assert worst < IDENTITY_ATOL


def test_identity_on_the_synthetic_world_model():
    if not (ASSETS / "synthetic-gpt-neo" / "world.json").exists():
        pytest.skip("the synthetic-world model is not shipped in icl_kernels/assets yet")
    model = load_model("synthetic-gpt-neo", device="cpu", dtype=torch.float64)
    vocab = model.cfg.d_vocab
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (len(LENGTHS), max(LENGTHS)), generator=gen)
    pred = torch.tensor(LENGTHS) - 1
    assert _check_identity(model, tokens, pred, _demo_mask(tokens.shape[1])) < IDENTITY_ATOL


def test_relaxed_output_matches_an_explicit_sum_with_local_windows(backend):
    """GPT-Neo local layers (window 8): demonstration tokens outside the window contribute nothing."""
    model = load_tiny("gpt-neo", backend, dtype=torch.float64)
    tokens, pred = _tokens(model)
    recorded: dict = {}
    with relaxed_attention(model, layers=[1], record=recorded), torch.no_grad():
        model(tokens)
    spec = H.attention_spec(model, 1)
    assert spec.window == 8
    q, k, v = (recorded[(kind, 1)] for kind in ("q", "k", "v"))
    row, p = 0, int(pred[0])
    explicit = sum((q[row, p] * k[row, j]).sum(-1)[:, None] * v[row, j] for j in range(p - 7, p + 1))
    torch.testing.assert_close(recorded[("z", 1)][row, p], explicit, atol=1e-9, rtol=1e-9)
    demo = torch.zeros(len(LENGTHS), tokens.shape[1], dtype=torch.bool)
    demo[:, 1 : p - 8] = True  # every demonstration token of row 0 lies outside the window
    parts = decompose(q, k, v, spec, pred, demo)
    assert parts.n_demo_visible[0] == 0 and not parts.dw_icl[0].any()
    assert parts.dw_icl[1].abs().sum() > 0  # row 1 (prediction at 13) still sees some


def test_relaxation_changes_the_model_and_no_hook_remains_after_errors(backend):
    model = load_tiny("gemma-3", backend)
    tokens, _ = _tokens(model)
    with torch.no_grad():
        plain = model(tokens)
    before = H.active_hook_count(model)
    with relaxed_attention(model, layers=[2]), torch.no_grad():
        relaxed = model(tokens)
    assert (relaxed - plain).abs().max() > 1e-3
    assert H.active_hook_count(model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with relaxed_attention(model, layers=[0, 1]):
            raise RuntimeError("raised inside the block")
    assert H.active_hook_count(model) == before
    bad = tokens.clone()
    bad[0, 0] = 10**7
    with pytest.raises((IndexError, RuntimeError)):
        with relaxed_attention(model), torch.no_grad():
            model(bad)
    assert H.active_hook_count(model) == before
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = load_tiny("gpt-neo")
    with pytest.raises(ValueError, match="Layers"):
        with relaxed_attention(model, layers=[9]):
            pass
    spec = H.attention_spec(model, 0)
    q = torch.randn(1, 5, 4, 16)
    with pytest.raises(ValueError, match="positions"):
        decompose(q, q, q, spec, torch.tensor([7]), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="demo_mask"):  # ours, or the run-time shape check
        decompose(q, q, q, spec, torch.tensor([3]), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        dual_form_toy(lr=0)


@pytest.mark.parametrize("arch", ["gpt-j", "llama", "gemma-3"])
def test_rotate_by_undoes_the_models_rotary(arch):
    model = load_tiny(arch, dtype=torch.float64)
    spec = H.attention_spec(model, 0)
    x = torch.randn(1, 12, spec.n_heads, spec.d_head, dtype=torch.float64)
    rotated = H.apply_rotary(x, spec)
    back = rotate_by(rotated, spec, -torch.arange(12.0, dtype=torch.float64)[None])
    torch.testing.assert_close(back, x, atol=1e-12, rtol=0)
    assert (rotated - x).abs().max() > 1e-3  # the rotary does something


def test_relaxed_z_has_no_softmax_and_no_scale():
    spec = H.AttentionSpec(layer=0, n_heads=2, n_kv_heads=1, d_head=3, scale=7.0, window=None, rotary_dim=None)
    q = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    k = torch.randn(1, 4, 1, 3, dtype=torch.float64)
    v = torch.randn(1, 4, 1, 3, dtype=torch.float64)
    z = relaxed_z(q, k, v, spec)
    want = (q[0, 3, 1] @ k[0, :, 0].T) @ v[0, :, 0]  # head 1 uses the shared key/value head
    torch.testing.assert_close(z[0, 3, 1], want, atol=1e-12, rtol=0)


def test_dual_form_toy_reproduces_the_paper_exactly():
    toy = dual_form_toy(d_in=6, d_out=4, n_demos=5, lr=0.1, seed=3)
    assert toy.max_abs_difference < 1e-12
    # the finetuning update is the sum of outer products of error signals and inputs
    gen = torch.Generator().manual_seed(3)
    torch.randn(4, 6, generator=gen, dtype=torch.float64)
    demos = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(toy.delta_w, toy.error_signals.T @ demos, atol=1e-12, rtol=0)
    assert toy.delta_w.abs().max() > 1e-3


def test_spectrum_and_stable_rank():
    u, v = torch.randn(5, 1, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    assert abs(float(stable_rank(u @ v)) - 1.0) < 1e-9
    eye = torch.eye(4, dtype=torch.float64)
    assert abs(float(stable_rank(eye)) - 4.0) < 1e-9
    s = spectrum(torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)))
    torch.testing.assert_close(s, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


def _position_free_gpt_neo():
    """tiny-gpt-neo (float64) with its position embeddings zeroed: layer 0's keys, values and queries
    are then functions of the token alone, so a zero-shot prompt's W equals the query side of the
    same query inside a k-shot prompt *exactly*."""
    model = load_model("tiny-gpt-neo", device="cpu", dtype=torch.float64)
    with torch.no_grad():
        model.W_pos.zero_()
    return model


def _split_maps(model, icl_p, zsl_p, mask_of):
    icl_tokens, zsl_tokens = list(icl_p.tokens), list(zsl_p.tokens)
    icl = record(model, icl_tokens, len(icl_tokens) - 1, len(icl_tokens) - 1, [0, 1], with_kv=True)
    zsl = record(model, zsl_tokens, len(zsl_tokens) - 1, len(zsl_tokens) - 1, [0, 1], with_kv=True)
    spec = H.attention_spec(model, 0)
    assert spec.window is None  # layer 0 is global: every key is visible

    def split(rec, mask):
        return decompose(rec.q_full[0][None], rec.k[0][None], rec.v[0][None], spec,
                         torch.tensor([rec.recording_position]), mask)

    return split(icl, mask_of(icl_p, len(icl_tokens))), split(zsl, torch.zeros(1, len(zsl_tokens), dtype=torch.bool))


def test_demonstration_split_gives_the_zero_shot_map():
    """W_ZSL of a k-shot prompt (split by `demo_token_mask`) equals W of its zero-shot prompt, and
    dW_ICL has one term per demonstration token; a split one token off in either direction breaks it."""
    model = _position_free_gpt_neo()
    world = make_world()
    cfg = CompareConfig.from_dict(dict(model="tiny-gpt-neo", shots=3, n_test=2, seed=0, episodes=1, lr=0.05))
    episodes, _ = synthetic_episodes(world, model.cfg.n_ctx, cfg)
    icl_p, zsl_p = episodes[0].icl_prompts[0], episodes[0].zsl_prompts[0]
    icl, zsl = _split_maps(model, icl_p, zsl_p, demo_token_mask)
    scale = float(zsl.w_zsl.abs().max())
    assert scale > 1e-3
    torch.testing.assert_close(icl.q, zsl.q, atol=1e-12, rtol=0)
    torch.testing.assert_close(icl.w_zsl, zsl.w_zsl, atol=1e-10 * scale, rtol=0)
    n_demo = sum(b - a for a, b in icl_p.demo_spans) + len(icl_p.demo_spans)  # demonstrations and separators
    assert int(icl.n_demo_visible[0]) == n_demo == icl_p.query_span[0] - 1
    assert float(icl.dw_icl.abs().max()) > 1e-3

    def shifted(by_start: int, by_end: int):
        def mask_of(prompt, width):
            mask = torch.zeros(1, width, dtype=torch.bool)
            mask[0, 1 + by_start : prompt.query_span[0] + by_end] = True
            return mask
        return mask_of

    # the query's first token on the demonstration side; the last separator on the query side; BOS a demo
    for wrong in (shifted(0, 1), shifted(0, -1), shifted(-1, 0), shifted(1, 0)):
        icl_w, _ = _split_maps(model, icl_p, zsl_p, wrong)
        assert float((icl_w.w_zsl - zsl.w_zsl).abs().max()) > 1e-6 * scale
        # ... while the relaxed identity, blind to the split, still holds
        torch.testing.assert_close(icl_w.output(), icl.output(), atol=1e-9 * scale, rtol=0)
