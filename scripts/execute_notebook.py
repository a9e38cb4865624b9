"""Execute notebooks/head_by_head.ipynb in place, so that it is committed with its outputs.

Figures are drawn as PNG images (``ICL_NOTEBOOK_RENDERER=png``, kaleido with a local Chromium), which
GitHub and an offline Jupyter show without plotly's JavaScript. The notebook's size knobs
(``ICL_NOTEBOOK_*``) come from the environment as usual. Per-cell timing metadata is dropped so that a
re-run changes only what the notebook shows.

    PYTHONPATH=. python scripts/execute_notebook.py            # then commit notebooks/head_by_head.ipynb

PNG figures need the ``figures`` extra (``pip install -e ".[figures]"``: kaleido) and a Chromium
(``scripts/setup.sh`` installs Debian's as root).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=str(ROOT / "notebooks" / "head_by_head.ipynb"))
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    os.environ.setdefault("ICL_NOTEBOOK_RENDERER", "png")
    if "png" in os.environ["ICL_NOTEBOOK_RENDERER"] and importlib.util.find_spec("kaleido") is None:
        parser.error('PNG figures need kaleido: pip install -e ".[figures]" (or set ICL_NOTEBOOK_RENDERER)')
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    path = Path(args.notebook)
    notebook = nbformat.read(path, as_version=4)
    started = time.time()
    nbclient.NotebookClient(notebook, timeout=args.timeout, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    for cell in notebook.cells:
        times = cell.get("metadata", {}).pop("execution", None) or {}
        if "iopub.status.busy" in times and "iopub.status.idle" in times:
            start, end = (datetime.fromisoformat(times[k].replace("Z", "+00:00")) for k in ("iopub.status.busy", "iopub.status.idle"))
            print(f"{(end - start).total_seconds():7.1f} s  {cell.source.splitlines()[0][:70]}")
    nbformat.write(notebook, path)
    print(f"{path}: executed in {time.time() - started:.0f} s, {path.stat().st_size / 1e6:.2f} MB, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
