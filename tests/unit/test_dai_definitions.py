"""Dai et al.'s SimAOU, SimAM and Kendall on a toy two-head case worked out by hand, and the lr -> 0 control.

The toy case (one query, two layers, two heads, d_model = d_head = 2) is fed to the real comparison
pipeline through stand-ins for the model runs (`record`, `finetune`, `kv_weights`), so the test
checks what `compare_icl_with_finetuning` reports under its *default* definition: it fails on a
pipeline whose default SimAM is the cosine of softmax weights (or whose SimAOU skips the L2
normalisation) and passes on the official definitions.

Prompts (``first-label`` recording position, so the appended label token is the recording token):

* ICL: ``[BOS] d1 d2 d3 | y | sep q1 q2`` (8 tokens) + the first label token L: recording position 8,
  keys ``BOS d1 d2 d3 y sep q1 q2 L`` (9); demonstration tokens at positions 1..4;
* ZSL and FT: ``[BOS] q1 q2`` + L: recording position 3, keys ``BOS q1 q2 L`` (4).

Scores are integer multiples of c = ln 2, so that softmax weights are powers of two over their sum
(cosines are scale-free, so neither c nor the sums matter).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_tiny

from icl_kernels.cli import main
from icl_kernels.data.prompts import IclPrompt
from icl_kernels.data.synthetic_world import make_world
from icl_kernels.engine import hooks as H
from icl_kernels.finetuning import dai_metrics
from icl_kernels.finetuning.dai_definitions import kendall, simam, simam_span, simaou
from icl_kernels.finetuning.dai_metrics import ComparisonSettings, Episode, compare_icl_with_finetuning
from icl_kernels.finetuning.finetune import FinetuneResult, finetune, kv_parameters
from icl_kernels.finetuning.recording import Record, record, recording_tokens
from icl_kernels.studies.compare import CompareConfig, synthetic_episodes
from icl_kernels.utils.errors import InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = math.log(2.0)
TOL = 1e-10  # float64 identities

ICL_PROMPT = IclPrompt(
    tokens=(0, 11, 12, 13, 14, 15, 21, 22), demo_input_spans=((1, 4),), demo_label_spans=((4, 5),),
    separator_spans=((5, 6),), demo_labels=(0,), query_span=(6, 8), bos_position=0,
)
ZSL_PROMPT = IclPrompt(
    tokens=(0, 21, 22), demo_input_spans=(), demo_label_spans=(), separator_spans=(), demo_labels=(),
    query_span=(1, 3), bos_position=0,
)
LABEL_IDS = [[5], [6]]

# --- scores of the recording position, in units of c; layer 1 = layer 0 with its heads swapped ----
#            BOS  d1  d2  d3  y   sep q1  q2  L
ICL_H0 = [0, 4, 0, 1, 3, 0, 1, 2, 1]
ICL_H1 = [0, -1, 2, 0, 2, 0, 0, 1, -1]
#            BOS q1  q2  L
ZSL_H0 = [0, 2, 1, 1]
ZSL_H1 = [0, 2, 0, -1]
FT_H0 = [0, 1, 2, 1]
FT_H1 = [0, 1, 1, -1]

# SimAM, official: cosine of the raw scores on keys q1 q2 L (the recording token L included)
#   before, head 0: cos([1,2,1], [2,1,1]) = (2+2+1) / (sqrt6 sqrt6) = 5/6
#   before, head 1: cos([0,1,-1], [2,0,-1]) = (0+0+1) / (sqrt2 sqrt5) = 1/sqrt10
#   after,  head 0: cos([1,2,1], [1,2,1]) = 1
#   after,  head 1: cos([0,1,-1], [1,1,-1]) = (0+1+1) / (sqrt2 sqrt3) = 2/sqrt6
OFFICIAL_BEFORE = (5 / 6, 1 / math.sqrt(10))
OFFICIAL_AFTER = (1.0, 2 / math.sqrt(6))
# SimAM, softmax-weights: softmax over all keys, then keys q1 q2 only; weights are 2^score / sum
#   before, head 0: ICL (2, 4)/12 vs ZSL (4, 2)/9: cos = (8+8) / (sqrt20 sqrt20) = 0.8
#   before, head 1: ICL (1, 2)/sum vs ZSL (4, 1)/sum: cos = (4+2) / (sqrt5 sqrt17) = 6/sqrt85
#   after,  head 0: ICL (2, 4) vs FT (2, 4): cos = 1
#   after,  head 1: ICL (1, 2) vs FT (2, 2): cos = (2+4) / (sqrt5 sqrt8) = 6/sqrt40
SOFTMAX_BEFORE = (0.8, 6 / math.sqrt(85))
SOFTMAX_AFTER = (1.0, 6 / math.sqrt(40))

# --- attention outputs [layer, d_model] -------------------------------------------------------------
H_ZSL = [[3.0, 4.0], [1.0, 0.0]]
H_ICL = [[0.0, 2.0], [2.0, 0.0]]
H_FT = [[4.0, 3.0], [0.0, 1.0]]
# SimAOU, official (normalise, then subtract):
#   layer 0: n(zsl) = (.6, .8), n(icl) = (0, 1), n(ft) = (.8, .6);
#            icl update (-.6, .2), ft update (.2, -.2): dot = -.12 - .04 = -.16,
#            norms sqrt(.4) sqrt(.08) = sqrt(.032): cos = -.16 / sqrt(.032) = -2/sqrt5
#   layer 1: n(icl) = n(zsl) = (1, 0): the ICL update is zero: undefined (NaN)
OFFICIAL_SIMAOU = (-2 / math.sqrt(5), float("nan"))
# SimAOU, softmax-weights (raw differences):
#   layer 0: icl update (-3, -2), ft update (1, -1): cos = (-3+2) / (sqrt13 sqrt2) = -1/sqrt26
#   layer 1: icl update (1, 0), ft update (-1, 1): cos = -1 / (1 sqrt2) = -1/sqrt2
RAW_SIMAOU = (-1 / math.sqrt(26), -1 / math.sqrt(2))

# --- Kendall: queries ---------------------------------------------------------------------------------
# training queries Q'[token, head, :]: head 0 = (u_t, 7), head 1 = (9, w_t); u = (1,1,2,2), w = (1,0,1,2)
U, W = (1.0, 1.0, 2.0, 2.0), (1.0, 0.0, 1.0, 2.0)
TRAIN_Q = torch.tensor([[[u, 7.0], [9.0, w]] for u, w in zip(U, W)], dtype=torch.float64)  # [tok head d]
# finetuned query q[head, :]: layer 0 head 0 = (1, 0), head 1 = (0, 1); layer 1 = minus layer 0
FT_Q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)
# ICL side = scores to d1 d2 d3 y summed over heads: (4-1, 0+2, 1+0, 3+2) = (3, 2, 1, 5) (both layers)
# FT side, layer 0 = u + w = (2, 1, 3, 4); layer 1 = -(2, 1, 3, 4)
# layer 0 pairs (i<j), sign(dx) sign(dy): (0,1) -,- C; (0,2) -,+ D; (0,3) +,+ C; (1,2) -,+ D;
#   (1,3) +,+ C; (2,3) +,+ C: 4 concordant, 2 discordant, no ties: tau = (4-2)/6 = 1/3; layer 1: -1/3
KENDALL = (1 / 3, -1 / 3)


def _scores(h0, h1) -> torch.Tensor:
    """[layer, head, key] in float64; layer 1 has the heads swapped."""
    layer0 = torch.tensor([h0, h1], dtype=torch.float64) * C
    return torch.stack([layer0, layer0.flip(0)])


def _record(scores, attn_out, q, width) -> Record:
    return Record(label_log_probs=torch.tensor([0.0, -1.0], dtype=torch.float64),
                  attn_out=torch.tensor(attn_out, dtype=torch.float64), scores=scores, q=q,
                  prediction_position=width - 2, recording_position=width - 1)


ZERO_Q = torch.zeros(2, 2, 2, dtype=torch.float64)
RECORDS = {
    "icl": _record(_scores(ICL_H0, ICL_H1), H_ICL, ZERO_Q, 9),
    "zsl": _record(_scores(ZSL_H0, ZSL_H1), H_ZSL, ZERO_Q, 4),
    "ft": _record(_scores(FT_H0, FT_H1), H_FT, FT_Q, 4),
}


class _FakeTuned(FinetuneResult):
    """Stands for a finetuning result: at lr 0 the original model, else the finetuned one."""

    def all_queries(self):
        return torch.stack([TRAIN_Q, TRAIN_Q])  # [layer tok head d]

    @contextlib.contextmanager
    def applied(self):
        yield self.base if self.lr == 0 else "finetuned"


def _toy_pipeline(monkeypatch, **settings):
    model = SimpleNamespace(cfg=SimpleNamespace(n_layers=2, n_heads=2))

    def fake_record(run_model, tokens, prediction_position, recording_position, label_tokens, with_kv=False, what="the run",
                    prefix=None):
        if run_model == "finetuned":
            return RECORDS["ft"]
        return RECORDS["icl" if len(tokens) == 9 else "zsl"]

    monkeypatch.setattr(dai_metrics, "record", fake_record)
    monkeypatch.setattr(dai_metrics, "finetune", lambda m, seqs, lr, record_queries=True: _FakeTuned(m, {}, lr, []))
    monkeypatch.setattr(dai_metrics, "kv_weights", lambda m, layer: (torch.zeros(2, 2), torch.zeros(2, 2)))
    episode = Episode([ICL_PROMPT], [ZSL_PROMPT], [0], [[0, 11, 12, 13, 14]])
    # no model to run a shared demonstration prefix on: every ICL prompt is "recorded" in full
    cfg = ComparisonSettings(position="first-label", lr=0.1, direct=False, prefix_reuse=False, **settings)
    return compare_icl_with_finetuning(model, [episode], LABEL_IDS, cfg, progress=False)


def _per_head(result, name):
    return {(r["layer"], r["head"]): r[name] for r in result.heads}


def test_default_definitions_are_the_official_ones(monkeypatch):
    """The pipeline's default SimAM / SimAOU are the official ones (fails on softmax weights)."""
    result = _toy_pipeline(monkeypatch)
    before, after = _per_head(result, "simam_before"), _per_head(result, "simam_after")
    for head in (0, 1):  # layer 1 has the heads of layer 0 swapped
        assert before[(0, head)] == pytest.approx(OFFICIAL_BEFORE[head], abs=TOL)
        assert before[(1, 1 - head)] == pytest.approx(OFFICIAL_BEFORE[head], abs=TOL)
        assert after[(0, head)] == pytest.approx(OFFICIAL_AFTER[head], abs=TOL)
    assert result.metrics["simam_before"] == pytest.approx(sum(OFFICIAL_BEFORE) / 2, abs=TOL)
    assert result.metrics["simam_after"] == pytest.approx(sum(OFFICIAL_AFTER) / 2, abs=TOL)
    layers = {r["layer"]: r for r in result.layers}
    assert layers[0]["simaou"] == pytest.approx(OFFICIAL_SIMAOU[0], abs=TOL)
    assert math.isnan(layers[1]["simaou"])
    assert result.metrics["simaou"] == pytest.approx(OFFICIAL_SIMAOU[0], abs=TOL)  # NaN layer left out
    for layer in (0, 1):
        assert layers[layer]["kendall"] == pytest.approx(KENDALL[layer], abs=TOL)


