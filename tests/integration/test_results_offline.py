"""Every figure shipped in results/ opens offline: no remote script, and the plotly.js it loads exists."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from icl_kernels.utils.plotting import metric_controls_figure

RESULTS = Path(__file__).resolve().parents[2] / "results"


def test_shipped_figures_load_no_remote_script():
    pages = sorted(RESULTS.rglob("*.html"))
    assert pages, "no figure in results/"
    for page in pages:
        text = page.read_text(encoding="utf-8")
        sources = re.findall(r'<script[^>]*\ssrc="([^"]+)"', text)
        assert not [s for s in sources if "//" in s], f"{page} loads a remote script"
        for src in sources:
            assert (page.parent / src).is_file(), f"{page}: {src} is missing"
        assert sources, f"{page} loads no plotly.js"


def test_metric_controls_figure_draws_each_interval_around_its_bar():
    frame = pd.DataFrame([
        dict(run="a", metric="SimAOU", condition="trained", value=0.4, low=0.3, high=0.45),
        dict(run="a", metric="SimAOU", condition="untrained model", value=0.1, low=0.0, high=0.3),
        dict(run="a", metric="Kendall tau", condition="trained", value=0.15, low=0.1, high=0.2),
    ])
    fig = metric_controls_figure(frame)
    bars = {(t.xaxis, t.name): t for t in fig.data}
    assert set(bars) == {("x", "trained"), ("x", "untrained model"), ("x2", "trained")}
    untrained = bars[("x", "untrained model")]
    assert list(untrained.y) == [0.1]
    assert list(untrained.error_y.array) == pytest.approx([0.2]) and list(untrained.error_y.arrayminus) == pytest.approx([0.1])
    with pytest.raises(ValueError, match="condition"):
        metric_controls_figure(frame.drop(columns="condition"))


def test_metric_controls_figure_lists_each_condition_once_even_when_a_later_panel_brings_it():
    frame = pd.DataFrame([
        dict(run="a", metric="SimAOU", condition="trained", value=0.4),
        dict(run="a", metric="Kendall tau", condition="trained", value=0.15),
        dict(run="a", metric="Kendall tau", condition="lr -> 0", value=0.14),
    ])
    shown = [t.name for t in metric_controls_figure(frame).data if t.showlegend]
    assert shown == ["trained", "lr -> 0"]
