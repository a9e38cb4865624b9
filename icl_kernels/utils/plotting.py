"""Figures. Every function takes plain data (tensors, arrays, tidy DataFrames) and returns a
``plotly.graph_objects.Figure``; none calls ``.show()``. Save with `write_html`, which writes pages
that open without internet: each page loads plotly.js by its plain file name from its own folder,
where one copy is kept (`ensure_plotly_js`, checked by sha256 against plotly's bundled script before
it is reused), never from a parent folder or a CDN; a folder copied elsewhere still shows its pages.

Conventions: layer x head maps put layers on the y axis (layer 0 at the bottom) and heads on the x
axis; maps of signed quantities (correlations) use a diverging scale centred at 0, maps of rates
(agreement, accuracy) a sequential scale on [0, 1].
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs, get_plotlyjs_version
from plotly.subplots import make_subplots

from icl_kernels.utils.io import atomic_write_text

__all__ = [
    "layer_head_heatmaps",
    "attention_map_figure",
    "probe_figure",
    "accuracy_vs_shots_figure",
    "metric_controls_figure",
    "colour_of",
    "token_attention_figure",
    "write_html",
    "write_image",
    "plotly_js_name",
    "ensure_plotly_js",
]


def plotly_js_name() -> str:
    """File name of the bundled plotly.js, versioned so that pages never load a mismatched copy."""
    return f"plotly-{get_plotlyjs_version()}.min.js"


@lru_cache(maxsize=1)
def _plotly_js() -> tuple[bytes, str]:
    """Plotly's bundled ``plotly.min.js`` as UTF-8 bytes, and their sha256 (computed once)."""
    data = get_plotlyjs().encode("utf-8")
    return data, hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_plotly_js(folder: str | os.PathLike) -> Path:
    """The verified copy of plotly.js in ``folder`` (named `plotly_js_name`), written if needed.

    An existing file is reused only if it is a regular file (not a link) whose sha256 equals that of
    plotly's bundled script; anything else of that name is replaced, with a warning, so a tampered
    or planted copy never runs. Parent folders are never consulted.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / plotly_js_name()
    data, expected = _plotly_js()
    if js.is_dir() and not js.is_symlink():
        raise IsADirectoryError(f"{js} is a folder: remove it so that the figures' plotly.js can be written there.")
    if js.is_symlink() or js.exists():
        if not js.is_symlink() and js.is_file() and _sha256(js) == expected:
            return js
        warnings.warn(f"{js} is not plotly's bundled plotly.min.js (its sha256 differs, or it is a link or not a "
                      "regular file): replacing it with the bundled copy.", stacklevel=2)
    atomic_write_text(js, data.decode("utf-8"))
    return js


def write_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a page that opens offline.

    The page loads plotly.js by its plain file name from its own folder, where `ensure_plotly_js`
    keeps one verified copy shared by every page in that folder; no script is loaded from a parent
    folder or fetched from the network, so the folder copied elsewhere still shows the page.
    """
    path = Path(path)
    js = ensure_plotly_js(path.parent)
    html = fig.to_html(include_plotlyjs=False, full_html=True)
    html = html.replace("<head>", f'<head><meta charset="utf-8" /><script src="{js.name}"></script>', 1)
    atomic_write_text(path, html)
    return path


def write_image(fig: go.Figure, path: str | os.PathLike, *, width: int = 1100, scale: float = 1.0) -> Path:
    """Write ``fig`` as a static image (PNG or SVG, by suffix) through kaleido, offline.

    Needs ``kaleido>=1`` and a Chrome or Chromium on this machine (Debian: ``apt-get install
    chromium``); kaleido never downloads one here.
    """
    try:
        import kaleido  # noqa: F401, PLC0415 - optional package (the figures extra)
    except ImportError as err:
        raise RuntimeError("Static figures need kaleido: pip install 'kaleido>=1' (and a local Chromium).") from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height = fig.layout.height or 500
    try:
        fig.write_image(path, width=width, height=height, scale=scale)
    except Exception as err:  # kaleido's errors for a missing browser vary by version
        if "chrome" in str(err).lower() or "browser" in str(err).lower():
            raise RuntimeError(
                f"Static export of {path.name} found no Chrome/Chromium: install one (Debian: apt-get install chromium) "
                "or set BROWSER_PATH to its executable."
            ) from err
        raise
    return path


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


