"""Forward time with momentum attention over a plain forward, at 512 and 2,048 tokens.

    nice .venv/bin/python -m benchmarks.bench_momentum                          # gemma-3-270m, CPU
    nice .venv/bin/python -m benchmarks.bench_momentum --model tiny-gemma-3 --repeats 3
    .venv/bin/python -m benchmarks.bench_momentum --device cuda                 # target ratio <= 1.10

Each measurement is one forward of a batch of held-out text (`icl_kernels.engine.perplexity.heldout_windows`)
that stops at the final norm (``return_type=None``), plain and with `momentum_attention` on every
layer, interleaved; printed are the medians over ``--repeats`` and their ratio, all from this run.
On a shared CPU the forward times are noisy, so the patch's own work is also timed alone (one
`momentum_term` per patched layer on value-shaped random input) and printed as
``(plain + scans) / plain``.
The patch costs one chunked scan per layer over the value heads (``O(T x chunk)``), which is
small next to attention's ``O(T^2)`` and the MLPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from icl_kernels.engine.perplexity import heldout_windows
from icl_kernels.finetuning.momentum_attention import momentum_attention, momentum_term, parse_layers
from icl_kernels.models.loading import load_model


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model, tokens, eta: float, layers: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a plain and a patched forward (interleaved, after one warm-up of each)."""
    device = tokens.device
    plain, patched = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            for mode, sink in (("plain", plain), ("momentum", patched)):
                _sync(device)
                start = time.perf_counter()
                if mode == "plain":
                    model(tokens, return_type=None)
                else:
                    with momentum_attention(model, eta, layers):
                        model(tokens, return_type=None)
                _sync(device)
                if i:  # the first round warms up
                    sink.append(time.perf_counter() - start)
    return statistics.median(plain), statistics.median(patched)


def time_scans(model, n_tokens: int, batch: int, eta: float, n_layers: int, repeats: int, device) -> float:
    """Median seconds of the patch's own work for one forward: a scan per patched layer on value-shaped input."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    v = torch.randn(batch, n_tokens, n_kv, model.cfg.d_head, device=device, dtype=next(model.parameters()).dtype)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            for _ in range(n_layers):
                momentum_term(v, eta)
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--backend", default=None, choices=("hooked", "bridge"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", default="512,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--layers", default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.tokens.split(",") if x.strip()]
    model = load_model(args.model, device=args.device, backend=args.backend, n_ctx=max(lengths))

    layers = parse_layers(args.layers, model.cfg.n_layers)
    windows = heldout_windows(model.tokenizer, max(lengths), args.batch)
    rows = []
    print(f"{args.model} ({args.backend or 'default backend'}) on {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, eta {args.eta}, layers {args.layers}, median of {args.repeats}")
    for n in lengths:
        tokens = windows[:, :n].to(args.device)
        plain, patched = time_forward(model, tokens, args.eta, args.layers, args.repeats)
        scans = time_scans(model, n, args.batch, args.eta, len(layers), args.repeats, args.device)
        rows.append(dict(tokens=n, plain_s=plain, momentum_s=patched, ratio=patched / plain, scan_s=scans,
                         scan_ratio=(plain + scans) / plain))
        print(f"{n:>6} tokens: plain {plain:.3f} s, momentum {patched:.3f} s, ratio {patched / plain:.3f}; "
              f"scans alone {scans:.3f} s, (plain + scans) / plain {(plain + scans) / plain:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