def test_both_definitions_are_reported_side_by_side(monkeypatch):
    result = _toy_pipeline(monkeypatch, definition="softmax-weights")
    m = result.metrics
    assert m["definition"] == "softmax-weights"
    assert m["simam_before"] == m["simam_before_softmax_weights"] == pytest.approx(sum(SOFTMAX_BEFORE) / 2, abs=TOL)
    assert m["simam_after_softmax_weights"] == pytest.approx(sum(SOFTMAX_AFTER) / 2, abs=TOL)
    assert m["simam_before_official"] == pytest.approx(sum(OFFICIAL_BEFORE) / 2, abs=TOL)
    assert m["simam_after_official"] == pytest.approx(sum(OFFICIAL_AFTER) / 2, abs=TOL)
    assert m["simaou"] == m["simaou_softmax_weights"] == pytest.approx(sum(RAW_SIMAOU) / 2, abs=TOL)
    assert m["simaou_official"] == pytest.approx(OFFICIAL_SIMAOU[0], abs=TOL)
    heads = _per_head(result, "simam_before_softmax_weights")
    assert heads[(0, 1)] == heads[(1, 0)] == pytest.approx(SOFTMAX_BEFORE[1], abs=TOL)


def test_pure_definitions_on_the_toy_case():
    icl, zsl, ft = RECORDS["icl"], RECORDS["zsl"], RECORDS["ft"]
    official = simaou(icl.attn_out, zsl.attn_out, ft.attn_out, "official")
    assert float(official[0]) == pytest.approx(OFFICIAL_SIMAOU[0], abs=TOL) and math.isnan(float(official[1]))
    raw = simaou(icl.attn_out, zsl.attn_out, ft.attn_out, "softmax-weights")
    assert raw.tolist() == pytest.approx(list(RAW_SIMAOU), abs=TOL)
    for definition, want_before, want_after in (("official", OFFICIAL_BEFORE, OFFICIAL_AFTER),
                                                ("softmax-weights", SOFTMAX_BEFORE, SOFTMAX_AFTER)):
        span_icl, span_zsl = simam_span(ICL_PROMPT, 8, definition), simam_span(ZSL_PROMPT, 3, definition)
        assert (span_icl, span_zsl) == (((6, 9), (1, 4)) if definition == "official" else ((6, 8), (1, 3)))
        before = simam(icl.scores, span_icl, zsl.scores, span_zsl, definition)
        after = simam(icl.scores, span_icl, ft.scores, span_zsl, definition)
        assert before[0].tolist() == pytest.approx(list(want_before), abs=TOL)
        assert before[1].tolist() == pytest.approx(list(want_before)[::-1], abs=TOL)
        assert after[0].tolist() == pytest.approx(list(want_after), abs=TOL)
    # at the prediction position the official slice is the query's tokens (the last is the recording one)
    assert simam_span(ZSL_PROMPT, 2, "official") == simam_span(ZSL_PROMPT, 2, "softmax-weights") == (1, 3)
    for layer in (0, 1):
        tau, icl_side = kendall(icl.scores[layer][:, 1:5], TRAIN_Q, FT_Q[layer])
        assert tau == pytest.approx(KENDALL[layer], abs=TOL)
        assert (icl_side / C).tolist() == pytest.approx([3.0, 2.0, 1.0, 5.0], abs=TOL)
    # a key masked in one run (a local window) is left out of both official score vectors
    masked = zsl.scores.clone()
    masked[0, 0, 1] = float("-inf")  # q1 of head 0: cos([2,1], [1,1]) over q2 L = 3 / (sqrt5 sqrt2)
    assert float(simam(icl.scores, (6, 9), masked, (1, 4))[0, 0]) == pytest.approx(3 / math.sqrt(10), abs=TOL)
    with pytest.raises(InvalidOptionError, match="definition"):
        simaou(icl.attn_out, zsl.attn_out, ft.attn_out, "softmax")
    with pytest.raises(ValueError, match="equal length"):
        simam(icl.scores, (6, 9), zsl.scores, (1, 3))


