"""The LM loss of many training rows with its gradient made chunk by chunk, never the whole logits.

The finetuning baseline's loss (`icl_kernels.finetuning.finetune`) is the mean next-token
cross-entropy over every token of a training sequence, over the whole vocabulary. For a small model
with a large vocabulary nearly all of a training step is this loss: the logits of every token
(``n_tokens x d_vocab`` floats: 240 MB for 1,200 tokens of GPT-2's 50,257, 1.3 GB for Gemma-3's
262,144), their log-softmax, and on the way back the softmax gradient and its product with the
unembedding, each a pass over that array in memory.

`row_lm_losses` runs the same computation on a few tokens at a time: for each chunk the logits,
the per-token loss (scaled by ``1 / n`` of its row, as a mean) and, at once, its gradient with respect
to the chunk's final residual (`torch.autograd.grad`), which is all the backward pass needs from
the unembedding: ``d loss_r / d residual_t`` is nonzero only for the tokens ``t`` of row ``r``. The
chunk's logits are freed before the next chunk, so memory holds one chunk's logits, not every token's. The
backward pass then multiplies the kept gradient (``n_tokens x d_model``) by the incoming gradient
of each token's row.

Each token's gradient is the same computation as in the whole-array loss (its row of the logits,
its log-softmax, the same ``1 / n``), and each row's loss is reduced from the same per-token losses
by the same reduction as ``cross_entropy(..., reduction="mean")`` on each row. The only difference
is the shape of the unembedding product, which can round a logit differently; the loss is taken in
float32 (as `icl_kernels.finetuning.finetune` takes it), so losses and gradients agree to float32
rounding, and bit for bit where a chunk holds every token (``tests/unit/test_lm_loss.py``; the
batched finetuning runs stay equal to the one-at-a-time runs, ``tests/unit/test_batched_finetune.py``).
``benchmarks/bench_compare_reuse.py`` prints the time the compare study spends in it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["row_lm_losses", "chunk_tokens"]

#: Logit floats per chunk (16 MB in float32): enough tokens for the products to run at speed, one
#: chunk's logits instead of every token's.
CHUNK_FLOATS = 1 << 22


def chunk_tokens(d_vocab: int, floats: int = CHUNK_FLOATS) -> int:
    """Tokens per chunk for a vocabulary of ``d_vocab`` (at least 1)."""
    return max(1, floats // max(1, d_vocab))


class _RowLmLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual: Tensor, logits_of: Callable[[Tensor], Tensor], targets: Tensor, owners: Tensor,
                counts: Tensor, chunk: int) -> Tensor:
        scale = 1.0 / counts.to(torch.float32)  # the mean's 1 / n, in the loss dtype
        token_losses = torch.empty(residual.shape[0], dtype=torch.float32, device=residual.device)
        grad = torch.empty_like(residual)
        for start in range(0, residual.shape[0], chunk):
            end = min(start + chunk, residual.shape[0])
            with torch.enable_grad():
                x = residual[start:end].detach().requires_grad_(True)
                per_token = torch.nn.functional.cross_entropy(logits_of(x).float(), targets[start:end], reduction="none")
                (grad[start:end],) = torch.autograd.grad((per_token * scale[owners[start:end]]).sum(), x)
            token_losses[start:end] = per_token.detach()
        # each row's mean by the reduction cross_entropy(..., reduction="mean") itself applies (nll_loss
        # over the gathered -log p), from the same per-token losses
        zero = torch.zeros(1, dtype=torch.long, device=residual.device)
        losses = torch.stack([
            torch.nn.functional.nll_loss(-token_losses[owners == r][:, None], zero.expand(int(counts[r])))
            for r in range(len(counts))])
        ctx.save_for_backward(grad, owners)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        grad, owners = ctx.saved_tensors
        return grad * grad_losses[owners].to(grad.dtype)[:, None], None, None, None, None, None


def row_lm_losses(
    residual: Float[Tensor, "n_tokens d_model"],
    logits_of: Callable[[Tensor], Tensor],
    targets: Int[Tensor, " n_tokens"],
    owners: Int[Tensor, " n_tokens"],
    n_rows: int,
    *,
    chunk: int,
) -> Float[Tensor, " n_rows"]:
    """Each row's mean next-token cross-entropy (float32) over its tokens, differentiable in ``residual``.

    ``residual`` holds the final residual of every predicting token (row ``owners[t]``, next token
    ``targets[t]``); ``logits_of`` maps a chunk of it to logits over the whole vocabulary (the
    unembedding, with soft-capping where the model has it); ``chunk`` tokens at a time (`chunk_tokens`).
    Equals ``cross_entropy(logits_of(residual[owners == r]).float(), targets[owners == r])`` for
    every row ``r`` to rounding, with its gradient (module docstring).

    Raises:
        ValueError: tensors of different lengths, an owner outside ``0..n_rows - 1``, a row without
            tokens, or ``chunk < 1``.
    """
    if not residual.shape[0] == targets.shape[0] == owners.shape[0]:
        raise ValueError(f"residual, targets and owners must have one entry per token; got {residual.shape[0]}, "
                         f"{targets.shape[0]} and {owners.shape[0]}.")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}.")
    if owners.numel() and (int(owners.min()) < 0 or int(owners.max()) >= n_rows):
        raise ValueError(f"owners must lie in 0..{n_rows - 1}.")
    counts = torch.bincount(owners, minlength=n_rows)  # tokens per row: the mean's n
    empty = (counts == 0).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"rows {empty} have no token to predict: every row needs at least one.")
    return _RowLmLosses.apply(residual, logits_of, targets, owners, counts, chunk)