#: One colour per series, reused by every panel of a figure so that the legend names each colour once.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def colour_of(i: int) -> str:
    """The ``i``-th colour of `PALETTE` (cycled)."""
    return PALETTE[i % len(PALETTE)]


def _graded_scale(zmin: float, zmax: float, baseline: float) -> list:
    """Viridis above ``baseline``, greys at or below it, on [zmin, zmax] (a colour scale with a cut)."""
    cut = float(np.clip((baseline - zmin) / ((zmax - zmin) or 1.0), 0.0, 1.0))
    viridis = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]
    scale = [[0.0, "#f0f0f0"], [cut, "#bdbdbd"]]
    if cut < 1.0:
        scale += [[cut + (1.0 - cut) * i / (len(viridis) - 1), c] for i, c in enumerate(viridis)]
    return scale


def layer_head_heatmaps(
    matrices: Mapping[str, object],
    title: str = "",
    *,
    diverging: bool = False,
    zrange: tuple[float, float] | None = None,
    layers: Sequence[int] | None = None,
    mark: tuple[int, int] | None = None,
    colorbar_title: str = "",
    baselines: Mapping[str, float] | None = None,
    baseline_name: str = "baseline",
    intervals: Mapping[str, tuple[object, object]] | None = None,
    own_scale: bool = False,
) -> go.Figure:
    """One layer x head heat map per entry of ``matrices`` (name -> [layer, head]), side by side,
    each with its own colour bar (titled ``colorbar_title``).

    ``diverging``: a red-blue scale symmetric around 0 (for correlations); otherwise viridis on
    ``zrange`` (default [0, 1]), or with ``own_scale`` on each panel's own [min, max] (scores of
    different units side by side). ``mark`` circles one (layer, head) in every panel.

    ``baselines`` (panel name -> value, e.g. the agreement of always answering the model's majority
    label): cells at or below the panel's baseline are drawn in greys, cells above it in viridis, the
    colour bar carries a tick at the baseline, and a legend entry named ``baseline_name`` says so.
    ``intervals`` (panel name -> (low, high) matrices) are shown on hover.
    """
    if not matrices:
        raise ValueError("layer_head_heatmaps needs at least one matrix.")
    names = list(matrices)
    arrays = [_np(matrices[n]) for n in names]
    for name, arr in zip(names, arrays):
        if arr.ndim != 2:
            raise ValueError(f"Matrix {name!r} must be [layer, head], got shape {arr.shape}.")
    baselines = dict(baselines or {})
    intervals = dict(intervals or {})
    unknown = sorted((set(baselines) | set(intervals)) - set(names))
    if unknown:
        raise ValueError(f"baselines / intervals name panels {unknown} that are not among {names}.")
    if diverging:
        bound = np.nanmax([np.nanmax(np.abs(a)) if np.isfinite(a).any() else 0 for a in arrays]) or 1.0
        zmin, zmax, scale = -bound, bound, "RdBu_r"
    else:
        zmin, zmax = zrange or (0.0, 1.0)
        scale = "Viridis"
    n = len(names)
    spacing = min(0.2, 0.6 / (n - 1)) if n > 1 else 0.0  # room for each panel's colour bar
    fig = make_subplots(rows=1, cols=n, subplot_titles=names, horizontal_spacing=spacing)
    width = (1.0 - spacing * (n - 1)) / n
    for j, arr in enumerate(arrays):
        name = names[j]
        y = list(layers) if layers is not None else list(range(arr.shape[0]))
        right = j * (width + spacing) + width
        colorbar = dict(title=dict(text=colorbar_title, side="top"), x=right + 0.01, xanchor="left", thickness=10,
                        len=0.9)
        panel_scale = scale
        if own_scale and not diverging and np.isfinite(arr).any():
            zmin, zmax = float(np.nanmin(arr)), float(np.nanmax(arr))
            zmax = zmax if zmax > zmin else zmin + 1.0
        if name in baselines and not diverging:
            b = float(baselines[name])
            panel_scale = _graded_scale(zmin, zmax, b)
            ticks = [t for t in np.linspace(zmin, zmax, 5).round(3).tolist() if abs(t - b) > 0.06 * (zmax - zmin)]
            colorbar.update(tickvals=[*ticks, b], ticktext=[f"{t:g}" for t in ticks] + [f"baseline {b:.3f}"])
        hover = "layer %{y}, head %{x}: %{z:.3f}"
        custom = None
        if name in intervals:
            low, high = (_np(a) for a in intervals[name])
            custom = np.stack([low, high], axis=-1)
            hover += " [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
        fig.add_trace(
            go.Heatmap(
                z=arr, x=list(range(arr.shape[1])), y=y, zmin=zmin, zmax=zmax, colorscale=panel_scale,
                zmid=0 if diverging else None, showscale=True, colorbar=colorbar, customdata=custom,
                hovertemplate=hover + "<extra>" + name + "</extra>",
            ),
            row=1, col=j + 1,
        )
        if mark is not None:
            fig.add_trace(
                go.Scatter(x=[mark[1]], y=[mark[0]], mode="markers", showlegend=False, name="marked head",
                           marker=dict(symbol="circle-open", size=14, color="red", line=dict(width=2))),
                row=1, col=j + 1,
            )
        fig.update_xaxes(title_text="head", row=1, col=j + 1)
        fig.update_yaxes(title_text="layer", row=1, col=j + 1)
    if baselines:
        listed = ", ".join(f"{name} {float(b):.3f}" for name, b in baselines.items())
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=f"{baseline_name} (grey at or below: {listed})",
                                 marker=dict(symbol="square", size=12, color="#bdbdbd")))
        fig.update_layout(showlegend=True, legend=dict(orientation="h", x=0, y=-0.18))
    fig.update_layout(title=title, template="plotly_white", height=max(340, 22 * arrays[0].shape[0] + 160))
    return fig


