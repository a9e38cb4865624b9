"""Accuracy vs shots of the GPT-Neo trained on the synthetic world, next to the exact Bayes predictor.

Fresh prompts (``np.random.default_rng([seed, k])``; training documents come from
``default_rng([data_seed, step])``, a different stream) go to three predictors: the model (argmax of
the last-position logits over the label tokens = every HMM token, delimiter excluded), the exact
Bayes predictor of the generating mixture, and the oracle that knows the concept.

Outputs in ``out_dir``: config.json, accuracy_vs_shots.csv (tidy: shots, predictor, accuracy, se, n,
agree_bayes, nll, bayes_nll), accuracy_vs_shots.html (plotly, plotly.js from CDN). Finished shot
counts are kept: rerunning with the same config only computes the missing ones.

    .venv/bin/python -m experiments.eval_synthetic --out-dir results/synthetic
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from experiments.command_line import parse_config
from icl_kernels.data.synthetic_bayes import accuracy_vs_shots, plot_accuracy_vs_shots
from icl_kernels.data.synthetic_world import SYNTHETIC_MODEL_DIR, load_world
from icl_kernels.models.loading import load_hf_model, load_model
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments, at_least, one_of, parse_list
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.plotting import write_html

BACKENDS = ("hf", "tl")


@dataclass
class EvalConfig(Options):
    """Which trained model, which prompts, and how they are scored."""

    model: str = field(default=str(SYNTHETIC_MODEL_DIR), metadata={
        "help": "HF folder with config.json, model.safetensors, world.json"})
    out_dir: str = "results/synthetic"
    shots: str = "0,1,2,4,8,16,32"
    n: int = 2000
    seed: int = 20240
    batch_size: int = 250
    backend: str = field(default="hf", metadata={
        "choices": BACKENDS,
        "help": "hf: the transformers model; tl: icl_kernels.models.loading.load_model (TransformerLens)"})
    threads: int = 1

    def __post_init__(self) -> None:
        problems = one_of("backend", self.backend, BACKENDS)
        for name in ("n", "batch_size", "threads"):
            problems += at_least(name, getattr(self, name), 1)
        problems += at_least("seed", self.seed, 0)
        try:
            parse_list(self.shots, int, "shots")
        except InvalidOptionError as error:
            problems.append(str(error).rstrip("."))
        if problems:
            raise InvalidOptionError("Invalid EvalConfig: " + "; ".join(problems) + ".")

    def shot_counts(self) -> list[int]:
        return list(parse_list(self.shots, int, "shots"))


def parse_args(argv: list[str] | None) -> EvalConfig:
    """The evaluation's configuration from a command line (one flag per `EvalConfig` field)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=OptionsHelpFormatter)
    add_arguments(parser, EvalConfig)
    return parse_config(parser, EvalConfig, argv)


def logits_fn_for(cfg: EvalConfig):
    """A function LongTensor [batch, pos] -> logits [batch, pos, d_vocab] for the chosen backend."""
    if cfg.backend == "hf":
        hf, _ = load_hf_model(cfg.model)
        return lambda t: hf(t).logits
    if cfg.backend == "tl":
        tl = load_model(cfg.model, device="cpu")
        return lambda t: tl(t)
    raise ValueError(f"backend={cfg.backend!r}; use 'hf' or 'tl'.")


def main(argv: list[str] | None = None):
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, csv_path = out / "config.json", out / "accuracy_vs_shots.csv"
    done = pd.DataFrame()
    if cfg_path.exists() and csv_path.exists():
        old = json.loads(cfg_path.read_text())
        same = {k: v for k, v in old.items() if k not in ("shots", "threads", "batch_size")} == {
            k: v for k, v in cfg.to_dict().items() if k not in ("shots", "threads", "batch_size")
        }
        if same:
            done = pd.read_csv(csv_path)
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    world = load_world(cfg.model)
    shots = cfg.shot_counts()
    todo = [k for k in shots if done.empty or k not in set(done["shots"])]
    if todo:
        fn = logits_fn_for(cfg)
        parts = [done] if not done.empty else []
        for k in todo:  # one k at a time, saved after each, so an interrupted run resumes
            parts.append(accuracy_vs_shots(world, fn, shots=[k], n=cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, progress=True))
            done = pd.concat(parts, ignore_index=True).sort_values(["shots", "predictor"]).reset_index(drop=True)
            tmp = csv_path.with_suffix(".tmp")
            done.to_csv(tmp, index=False)
            tmp.replace(csv_path)
    df = done[done["shots"].isin(shots)]
    wide = df.pivot(index="shots", columns="predictor", values="accuracy")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    write_html(
        plot_accuracy_vs_shots(df, title=f"Synthetic world, n={cfg.n} prompts per k"), out / "accuracy_vs_shots.html"
    )
    return df


if __name__ == "__main__":
    main()
