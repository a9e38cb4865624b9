"""The documentation site: ``mkdocs build --strict`` passes (a broken docstring, link or page fails
it), the built pages load nothing from the network, the API reference covers every module, and the
commands the pages show parse with the command line's own parser.

Needs the ``docs`` extra (mkdocs, mkdocs-material, mkdocstrings[python]); skipped without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
           if importlib.util.find_spec(m.split(".")[0]) is None
           or (m == "mkdocstrings_handlers.python" and importlib.util.find_spec(m) is None)]
needs_mkdocs = pytest.mark.skipif(bool(MISSING), reason=f"the docs extra is not installed (missing {MISSING}): "
                                                        "pip install -e '.[docs]'")

#: A tag that would fetch a script or a stylesheet from the network when a page opens.
REMOTE_ASSET = re.compile(r"<script\b[^>]*\bsrc=[\"']?(?:https?:)?//|<link\b[^>]*\bhref=[\"']?(?:https?:)?//", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


@needs_mkdocs
def test_site_builds_strict_and_loads_nothing_remote(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 15, [p.name for p in pages]
    for page in pages:
        html = page.read_text(encoding="utf-8")
        remote = REMOTE_ASSET.findall(html)
        assert not remote, f"{page.relative_to(site)} loads from the network: {remote[:3]}"
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html, page
        # Material's bundle would fetch mermaid from a CDN for a diagram; the site has none
        assert 'class="mermaid"' not in html, page
    for name in ("index", "tutorial", "results", "results-compare", "how-to/own-task", "how-to/own-model",
                 "how-to/slurm-sweep", "reference/index"):
        assert (site / f"{name}.html").is_file(), name


@needs_mkdocs
def test_reference_pages_document_known_functions(site):
    expected = {
        "utils": ["icl_kernels.utils.stats.kendall_tau", "icl_kernels.utils.stats.paired_bootstrap"],
        "kernel": ["icl_kernels.kernel.scores.kernel_regression", "icl_kernels.kernel.head_scan.analyze_heads"],
        "finetuning": ["icl_kernels.finetuning.momentum_attention.momentum_attention"],
        "models": ["icl_kernels.models.loading.load_model", "icl_kernels.models.encoders.MiniLMEncoder"],
        "engine": ["icl_kernels.engine.hooks.hooks_on"],
        "data": ["icl_kernels.data.prompts.PromptBuilder"],
        "studies": ["icl_kernels.studies.registry.get_study"],
    }
    for page, names in expected.items():
        html = (site / "reference" / f"{page}.html").read_text(encoding="utf-8")
        for name in names:
            assert f'id="{name}"' in html, f"{name} is not documented on reference/{page}"
    # doctests render as code, not as nested block quotes (scripts/griffe_doctests.py)
    utils = (site / "reference" / "utils.html").read_text(encoding="utf-8")
    assert "<blockquote>" not in utils and "&gt;&gt;&gt;" in utils
    assert ":class:" not in (site / "reference" / "data.html").read_text(encoding="utf-8")  # Sphinx roles dropped


def test_every_module_has_a_reference_entry():
    documented = set()
    for page in (DOCS / "reference").glob("*.md"):
        documented |= set(re.findall(r"^::: (\S+)", page.read_text(encoding="utf-8"), flags=re.M))
    modules = set()
    for path in (ROOT / "icl_kernels").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert modules - documented == set(), "add these modules to a docs/reference page"
    assert documented - modules == set(), "these reference entries name no module"


def _commands(text: str) -> list[list[str]]:
    """Every ``icl-kernels STUDY ...`` line of the page's code blocks (continuations joined,
    comments and environment assignments dropped)."""
    commands, blocks, language, lines = [], [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                if language in ("", "bash", "sh"):
                    blocks.append("\n".join(lines))
                language = None
        elif language is not None:
            lines.append(line)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #", 1)[0])
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words and words[0].endswith("icl-kernels"):
                commands.append(words[1:])
    return commands


def test_documented_commands_parse():
    from icl_kernels.cli import DELEGATED, build_parser  # noqa: PLC0415 - after collection, like the other CLI tests

    pages = [DOCS / "tutorial.md", *sorted((DOCS / "how-to").glob("*.md"))]
    seen = 0
    for page in pages:
        for argv in _commands(page.read_text(encoding="utf-8")):
            if not argv or argv[0].startswith("-") or argv[0] in DELEGATED or argv[0] in ("models", "tasks"):
                continue
            try:
                build_parser(studies=[argv[0]]).parse_args(argv)
            except SystemExit as error:
                pytest.fail(f"{page.name}: `icl-kernels {shlex.join(argv)}` does not parse ({error})")
            seen += 1
    assert seen >= 6, seen


def test_fence_doctests():
    fence = pytest.importorskip("scripts.griffe_doctests", reason="needs griffe (docs extra)").fence_doctests
    text = "Sum:\n\n>>> 1 + 1\n2\n\nDone.\n    >>> x = 1\n    >>> x\n    1"
    assert fence(text) == ("Sum:\n\n```pycon\n>>> 1 + 1\n2\n```\n\nDone.\n\n    ```pycon\n    >>> x = 1\n"
                           "    >>> x\n    1\n    ```")
    fenced = "```python\n>>> 1\n1\n```"
    assert fence(fenced) == fenced  # already in a fence: left alone
    roles = pytest.importorskip("scripts.griffe_doctests").drop_sphinx_roles
    assert roles("A :class:`Task` from :func:`~a.b.get_task`, not `x`.") == "A `Task` from `a.b.get_task`, not `x`."