def attention_map_figure(
    attention_map,
    segments: Sequence,
    *,
    heads: Sequence[tuple[int, int]] | None = None,
    layers: Sequence[int] | None = None,
    title: str = "",
    n_prompts: int | None = None,
) -> go.Figure:
    """The averaged, resampled attention of the prediction position (the paper's Figure 2).

    ``attention_map`` is ``[layer, head, resampled]`` (from `icl_kernels.kernel.scores.resample_rows`,
    averaged); ``segments`` the pieces along the last axis (``.name``, ``.length``). One row per head
    (``heads`` picks some; default all), tick marks at the start of each piece.
    """
    arr = _np(attention_map)
    if arr.ndim != 3:
        raise ValueError(f"attention_map must be [layer, head, resampled], got shape {arr.shape}.")
    layer_ids = list(layers) if layers is not None else list(range(arr.shape[0]))
    pairs = list(heads) if heads is not None else [(layer_ids[i], h) for i in range(arr.shape[0]) for h in range(arr.shape[1])]
    rows = np.stack([arr[layer_ids.index(layer), h] for layer, h in pairs])
    total = sum(s.length for s in segments)
    if total != arr.shape[-1]:
        raise ValueError(f"segments cover {total} points but the map has {arr.shape[-1]}.")
    starts, pos = [], 0
    for s in segments:
        starts.append(pos)
        pos += s.length
    fig = go.Figure(
        go.Heatmap(
            z=rows, y=[f"L{layer}.H{h}" for layer, h in pairs], x=list(range(arr.shape[-1])),
            colorscale="Viridis", zmin=0, colorbar=dict(title="attention"),
            hovertemplate="%{y}, point %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(tickmode="array", tickvals=starts, ticktext=[s.name for s in segments], tickangle=-60,
                     title_text="position in the prompt (each piece resampled to a fixed length)")
    fig.update_yaxes(title_text="head")
    suffix = f" (mean over {n_prompts} prompts)" if n_prompts else ""
    fig.update_layout(
        title=(title or "Attention of the prediction position, each x resampled") + suffix,
        template="plotly_white", height=max(320, 14 * len(pairs) + 160), yaxis=dict(autorange="reversed"),
    )
    return fig


def token_attention_figure(
    tokens: Sequence[str], weights, pieces: Sequence[str], *, title: str = "", baseline: float | None = None,
) -> go.Figure:
    """One prompt, token by token: the attention one head's prediction position pays to each token.

    ``tokens``: the tokens as text; ``weights``: one attention weight per token; ``pieces``: what each
    token belongs to (e.g. ``x_1``, ``y_1``, ``query``), one bar colour per kind of piece (the text
    before the first underscore). ``baseline`` (e.g. uniform attention, 1 / number of tokens) is drawn
    as a dotted line.
    """
    w = _np(weights).reshape(-1)
    if not len(tokens) == len(w) == len(pieces):
        raise ValueError(f"tokens, weights and pieces must have one entry per token: {len(tokens)}, {len(w)}, {len(pieces)}.")
    kinds = list(dict.fromkeys(p.split("_")[0] for p in pieces))
    fig = go.Figure()
    x = list(range(len(tokens)))
    for i, kind in enumerate(kinds):
        idx = [j for j, p in enumerate(pieces) if p.split("_")[0] == kind]
        fig.add_trace(go.Bar(x=[x[j] for j in idx], y=w[idx], name=kind, marker_color=colour_of(i),
                             customdata=[[tokens[j], pieces[j]] for j in idx],
                             hovertemplate="%{customdata[0]!r} (%{customdata[1]}): %{y:.4f}<extra></extra>"))
    if baseline is not None:
        fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[baseline, baseline], mode="lines", line=dict(dash="dot", color="gray"),
                                 name=f"baseline: uniform attention {baseline:.4f}"))
    fig.update_xaxes(title_text="token", tickmode="array", tickvals=x, ticktext=[t.replace("\n", "\\n") for t in tokens],
                     tickangle=-70)
    fig.update_yaxes(title_text="attention of the prediction position")
    fig.update_layout(title=title or "Attention of one head, token by token", template="plotly_white", height=420,
                      bargap=0.05)
    return fig


