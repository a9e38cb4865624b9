"""Every figure says what it shows: a title, a title on every axis, a colour bar on every heat map,
one colour per legend entry in every panel, and a trace named ``baseline...`` where a baseline is
drawn. Each figure function is built on small synthetic data (no model)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from icl_kernels.kernel.theorem_one import theorem_figure
from icl_kernels.studies.compare import compare_figures
from icl_kernels.studies.families import FamiliesConfig, FamiliesReport
from icl_kernels.studies.heads import HeadsConfig, HeadsReport, head_matrix
from icl_kernels.studies.momentum import momentum_heatmap
from icl_kernels.sweeps.summary import causal_figure, heads_figure, layers_figure
from icl_kernels.utils.plotting import (
    accuracy_vs_shots_figure,
    attention_map_figure,
    layer_head_heatmaps,
    metric_controls_figure,
    probe_figure,
)

AXIS = re.compile(r"^[xy]axis\d*$")
rng = np.random.default_rng(0)


def assert_labelled(fig: go.Figure) -> None:
    """A title, a title on every axis, and a colour bar on every heat map."""
    layout = fig.layout.to_plotly_json()
    assert (layout.get("title") or {}).get("text"), "figure without a title"
    axes = [k for k in layout if AXIS.match(k)]
    assert axes, "figure without axes"
    for key in axes:
        assert (layout[key].get("title") or {}).get("text"), f"{key} has no title"
    for trace in fig.data:
        if trace.type == "heatmap":
            assert trace.showscale is not False, f"heat map {trace.name!r} without a colour bar"


def assert_legend_colours_match(fig: go.Figure) -> None:
    """Traces of one legend group (one legend entry) have one colour in every panel."""
    colours: dict[str, set] = {}
    for trace in fig.data:
        if trace.type == "scatter" and trace.legendgroup:
            colours.setdefault(trace.legendgroup, set()).add(trace.line.color)
    assert colours
    for group, seen in colours.items():
        assert len(seen) == 1 and None not in seen, f"legend entry {group!r} drawn in colours {seen}"


def baseline_names(fig: go.Figure) -> list[str]:
    names = [t.name for t in fig.data if t.name and t.name.startswith("baseline")]
    names += [s.name for s in fig.layout.shapes if s.name and s.name.startswith("baseline")]
    return names


def test_layer_head_heatmaps_every_panel_has_a_colour_bar_and_its_baseline():
    a, b = rng.random((3, 4)), rng.random((3, 4))
    fig = layer_head_heatmaps({"a": a, "b": b}, "maps", colorbar_title="agreement", baselines={"a": 0.6, "b": 0.3},
                              intervals={"a": (a - 0.1, a + 0.1)}, baseline_name="baseline: majority", mark=(1, 2))
    assert_labelled(fig)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 2
    # each colour bar sits beside its own panel, with a tick at that panel's baseline
    assert heatmaps[0].colorbar.x < heatmaps[1].colorbar.x
    for trace, value in zip(heatmaps, (0.6, 0.3)):
        assert value in trace.colorbar.tickvals
        assert any(text.startswith("baseline") for text in trace.colorbar.ticktext)
        cut = [p for p, colour in trace.colorscale if colour == "#bdbdbd"]
        assert cut == [pytest.approx(value)]
    assert heatmaps[0].customdata is not None and heatmaps[1].customdata is None
    assert len(baseline_names(fig)) == 1 and "0.600" in baseline_names(fig)[0]
    plain = layer_head_heatmaps({"a": a}, "plain", diverging=True)
    assert_labelled(plain)
    assert baseline_names(plain) == []


def test_layer_head_heatmaps_refuses_a_baseline_for_an_unknown_panel():
    with pytest.raises(ValueError, match="not among"):
        layer_head_heatmaps({"a": np.zeros((2, 2))}, "x", baselines={"b": 0.5})


def test_own_scale_gives_each_panel_its_range():
    fig = layer_head_heatmaps({"small": np.array([[0.0, 0.1]]), "large": np.array([[5.0, 9.0]])}, "x", own_scale=True)
    ranges = [(t.zmin, t.zmax) for t in fig.data if t.type == "heatmap"]
    assert ranges == [(0.0, 0.1), (5.0, 9.0)]


def test_attention_map_figure_is_labelled():
    segments = [SimpleNamespace(name="demo", length=4), SimpleNamespace(name="query", length=2)]
    assert_labelled(attention_map_figure(rng.random((2, 2, 6)), segments, title="attention"))


def test_probe_figure_legend_matches_every_panel():
    acc = {"keys": rng.random((3, 4, 2)), "values": rng.random((3, 4, 2))}
    fig = probe_figure(acc, [-1, 0, 1], chance=0.5, title="probes")
    assert_labelled(fig)
    assert_legend_colours_match(fig)
    assert baseline_names(fig)


def test_theorem_figure_legend_matches_every_panel():
    sim = pd.DataFrame([dict(shots=k, predictor=p, accuracy=0.5 + 0.01 * k, se=0.01, agree_bayes=0.9)
                        for p in ("bayes", "oracle", "kr_forward") for k in (1, 2, 4)])
    behaviour = pd.DataFrame([dict(shots=k, metric=m, value=0.6, low=0.5, high=0.7)
                              for m in ("model_accuracy", "head_accuracy", "model_agree_bayes", "head_agree_bayes")
                              for k in (1, 2)])
    fig = theorem_figure(sim, behaviour)
    assert_labelled(fig)
    assert_legend_colours_match(fig)
    model = [t for t in fig.data if t.name == "trained model"]
    assert model and all(t.error_y.arrayminus is not None for t in model)


def test_line_and_bar_figures_are_labelled():
    frame = pd.DataFrame(dict(shots=[1, 2, 1, 2], value=[0.5, 0.6, 0.4, 0.7], series=list("aabb"), se=0.01))
    assert_labelled(accuracy_vs_shots_figure(frame))
    bars = pd.DataFrame(dict(metric=["m", "m", "n"], run=["r1", "r1", "r1"], condition=["trained", "control", "trained"],
                             value=[0.3, 0.1, 0.2], low=[0.2, np.nan, 0.1], high=[0.4, np.nan, 0.3]))
    assert_labelled(metric_controls_figure(bars))


def test_momentum_heatmap_has_colour_bars_and_intervals():
    rows = [dict(eta=e, layers=l, shots="all", delta_accuracy=0.01 * e, delta_ci_low=-0.1, delta_ci_high=0.1,
                 delta_perplexity=0.2) for e in (0.1, 0.5) for l in ("0-3", "4-7")]
    fig = momentum_heatmap(pd.DataFrame(rows))
    assert_labelled(fig)
    assert fig.data[0].customdata is not None


def test_compare_figures_are_labelled():
    layers = [dict(layer=i, simaou=0.1, simaou_random=0.0, kendall=0.2, kendall_random=0.0, simam_before=0.3,
                   simam_after=0.4) for i in range(3)]
    heads = [dict(layer=i, head=h, simam_before=0.1, simam_after=0.2, dw_cosine=0.1, dw_output_cosine=-0.1)
             for i in range(3) for h in range(2)]
    for fig in compare_figures(layers, heads, "(x)").values():
        assert_labelled(fig)


def _heads_table(n_layers=3, n_heads=2):
    rows = []
    for split, n in (("select", 20), ("report", 10)):
        for layer in range(n_layers):
            for head in range(n_heads):
                rows.append(dict(split=split, aggregation="max", layer=layer, head=head, n=n,
                                 agreement=(layer * n_heads + head) / (n_layers * n_heads), accuracy=0.5))
    return pd.DataFrame(rows)


def test_heads_report_draws_report_split_maps_with_their_baselines():
    summary = dict(model="m", task="t", shots=4, n_report=10, best_head={"max": {"layer": 1, "head": 0}},
                   held_out={"model_majority_share": {"value": 0.7}, "gold_majority_share": {"value": 0.5}})
    probes = pd.DataFrame([dict(probe=p, offset=o, layer=l, kv_head=k, accuracy=0.6)
                           for p in ("keys", "values") for o in (-1, 0) for l in range(3) for k in range(2)])
    similarity = pd.DataFrame([dict(aggregation="max", layer=l, head=h, pearson=0.1) for l in range(3) for h in range(2)])
    report = HeadsReport("heads", HeadsConfig(), {"heads": _heads_table(), "probes": probes, "kernel_similarity": similarity},
                         summary)
    figs = report.figures()
    assert set(figs) == {"heads_agreement", "heads_accuracy", "probes", "kernel_similarity"}
    for fig in figs.values():
        assert_labelled(fig)
    agreement = figs["heads_agreement"]
    assert baseline_names(agreement) and "0.700" in baseline_names(agreement)[0]
    z = np.array(agreement.data[0].z, dtype=float)
    expected, _, _ = head_matrix(_heads_table().query("split == 'report'"), "agreement")
    np.testing.assert_allclose(z, expected)  # the report split, not the selection split
    assert_legend_colours_match(figs["probes"])


def test_head_matrix_intervals_contain_the_rate():
    values, layers, (low, high) = head_matrix(_heads_table().query("split == 'report'"), "agreement")
    assert layers == [0, 1, 2]
    assert (low <= values + 1e-12).all() and (values <= high + 1e-12).all() and (high - low > 0).all()


def test_families_figures_have_colour_bars_and_baselines():
    heads = pd.DataFrame([dict(layer=l, head=h, induction=rng.random(), previous_token=rng.random())
                          for l in range(3) for h in range(2)])
    fv = pd.DataFrame([dict(vector=v, layer=l, n=10, accuracy=0.6, accuracy_low=0.4, accuracy_high=0.8)
                       for v in ("function vector", "random heads") for l in range(3)])
    tv = pd.DataFrame([dict(split=s, layer=l, n=10, accuracy=0.5) for s in ("dev", "test") for l in range(3)])
    sal = pd.DataFrame(dict(layer=range(3), text_to_label=0.1, label_to_prediction=0.2, other=0.3))
    report = FamiliesReport("families", FamiliesConfig(), {"heads": heads, "function_vectors": fv, "task_vector_layers": tv,
                                                "saliency": sal},
                            dict(model="m", task="t", shots=4, zsl_accuracy=0.55, tv_zsl_accuracy=0.5))
    figs = report.figures()
    for fig in figs.values():
        assert_labelled(fig)
    assert sum(t.type == "heatmap" for t in figs["families"].data) == 2
    assert baseline_names(figs["layers"])


def test_sweep_summary_figures_are_labelled():
    frame = pd.DataFrame(dict(cell_id=["a", "b"], model="m", task="t", shots=4, seed=0, layer=[0, 1], top_drop=[0.1, 0.2],
                              top_drop_low=[0.0, 0.1], top_drop_high=[0.2, 0.3], accuracy_drop=[0.1, 0.2],
                              drop_low=[0.0, 0.1], drop_high=[0.2, 0.3], recovery=[0.3, 0.4], report_agreement=[0.8, 0.9],
                              report_accuracy=[0.6, 0.7], icl_accuracy=[0.7, 0.7]))
    for build in (causal_figure, layers_figure, heads_figure):
        assert_labelled(build(frame))


def test_token_attention_figure_is_labelled_with_its_baseline():
    from icl_kernels.utils.plotting import token_attention_figure  # noqa: PLC0415 - next to its test

    tokens, pieces = ["a", " good", "\n", " positive", " film"], ["x_1", "x_1", "sep_1", "y_1", "query"]
    fig = token_attention_figure(tokens, np.full(5, 0.2), pieces, baseline=0.2)
    assert_labelled(fig)
    assert [t.name for t in fig.data if t.type == "bar"] == ["x", "sep", "y", "query"]
    assert baseline_names(fig)
    with pytest.raises(ValueError, match="one entry per token"):
        token_attention_figure(tokens, np.ones(4), pieces)
