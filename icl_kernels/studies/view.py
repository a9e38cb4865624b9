"""``icl-kernels view RUN_DIR``: one self-contained HTML page that explores a run head by head, offline.

The page is plain HTML with the run's numbers embedded as JSON and one small hand-written script and
style sheet (`icl_kernels/assets/view/`), all inline: it loads nothing, from the network or from
disk, so it opens anywhere, also copied out of the run folder.

What it shows, from the files a study wrote (nothing is recomputed but the intervals):

* **heads runs** (``heads.csv``, ``prompts.csv``, ``summary.json``): the layer x head map of the
  study's score (agreement of each head's reconstruction with the model, or accuracy against gold),
  per aggregation of a_i and split, the best head of each aggregation outlined. Hovering a head
  shows its score with a 95% Wilson interval over the split's prompts, its rank, and the baseline
  it has to beat on the same prompts: the demonstrations' majority label (for accuracy also the
  model's own ICL accuracy).
* **the token view** (``view_data.json``, `icl_kernels.studies.view_data`): clicking a head shows,
  for the prompt chosen in the selector, every token coloured by that head's attention from the
  prediction position (scaled to the row's largest weight, the weight itself on hover), with the
  demonstrations (x_i underlined in its label's colour), the label words (boxed) and the query
  (framed) marked, the prediction position flagged, the head's class votes and the class they
  reconstruct, and the model's answer beside the gold label.
* **families and causal runs**: a layer x head map of every numeric column of their per-head tables
  (``heads.csv``, ``ranking.csv``: tables with ``layer`` and ``head`` columns) with the family's top
  heads (``top_heads.csv``) outlined, and their other small tables (overlap, ablation effects,
  causal summary) as they are.

`view_run` returns a `RunView` whose ``html`` is the page and which renders inline in Jupyter (an
``iframe`` with the page as ``srcdoc``). Writing the page is the command line's job
(`icl_kernels.cli`).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from icl_kernels.studies.view_data import VIEW_DATA_FILE
from icl_kernels.utils.errors import IclKernelsError
from icl_kernels.utils.stats import wilson_interval

__all__ = ["RunView", "RunFolderError", "view_run", "view_html", "view_record", "VIEW_FILE"]

#: The page's default file name in the run folder.
VIEW_FILE = "view.html"
#: Rows of a non-head table shown in the page (the rest are counted).
MAX_TABLE_ROWS = 60
#: Tables shown first (the causal summary, the families' ablation effects and overlap); the rest by name.
FIRST_TABLES = ("summary", "ablation", "overlap")


class RunFolderError(IclKernelsError, FileNotFoundError):
    """The folder is not the output folder of a run the view can show."""


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV with numbers parsed (ints, floats; empty cells None)."""
    def value(text: str) -> Any:
        if text == "":
            return None
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(text, text)

    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunFolderError(f"{path} cannot be read as JSON ({error}).") from error


def _rate(k: int, n: int) -> dict[str, Any]:
    """k/n with its 95% Wilson interval (all None for n = 0)."""
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0}
    low, high = wilson_interval(k, n)
    return {"value": k / n, "low": low, "high": high, "n": n}


