"""Train a small GPT-Neo on documents from the synthetic mixture-of-HMMs world (icl_kernels.data.synthetic_world).

Data: every step draws a fresh batch of documents with ``np.random.default_rng([data_seed, step])``,
so the data stream depends only on (data_seed, step): a resumed run sees exactly the batches an
uninterrupted run sees. Dropout is 0, the learning-rate schedule is a function of the step, and the
checkpoint holds model, optimiser and torch RNG state, so resuming from the last checkpoint gives the
same final weights as an uninterrupted run (bit for bit on the same machine and thread count).

Outputs in ``out_dir``: config.json (this config + world + model config), loss_log.csv (step, loss,
lr, tokens, wall_s), eval_log.csv (ICL accuracy of the model and the exact Bayes predictor on a fixed
prompt set during training), checkpoint.pt (every ``save_every`` steps), final/ (HF folder:
config.json + model.safetensors + world.json). ``--export-dir`` copies final/ there as well (e.g.
icl_kernels/assets/synthetic-gpt-neo).

`train` runs one training from a `TrainConfig` (what `experiments.momentum_from_scratch` calls);
`main` reads the same configuration from the command line (one flag per field, same defaults).

    nice -n 10 .venv/bin/python -m experiments.train_synthetic --out-dir runs/synthetic-gpt-neo --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from experiments.command_line import parse_config
from icl_kernels.data.synthetic_bayes import accuracy_vs_shots
from icl_kernels.data.synthetic_world import SyntheticWorld, WorldConfig, make_world
from icl_kernels.finetuning.momentum_attention import check_eta, hf_momentum_attention
from icl_kernels.utils.config import Options, OptionsHelpFormatter, add_arguments, at_least, parse_list
from icl_kernels.utils.errors import InvalidOptionError


@dataclass
class TrainConfig(Options):
    """One training run: the synthetic world, the GPT-Neo, the optimiser and the logging."""

    out_dir: str = "runs/synthetic-gpt-neo"
    export_dir: str = ""  # if set, the final HF folder is copied there
    # world (icl_kernels.data.synthetic_world.WorldConfig)
    n_concepts: int = 8
    n_states: int = 32
    vocab_size: int = 8
    x_len: int = 3
    structure: str = "layered"
    branching: int = 2
    trans_smoothing: float = 0.02
    emit_smoothing: float = 0.05
    start_smoothing: float = 0.02
    seg_len_min: int = 2
    seg_len_max: int = 8
    doc_len: int = 192
    world_seed: int = 0
    # model (transformers.GPTNeoConfig); attention layers alternate global, local
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    window_size: int = 32
    # optimisation
    steps: int = 1600
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0  # model initialisation
    data_seed: int = 1  # training documents: default_rng([data_seed, step])
    # logging / checkpoints
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 200
    eval_n: int = 256
    eval_shots: str = "0,1,4,16"
    eval_seed: int = 777  # fixed prompt set for the training-time evaluation
    threads: int = 1
    device: str = "cpu"
    stop_after: int = 0  # if > 0, stop this invocation (after a checkpoint) at this step; rerun to resume
    # momentum attention (icl_kernels.finetuning.momentum_attention, Dai et al. sec. 5); 0 = vanilla attention
    momentum_eta: float = 0.0
    momentum_layers: str = "all"

    def world_config(self) -> WorldConfig:
        return WorldConfig(
            n_concepts=self.n_concepts,
            n_states=self.n_states,
            vocab_size=self.vocab_size,
            x_len=self.x_len,
            structure=self.structure,
            branching=self.branching,
            trans_smoothing=self.trans_smoothing,
            emit_smoothing=self.emit_smoothing,
            start_smoothing=self.start_smoothing,
            seg_len_min=self.seg_len_min,
            seg_len_max=self.seg_len_max,
            doc_len=self.doc_len,
            seed=self.world_seed,
        )

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "window_size", "steps", "batch_size", "log_every", "save_every",
                     "eval_n", "threads"):
            problems += at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "stop_after", "seed", "data_seed", "eval_seed"):
            problems += at_least(name, getattr(self, name), 0)
        if self.n_layers % 2:
            problems.append(f"n_layers must be even (layers alternate global, local), not {self.n_layers}")
        if self.d_model % max(1, self.n_heads):
            problems.append(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, not {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            problems.append(f"weight_decay and grad_clip must be >= 0, not {self.weight_decay} and {self.grad_clip}")
        problems += _problem(lambda: parse_list(self.eval_shots, int, "eval_shots"))
        problems += _problem(lambda: check_eta(self.momentum_eta))
        problems += _problem(self.world_config)
        if problems:
            raise InvalidOptionError("Invalid TrainConfig: " + "; ".join(problems) + ".")

    def eval_shot_counts(self) -> list[int]:
        """The demonstration counts of the training-time evaluation."""
        return list(parse_list(self.eval_shots, int, "eval_shots"))


# Fields that may differ between the run that wrote a checkpoint and the run that resumes it.
_RESUME_FREE = {"out_dir", "export_dir", "log_every", "save_every", "threads", "device", "eval_every", "eval_n", "stop_after"}


def _problem(check) -> list[str]:
    """``[]``, or the message of the error ``check()`` raises on a bad value."""
    try:
        check()
    except ValueError as error:
        return [str(error).rstrip(".")]
    return []


def parse_args(argv: list[str] | None) -> TrainConfig:
    """The training configuration of a command line (one flag per `TrainConfig` field)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=OptionsHelpFormatter)
    add_arguments(parser, TrainConfig)
    return parse_config(parser, TrainConfig, argv)


