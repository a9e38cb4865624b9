"""The package's layer order (utils < models < data < engine < kernel | finetuning < families < studies
< cli, declared in pyproject.toml's ``[tool.importlinter]``) holds for every import, function-local
ones included."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(config: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", script, "--config", str(config), "--no-cache"],
        cwd=root, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_layers_contract_is_kept():
    result = _lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "icl_kernels layers KEPT" in result.stdout


def test_contract_catches_an_upward_import(tmp_path):
    """The same contract breaks when utils/ imports a study: the check can fail. The probe goes into a
    copy of the package, never the checkout, which concurrent test runs (lint, docs, this contract) read."""
    text = (ROOT / "pyproject.toml").read_text()
    layers = text[text.index("[tool.importlinter]"):]
    config = tmp_path / "importlinter.toml"
    config.write_text(layers)
    shutil.copytree(ROOT / "icl_kernels", tmp_path / "icl_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "icl_kernels" / "utils" / "_upward_probe.py").write_text(
        "from icl_kernels.studies import get_study  # deliberately upward\n")
    result = _lint_imports(config, root=tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "icl_kernels.utils._upward_probe" in result.stdout


@pytest.mark.parametrize("folder", ["utils", "models", "data", "data/tasks", "engine", "kernel", "finetuning", "families", "studies", "sweeps"])
def test_every_subpackage_says_its_job(folder):
    doc = ast.get_docstring(ast.parse((ROOT / "icl_kernels" / folder / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"icl_kernels/{folder}/__init__.py needs a one-sentence docstring"