def test_controls_on_the_toy_case(monkeypatch):
    """lr -> 0: FT is the original model, so SimAM after = before, SimAOU undefined, Kendall from
    the original query (zeros here: a constant FT side, undefined)."""
    result = _toy_pipeline(monkeypatch)
    lr0 = result.metrics["controls"]["lr0"]
    assert lr0["lr"] == 0.0 and lr0["ft_dwk_norm"] == 0.0 and lr0["ft_dwv_norm"] == 0.0
    simam_after = lr0["metrics"]["simam_after_official"]
    assert simam_after["control"] == pytest.approx(sum(OFFICIAL_BEFORE) / 2, abs=TOL)
    # trained minus control = SimAM after minus before, paired over the one query
    want = (sum(OFFICIAL_AFTER) - sum(OFFICIAL_BEFORE)) / 2
    assert simam_after["difference"]["value"] == pytest.approx(want, abs=TOL)
    assert simam_after["difference"]["verdict"] == "differs from the lr -> 0 control"  # one query: a point
    assert lr0["metrics"]["simaou_official"]["difference"]["verdict"] == "undefined at lr 0"
    assert "mismatched" not in result.metrics["controls"]  # one demonstration set only
    assert result.examples[0]["lr0_ft_pred"] == result.examples[0]["zsl_pred"]


