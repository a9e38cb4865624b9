"""Accuracy vs shots of the GPT-Neo trained on the synthetic world, next to the exact Bayes predictor.

Fresh prompts (``np.random.default_rng([seed, k])``; training documents come from
``default_rng([data_seed, step])``, a different stream) go to three predictors: the model (argmax of
the last-position logits over the label tokens = every HMM token, delimiter excluded), the exact
Bayes predictor of the generating mixture, and the oracle that knows the concept.

Outputs in ``out_dir``: config.json, accuracy_vs_shots.csv (tidy: shots, predictor, accuracy, se, n,
agree_bayes, nll, bayes_nll), accuracy_vs_shots.html (plotly, plotly.js from CDN). Finished shot
counts are kept: rerunning with the same config only computes the missing ones.

    .venv/bin/python experiments/eval_synthetic.py --out-dir results/synthetic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

from icl_kernels.data.synthetic_bayes import accuracy_vs_shots, plot_accuracy_vs_shots
from icl_kernels.data.synthetic_world import SYNTHETIC_MODEL_DIR, load_world
from icl_kernels.utils.plotting import write_html


@dataclass
class EvalConfig:
    model: str = str(SYNTHETIC_MODEL_DIR)  # HF folder with config.json, model.safetensors, world.json
    out_dir: str = "results/synthetic"
    shots: str = "0,1,2,4,8,16,32"
    n: int = 2000
    seed: int = 20240
    batch_size: int = 250
    backend: str = "hf"  # "hf": transformers model; "tl": icl_kernels.models.loading.load_model (TransformerLens)
    threads: int = 1


def parse_args(argv: list[str] | None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=hints[f.name], default=f.default)
    return EvalConfig(**vars(p.parse_args(argv)))


def logits_fn_for(cfg: EvalConfig):
    """A function LongTensor [batch, pos] -> logits [batch, pos, d_vocab] for the chosen backend."""
    from icl_kernels.models.loading import load_hf_model, load_model

    if cfg.backend == "hf":
        hf, _ = load_hf_model(cfg.model)
        return lambda t: hf(t).logits
    if cfg.backend == "tl":
        tl = load_model(cfg.model, device="cpu")
        return lambda t: tl(t)
    raise ValueError(f"backend={cfg.backend!r}; use 'hf' or 'tl'.")


def main(argv: list[str] | None = None):
    import pandas as pd
    import torch

    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, csv_path = out / "config.json", out / "accuracy_vs_shots.csv"
    done = pd.DataFrame()
    if cfg_path.exists() and csv_path.exists():
        old = json.loads(cfg_path.read_text())
        same = {k: v for k, v in old.items() if k not in ("shots", "threads", "batch_size")} == {
            k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("shots", "threads", "batch_size")
        }
        if same:
            done = pd.read_csv(csv_path)
    cfg_path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    world = load_world(cfg.model)
    shots = [int(s) for s in cfg.shots.split(",") if s.strip()]
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
