"""The README's ICL-vs-finetuning table: every ``compare`` run side by side, Dai et al.'s numbers beside them.

Each column is one run of the compare study (written by ``icl-kernels compare ... --out DIR``); each
row one quantity with its 95% interval over demonstration sets (the independent unit: the summary's
``intervals_by_episode``), next to the controls that could fail:

* accuracies and their paired differences (FT - ZSL, ICL - FT);
* Rec2FTP with its chance level and the mismatched-update control;
* SimAOU and SimAM under the official definitions (``simaou_official``, ``simam_*_official``) and the
  softmax-weights variant, each against the lr -> 0 control (SimAM after minus before; SimAOU is
  undefined at lr 0), the mismatched update and the untrained copy (paired, same queries);
* Kendall tau against lr -> 0, the mismatched update and the untrained copy.

Each claim also gets a verdict derived from the intervals alone (`verdict`): "agrees" only where
every control's paired difference excludes 0 on the paper's side, "opposite" where one excludes it
on the other side, "not informative here" where the lr -> 0 difference holds 0, "undetermined"
otherwise. Nothing here recomputes a run; it reads ``metrics.json`` and ``config.json``:

    .venv/bin/python -m experiments.compare_table results/compare/gemma-movie-reviews ... \\
        --out results/compare/table

Writes ``compare_table.csv`` (tidy: run, quantity, value, low, high, n, unit, method), ``verdicts.csv``
(run, claim, verdict) and ``config.json`` into ``out``, and prints the markdown table and verdicts.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from experiments.command_line import parse_config
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text, write_csv

#: Dai et al.'s numbers (fairseq GPT 1.3B / 2.7B; MR for accuracies, the six-task averages otherwise;
#: ../shared/reference/papers.md); rows the paper has no number for say "not reported".
PAPER = {
    "zsl_accuracy": "65.9 / 60.9 (MR)",
    "ft_accuracy": "73.0 / 80.0 (MR)",
    "icl_accuracy": "89.0 / 91.3 (MR)",
    "ft_minus_zsl_accuracy": "+7.1 / +19.1 (MR)",
    "icl_minus_ft_accuracy": "+16.0 / +11.3 (MR)",
    "rec2ftp": "85.6% / 89.4% (average)",
    "simaou_official": ".186 / .225 (average)",
    "simaou_random": "about .002 / -.001",
    "simam_official": ".338 -> .442 / .355 -> .434 (average)",
    "kendall": "about .19 / .21 (average)",
    "kendall_random": "about 0",
}


@dataclass
class CompareTableConfig(Options):
    """Which compare runs to put side by side, and where the table goes."""

    runs: tuple[str, ...] = field(default=(), metadata={"cli": False})
    out: str = field(default="results/compare/table", metadata={"help": "folder for the tidy table and verdicts"})

    def __post_init__(self) -> None:
        for run in self.runs:
            if not (Path(run) / "metrics.json").is_file():
                raise InvalidOptionError(f"{run} holds no metrics.json: give folders written by `icl-kernels compare --out`.")


class Run(NamedTuple):
    """One compare run: its folder name and summary."""

    name: str
    metrics: dict

    @property
    def sets(self) -> dict:
        return self.metrics["intervals_by_episode"]

    def interval(self, key: str) -> dict | None:
        return self.sets.get(key)

    def control(self, control: str, key: str) -> dict | None:
        entry = self.metrics.get("controls", {}).get(control, {}).get("metrics", {}).get(key)
        return None if entry is None else entry["difference"]

    def trained_minus_untrained(self, key: str) -> dict | None:
        return self.metrics.get("paired", {}).get("trained_minus_untrained", {}).get(key)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def fmt(entry: dict | None, scale: float = 1.0, digits: int = 3, sign: bool = False,
        bounds: tuple[float, float] = (-1.0, 1.0)) -> str:
    """``value [low, high]`` (``undefined`` where the value is not a number), times ``scale``.

    The interval is clipped to ``bounds`` (the quantity's range, before scaling: every quantity in the
    table is a cosine, a rank correlation, a rate or a difference of rates): a t interval on a few set
    means can reach past it (a chance-corrected Rec2FTP of 0.915 over 8 sets reaches 1.089); the tidy
    table keeps the summary's unclipped ends.
    """
    if entry is None or not _finite(entry.get("value")):
        return "undefined"
    ends = [entry[k] * scale for k in ("value", "low", "high") if _finite(entry.get(k))]
    tiny = 0 < max(abs(x) for x in ends) < 0.5 * 10 ** -digits  # would print as +-0.000: show its size
    spec = f"{'+' if sign else ''}.1e" if tiny else f"{'+' if sign else ''}.{digits}f"
    value = format(entry["value"] * scale, spec)
    if not (_finite(entry.get("low")) and _finite(entry.get("high"))):
        return value
    low, high = max(entry["low"], bounds[0]), min(entry["high"], bounds[1])
    return f"{value} [{low * scale:{spec}}, {high * scale:{spec}}]"


def side(entry: dict | None) -> str:
    """Where a paired difference's interval lies: "above", "below", "holds 0" or "undefined"."""
    if entry is None or not (_finite(entry.get("low")) and _finite(entry.get("high"))):
        return "undefined"
    if entry["low"] > 0:
        return "above"
    if entry["high"] < 0:
        return "below"
    return "holds 0"


