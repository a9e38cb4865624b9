"""Figure pages load plotly.js only from their own folder: a verified copy, never a parent's file.

A file planted in a shared parent folder under plotly.js's name must never be referenced; a tampered
copy in the run folder is replaced (with a warning); a run folder copied elsewhere on its own still
holds everything its pages load.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from icl_kernels.studies.report import Report
from icl_kernels.utils.config import Options
from icl_kernels.utils.plotting import ensure_plotly_js, plotly_js_name, write_html

PLANTED = "alert('planted');\n"
SCRIPT_SRC = re.compile(r'<script[^>]*\ssrc="([^"]+)"')


def _figure() -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))


def _bundled_sha256() -> str:
    return hashlib.sha256(get_plotlyjs().encode("utf-8")).hexdigest()


def _assert_self_contained(folder: Path) -> None:
    """Every page in ``folder`` loads only plain file names that exist there, holding plotly's script."""
    pages = sorted(folder.glob("*.html"))
    assert pages
    for page in pages:
        sources = SCRIPT_SRC.findall(page.read_text(encoding="utf-8"))
        assert sources, f"{page.name} loads no plotly.js"
        for src in sources:
            assert src == Path(src).name and "/" not in src and "\\" not in src and src != "..", src
            script = folder / src
            assert script.is_file() and not script.is_symlink(), src
            assert hashlib.sha256(script.read_bytes()).hexdigest() == _bundled_sha256(), src


@dataclass
class _NoOptions(Options):
    """A configuration without options."""


class _Figures(Report):
    """A hand-made report with two figures (its record given, so no model is hashed)."""

    def figures(self):
        return {"first": _figure(), "second": _figure()}


def _report() -> _Figures:
    record = {"study": "figures", "fingerprint": "f" * 16, "resume_key": "r", "config": {}, "model": {},
              "data_source": {}}
    return _Figures("figures", _NoOptions(), identity=record)


def test_a_script_planted_in_a_parent_folder_is_never_referenced(tmp_path):
    shared = tmp_path / "shared"
    run = shared / "results" / "heads" / "run"
    run.mkdir(parents=True)
    for parent in (shared, shared / "results", shared / "results" / "heads"):
        (parent / plotly_js_name()).write_text(PLANTED)
    _report().write(run, environment=False)
    _assert_self_contained(run)
    for page in run.glob("*.html"):
        assert SCRIPT_SRC.findall(page.read_text(encoding="utf-8")) == [plotly_js_name()]
    assert len(list(run.glob("*.min.js"))) == 1  # one shared copy per run folder, not one per page
    assert all(page.stat().st_size < 100_000 for page in run.glob("*.html"))  # the script is not inlined


def test_a_tampered_copy_in_the_run_folder_is_replaced(tmp_path):
    run = tmp_path / "run"
    write_html(_figure(), run / "first.html")
    (run / plotly_js_name()).write_text(PLANTED)
    with pytest.warns(UserWarning, match="sha256 differs"):
        write_html(_figure(), run / "second.html")
    _assert_self_contained(run)


def test_a_link_in_place_of_the_copy_is_replaced_not_followed(tmp_path):
    target = tmp_path / "elsewhere.js"
    target.write_text(PLANTED)
    run = tmp_path / "run"
    run.mkdir()
    (run / plotly_js_name()).symlink_to(target)
    with pytest.warns(UserWarning, match="link"):
        ensure_plotly_js(run)
    assert target.read_text() == PLANTED  # the link's target is left as it was
    write_html(_figure(), run / "page.html")
    _assert_self_contained(run)


def test_a_verified_copy_is_reused_silently(tmp_path, recwarn):
    run = tmp_path / "run"
    js = ensure_plotly_js(run)
    before = js.stat().st_mtime_ns
    write_html(_figure(), run / "page.html")
    assert js.stat().st_mtime_ns == before and not recwarn.list


def test_a_run_folder_copied_elsewhere_still_shows_its_figures(tmp_path):
    shared = tmp_path / "shared"
    (shared / plotly_js_name()).parent.mkdir(parents=True)
    (shared / plotly_js_name()).write_text(get_plotlyjs())  # even a genuine parent copy is not used
    run = shared / "a" / "run"
    _report().write(run, environment=False)
    copy = tmp_path / "moved" / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(shared)
    _assert_self_contained(copy)