def probe_figure(
    accuracies: Mapping[str, object],
    offsets: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    chance: float | None = None,
    title: str = "",
) -> go.Figure:
    """Ridge-probe accuracy vs layer, one line per offset from the label position (Figure 5).

    ``accuracies``: name (e.g. ``"keys -> zero-shot class"``) -> ``[offset, layer, kv_head]``; each
    line is the best key/value head of the layer.
    """
    fig = make_subplots(rows=1, cols=len(accuracies), subplot_titles=list(accuracies), shared_yaxes=True)
    for j, (_name, acc) in enumerate(accuracies.items()):
        arr = _np(acc)
        best = np.nanmax(arr, axis=-1) if np.isfinite(arr).any() else np.full(arr.shape[:2], np.nan)
        x = list(layers) if layers is not None else list(range(arr.shape[1]))
        for oi, offset in enumerate(offsets):
            fig.add_trace(
                go.Scatter(x=x, y=best[oi], mode="lines+markers", name=f"offset {offset:+d}",
                           line=dict(color=colour_of(oi)), marker=dict(color=colour_of(oi)),
                           legendgroup=str(offset), showlegend=j == 0),
                row=1, col=j + 1,
            )
        if chance is not None:
            fig.add_trace(go.Scatter(x=[x[0], x[-1]], y=[chance, chance], mode="lines", name=f"baseline: chance {chance:.3f}",
                                     line=dict(dash="dot", color="gray"), legendgroup="baseline", showlegend=j == 0),
                          row=1, col=j + 1)
        fig.update_xaxes(title_text="layer", row=1, col=j + 1)
        fig.update_yaxes(title_text="held-out accuracy (best head of the layer)", range=[0, 1.02], row=1, col=j + 1)
    fig.update_layout(title=title or "Ridge probes around the label position", template="plotly_white")
    return fig


