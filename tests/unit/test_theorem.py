"""Theorem 1 on the synthetic world: the kernel-regression limit, its convergence, a model's heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from icl_kernels.cli import main
from icl_kernels.data.synthetic_bayes import bayes_label_probs, bayes_predictive
from icl_kernels.data.synthetic_world import make_world
from icl_kernels.engine import hooks as H
from icl_kernels.kernel import theorem_one as T
from icl_kernels.models.loading import hf_to_transformer_lens
from icl_kernels.studies import get_study
from icl_kernels.studies.theorem import TheoremConfig
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.stats import rng, split_indices

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_world():
    return make_world(n_concepts=3, n_states=9, vocab_size=3, x_len=2, branching=2, doc_len=64)


@pytest.mark.parametrize("features", T.FEATURES)
def test_limit_of_kernel_regression_is_the_concept_conditional(features):
    """n -> infinity: sum_i y_i K(x, x_i) / sum_i K(x, x_i) equals P(y | x, c*) exactly, every x and c*."""
    world = small_world()
    kernel = T.theorem_kernel(world, features)
    assert 0 < kernel.rank <= world.vocab_size ** world.config.x_len
    for concept in range(world.n_concepts):
        np.testing.assert_allclose(T.expected_kr(kernel, concept), T.conditional(world, concept), atol=1e-9)


def test_forward_features_give_probabilities():
    """phi(x) = (start_c^T T^c_x)_c: its blocks sum to P(x | c) (checked against the Bayes code)."""
    world = small_world()
    x = T.all_inputs(world)
    phi = T.input_features(world, x, "forward").reshape(len(x), world.n_concepts, world.n_states)
    p_x_given_c = phi.sum(-1)
    np.testing.assert_allclose(p_x_given_c.sum(0), np.full(world.n_concepts, 1.0), atol=1e-12)
    # the predictive of a concept-knowing reader of <d> x equals phi_c(x) @ emit, normalised
    tokens = np.concatenate([np.full((len(x), 1), world.delim_id), x], axis=1)
    prior = np.zeros(world.n_concepts)
    prior[1] = 1.0
    want = bayes_predictive(world, tokens, concept_prior=prior)
    np.testing.assert_allclose(T.conditional(world, 1), want, atol=1e-12)


def test_kernel_estimate_matches_a_loop():
    world = small_world()
    kernel = T.theorem_kernel(world, "forward")
    batch = world.sample_prompts(6, 5, np.random.default_rng(0))
    got = T.kernel_estimate(kernel, batch, world.vocab_size)
    for row in range(6):
        x = batch.tokens[row, batch.x_positions[5]]
        num, den, scale = np.zeros(world.vocab_size), 0.0, 0.0
        for i in range(5):
            k = kernel.matrix[T.input_index(world, x), T.input_index(world, batch.tokens[row, batch.x_positions[i]])]
            num[batch.tokens[row, batch.label_positions[i]]] += k
            den += k
            scale += abs(k)
        if den > T.MIN_RELATIVE_DENOMINATOR * scale:
            np.testing.assert_allclose(got[row], num / den, atol=1e-12)
        else:
            assert np.isnan(got[row]).all()


def test_simulation_table_against_a_brute_force_one_shot_case():
    """At n = 1 every kernel predictor is exact by hand: it answers y_1 when K(x, x_1) > 0 and abstains
    otherwise; the uniform kernel always answers y_1. The table's accuracy, abstention and agreement
    must equal these counts on the same prompts (abstentions count as wrong)."""
    world = make_world(n_concepts=2, n_states=4, vocab_size=3, x_len=1, branching=2, doc_len=64)
    n = 400
    sim = T.simulate(world, shots=(1,), n=n, seed=5, features=("forward", "operator")).set_index("predictor")
    batch = world.sample_prompts(n, 1, rng("theorem_simulation", 5, 1))
    x1, y1 = batch.tokens[:, batch.x_positions[0]], batch.tokens[:, batch.label_positions[0]]
    x = batch.tokens[:, batch.x_positions[1]]
    bayes = bayes_label_probs(world, batch).argmax(-1)
    for name in ("kr_forward", "kr_operator", "kr_uniform"):
        if name == "kr_uniform":
            answers = np.ones(n, bool)
        else:
            kernel = T.theorem_kernel(world, name[3:])
            answers = kernel(x, x1) > T.MIN_RELATIVE_DENOMINATOR * np.abs(kernel(x, x1))
            answers &= np.abs(kernel(x, x1)) > 0
        pred = np.where(answers, y1, -1)
        row = sim.loc[name]
        assert row["abstain"] == pytest.approx(1 - answers.mean(), abs=1e-12)
        assert row["accuracy"] == pytest.approx((pred == batch.labels).mean(), abs=1e-12)
        assert row["agree_bayes"] == pytest.approx((pred == bayes).mean(), abs=1e-12)
    # the uniform kernel never abstains; at 1 shot the theorem kernel does (a signed K(x, x_1) <= 0)
    assert sim.loc["kr_uniform", "abstain"] == 0 and sim.loc["kr_forward", "abstain"] > 0.05


def test_kernel_regression_converges_to_bayes():
    """Measured effect: agreement of the theorem's KR with Bayes climbs from ~0.2 (4 shots) to ~0.9
    (256 shots), while the label-frequency baseline stays near 0.3 (default world, 300 prompts)."""
    sim = T.simulate(make_world(), shots=(4, 256), n=300, seed=0, features=("forward",))
    agree = sim.set_index(["predictor", "shots"])["agree_bayes"]
    assert agree["kr_forward", 256] >= 0.8
    assert agree["kr_forward", 256] >= agree["kr_forward", 4] + 0.4
    assert agree["kr_uniform", 256] <= 0.5
    assert (sim[sim.predictor == "bayes"]["agree_bayes"] == 1.0).all()


def _tiny_synthetic_model(world, backend="hooked"):
    config = GPTNeoConfig(
        vocab_size=world.n_tokens, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=96,
        bos_token_id=world.delim_id, eos_token_id=world.delim_id,
    )
    config.architectures = ["GPTNeoForCausalLM"]
    torch.manual_seed(0)
    hf = GPTNeoForCausalLM(config).eval()
    assert sum(p.numel() for p in hf.parameters()) < 50_000
    return hf_to_transformer_lens(hf, None, backend=backend, device="cpu")


@pytest.mark.tl3_only(reason="tiny synthetic model on backend='hooked', gone in TL 4")
def test_model_behaviour_on_a_tiny_model():
    world = make_world()
    model = _tiny_synthetic_model(world)
    before = H.active_hook_count(model)
    frame = T.model_behaviour(model, world, shots=(1, 4), n=20, seed=0, batch_size=8)
    assert H.active_hook_count(model) == before
    values = frame.set_index(["shots", "metric"])["value"]
    # recomputed from the same prompts: the model's own logits, the Bayes predictive, and at 1 shot the
    # head reconstruction, which can only be the single demonstration's label y_1 (or an abstention)

    _, report = split_indices(20, 0.7, 0)
    for k in (1, 4):
        batch = world.sample_prompts(20, k, rng("theorem_model", 0, k))
        with torch.no_grad():
            logits = model(torch.as_tensor(batch.tokens))[:, -1, : world.vocab_size]
        model_pred = logits.argmax(-1).numpy()
        bayes_pred = bayes_label_probs(world, batch).argmax(-1)
        assert values[k, "model_accuracy"] == pytest.approx((model_pred == batch.labels).mean(), abs=1e-6)
        assert values[k, "bayes_accuracy"] == pytest.approx((bayes_pred == batch.labels).mean(), abs=1e-6)
        assert values[k, "model_agree_bayes"] == pytest.approx((model_pred == bayes_pred).mean(), abs=1e-6)
        share = np.bincount(model_pred[report]).max() / len(report)  # always voting the favourite
        assert values[k, "model_majority_share"] == pytest.approx(share, abs=1e-6)
        # the paired difference is the head's agreement minus that share, over the held-out prompts
        diff = frame[(frame.shots == k) & (frame.metric == "head_minus_majority_share")].iloc[0]
        assert diff.value == pytest.approx(values[k, "head_agree_model"] - share, abs=1e-6)
        assert diff.low <= diff.value <= diff.high and diff.n == len(report)
        head = frame[(frame.shots == k) & (frame.metric == "head_agree_model")].iloc[0]
        assert head.n == len(report) and head.low <= head.value <= head.high
    batch = world.sample_prompts(20, 1, rng("theorem_model", 0, 1))
    y1 = batch.tokens[report, batch.label_positions[0]]
    assert values[1, "head_accuracy"] <= (y1 == batch.labels[report]).mean() + 1e-6
    # softmax attention is positive: the one demonstration always gets a vote, so equality holds
    assert values[1, "head_accuracy"] == pytest.approx((y1 == batch.labels[report]).mean(), abs=1e-6)
    assert "kernel_corr_max" in frame[frame.shots == 4].metric.values
    assert 0 <= values[4, "best_layer"] < 2
    with pytest.raises(ValueError, match="context"):
        T.model_behaviour(model, world, shots=(40,), n=4)


def test_theorem_command_writes_its_files(tmp_path, capsys):
    out = tmp_path / "theorem"
    assert main(["theorem", "--shots", "1,16", "--n", "60", "--features", "forward", "--out", str(out)]) == 0
    for name in ("theorem.csv", "summary.json", "config.json", "theorem.html"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["kr_forward"]) == {"1", "16"}
    assert summary["bayes"]["16"]["agree_bayes"] == 1.0
    for k in ("1", "16"):  # abstentions and intervals per n, from the table
        iv = summary["intervals"]["kr_forward"][k]
        assert iv["abstain"]["value"] == pytest.approx(summary["abstain"]["kr_forward"][k])
        assert iv["accuracy"]["value"] == pytest.approx(summary["kr_forward"][k]["accuracy"])
        assert iv["accuracy"]["n"] == 60 and iv["accuracy"]["low"] <= iv["accuracy"]["value"] <= iv["accuracy"]["high"]
        assert iv["accuracy_when_answering"]["n"] == 60 - round(60 * summary["abstain"]["kr_forward"][k])
    assert summary["abstain"]["bayes"]["16"] == 0.0
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects the option before anything runs
        main(["theorem", "--shots", "1,x", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--shots: expected comma-separated numbers, got '1,x'" in capsys.readouterr().err


@pytest.mark.tl3_only(reason="tiny synthetic model on backend='hooked', gone in TL 4")
def test_theorem_study_with_a_given_model_and_validation():
    world = make_world()
    model = _tiny_synthetic_model(world)
    before = H.active_hook_count(model)
    report = get_study("theorem")(
        {"shots": (1, 4), "n": 40, "features": ("forward",), "model_shots": (2, 4, 1000), "model_n": 12},
        model=model, progress=False,
    )
    assert H.active_hook_count(model) == before
    assert set(report.tables) == {"theorem", "model"}
    assert set(report.summary["model_behaviour"]) == {2, 4}  # 1000 shots exceed the context: left out
    assert set(report.summary["kr_forward"]) == {1, 4} and "theorem" in report.figures()
    assert report.line().startswith("Theorem 1 simulation, 4 shots: accuracy bayes")
    for bad in ({"features": ("backward",)}, {"n": 0}, {"shots": (-1,)}, {"model": "synthetic-gpt-neo", "device": "gpu"}):
        with pytest.raises(InvalidOptionError):
            TheoremConfig.from_dict(bad)
    assert TheoremConfig().model is None and TheoremConfig().shots == (1, 2, 4, 8, 16, 32, 64, 128, 256)
