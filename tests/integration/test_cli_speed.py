"""The command line starts without the heavy libraries (issue 25: a command line that feels instant).

Building the parser and running ``--help``, ``--version``, ``models`` and ``tasks`` must import none
of torch, TransformerLens, transformers, datasets, plotly or pandas: each check runs in a fresh
interpreter and reads ``sys.modules`` (an import check, not a timing one).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import icl_kernels
from icl_kernels.cli import main, version
from icl_kernels.data.tasks.registry import SYNTHETIC_TASKS
from icl_kernels.studies import get_study
from icl_kernels.studies.catalog import BUILTIN_STUDIES, builtin_module

HEAVY = ("torch", "transformer_lens", "transformers", "datasets", "plotly", "pandas")
ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    import icl_kernels.cli as cli
    heavy = {heavy!r}
    loaded = {{}}
    def note(step):
        loaded[step] = sorted(m for m in heavy if m in sys.modules)
    note("import")
    cli.build_parser()
    note("build_parser")
    for argv in (["--help"], ["--version"], ["models"], ["tasks"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                code = cli.main(argv)
            except SystemExit as exit:  # --help and --version exit from argparse
                code = exit.code
        assert code == 0, (argv, code)
        assert out.getvalue().strip(), argv
        note(" ".join(argv))
    print(json.dumps(loaded))
""")


def _probe(code: str) -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_parser_help_version_models_and_tasks_import_no_heavy_library():
    loaded = _probe(PROBE.format(heavy=HEAVY))
    assert list(loaded) == ["import", "build_parser", "--help", "--version", "models", "tasks"]
    assert loaded == {step: [] for step in loaded}


def test_sweep_and_summarize_are_listed_without_importing_their_modules():
    """``icl-kernels --help`` lists ``sweep`` and ``summarize``; their modules (submitit, torch, pandas,
    plotly) load only when the subcommand runs."""
    loaded = _probe(
        "import contextlib, io, json, sys\nimport icl_kernels.cli as cli\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n    try:\n        cli.main(['--help'])\n    except SystemExit:\n        pass\n"
        "print(json.dumps({'help': out.getvalue(), 'sweeps': sorted(m for m in sys.modules if m.startswith('icl_kernels.sweeps'))}))"
    )
    assert "sweep" in loaded["help"] and "summarize" in loaded["help"]
    assert loaded["sweeps"] == []


def test_import_icl_kernels_and_studies_is_cheap():
    loaded = _probe(
        "import json, sys, icl_kernels, icl_kernels.studies, icl_kernels.models.options, icl_kernels.utils.config\n"
        f"print(json.dumps({{'import': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))"
    )
    assert loaded == {"import": []}


def test_every_public_name_of_the_package_imports():
    for name in icl_kernels.__all__:
        assert getattr(icl_kernels, name) is not None, name
    with pytest.raises(AttributeError):
        icl_kernels.no_such_name  # noqa: B018 - the lazy __getattr__ still refuses unknown names


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"icl-kernels {version()}"
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert pyproject and icl_kernels.__version__ == pyproject.group(1)  # the fallback agrees with pyproject


def test_tasks_lists_the_synthetic_world(capsys):
    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    synthetic = [line.split("\t") for line in lines if line.split("\t")[0] in SYNTHETIC_TASKS]
    assert [row[0] for row in synthetic] == ["synthetic-world"]
    assert len(synthetic[0]) == 3 and synthetic[0][2].strip()  # name, classes, a one-line description


def test_study_catalog_matches_the_registered_studies():
    for entry in BUILTIN_STUDIES:
        study = get_study(entry.name)
        assert study.help == entry.help
        assert study.run.__module__ == builtin_module(entry.name)


def test_citation_file_is_cff_and_matches_pyproject():
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    pyproject = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    for line in ("cff-version: 1.2.0", 'title: "icl-kernels"', "type: software", "license: MIT",
                 '  - name: "icl-kernels developers"', f'version: "{pyproject.group(1)}"'):
        assert line in text.splitlines(), line
    assert re.search(r"^message: \S", text, re.MULTILINE)
