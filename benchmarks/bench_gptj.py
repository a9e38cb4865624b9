"""GPT-J-6B-shaped random-weights benchmark in bf16 on CUDA (one GPU).

    .venv/bin/python -m benchmarks.bench_gptj                  # CUDA only: refuses without a GPU
    .venv/bin/python -m benchmarks.bench_gptj --tiny --device cpu   # same config, 2 layers, d_model 256: a build check

The model is GPT-J-6B's exact shape (28 layers, 16 heads, d_model 4096, d_mlp 16384, rotary 64,
parallel attention/MLP block, vocabulary 50400) with random weights (same FLOPs and memory as the
real model), wrapped as a TransformerLens model. Printed, all measured in this run:

* head scoring: prompts/s of `icl_kernels.engine.capture.capture` (prediction rows of every layer and
  head) + the label logits, on ``--shots``-shot-sized prompts (~31 tokens per demonstration, so
  32 shots ~ 1,000 tokens), batch ``--batch-size`` (target >= 15 prompts/s on one H100);
* momentum: forward time with `icl_kernels.finetuning.momentum_attention.momentum_attention` on every layer over a plain
  forward at ``--momentum-tokens`` (2,048) tokens (target <= 1.10);
* peak CUDA memory of the capture vs ``run_with_cache`` of every activation (target >= 50x lower),
  both above the memory the weights hold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GPTJConfig

from icl_kernels.engine.capture import capture, nbytes
from icl_kernels.engine.label_scoring import unembed
from icl_kernels.finetuning.momentum_attention import momentum_attention
from icl_kernels.models.loading import gpt2_tokenizer, hf_to_transformer_lens, parse_dtype

GPTJ_6B = dict(n_layer=28, n_head=16, n_embd=4096, rotary_dim=64, n_inner=None, vocab_size=50400, n_positions=2048)
TINY = dict(n_layer=2, n_head=4, n_embd=256, rotary_dim=16, n_inner=None, vocab_size=50400, n_positions=2048)


def build(tiny: bool, device: str, dtype: torch.dtype, backend: str | None):
    """A random-weights GPT-J of the 6B shape (or a tiny one) as a TransformerLens model."""
    config = GPTJConfig(**(TINY if tiny else GPTJ_6B), architectures=["GPTJForCausalLM"])
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32 if tiny else dtype)
    return hf_to_transformer_lens(hf, gpt2_tokenizer(), backend=backend, device=device, dtype=dtype,
                                  n_ctx=2048, name="gptj-6b-shape")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2 layers, d_model 256 (a build check, any device)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--tokens-per-shot", type=int, default=31)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--momentum-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gptj: CUDA is not available; this benchmark times a 6B model on a GPU. "
              "Run it on a CUDA machine, or `--tiny --device cpu` to check that it builds.", file=sys.stderr)
        return 2
    if not args.tiny and not args.device.startswith("cuda"):
        print("bench_gptj: the full GPT-J-6B shape needs --device cuda (use --tiny on a CPU).", file=sys.stderr)
        return 2

    dtype = parse_dtype(args.dtype)
    model = build(args.tiny, args.device, dtype, args.backend)
    cfg = model.cfg
    print(f"GPT-J shape: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {dtype}, {args.device}")
    g = torch.Generator().manual_seed(0)
    width = 1 + args.shots * args.tokens_per_shot + 8
    labels = torch.tensor([352, 657], device=args.device)

    def score(batch: torch.Tensor) -> torch.Tensor:
        positions = torch.full((batch.shape[0],), batch.shape[1] - 1)
        cap = capture(model, batch, positions, out_device=None)
        return unembed(model, cap.final_residual, labels).float().log_softmax(-1)

    prompts = torch.randint(10, 50000, (args.prompts, width), generator=g).to(args.device)

    def all_prompts() -> None:
        for start in range(0, args.prompts, args.batch_size):
            score(prompts[start : start + args.batch_size])

    score(prompts[: args.batch_size])  # warm-up
    elapsed = _median_time(all_prompts, args.repeats, args.device)
    print(f"head scoring: {args.prompts / elapsed:.1f} prompts/s ({args.shots} shots, {width} tokens, batch "
          f"{args.batch_size}; target >= 15 on one H100)")

    text = torch.randint(10, 50000, (1, args.momentum_tokens), generator=g).to(args.device)

    def plain() -> None:
        with torch.no_grad():
            model(text, return_type=None)

    def patched() -> None:
        with torch.no_grad(), momentum_attention(model, 0.3):
            model(text, return_type=None)

    plain()
    patched()
    t_plain, t_patched = [], []
    for _ in range(args.repeats):  # interleaved
        t_plain.append(_median_time(plain, 1, args.device))
        t_patched.append(_median_time(patched, 1, args.device))
    p, m = statistics.median(t_plain), statistics.median(t_patched)
    print(f"momentum at {args.momentum_tokens} tokens: plain {p:.3f} s, patched {m:.3f} s, ratio {m / p:.3f} "
          "(target <= 1.10)")

    one = prompts[:1]
    positions = torch.tensor([width - 1])
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        cap = capture(model, one, positions, out_device=None)
        cap_peak = torch.cuda.max_memory_allocated() - base
        del cap
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            _, cache = model.run_with_cache(one, return_type=None)
        full_peak = torch.cuda.max_memory_allocated() - base
        stored_full = sum(nbytes(t) for t in cache.values())
        del cache
        print(f"peak memory above the weights, 1 prompt of {width} tokens: capture {cap_peak / 2**20:.0f} MiB, "
              f"full cache {full_peak / 2**20:.0f} MiB, ratio {full_peak / max(cap_peak, 1):.1f}x; stored: capture "
              f"{capture(model, one, positions).nbytes / 2**20:.2f} MiB, full cache {stored_full / 2**20:.0f} MiB")
    else:
        cap = capture(model, one, positions)
        with torch.no_grad():
            _, cache = model.run_with_cache(one, return_type=None)
        stored_full = sum(nbytes(t) for t in cache.values())
        print(f"stored (CPU; peak memory is measured on CUDA only): capture {cap.nbytes / 2**20:.2f} MiB, full cache "
              f"{stored_full / 2**20:.1f} MiB, ratio {stored_full / cap.nbytes:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
