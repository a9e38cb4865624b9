"""Induction, previous-token and duplicate-token heads, scored on repeated random tokens.

The standard detector (TransformerLens ``head_detector.detect_head``, Olsson et al. 2022): feed
``[BOS, r_1..r_n, r_1..r_n]`` with ``r`` random token ids and compare each head's attention pattern
``A`` (query x key, lower triangular) with an ideal pattern ``P`` built from the tokens:

* previous token: ``P[i, i-1] = 1``;
* duplicate token: ``P[i, j] = 1`` iff ``j < i`` and ``t_j = t_i``;
* induction: ``P[i, j] = 1`` iff ``j - 1 < i`` and ``t_{j-1} = t_i`` (the token after an earlier
  occurrence of the current one).

Score ("mul", TransformerLens's default) = sum(A * P) / sum(A) over all query rows, averaged over
sequences. As in ``head_detector`` (TransformerLens 3.9 and 4.3) the first token's column counts by
default: ``exclude_bos=False``. With ``exclude_bos`` A's first column is zeroed first (so the
first-half rows, which have nothing to match and park on the first token, do not dilute a perfect
induction head to n/(2n+1); with it a perfect head scores 1), and its diagonal with
``exclude_current_token``. With the same options our scores equal ``detect_head``'s (tested).

**Idle heads.** Excluding the first token lets a head that sends nearly all its attention there win
on the remainder (a head with 99.99% of its attention on the first token can rank among the top
induction heads). So every head's **first-token share** is reported beside its scores (the mean
over sequences and query rows i >= 1 of A[i, 0]; row 0 can attend only to itself), and a head whose
attention off the first token, 1 - share, is below a threshold (`MIN_ATTENTION_OFF_FIRST_TOKEN`,
0.05, i.e. more than 95% on the first token) is **not ranked** (`ranked_heads`): the families study
leaves it out of every pattern family's top-k and lists it in its ``top_heads`` table with rank NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.engine.hooks import act_name, run_until
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.stats import rng

__all__ = [
    "PATTERN_KINDS", "MIN_ATTENTION_OFF_FIRST_TOKEN", "ideal_pattern", "pattern_scores", "first_token_share",
    "ranked_heads", "repeated_random_tokens", "head_pattern_scores",
]

PATTERN_KINDS = ("induction", "previous_token", "duplicate_token")
#: Least share of attention off the first token for a head to be ranked in a pattern family.
MIN_ATTENTION_OFF_FIRST_TOKEN = 0.05


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
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> Float[Tensor, " head_index"]:
    """Mean over sequences of sum(A * P) / sum(A) per head (TransformerLens's "mul" measure, its
    defaults: first token and diagonal counted)."""
    a = pattern.float().clone()
    if exclude_bos:
        a[..., 0] = 0
    if exclude_current_token:
        a = a * (1 - torch.eye(a.shape[-1]))[None, None]
    ideal = torch.stack([ideal_pattern(t, kind) for t in tokens.cpu()])[:, None]  # [batch 1 q k]
    num = (a * ideal.to(a.device)).sum((-1, -2))
    den = a.sum((-1, -2)).clamp_min(1e-12)
    return (num / den).mean(0).cpu()


def first_token_share(pattern: Float[Tensor, "batch head_index query_pos key_pos"]) -> Float[Tensor, " head_index"]:
    """Mean over sequences and query rows i >= 1 of the attention on the first token, A[i, 0]."""
    if pattern.shape[-2] < 2:
        raise ValueError("first_token_share needs sequences of at least two tokens.")
    return pattern[..., 1:, 0].float().mean((0, -1)).cpu()


def ranked_heads(
    share: Float[Tensor, "*head"], min_off_first: float = MIN_ATTENTION_OFF_FIRST_TOKEN
) -> Bool[Tensor, "*head"]:
    """True for heads that may be ranked: attention off the first token, 1 - ``share``, at least
    ``min_off_first``."""
    if not 0 <= min_off_first <= 1:
        raise ValueError(f"min_off_first must be in [0, 1], not {min_off_first}.")
    return (1 - share) >= min_off_first


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
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    batch_size: int = 8,
) -> pd.DataFrame:
    """One row per head (layer, head, one column per kind, ``first_token_share``) from the model's
    ``hook_pattern``."""
    n_layers = model.cfg.n_layers
    device = tl_backend.model_device(model)
    sums = {kind: torch.zeros(n_layers, model.cfg.n_heads) for kind in (*kinds, "first_token_share")}
    for start in range(0, tokens.shape[0], batch_size):
        chunk = tokens[start:start + batch_size]
        patterns: dict[int, Tensor] = {}

        def keep(pattern: Tensor, hook, patterns=patterns) -> None:
            patterns[int(hook.name.split(".")[1])] = pattern.detach()

        with torch.no_grad():
            run_until(model, chunk.to(device), [(act_name("pattern", layer), keep) for layer in range(n_layers)])
        for layer in range(n_layers):
            for kind in kinds:
                score = pattern_scores(patterns[layer], chunk, kind, exclude_bos=exclude_bos,
                                       exclude_current_token=exclude_current_token)
                sums[kind][layer] += score * chunk.shape[0]
            sums["first_token_share"][layer] += first_token_share(patterns[layer]) * chunk.shape[0]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    frame = pd.DataFrame(dict(layer=np.repeat(np.arange(n_layers), n_heads), head=np.tile(np.arange(n_heads), n_layers)))
    for kind in (*kinds, "first_token_share"):
        frame[kind] = (sums[kind] / tokens.shape[0]).flatten().numpy()
    return frame
