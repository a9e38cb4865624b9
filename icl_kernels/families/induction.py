"""Induction, previous-token and duplicate-token heads, scored on repeated random tokens.

The standard detector (TransformerLens ``head_detector.detect_head``, Olsson et al. 2022): feed
``[BOS, r_1..r_n, r_1..r_n]`` with ``r`` random token ids and compare each head's attention pattern
``A`` (query x key, lower triangular) with an ideal pattern ``P`` built from the tokens:

* previous token: ``P[i, i-1] = 1``;
* duplicate token: ``P[i, j] = 1`` iff ``j < i`` and ``t_j = t_i``;
* induction: ``P[i, j] = 1`` iff ``j - 1 < i`` and ``t_{j-1} = t_i`` (the token after an earlier
  occurrence of the current one).

Score ("mul", TransformerLens's default) = sum(A * P) / sum(A) over all query rows, averaged over
sequences, after zeroing A's BOS column when ``exclude_bos`` (default here: True, so that the
first-half rows, which have nothing to match and park on BOS, do not dilute a perfect induction
head to n/(2n+1); with it a perfect head scores 1) and its diagonal when ``exclude_current_token``.

The scorer `pattern_scores` is pure (a pattern tensor and the tokens); `head_pattern_scores` runs
the model and reads ``hook_pattern`` (readable on both backends; TransformerLens's own detector
re-tokenises strings and, in older versions, drops its options for lists, so it is not used).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_kernels.engine.hooks import act_name, run_until
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import rng

__all__ = ["PATTERN_KINDS", "ideal_pattern", "pattern_scores", "repeated_random_tokens", "head_pattern_scores"]

PATTERN_KINDS = ("induction", "previous_token", "duplicate_token")


def ideal_pattern(tokens: Int[Tensor, " pos"], kind: str) -> Float[Tensor, "query_pos key_pos"]:
    """The detector's ideal pattern ``P`` of one sequence (see the module docstring)."""
    n = tokens.shape[0]
    if kind == "previous_token":
        return torch.diag(torch.ones(n - 1), -1)
    same = (tokens[:, None] == tokens[None, :]).float()
    if kind == "duplicate_token":
        return torch.tril(same, -1)
    if kind == "induction":
        shifted = torch.zeros(n, n)
        shifted[:, 1:] = torch.tril(same, -1)[:, :-1]  # P[i, j] = [t_{j-1} = t_i, j - 1 < i]
        return shifted
    raise ValueError(f"kind must be one of {PATTERN_KINDS}, not {kind!r}.")


def pattern_scores(
    pattern: Float[Tensor, "batch head_index query_pos key_pos"],
    tokens: Int[Tensor, "batch pos"],
    kind: str,
    *,
    exclude_bos: bool = True,
    exclude_current_token: bool = False,
) -> Float[Tensor, " head_index"]:
    """Mean over sequences of sum(A * P) / sum(A) per head (TransformerLens's "mul" measure)."""
    a = pattern.float().clone()
    if exclude_bos:
        a[..., 0] = 0
    if exclude_current_token:
        a = a * (1 - torch.eye(a.shape[-1]))[None, None]
    ideal = torch.stack([ideal_pattern(t, kind) for t in tokens.cpu()])[:, None]  # [batch 1 q k]
    num = (a * ideal.to(a.device)).sum((-1, -2))
    den = a.sum((-1, -2)).clamp_min(1e-12)
    return (num / den).mean(0).cpu()


def repeated_random_tokens(
    n_sequences: int, length: int, low: int, high: int, bos: int | None, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """``[BOS, r, r]`` rows, ``r`` ``length`` distinct ids uniform in ``[low, high)`` (stream
    ``repeated_tokens``); no BOS column when ``bos`` is None."""
    if high - low < length:
        raise ValueError(f"Cannot draw {length} distinct tokens from [{low}, {high}).")
    generator = rng("repeated_tokens", seed)
    rows = []
    for _ in range(n_sequences):
        r = generator.choice(np.arange(low, high), size=length, replace=False)
        rows.append(([] if bos is None else [bos]) + list(r) + list(r))
    return torch.tensor(rows, dtype=torch.long)


def head_pattern_scores(
    model: tl_backend.Model,
    tokens: Int[Tensor, "batch pos"],
    kinds: Sequence[str] = PATTERN_KINDS,
    *,
    exclude_bos: bool = True,
    batch_size: int = 8,
) -> pd.DataFrame:
    """One row per head (layer, head, one column per kind) from the model's ``hook_pattern``."""
    n_layers = model.cfg.n_layers
    device = tl_backend.model_device(model)
    sums = {kind: torch.zeros(n_layers, model.cfg.n_heads) for kind in kinds}
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        patterns: dict[int, Tensor] = {}

        def keep(pattern: Tensor, hook, patterns=patterns) -> None:
            patterns[int(hook.name.split(".")[1])] = pattern.detach()

        with torch.no_grad():
            run_until(model, chunk.to(device), [(act_name("pattern", layer), keep) for layer in range(n_layers)])
        for layer in range(n_layers):
            for kind in kinds:
                score = pattern_scores(patterns[layer], chunk, kind, exclude_bos=exclude_bos)
                sums[kind][layer] += score * chunk.shape[0]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    frame = pd.DataFrame(dict(layer=np.repeat(np.arange(n_layers), n_heads), head=np.tile(np.arange(n_heads), n_layers)))
    for kind in kinds:
        frame[kind] = (sums[kind] / tokens.shape[0]).flatten().numpy()
    return frame
