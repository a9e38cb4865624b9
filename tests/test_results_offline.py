"""Every figure shipped in results/ opens offline: no remote script, and the plotly.js it loads exists."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_shipped_figures_load_no_remote_script():
    pages = sorted(RESULTS.rglob("*.html"))
    assert pages, "no figure in results/"
    for page in pages:
        text = page.read_text(encoding="utf-8")
        sources = re.findall(r'<script[^>]*\ssrc="([^"]+)"', text)
        assert not [s for s in sources if "//" in s], f"{page} loads a remote script"
        for src in sources:
            assert (page.parent / src).is_file(), f"{page}: {src} is missing"
        assert sources, f"{page} loads no plotly.js"