def verdict(differences: dict[str, dict | None], lr0: str | None = None) -> str:
    """The claim's verdict from its paired differences with each control (the paper's side: above 0).

    "not informative here" when the lr -> 0 difference (named by ``lr0``) holds 0; "opposite" when
    some difference lies below 0; "agrees" when every defined difference lies above 0; else
    "undetermined". Names the controls that decided it.
    """
    sides = {name: side(entry) for name, entry in differences.items()}
    if lr0 is not None and sides.get(lr0) == "holds 0":
        return f"not informative here ({lr0} difference holds 0)"
    below = [name for name, s in sides.items() if s == "below"]
    if below:
        return "opposite (below: " + ", ".join(below) + ")"
    defined = {name: s for name, s in sides.items() if s != "undefined"}
    if defined and all(s == "above" for s in defined.values()):
        return "agrees (above: " + ", ".join(defined) + ")"
    holding = [name for name, s in defined.items() if s == "holds 0"]
    return "undetermined (holds 0: " + ", ".join(holding or ["no defined control"]) + ")"


def _rec2ftp(run: Run) -> str:
    m = run.metrics
    n = m.get("n_ftp") or 0
    if not n or not _finite(m.get("rec2ftp")):
        return "undefined (0 such queries)"
    return f"{round(m['rec2ftp'] * n)} of {n} ({100 * m['rec2ftp']:.1f}%)"


def _norm_ratio(run: Run) -> str:
    m = run.metrics
    if not _finite(m.get("dw_icl_to_w_zsl_per_token")):
        return "undefined"
    return f"{m['dw_icl_to_w_zsl_per_token']:.2f} ({m['mean_demo_tokens']:.0f})"


def _wall_time(run: Run) -> str:
    seconds = (run.metrics.get("timing") or {}).get("total_s")
    return "not recorded" if not _finite(seconds) else f"{seconds:.0f}"


def _identity(run: Run) -> str:
    value = run.metrics.get("identity_max_abs_error")
    return "not measured" if not _finite(value) else f"{value:.1e}"


def _simam(run: Run, definition: str) -> str:
    before, after = run.interval(f"simam_before_{definition}"), run.interval(f"simam_after_{definition}")
    return f"{fmt(before)} -> {fmt(after)}"


def _paired(run: Run, name: str, definition: str) -> dict | None:
    return run.metrics.get("paired", {}).get(name, {}).get(definition)


