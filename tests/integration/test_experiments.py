"""The command lines of `experiments` and `benchmarks`: every module answers ``--help``, every
configuration is an `Options` dataclass that rejects a bad value with a clear error, and every
``python -m experiments.NAME ...`` command quoted in the README, the docs and the modules' docstrings
still parses."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import shlex
from pathlib import Path

import pytest

import benchmarks
import experiments
from experiments import train_synthetic
from experiments.causal_table import CausalTableConfig
from experiments.columns_doc import ColumnsDocConfig
from experiments.compare_table import CompareTableConfig
from experiments.eval_synthetic import EvalConfig
from experiments.families_table import FamiliesTableConfig
from experiments.heads_table import HeadsTableConfig
from experiments.momentum_from_scratch import ScratchConfig
from experiments.phenomena_table import PhenomenaConfig
from experiments.readme_figures import FiguresConfig
from experiments.rebuild_pages import PagesConfig
from experiments.summarize import SummarizeArgs
from experiments.sweep import SweepArgs, SweepConfig
from experiments.train_synthetic import TrainConfig
from icl_kernels.utils.config import Options
from icl_kernels.utils.errors import InvalidOptionError

ROOT = Path(__file__).resolve().parents[2]


def _modules(package) -> list[str]:
    return sorted(f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))


EXPERIMENTS = _modules(experiments)
#: The sweep and summary commands live in the package; `experiments.sweep` and `experiments.summarize` wrap them.
SWEEPS = ["icl_kernels.sweeps.command", "icl_kernels.sweeps.config", "icl_kernels.sweeps.summary"]
COMMANDS = [m for m in EXPERIMENTS if hasattr(importlib.import_module(m), "main")]

#: One bad value per configuration, and the words its error must contain.
BAD_VALUES = {
    TrainConfig: (dict(n_layers=3), "n_layers must be even"),
    ScratchConfig: (dict(eta=0.0), "eta must be > 0"),
    EvalConfig: (dict(backend="jax"), "backend must be one of ('hf', 'tl'), not 'jax'"),
    PhenomenaConfig: (dict(conditions=","), "conditions must name at least one condition"),
    FamiliesTableConfig: (dict(ablation="half"), "ablation must be mean, zero or resample"),
    CausalTableConfig: (dict(out=""), "runs and out must be folders"),
    HeadsTableConfig: (dict(runs=""), "runs and out must be folders"),
    CompareTableConfig: (dict(runs=("no-such-run",)), "holds no metrics.json"),
    ColumnsDocConfig: (dict(out="columns.txt"), "out must be a .md file"),
    FiguresConfig: (dict(out=""), "out must not be empty"),
    PagesConfig: (dict(results=""), "results must not be empty"),
    SummarizeArgs: (dict(), "sweeps must name one or more sweep output folders"),
    SweepArgs: (dict(config="sweep.toml", max_jobs=0), "max_jobs must be >= 1, not 0"),
    SweepConfig: (dict(threads=0), "threads must be >= 1, not 0"),
}


def test_the_experiment_commands_are_found():
    assert {"experiments.sweep", "experiments.train_synthetic", "experiments.momentum_from_scratch"} <= set(COMMANDS)
    assert "experiments.sweep_shards" in EXPERIMENTS and "experiments.sweep_shards" not in COMMANDS


@pytest.mark.parametrize("name", COMMANDS + _modules(benchmarks))
def test_help_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(name).main(["--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_every_experiment_configuration_is_options_with_a_bad_value_case():
    defined = {obj for name in EXPERIMENTS + SWEEPS for obj in vars(importlib.import_module(name)).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == name
               and name.split(".")[-1] != "sweep_shards" and obj.__name__ not in ("Cell", "Worker")}  # records, not options
    assert defined == set(BAD_VALUES)
    assert all(issubclass(cls, Options) for cls in defined)


@pytest.mark.parametrize("cls", list(BAD_VALUES), ids=lambda cls: cls.__name__)
def test_a_bad_value_is_a_clear_error(cls):
    values, words = BAD_VALUES[cls]
    with pytest.raises(InvalidOptionError, match=re.escape(words)):
        cls(**values)


def test_the_sweep_commands_are_the_package_commands():
    """``python -m experiments.sweep`` / ``summarize`` are thin wrappers of ``icl-kernels sweep`` / ``summarize``."""
    from experiments import summarize, sweep  # noqa: PLC0415
    from icl_kernels.sweeps import command, summary  # noqa: PLC0415

    assert sweep.main is command.main and sweep.SweepConfig is command.SweepConfig
    assert summarize.main is summary.main and summarize.SummarizeArgs is summary.SummarizeArgs


def test_a_bad_value_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        train_synthetic.parse_args(["--n-layers", "3"])
    assert stop.value.code == 2
    assert "n_layers must be even" in capsys.readouterr().err


#: Placeholders the documents write for a value (``--seeds S``: one seed per process) -> an example value.
PLACEHOLDERS = {"S": "0", "CONFIG": "experiments/configs/example.toml"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, argv) of every ``python -m experiments.NAME ...`` in the README, the docs and the
    experiments' docstrings (continued lines joined; comments, ``[ ]`` and ``...`` dropped)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*.py"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for line_no, line in enumerate(lines, 1):
            follow = line_no
            while line.rstrip().endswith("\\") and follow < len(lines):  # a command continued on the next line
                line = line.rstrip().rstrip("\\") + " " + lines[follow].strip()
                follow += 1
            for match in re.finditer(r"python -m experiments\.(\w+)([^`\n]*)", line):
                if match.group(1) == "NAME":  # "run them as python -m experiments.NAME ..."
                    continue
                rest = re.split(r"\s#\s|\s{3,}#", match.group(2))[0]
                argv = [PLACEHOLDERS.get(token, token).strip("[]") for token in shlex.split(rest) if token != "..."]
                if not argv and line[match.end():].startswith("`"):  # a name in prose, not a command
                    continue
                found.append((f"{path.name}:{line_no}", f"experiments.{match.group(1)}", argv))
    return found


COMMAND_LINES = documented_commands()


def test_documented_commands_are_found():
    modules = {module for _, module, _ in COMMAND_LINES}
    assert {"experiments.sweep", "experiments.summarize", "experiments.momentum_from_scratch",
            "experiments.train_synthetic", "experiments.eval_synthetic", "experiments.phenomena_table",
            "experiments.readme_figures"} <= modules
    assert len(COMMAND_LINES) >= 15


@pytest.mark.parametrize(("where", "module", "argv"), COMMAND_LINES, ids=[w for w, _, _ in COMMAND_LINES])
def test_documented_command_parses(where, module, argv):
    """Parsing only: the flags and values exist and pass validation (nothing runs)."""
    cfg = importlib.import_module(module).parse_args(argv)
    assert isinstance(cfg, Options)