def gpt_neo_config(cfg: TrainConfig, world: SyntheticWorld) -> GPTNeoConfig:
    return GPTNeoConfig(
        vocab_size=world.n_tokens,
        max_position_embeddings=cfg.doc_len,
        hidden_size=cfg.d_model,
        num_layers=cfg.n_layers,
        attention_types=[[["global", "local"], cfg.n_layers // 2]],
        num_heads=cfg.n_heads,
        intermediate_size=None,  # 4 * hidden_size (what TransformerLens assumes for GPT-Neo)
        window_size=cfg.window_size,
        activation_function="gelu_new",
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=0.02,
        use_cache=False,
        bos_token_id=world.delim_id,
        eos_token_id=world.delim_id,
        tie_word_embeddings=True,
    )


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_for_step(world: SyntheticWorld, cfg: TrainConfig, step: int) -> np.ndarray:
    tokens, _ = world.sample_documents(cfg.batch_size, np.random.default_rng([cfg.data_seed, step]))
    return tokens


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) the run ``cfg`` describes; returns its output folder.

    Raises:
        ValueError: ``out_dir`` holds a checkpoint written with another configuration.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = make_world(cfg.world_config())
    model_cfg = gpt_neo_config(cfg, world)
    torch.manual_seed(cfg.seed)
    model = GPTNeoForCausalLM(model_cfg).to(cfg.device)
    model.config._attn_implementation = "eager"
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    ckpt_path = out / "checkpoint.pt"
    step, wall, loss_rows, eval_rows = 0, 0.0, [], []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=cfg.device, weights_only=True)
        saved = ck["config"]
        defaults = TrainConfig().to_dict()  # keys older checkpoints lack
        diff = {
            k: (saved.get(k, defaults[k]), v)
            for k, v in cfg.to_dict().items()
            if k not in _RESUME_FREE and saved.get(k, defaults[k]) != v
        }
        if diff:
            raise ValueError(
                f"{ckpt_path} was written with a different config {diff} (saved, now); use another --out-dir "
                "or delete the checkpoint to start over."
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["torch_rng"])
        step, wall, loss_rows, eval_rows = ck["step"], ck["wall_s"], ck["loss_rows"], ck["eval_rows"]
        print(f"resumed from {ckpt_path} at step {step} ({wall:.0f} s of training so far)")

    (out / "config.json").write_text(
        json.dumps(
            {"train": cfg.to_dict(), "world": world.to_json_dict(), "model": model_cfg.to_dict(), "n_params": n_params},
            indent=2,
        )
        + "\n"
    )
    print(f"GPT-Neo with {n_params:,} parameters; vocab {world.n_tokens} (delimiter {world.delim_id})")

    shots = cfg.eval_shot_counts()

    def run_eval(at_step: int) -> None:
        model.eval()
        df = accuracy_vs_shots(
            world, lambda t: model(t).logits, shots=shots, n=cfg.eval_n, seed=cfg.eval_seed, oracle=False, device=cfg.device
        )
        model.train()
        for r in df.itertuples():
            eval_rows.append(dict(step=at_step, shots=r.shots, predictor=r.predictor, accuracy=r.accuracy, n=r.n))
        msg = " ".join(
            f"k={k}: {g.set_index('predictor').accuracy.get('model', float('nan')):.3f}/{g.set_index('predictor').accuracy['bayes']:.3f}"
            for k, g in df.groupby("shots")
        )
        tqdm.write(f"step {at_step} ICL acc model/bayes {msg}")

    def save(at_step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            dict(
                step=at_step,
                wall_s=wall,
                model=model.state_dict(),
                optimizer=opt.state_dict(),
                torch_rng=torch.get_rng_state(),
                config=cfg.to_dict(),
                loss_rows=loss_rows,
                eval_rows=eval_rows,
            ),
            tmp,
        )
        os.replace(tmp, ckpt_path)
        _write_csv(out / "loss_log.csv", loss_rows)
        _write_csv(out / "eval_log.csv", eval_rows)

    patch = contextlib.nullcontext()
    if cfg.momentum_eta:
        # hooks for the rest of this run (removed before returning): training and evaluations use them
        patch = hf_momentum_attention(model, cfg.momentum_eta, cfg.momentum_layers)
    patch.__enter__()
    if cfg.momentum_eta:
        print(f"momentum attention: eta={cfg.momentum_eta} layers={cfg.momentum_layers}")

    model.train()
    window_losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=5)
    while step < cfg.steps:
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        x = torch.as_tensor(batch_for_step(world, cfg, step), device=cfg.device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        wall += time.perf_counter() - t0
        window_losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_rows.append(
                dict(step=step, loss=float(np.mean(window_losses)), lr=lr_at(cfg, step - 1), tokens=step * cfg.batch_size * cfg.doc_len, wall_s=round(wall, 2))
            )
            bar.set_postfix(loss=f"{loss_rows[-1]['loss']:.4f}")
            window_losses = []
        bar.update(1)
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            run_eval(step)
        if step % cfg.save_every == 0 or step == cfg.steps or step == cfg.stop_after:
            save(step)
        if step == cfg.stop_after and step < cfg.steps:
            bar.close()
            print(f"stopped at step {step} (--stop-after); run the same command again to resume")
            patch.__exit__(None, None, None)
            return out
    bar.close()
    patch.__exit__(None, None, None)

    final = out / "final"
    final.mkdir(exist_ok=True)
    model.save_pretrained(final, safe_serialization=True)
    world.to_json(final / "world.json")
    if cfg.momentum_eta:
        (final / "momentum.json").write_text(
            json.dumps({"eta": cfg.momentum_eta, "layers": cfg.momentum_layers}, indent=2) + "\n"
        )
    summary = dict(
        steps=step,
        train_wall_s=round(wall, 1),
        final_loss=loss_rows[-1]["loss"] if loss_rows else None,
        n_params=n_params,
        threads=cfg.threads,
        device=cfg.device,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: {summary}")
    if cfg.export_dir:
        dst = Path(cfg.export_dir)
        dst.mkdir(parents=True, exist_ok=True)
        for f in final.iterdir():
            shutil.copy2(f, dst / f.name)
        print(f"exported {sorted(p.name for p in final.iterdir())} to {dst}")
    return out


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    return train(cfg)


if __name__ == "__main__":
    main()