def accuracy_vs_shots_figure(
    frame: pd.DataFrame, *, x: str = "shots", y: str = "value", color: str = "series",
    error: str | None = "se", title: str = "", y_title: str = "",
) -> go.Figure:
    """Lines of ``y`` vs ``x`` from a tidy frame, one per ``color`` value (optional ``error`` bars)."""
    missing = {x, y, color} - set(frame.columns)
    if missing:
        raise ValueError(f"accuracy_vs_shots_figure needs columns {sorted(missing)}.")
    fig = go.Figure()
    for name, g in frame.groupby(color, sort=False):
        g = g.sort_values(x)
        err = dict(type="data", array=g[error].to_numpy()) if error and error in g else None
        fig.add_trace(go.Scatter(x=g[x], y=g[y], error_y=err, mode="lines+markers", name=str(name)))
    log_x = bool((frame[x] > 0).all())
    fig.update_layout(
        title=title or f"{y_title or y} vs {x}", template="plotly_white", xaxis=dict(title=x, type="log" if log_x else "linear"),
        yaxis=dict(title=y_title or y, range=[0, 1.02]),
    )
    return fig


def metric_controls_figure(frame: pd.DataFrame, title: str = "") -> go.Figure:
    """Grouped bars of each metric next to its controls, one panel per metric.

    ``frame``: tidy rows with columns ``metric`` (panel), ``run`` (x axis), ``condition`` (bar colour,
    e.g. trained / random direction / untrained model), ``value`` and optional ``low`` / ``high``
    (a 95% interval, drawn as error bars).
    """
    missing = {"metric", "run", "condition", "value"} - set(frame.columns)
    if missing:
        raise ValueError(f"metric_controls_figure needs columns {sorted(missing)}.")
    metrics = list(dict.fromkeys(frame["metric"]))
    conditions = list(dict.fromkeys(frame["condition"]))
    colours = {condition: colour_of(i) for i, condition in enumerate(conditions)}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics, horizontal_spacing=0.06)
    in_legend: set[str] = set()  # each condition once, in the first panel that has it
    for j, metric in enumerate(metrics):
        part = frame[frame["metric"] == metric]
        for condition in conditions:
            rows = part[part["condition"] == condition]
            if rows.empty:
                continue
            err = None
            if {"low", "high"} <= set(rows.columns) and rows["low"].notna().any():
                err = dict(type="data", symmetric=False, array=(rows["high"] - rows["value"]).to_numpy(),
                           arrayminus=(rows["value"] - rows["low"]).to_numpy())
            fig.add_trace(go.Bar(x=rows["run"], y=rows["value"], name=condition, error_y=err,
                                 marker_color=colours[condition], legendgroup=condition,
                                 showlegend=condition not in in_legend),
                          row=1, col=j + 1)
            in_legend.add(condition)
        fig.update_xaxes(title_text="run", row=1, col=j + 1)
        fig.update_yaxes(title_text=metric, row=1, col=j + 1)
    fig.update_layout(title=title or "Metrics next to their controls", template="plotly_white", barmode="group", height=460,
                      legend=dict(orientation="h", y=-0.25))
    return fig