def test_lr0_control_equals_its_definition_on_a_tiny_model():
    """The lr -> 0 control of a real run equals the metric with FT := the original model, computed here
    from the original model's own runs (float64, 1e-10)."""
    model = load_tiny("gpt-neo", dtype=torch.float64)
    cfg = CompareConfig.from_dict(dict(model="tiny-gpt-neo", shots=3, n_test=4, seed=0, episodes=2, lr=0.05))
    episodes, label_ids = synthetic_episodes(make_world(), model.cfg.n_ctx, cfg)
    result = compare_icl_with_finetuning(model, episodes, label_ids, ComparisonSettings(lr=0.05, direct=False, prefix_reuse=False),
                                         progress=False)
    lr0 = result.metrics["controls"]["lr0"]
    # learning rate 0 leaves every key/value weight exactly as it was
    tuned = finetune(model, episodes[0].train_sequences, 0.0)
    params = kv_parameters(model)
    assert all(torch.equal(tuned.state[name], params[name]) for name in params)
    assert lr0["ft_dwk_norm"] == 0.0 and lr0["ft_dwv_norm"] == 0.0
    # the definition: FT := the original model; training queries := the original model's queries
    label_tokens = [ids[0] for ids in label_ids]
    kendall_rows, simam_rows, right = [], [], []
    for episode in episodes:
        train_q = []
        for seq in episode.train_sequences:  # gpt-neo has no rotary: the position-free frame is hook_q
            _, cache = model.run_with_cache(torch.tensor([seq]))
            train_q.append(torch.stack([cache[H.act_name("q", layer)][0, 1:] for layer in range(model.cfg.n_layers)]))
        train_q = torch.cat(train_q, dim=1)
        for icl_p, zsl_p, gold in zip(episode.icl_prompts, episode.zsl_prompts, episode.gold):
            icl = record(model, *recording_tokens(icl_p, "prediction", label_tokens[0]), label_tokens)
            zsl = record(model, *recording_tokens(zsl_p, "prediction", label_tokens[0]), label_tokens)
            demo = torch.cat([torch.arange(a, b) for a, b in icl_p.demo_spans])
            kendall_rows.append([kendall(icl.scores[layer][:, demo], train_q[layer], zsl.q[layer])[0]
                                 for layer in range(model.cfg.n_layers)])
            spans = simam_span(icl_p, icl.recording_position, "official"), simam_span(zsl_p, zsl.recording_position,
                                                                                      "official")
            simam_rows.append(simam(icl.scores, spans[0], zsl.scores, spans[1]).numpy())
            right.append(float(int(zsl.label_log_probs.argmax()) == gold))
    want_kendall = float(np.nanmean(np.nanmean(np.array(kendall_rows), 0)))
    assert lr0["metrics"]["kendall"]["control"] == pytest.approx(want_kendall, abs=TOL)
    want_simam = float(np.nanmean(np.nanmean(np.nanmean(np.array(simam_rows), 0), -1)))
    assert lr0["metrics"]["simam_after_official"]["control"] == pytest.approx(want_simam, abs=TOL)
    assert want_simam == pytest.approx(result.metrics["simam_before_official"], abs=TOL)
    assert lr0["metrics"]["ft_accuracy"]["control"] == pytest.approx(np.mean(right), abs=TOL)
    assert math.isnan(lr0["metrics"]["simaou_official"]["control"])  # h_FT == h_ZSL exactly
    # trained minus control is paired and its interval says how it was made
    diff = lr0["metrics"]["kendall"]["difference"]
    assert diff["value"] == pytest.approx(result.metrics["kendall"] - want_kendall, abs=TOL)
    assert diff["method"] == "t(G-1) on cluster values" and diff["n"] == 2 and diff["n_rows"] == 4
    assert diff["verdict"] in ("not informative here", "differs from the lr -> 0 control")
    mismatched = result.metrics["controls"]["mismatched"]
    assert mismatched["lr"] == 0.05 and mismatched["ft_dwk_norm"] > 0
    assert set(mismatched["metrics"]) == set(lr0["metrics"])


def test_definition_is_a_compare_option(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--definition" in text and "official" in text and "softmax-weights" in text and "--no-controls" in text
    assert CompareConfig().definition == "official"
    with pytest.raises(InvalidOptionError, match="definition"):
        CompareConfig(definition="softmax")
    with pytest.raises(InvalidOptionError, match="definition"):
        ComparisonSettings(definition="pre-softmax")
