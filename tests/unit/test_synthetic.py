"""Tests of the synthetic mixture-of-HMMs world, its exact Bayes predictor and the shipped GPT-Neo."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from safetensors.torch import load_file

from experiments import train_synthetic
from icl_kernels.data.synthetic_bayes import (
    accuracy,
    accuracy_vs_shots,
    bayes_document_nll,
    bayes_label_probs,
    bayes_predictive,
    plot_accuracy_vs_shots,
)
from icl_kernels.data.synthetic_world import SyntheticWorld, WorldConfig, load_world, make_world
from icl_kernels.utils.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[2]

TINY_RANDOM = WorldConfig(n_concepts=3, n_states=3, vocab_size=3, x_len=2, structure="random", branching=2,
                          trans_smoothing=0.1, emit_smoothing=0.2, start_support=2, seg_len_max=4, seed=3)
TINY_LAYERED = WorldConfig(n_concepts=2, n_states=6, vocab_size=2, x_len=2, branching=1, seg_len_max=4, seed=5)


# ---------------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [WorldConfig(), TINY_RANDOM, TINY_LAYERED, WorldConfig(structure="random")])
def test_rows_are_distributions(cfg):
    w = make_world(cfg)
    for arr in (w.start, w.trans, w.emit):
        assert (arr >= 0).all()
        np.testing.assert_allclose(arr.sum(-1), 1.0, atol=1e-12)
    assert w.trans.shape == (cfg.n_concepts, cfg.n_states, cfg.n_states)
    assert w.emit.shape == (cfg.n_states, cfg.vocab_size)


def test_generator_is_deterministic_per_seed():
    a, b, c = make_world(), make_world(), make_world(seed=1)
    assert a.checksum() == b.checksum() != c.checksum()
    d1, c1 = a.sample_documents(4, np.random.default_rng(7))
    d2, c2 = b.sample_documents(4, np.random.default_rng(7))
    d3, _ = a.sample_documents(4, np.random.default_rng(8))
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(d1, d3)
    p1, p2 = (a.sample_prompts(5, 3, np.random.default_rng(11)) for _ in range(2))
    np.testing.assert_array_equal(p1.tokens, p2.tokens)
    np.testing.assert_array_equal(p1.labels, p2.labels)


def test_document_and_prompt_layout():
    w = make_world()
    cfg = w.config
    docs, _ = w.sample_documents(8, np.random.default_rng(0))
    assert docs.shape == (8, cfg.doc_len) and (docs[:, 0] == w.delim_id).all()
    for row in docs:  # sequence lengths between delimiters stay in range (the last one may be cut)
        cuts = np.flatnonzero(row == w.delim_id)
        lens = np.diff(cuts) - 1
        assert lens.min() >= cfg.seg_len_min and lens.max() <= cfg.seg_len_max
    pb = w.sample_prompts(6, 4, np.random.default_rng(0))
    L = cfg.x_len
    assert pb.tokens.shape == (6, w.prompt_len(4)) == (6, 1 + 4 * (L + 2) + L)
    assert (pb.tokens[:, 0] == w.delim_id).all()
    assert (pb.tokens[:, pb.label_positions + 1] == w.delim_id).all()
    assert (pb.tokens[:, pb.x_positions] != w.delim_id).all()
    assert (pb.tokens[:, pb.label_positions] != w.delim_id).all()
    assert pb.labels.max() < w.vocab_size


def test_world_json_roundtrip(tmp_path):
    w = make_world(WorldConfig(n_concepts=4, seed=9))
    w.to_json(tmp_path / "world.json")
    w2 = load_world(tmp_path)  # a folder works as well as the file
    assert w2.checksum() == w.checksum()
    np.testing.assert_array_equal(SyntheticWorld.from_json(tmp_path / "world.json").trans, w.trans)
    d = json.loads((tmp_path / "world.json").read_text())
    d["sha256_float64_arrays"] = "0" * 64
    (tmp_path / "world.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="different parameters"):
        load_world(tmp_path)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="divisible"):
        WorldConfig(n_states=30, x_len=3)
    with pytest.raises(ValueError, match="structure"):
        WorldConfig(structure="tree")


# ---------------------------------------------------------------------------------------------------
# exact Bayes predictor
# ---------------------------------------------------------------------------------------------------


def _brute_force_predictive(w: SyntheticWorld, tokens: list[int]) -> np.ndarray:
    """P(next non-delimiter token | tokens) by enumerating every hidden path of every sequence."""
    C, S, V = w.n_concepts, w.n_states, w.vocab_size
    segs, cur = [], []
    for t in tokens:
        if t == w.delim_id:
            if cur:
                segs.append(cur)
            cur = []
        else:
            cur.append(t)

    def seq_prob(c: int, seq: list[int]) -> float:
        total = 0.0
        for path in itertools.product(range(S), repeat=len(seq)):
            p = w.start[c, path[0]] * w.emit[path[0], seq[0]]
            for i in range(1, len(seq)):
                p *= w.trans[c, path[i - 1], path[i]] * w.emit[path[i], seq[i]]
            total += p
        return total

    joint = np.zeros(V)
    for c in range(C):
        closed = w.concept_prior[c] * np.prod([seq_prob(c, s) for s in segs])
        for v in range(V):
            joint[v] += closed * seq_prob(c, cur + [v])
    return joint / joint.sum()


@pytest.mark.parametrize("cfg", [TINY_RANDOM, TINY_LAYERED])
def test_bayes_equals_brute_force(cfg):
    w = make_world(cfg)
    rng = np.random.default_rng(0)
    d = w.delim_id
    seqs = [
        [d],
        [d, 0],
        [d, 1, 2 % w.vocab_size, d, 0, 1, d, 1],
        [0, 1, d, d, 1],  # no leading delimiter; an empty sequence between two delimiters
    ]
    for _ in range(4):
        docs, _ = w.sample_documents(1, rng, doc_len=9)
        seqs.append(docs[0].tolist())
    for s in seqs:
        got = bayes_predictive(w, np.array([s]))[0]
        np.testing.assert_allclose(got, _brute_force_predictive(w, s), rtol=0, atol=1e-9)
    # every position of one sequence at once
    s = seqs[-1]
    allp = bayes_predictive(w, np.array([s]), all_positions=True)[0]
    for t in range(len(s)):
        np.testing.assert_allclose(allp[t], _brute_force_predictive(w, s[: t + 1]), rtol=0, atol=1e-9)
    # prompts: the label predictive
    pb = w.sample_prompts(3, 2, rng)
    probs = bayes_label_probs(w, pb)
    for i in range(3):
        np.testing.assert_allclose(probs[i], _brute_force_predictive(w, pb.tokens[i].tolist()), atol=1e-9)


def test_oracle_prior_and_posterior():
    w = make_world(TINY_RANDOM)
    pb = w.sample_prompts(4, 3, np.random.default_rng(1))
    one_hot = np.eye(w.n_concepts)[pb.concepts]
    _, post = bayes_predictive(w, pb.tokens, concept_prior=one_hot, return_posterior=True)
    np.testing.assert_allclose(post, one_hot, atol=1e-12)
    _, post = bayes_predictive(w, pb.tokens, return_posterior=True)
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-12)


def test_bayes_accuracy_rises_with_k():
    # default world, n=1500 per k (s.e. <= 0.013). Measured with these seeds: k=0 0.311, k=1 0.645,
    # k=4 0.850, k=16 0.877; the asserted gaps are far below the measured ones.
    w = make_world()
    acc = {}
    for k in (0, 1, 4, 16):
        pb = w.sample_prompts(1500, k, np.random.default_rng([42, k]))
        acc[k] = accuracy(bayes_label_probs(w, pb), pb.labels)
    assert acc[1] > acc[0] + 0.15
    assert acc[4] > acc[1] + 0.10
    assert acc[16] > acc[0] + 0.40
    assert acc[0] < 0.45  # the concept matters: x alone says little


def test_document_nll_floor_below_unigram():
    w = make_world()
    docs, _ = w.sample_documents(8, np.random.default_rng(3))
    floor = bayes_document_nll(w, docs)
    assert 0.5 < floor < np.log(w.n_tokens)


def test_plot_returns_figure():
    df = accuracy_vs_shots(make_world(), shots=(0, 2), n=50)
    fig = plot_accuracy_vs_shots(df)
    assert isinstance(fig, go.Figure) and len(fig.data) == 2
    with pytest.raises(ValueError, match="columns"):
        plot_accuracy_vs_shots(df.drop(columns=["accuracy"]))


def test_accuracy_vs_shots_carries_the_wilson_interval_of_its_count():
    df = accuracy_vs_shots(make_world(), shots=(0, 2), n=50)
    for r in df.itertuples():
        correct = round(r.accuracy * 50)
        assert r.accuracy == pytest.approx(correct / 50)
        assert (r.low, r.high) == pytest.approx(wilson_interval(correct, 50))
        assert r.low <= r.accuracy <= r.high and r.high - r.low < 0.4


# ---------------------------------------------------------------------------------------------------
# training script: resumable and exact
# ---------------------------------------------------------------------------------------------------


def test_training_resume_equals_uninterrupted(tmp_path):
    torch = pytest.importorskip("torch")

    common = ["--n-layers", "2", "--d-model", "16", "--n-heads", "2", "--window-size", "8", "--doc-len", "32",
              "--batch-size", "2", "--steps", "6", "--save-every", "2", "--log-every", "1", "--eval-every", "0",
              "--warmup-steps", "2", "--n-concepts", "2"]
    threads = torch.get_num_threads()
    try:
        train_synthetic.main(common + ["--out-dir", str(tmp_path / "a")])
        train_synthetic.main(common + ["--out-dir", str(tmp_path / "b"), "--stop-after", "3"])
        assert not (tmp_path / "b" / "final").exists()
        train_synthetic.main(common + ["--out-dir", str(tmp_path / "b")])
    finally:
        torch.set_num_threads(threads)
    wa = load_file(tmp_path / "a" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)

    la, lb = (pd.read_csv(tmp_path / d / "loss_log.csv") for d in ("a", "b"))
    pd.testing.assert_frame_equal(la[["step", "loss", "lr"]], lb[["step", "loss", "lr"]])
    cfg = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoForCausalLM"]
    assert load_world(tmp_path / "a" / "final").checksum() == make_world(
        WorldConfig(n_concepts=2, doc_len=32)).checksum()
    with pytest.raises(ValueError, match="different config"):
        train_synthetic.main(common + ["--out-dir", str(tmp_path / "a"), "--lr", "0.5"])