def _heads_maps(folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The heads study's score maps: one entry per (split, aggregation), with intervals and baselines."""
    rows = _read_csv(folder / "heads.csv")
    prompts = _read_csv(folder / "prompts.csv") if (folder / "prompts.csv").is_file() else []
    n_layers = 1 + max(int(r["layer"]) for r in rows)
    n_heads = 1 + max(int(r["head"]) for r in rows)
    maps: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = f"{r['split']}|{r['aggregation']}"
        entry = maps.setdefault(key, {"split": r["split"], "aggregation": r["aggregation"], "n": int(r["n"]),
                                      "cells": [[None] * n_heads for _ in range(n_layers)]})
        n = int(r["n"])
        entry["cells"][int(r["layer"])][int(r["head"])] = {
            "agreement": _rate(round(float(r["agreement"]) * n), n),
            "accuracy": _rate(round(float(r["accuracy"]) * n), n),
            "rank": r.get("rank"),
        }
    baselines: dict[str, Any] = {}
    for split in {m["split"] for m in maps.values()}:
        chosen = [p for p in prompts if split == "all" or p["split"] == split]
        if not chosen:
            continue
        n = len(chosen)
        baselines[split] = {
            "demo_majority_agreement": _rate(sum(p["demo_majority"] == p["icl_pred"] for p in chosen), n),
            "demo_majority_accuracy": _rate(sum(p["demo_majority"] == p["gold"] for p in chosen), n),
            "icl_accuracy": _rate(sum(p["icl_pred"] == p["gold"] for p in chosen), n),
        }
    best = {how: [b["layer"], b["head"]] for how, b in summary.get("best_head", {}).items()}
    return {"n_layers": n_layers, "n_heads": n_heads, "maps": maps, "baselines": baselines, "best": best}


def _head_tables(folder: Path, skip: set[str], summary: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Other studies' per-head tables as maps (one per numeric column), and their other tables.

    Outlined heads: a families run's top heads of the column's family (``top_heads.csv``); a causal
    run's ablated and patched top heads (``top_heads`` of its summary) on every column."""
    maps, tables = [], []
    top = _read_csv(folder / "top_heads.csv") if (folder / "top_heads.csv").is_file() else []
    ablated = summary.get("top_heads") if isinstance(summary.get("top_heads"), list) else []
    ablated = [[int(h[0]), int(h[1])] for h in ablated if isinstance(h, (list, tuple)) and len(h) == 2]
    for path in sorted(folder.glob("*.csv")):
        if path.name in skip:
            continue
        rows = _read_csv(path)
        if not rows:
            continue
        columns = list(rows[0])
        if {"layer", "head"} <= set(columns) and "split" not in columns and path.name != "top_heads.csv":
            n_layers = 1 + max(int(r["layer"]) for r in rows)
            n_heads = 1 + max(int(r["head"]) for r in rows)
            for column in columns:
                if column in ("layer", "head") or not all(isinstance(r[column], (int, float)) and
                                                          not isinstance(r[column], bool) for r in rows):
                    continue
                cells: list[list[float | None]] = [[None] * n_heads for _ in range(n_layers)]
                for r in rows:
                    v = float(r[column])
                    cells[int(r["layer"])][int(r["head"])] = v if math.isfinite(v) else None
                marked = [[int(t["layer"]), int(t["head"])] for t in top if t.get("family") == column
                          and str(t.get("ranked", True)).lower() not in ("false", "0")] or ablated
                maps.append({"table": path.stem, "column": column, "cells": cells, "marked": marked})
        else:
            tables.append({"name": path.stem, "columns": columns, "rows": [[r[c] for c in columns] for r in rows[:MAX_TABLE_ROWS]],
                           "more": max(0, len(rows) - MAX_TABLE_ROWS)})
    tables.sort(key=lambda t: (FIRST_TABLES.index(t["name"]) if t["name"] in FIRST_TABLES else len(FIRST_TABLES), t["name"]))
    return maps, tables


def view_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Everything the page shows of the run in ``run_dir``, as one JSON-able record."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is not a folder; give the --out folder of a run (heads, families, causal).")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    summary_path = next((folder / n for n in ("summary.json", "metrics.json") if (folder / n).is_file()), None)
    if summary_path is None:
        raise RunFolderError(f"{folder} holds no summary.json: not a finished run's folder (was it written by a study?).")
    summary = _read_json(summary_path)
    study = config.get("study", "?")
    record: dict[str, Any] = {"study": study, "folder": folder.name, "title": _title(study, config, summary),
                              "headline": _headline(summary), "heads": None, "view": None, "maps": [], "tables": []}
    skip = {"prompts.csv"}
    if study == "heads" and (folder / "heads.csv").is_file():
        record["heads"] = _heads_maps(folder, summary)
        skip.add("heads.csv")
        if (folder / VIEW_DATA_FILE).is_file():
            view = _read_json(folder / VIEW_DATA_FILE)
            # a view_data.json left by an earlier run of another configuration (--force keeps it) is not shown
            record["view"] = view if view.get("fingerprint") == summary.get("fingerprint") else None
        skip |= {"kernel_similarity.csv", "probes.csv"}  # per-aggregation / per-probe tables: the figures show them
    record["maps"], record["tables"] = _head_tables(folder, skip, summary)
    record["map_note"] = {"families": "outlined: the family's top heads (top_heads.csv)",
                          "causal": "outlined: the top heads the run ablated and patched (summary.json top_heads)"}.get(study, "")
    if record["heads"] is None and not record["maps"]:
        raise RunFolderError(f"{folder} ({study} run) has no per-head table (heads.csv with layer and head columns): "
                             "nothing to show head by head.")
    return record


def _title(study: str, config: dict[str, Any], summary: dict[str, Any]) -> str:
    model = summary.get("model") or config.get("model", {}).get("model", "?")
    task = summary.get("task") or config.get("prompts", {}).get("task", "?")
    shots = summary.get("shots") or config.get("prompts", {}).get("shots", "?")
    return f"{study}: {model} on {task}, {shots} shots"


def _headline(summary: dict[str, Any]) -> str:
    """The run's headline numbers, where the summary has them (a heads run's; else empty)."""
    parts = []
    if "n_prompts" in summary:
        split = f" (select {summary['n_select']} / report {summary['n_report']})" if "n_select" in summary else ""
        parts.append(f"{summary['n_prompts']} prompts{split}")
    if isinstance(summary.get("icl_accuracy"), (int, float)):
        parts.append(f"ICL accuracy {summary['icl_accuracy']:.3f}")
    best = summary.get("best_head", {}).get("max") if isinstance(summary.get("best_head"), dict) else None
    if best and "report_agreement" in best:
        parts.append(f"best head (a_i max, chosen on select) L{best['layer']}.H{best['head']}: report agreement "
                     f"{best['report_agreement']:.3f}, accuracy {best['report_accuracy']:.3f} (n={best['n_report']})")
    return "; ".join(parts)


def _asset(name: str) -> str:
    return resources.files("icl_kernels").joinpath("assets", "view", name).read_text(encoding="utf-8")


def _script_json(record: dict[str, Any]) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</``, no HTML comment openers)."""
    text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def view_html(run_dir: str | os.PathLike) -> str:
    """The page for the run in ``run_dir`` (a complete HTML document; every script and style inline)."""
    record = view_record(run_dir)
    title = html.escape(record["title"])
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        # Nothing may load from anywhere: the policy forbids every fetch, the inline code aside.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">\n"
        f"<title>{title}</title>\n<style>\n{_asset('view.css')}</style>\n</head>\n<body>\n"
        f"<h1 id=\"title\">{title}</h1>\n<div id=\"app\"></div>\n"
        f"<script id=\"run-data\" type=\"application/json\">{_script_json(record)}</script>\n"
        f"<script>\n{_asset('view.js')}</script>\n</body></html>\n"
    )


@dataclass(frozen=True)
class RunView:
    """The view of one run: ``html`` is the page; in Jupyter it renders inline (`_repr_html_`)."""

    run_dir: Path
    html: str

    def _repr_html_(self) -> str:
        # An iframe keeps the page's script and style apart from the notebook's.
        return (f"<iframe srcdoc=\"{html.escape(self.html, quote=True)}\" style=\"width:100%;height:900px;"
                f"border:1px solid #ccc\" sandbox=\"allow-scripts\" title=\"{html.escape(str(self.run_dir))}\"></iframe>")


def view_run(run_dir: str | os.PathLike) -> RunView:
    """The head explorer of the run in ``run_dir`` (see the module docstring); ``.html`` is the page."""
    return RunView(Path(run_dir), view_html(run_dir))