def rows(runs: list[Run]) -> list[tuple[str, str, list[str]]]:
    """(quantity, paper, one cell per run) in table order."""

    def each(cell) -> list[str]:
        return [cell(run) for run in runs]

    def pct(key: str, sign: bool = False):
        return lambda run: fmt(run.interval(key), 100, 1, sign, bounds=(-1.0, 1.0) if sign else (0.0, 1.0))

    def setup(run: Run) -> str:
        m = run.metrics
        lrs = f"{m['lr']:g} / {m['lr_untrained']:g}" if _finite(m.get("lr_untrained")) else f"{m['lr']:g}"
        return f"{m['n_test']} / {m['n_episodes']} / {m['shots']}; {lrs}"

    return [
        ("queries / demonstration sets / shots; lr trained / untrained (dev)", "", each(setup)),
        ("ZSL accuracy (%)", PAPER["zsl_accuracy"], each(pct("zsl_accuracy"))),
        ("FT accuracy (%)", PAPER["ft_accuracy"], each(pct("ft_accuracy"))),
        ("ICL accuracy (%)", PAPER["icl_accuracy"], each(pct("icl_accuracy"))),
        ("FT - ZSL (points)", PAPER["ft_minus_zsl_accuracy"], each(pct("ft_minus_zsl_accuracy", True))),
        ("ICL - FT (points)", PAPER["icl_minus_ft_accuracy"], each(pct("icl_minus_ft_accuracy", True))),
        ("Rec2FTP: ICL right of the FT-right & ZSL-wrong queries", PAPER["rec2ftp"], each(_rec2ftp)),
        ("... chance-corrected", "not reported", each(lambda r: fmt(r.interval("rec2ftp_chance")))),
        ("... minus mismatched update", "not reported", each(lambda r: fmt(r.control("mismatched", "rec2ftp"), sign=True))),
        ("SimAOU (official: normalised outputs)", PAPER["simaou_official"], each(lambda r: fmt(r.interval("simaou_official")))),
        ("... minus mismatched update", "not reported", each(lambda r: fmt(r.control("mismatched", "simaou_official"), sign=True))),
        ("... minus untrained copy", "not reported", each(lambda r: fmt(r.trained_minus_untrained("simaou_official"), sign=True))),
        ("... random update", PAPER["simaou_random"], each(lambda r: fmt(r.interval("simaou_random_official")))),
        ("SimAOU (variant: unnormalised outputs)", "", each(lambda r: fmt(r.interval("simaou_softmax_weights")))),
        ("SimAM (official: pre-softmax) before -> after", PAPER["simam_official"], each(lambda r: _simam(r, "official"))),
        ("... after - before (= minus lr -> 0)", "+.104 / +.079", each(lambda r: fmt(_paired(r, "simam_after_minus_before", "official"), sign=True))),
        ("... minus mismatched update", "not reported", each(lambda r: fmt(r.control("mismatched", "simam_after_official"), sign=True))),
        ("... untrained copy: after - before", "not reported", each(lambda r: fmt(_paired(r, "untrained_simam_after_minus_before", "official"), sign=True))),
        ("SimAM (variant: softmax weights) after - before", "", each(lambda r: fmt(_paired(r, "simam_after_minus_before", "softmax_weights"), sign=True))),
        ("Kendall tau", PAPER["kendall"], each(lambda r: fmt(r.interval("kendall")))),
        ("... minus lr -> 0", "not reported", each(lambda r: fmt(r.control("lr0", "kendall"), sign=True))),
        ("... minus mismatched update", "not reported", each(lambda r: fmt(r.control("mismatched", "kendall"), sign=True))),
        ("... minus untrained copy", "not reported", each(lambda r: fmt(r.trained_minus_untrained("kendall"), sign=True))),
        ("... uniform random", PAPER["kendall_random"], each(lambda r: fmt(r.interval("kendall_random")))),
        ("cos(dW_ICL, actual dW_FT)", "not reported", each(lambda r: fmt(r.interval("dw_cosine")))),
        ("per-token norm dW_ICL / W_ZSL, same run (mean demonstration tokens)", "not reported", each(_norm_ratio)),
        ("relaxed identity (W_ZSL + dW_ICL) q, max abs error", "not reported", each(_identity)),
        ("wall time (s, one thread; two to four runs shared the 2-core CPU)", "", each(_wall_time)),
    ]


