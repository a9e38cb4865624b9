"""Momentum attention from scratch: the synthetic-world GPT-Neo trained with and without it.

For each seed, two models are trained by `experiments.train_synthetic.train` on the same documents
(``data_seed = data_seed_base + seed``), from the same initialisation (``seed``), for the same
number of steps: vanilla attention, and momentum attention (`icl_kernels.finetuning.momentum_attention`, on the Hugging
Face modules via `hf_momentum_attention`, during training and evaluation alike). Each finished model
is then measured

* validation loss: mean next-token cross-entropy on ``val_docs`` held-out documents
  (``np.random.default_rng([val_seed, i])``, a stream no training batch uses), and
* ICL accuracy vs shots on the synthetic prompts (`icl_kernels.data.synthetic_bayes.accuracy_vs_shots`, the same
  ``n`` prompts per k for every model; the exact Bayes predictor alongside).

Outputs in ``out_dir``: one training folder per (variant, seed), ``results.csv`` (tidy: variant,
seed, metric, shots, value; a rerun skips finished (variant, seed) pairs), ``summary.csv`` (mean
and standard error over seeds, and the paired momentum - vanilla difference), ``config.json`` and
``accuracy_vs_shots.html``.

    nice -n 10 .venv/bin/python -m experiments.momentum_from_scratch --steps 400 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import GPTNeoForCausalLM

from experiments.command_line import parse_config
from experiments.train_synthetic import TrainConfig, train
from icl_kernels.data.synthetic_bayes import accuracy_vs_shots, plot_accuracy_vs_shots
from icl_kernels.data.synthetic_world import load_world
from icl_kernels.finetuning.momentum_attention import check_eta, hf_momentum_attention
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments, at_least, parse_list
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import append_rows, finished_ids, write_csv, write_json
from icl_kernels.utils.plotting import write_html


@dataclass
class ScratchConfig(Options):
    """The paired experiment: seeds, training length, the momentum term and the evaluation."""

    out_dir: str = "runs/momentum-scratch"
    seeds: str = "0,1,2"
    steps: int = 400
    warmup_steps: int = 50
    eta: float = 0.5
    layers: str = "all"
    data_seed_base: int = 1
    val_docs: int = 64
    val_seed: int = 424242
    shots: str = "0,1,2,4,8,16"
    n: int = 500
    eval_seed: int = 20240
    threads: int = 1
    cross_eval: bool = field(default=False, metadata={
        "help": "also evaluate each trained model with the other attention (cross_eval.csv)"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "val_docs", "n", "threads"):
            problems += at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "data_seed_base", "val_seed", "eval_seed"):
            problems += at_least(name, getattr(self, name), 0)
        for name in ("seeds", "shots"):
            try:
                parse_list(getattr(self, name), int, name)
            except InvalidOptionError as error:
                problems.append(str(error).rstrip("."))
        try:
            if check_eta(self.eta) == 0.0:
                problems.append("eta must be > 0 (the vanilla model is always trained alongside)")
        except ValueError as error:
            problems.append(str(error).rstrip("."))
        if problems:
            raise InvalidOptionError("Invalid ScratchConfig: " + "; ".join(problems) + ".")

    def seed_list(self) -> tuple[int, ...]:
        return parse_list(self.seeds, int, "--seeds")

    def shot_counts(self) -> tuple[int, ...]:
        return parse_list(self.shots, int, "--shots")

    def train_config(self, variant: str, seed: int, folder: Path) -> TrainConfig:
        """The training run of one (variant, seed): same documents and initialisation for both variants."""
        momentum = dict(momentum_eta=self.eta, momentum_layers=self.layers) if variant == "momentum" else {}
        return TrainConfig(out_dir=str(folder), steps=self.steps, warmup_steps=self.warmup_steps, seed=seed,
                           data_seed=self.data_seed_base + seed, eval_every=0, threads=self.threads, save_every=100,
                           **momentum)


def parse_args(argv: list[str] | None) -> ScratchConfig:
    """The experiment's configuration from a command line (one flag per `ScratchConfig` field)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=OptionsHelpFormatter)
    add_arguments(parser, ScratchConfig)
    return parse_config(parser, ScratchConfig, argv)


def validation_loss(model, world, cfg: ScratchConfig) -> float:
    """Mean next-token cross-entropy on held-out documents."""
    losses = []
    with torch.no_grad():
        for i in range(0, cfg.val_docs, 16):
            n = min(16, cfg.val_docs - i)
            tokens, _ = world.sample_documents(n, np.random.default_rng([cfg.val_seed, i]))
            x = torch.as_tensor(tokens)
            losses.append(float(model(input_ids=x, labels=x).loss) * n)
    return sum(losses) / cfg.val_docs


