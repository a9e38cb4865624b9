"""Batching without waste: length-bucketed batches under a token and memory budget.

Batches are right-padded (package convention), so each row costs the width of the longest prompt
in its batch. Sorting prompts by length before cutting batches (`bucketed_batches`) makes rows of a
batch nearly equal in length, so padding costs almost nothing; results are scattered back to the
caller's order. A right pad never changes a real token's result: under the causal mask a real
token attends only to earlier positions (``tests/unit/test_batching.py`` checks bucketed scores against
one-prompt-at-a-time scores).

The batch size follows a memory budget (`auto_batch_size`): the peak activation memory of one row
of a forward that stops at the unembedding input is about

    bytes/elt x width x (6 d_model + 2 d_mlp + 3 n_heads x width)

(residual, q/k/v/z and MLP hidden states of the running layer, plus attention scores, pattern and
the hooked copy of a pattern row), and a batch holds as many rows as the budget allows. The
default budget is half the free CUDA memory on a GPU and 1 GiB on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from icl_kernels.data.prompts import IclPrompt, PromptBatch
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.models import backend as tl_backend

__all__ = ["row_bytes", "memory_budget", "auto_batch_size", "bucketed_batches", "bucketed_label_log_probs"]

CPU_BUDGET = 1 << 30


def row_bytes(model: tl_backend.Model, width: int) -> int:
    """Estimated peak activation bytes of one batch row ``width`` tokens wide (see the module docstring)."""
    cfg = model.cfg
    elt = torch.empty((), dtype=tl_backend.model_dtype(model)).element_size()
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    return int(elt * width * (6 * cfg.d_model + 2 * d_mlp + 3 * cfg.n_heads * width))


def memory_budget(model: tl_backend.Model) -> int:
    """Default bytes for activations: half the free memory of the model's CUDA device, else 1 GiB."""
    device = tl_backend.model_device(model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return CPU_BUDGET


def auto_batch_size(model: tl_backend.Model, width: int, budget: int | None = None, cap: int = 256) -> int:
    """Rows of ``width`` tokens that fit in ``budget`` bytes (default `memory_budget`), in [1, cap]."""
    budget = memory_budget(model) if budget is None else int(budget)
    return max(1, min(cap, budget // max(1, row_bytes(model, width))))


def bucketed_batches(
    prompts: Sequence[IclPrompt],
    pad_token_id: int,
    *,
    model: tl_backend.Model | None = None,
    batch_size: int | None = None,
    budget: int | None = None,
    device=None,
) -> Iterator[tuple[list[int], PromptBatch]]:
    """``(indices, batch)`` pairs covering every prompt once, longest prompts first.

    Batch sizes: ``batch_size`` when given, else `auto_batch_size` of ``model`` for the width of
    each batch (so short prompts go in larger batches).
    """
    if batch_size is None and model is None:
        raise ValueError("Give batch_size, or a model to size batches under a memory budget.")
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    start = 0
    while start < len(order):
        width = len(prompts[order[start]])
        size = batch_size if batch_size is not None else auto_batch_size(model, width, budget)
        chunk = order[start : start + max(1, size)]
        start += len(chunk)
        yield chunk, PromptBatch.from_prompts([prompts[i] for i in chunk], pad_token_id, device)


def bucketed_label_log_probs(
    model: tl_backend.Model,
    prompts: Sequence[IclPrompt],
    label_ids: Sequence[Sequence[int]],
    *,
    batch_size: int | None = None,
    budget: int | None = None,
    pad_token_id: int = 0,
) -> Float[Tensor, "batch n_classes"]:
    """`icl_kernels.engine.label_scoring.label_log_probs` over length-bucketed batches, in the prompts' order."""
    out = torch.zeros(len(prompts), len(label_ids))
    for indices, batch in bucketed_batches(prompts, pad_token_id, model=model, batch_size=batch_size,
                                           budget=budget):
        scores = label_log_probs(model, batch.prompts, label_ids, batch_size=len(indices),
                                 pad_token_id=pad_token_id)
        out[torch.tensor(indices)] = scores.to(out.dtype)
    return out