def verdicts(run: Run) -> dict[str, str]:
    """Each claim of the paper on this run, from its intervals (see `verdict`)."""
    return {
        "accuracy order ICL > FT > ZSL": verdict({"FT - ZSL": run.interval("ft_minus_zsl_accuracy"),
                                                  "ICL - FT": run.interval("icl_minus_ft_accuracy")}),
        "Rec2FTP above its controls": verdict({"chance": run.interval("rec2ftp_chance"),
                                               "mismatched": run.control("mismatched", "rec2ftp")}),
        "SimAOU above its controls": verdict({"mismatched": run.control("mismatched", "simaou_official"),
                                              "untrained": run.trained_minus_untrained("simaou_official")}),
        "SimAM rises after finetuning": verdict(
            {"lr -> 0": _paired(run, "simam_after_minus_before", "official"),
             "mismatched": run.control("mismatched", "simam_after_official"),
             "untrained": run.trained_minus_untrained("simam_after_minus_before_official")}, lr0="lr -> 0"),
        "Kendall above its controls": verdict({"lr -> 0": run.control("lr0", "kendall"),
                                               "mismatched": run.control("mismatched", "kendall"),
                                               "untrained": run.trained_minus_untrained("kendall")}, lr0="lr -> 0"),
    }


def tidy(runs: list[Run]) -> list[dict]:
    """Every interval of every run, one row each (the summary's by-set intervals and controls)."""
    out = []
    for run in runs:
        for key, entry in run.sets.items():
            if isinstance(entry, dict):
                out.append(dict(run=run.name, quantity=key, **{k: entry.get(k) for k in
                                                               ("value", "low", "high", "n", "unit", "method")}))
        for control, block in run.metrics.get("controls", {}).items():
            for key, entry in block.get("metrics", {}).items():
                diff = entry["difference"]
                out.append(dict(run=run.name, quantity=f"{key}_minus_{control}", **{k: diff.get(k) for k in
                                                                                   ("value", "low", "high", "n", "unit", "method")}))
        for key, entry in run.metrics.get("paired", {}).get("trained_minus_untrained", {}).items():
            out.append(dict(run=run.name, quantity=f"{key}_trained_minus_untrained",
                            **{k: entry.get(k) for k in ("value", "low", "high", "n", "unit", "method")}))
    return out


def markdown(runs: list[Run]) -> str:
    header = "| | Dai et al. (1.3B / 2.7B) | " + " | ".join(run.name for run in runs) + " |"
    lines = [header, "|" + "---|" * (len(runs) + 2)]
    for quantity, paper, cells in rows(runs):
        lines.append(f"| {quantity} | {paper} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line: the run folders, then one flag per other `CompareTableConfig` field."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=OptionsHelpFormatter)
    parser.add_argument("runs", nargs="+", help="compare run folders, in column order")
    add_arguments(parser, CompareTableConfig)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> CompareTableConfig:
    """The table's configuration from a command line; a bad value is a usage error (exit 2)."""
    return parse_config(parser or build_parser(), CompareTableConfig, argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    runs = [Run(Path(path).name, json.loads((Path(path) / "metrics.json").read_text(encoding="utf-8")))
            for path in cfg.runs]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare_table.csv", tidy(runs))
    verdict_rows = [dict(run=run.name, claim=claim, verdict=text) for run in runs for claim, text in verdicts(run).items()]
    write_csv(out / "verdicts.csv", verdict_rows)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    print(markdown(runs))
    print()
    for row in verdict_rows:
        print(f"- {row['run']}: {row['claim']}: {row['verdict']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