def main(argv: list[str] | None = None):
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg.to_dict())
    results = out / "results.csv"
    done = finished_ids(results, key="run_id")
    shots = cfg.shot_counts()
    for seed in cfg.seed_list():
        for variant in ("vanilla", "momentum"):
            run_id = f"{variant}-seed{seed}"
            if run_id in done:
                continue
            folder = out / run_id
            train(cfg.train_config(variant, seed, folder))
            model = GPTNeoForCausalLM.from_pretrained(folder / "final").eval()
            model.config._attn_implementation = "eager"
            world = load_world(folder / "final")
            patch = (hf_momentum_attention(model, cfg.eta, cfg.layers) if variant == "momentum"
                     else contextlib.nullcontext())
            with patch:
                val = validation_loss(model, world, cfg)
                icl = accuracy_vs_shots(world, lambda t: model(t).logits, shots=shots, n=cfg.n, seed=cfg.eval_seed,
                                   oracle=False)
            rows = [dict(run_id=run_id, variant=variant, seed=seed, metric="val_loss", shots=-1, value=val)]
            for r in icl.itertuples():
                rows.append(dict(run_id=run_id, variant=variant if r.predictor == "model" else "bayes", seed=seed,
                                 metric="icl_accuracy", shots=int(r.shots), value=float(r.accuracy)))
            append_rows(results, [dict(r, row_id=f"{run_id}|{r['variant']}|{r['metric']}|{r['shots']}") for r in rows],
                        key="row_id")
            acc = " ".join(f"k={int(r.shots)}:{r.accuracy:.3f}" for r in icl.itertuples() if r.predictor == "model")
            print(f"{run_id}: val loss {val:.4f}; ICL accuracy {acc}", flush=True)
    if cfg.cross_eval:
        cross_evaluate(cfg, out)
    frame = pd.read_csv(results)
    summary = summarise(frame)
    write_csv(out / "summary.csv", summary.to_dict("records"))
    icl = frame[frame["metric"] == "icl_accuracy"].groupby(["variant", "shots"], as_index=False)["value"].agg(
        accuracy="mean", se=lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)
    figure = plot_accuracy_vs_shots(icl.rename(columns={"variant": "predictor"}),
                                    title=f"Synthetic world: vanilla vs momentum (eta={cfg.eta}), {cfg.steps} steps")
    write_html(figure, out / "accuracy_vs_shots.html")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return summary


def cross_evaluate(cfg: ScratchConfig, out: Path) -> None:
    """Control: every trained model evaluated with and without the momentum term (no retraining).

    Separates what the trained weights learned from what the term adds at inference.
    """
    rows = []
    for seed in cfg.seed_list():
        for variant in ("vanilla", "momentum"):
            folder = out / f"{variant}-seed{seed}" / "final"
            if not folder.exists():
                continue
            model = GPTNeoForCausalLM.from_pretrained(folder).eval()
            world = load_world(folder)
            for eval_eta in (0.0, cfg.eta):
                patch = hf_momentum_attention(model, eval_eta, cfg.layers) if eval_eta else contextlib.nullcontext()
                with patch:
                    val = validation_loss(model, world, cfg)
                    icl = accuracy_vs_shots(world, lambda t: model(t).logits, shots=cfg.shot_counts(), n=cfg.n,
                                       seed=cfg.eval_seed, oracle=False)
                acc = {f"acc_k{int(r.shots)}": float(r.accuracy) for r in icl.itertuples() if r.predictor == "model"}
                rows.append(dict(trained=variant, seed=seed, eval_eta=eval_eta, val_loss=val, **acc))
                print(f"trained {variant} seed {seed}, evaluated with eta={eval_eta}: val loss {val:.4f}, "
                      + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    frame = pd.DataFrame(rows)
    write_csv(out / "cross_eval.csv", rows)
    mean = frame.groupby(["trained", "eval_eta"]).mean(numeric_only=True).drop(columns="seed")
    print(mean.to_string(float_format=lambda v: f"{v:.4f}"))


def summarise(frame):
    """Mean +- s.e. over seeds per variant, and the paired (same seed) momentum - vanilla difference."""
    rows = []
    models = frame[frame["variant"].isin(["vanilla", "momentum"])]
    for (metric, shots), g in models.groupby(["metric", "shots"]):
        wide = g.pivot_table(index="seed", columns="variant", values="value")
        row = dict(metric=metric, shots=int(shots), n_seeds=int(wide.notna().all(axis=1).sum()))
        for variant in ("vanilla", "momentum"):
            if variant in wide:
                v = wide[variant].dropna()
                row[variant] = float(v.mean())
                row[f"{variant}_se"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
        if {"vanilla", "momentum"} <= set(wide):
            d = (wide["momentum"] - wide["vanilla"]).dropna()
            row["diff"] = float(d.mean()) if len(d) else float("nan")
            row["diff_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        bayes = frame[(frame["variant"] == "bayes") & (frame["metric"] == metric) & (frame["shots"] == shots)]
        if len(bayes):
            row["bayes"] = float(bayes["value"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
