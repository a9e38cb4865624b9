"""Label scores: the package's one way from prompts to log P(label | prompt).

Every analysis that asks "what does the model predict here?" does the same four steps, and they
are written once, here:

1. run the prompts (right-padded, in batches), under any edits (`icl_kernels.engine.edits`) and,
   optionally, after a shared prefix whose keys and values were computed once
   (`icl_kernels.engine.prefix_cache`), and stop the forward pass at the unembedding input
   (`icl_kernels.engine.hooks.STOP_HOOK`), keeping it only at the positions to be read
   (`final_residual`);
2. unembed those rows only (`unembed`: no logits for every position over a 262k vocabulary);
3. refuse NaN or infinite logits with one clear error naming the prompts (`check_finite`,
   `prediction_logits`), instead of reporting numbers computed from them;
4. log-softmax over the whole vocabulary and read the label tokens (`label_scores`).

`label_log_probs` does all four for `icl_kernels.data.prompts.IclPrompt`s (or plain token lists).
By default a multi-token label word is scored as a full continuation (its tokens appended to the
prompt, log-probabilities summed); ``whole_label=False`` reads only the first token of each label,
the convention of the patching, head and family analyses. Analyses whose forward pass also keeps
other activations (`icl_kernels.engine.capture.capture`, `icl_kernels.finetuning.recording`) run it
themselves and call `label_scores` / `prediction_logits` on the rows they kept.

Precision: logits are cast to `score_dtype` before the log-softmax: float64 for a float64 model,
float32 for every other dtype (float16 and bfloat16 logits are upcast), unless ``dtype`` asks for
another. A float32 model's scores are therefore exactly those of a plain float32 log-softmax, and a
float64 model's are float64 throughout (the float64 identities of the tests hold to ~1e-12).

With a shared prefix, a prompt's position ``p`` is position ``p - len(prefix)`` of the suffix that
is run, and that is what hooks and edits see (`icl_kernels.engine.edits.EditContext` gets suffix
prediction positions). Edits that write at the prediction position are exact there; edits that
recompute attention from q, k and v (`Edit.reads`) would see only the suffix's keys and are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.edits import Edit, check_edits, edits_on
from icl_kernels.engine.hooks import STOP_HOOK, act_name, run_until
from icl_kernels.engine.layer_start import LayerStart, started_forward_kwargs
from icl_kernels.engine.prefix_cache import (
    SharedPrefix,
    common_prefix_length,
    encode_prefix,
    prefix_forward,
    reuse_reason,
    right_pad,
)
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import NonFiniteLogitsError

__all__ = [
    "shared_label_log_probs",
    "NonFiniteLogitsError",
    "check_finite",
    "score_dtype",
    "unembed",
    "final_residual",
    "prediction_logits",
    "label_scores",
    "label_log_probs",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# From final residual rows to checked logits and label log-probabilities
# ------------------------------------------------------------------------------------------------


def unembed(
    model: tl_backend.Model,
    residual: Float[Tensor, "... d_model"],
    token_ids: Int[Tensor, " n_tokens"] | None = None,
    *,
    w_u_t: Float[Tensor, "d_vocab d_model"] | None = None,
) -> Float[Tensor, "... d_vocab"]:
    """Logits from the unembedding input, only for ``token_ids`` when given (then the last dimension
    is ``n_tokens``), with Gemma-style soft-capping when configured.

    Multiplies by ``W_U`` directly: TransformerLens' ``Unembed`` copies the transposed ``W_U`` on
    every call (0.7 s for Gemma's 262k x 640 on one CPU thread), and scoring a few label tokens
    needs only their columns. ``w_u_t``: ``W_U`` transposed and made contiguous once by a caller that
    unembeds many batches (the product of many rows runs faster in that layout, ~1.8x on a CPU).
    """
    w_u, b_u = model.unembed.W_U, getattr(model.unembed, "b_U", None)
    if token_ids is not None:
        w_u = w_u[:, token_ids]
        b_u = b_u[token_ids] if b_u is not None else None
    if w_u_t is not None and token_ids is None:
        logits = torch.nn.functional.linear(residual.to(w_u_t.dtype), w_u_t, b_u)
    else:
        logits = residual.to(w_u.dtype) @ w_u
        if b_u is not None:
            logits = logits + b_u
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def check_finite(
    logits: Float[Tensor, "row ..."],
    *,
    first_index: int = 0,
    what: str = "prompt",
    model: tl_backend.Model | None = None,
    indices: Sequence[int] | None = None,
) -> None:
    """Raise `NonFiniteLogitsError` if any row of ``logits`` holds NaN or inf.

    Row ``r`` belongs to ``what`` number ``indices[r]`` (default ``first_index + r``; several rows
    may belong to one prompt). The message names every such prompt, the model's dtype, and what to
    try: float32 where float16/bfloat16 overflowed, else a look at the weights and edits.
    """
    bad = ~torch.isfinite(logits.reshape(logits.shape[0], -1)).all(-1)
    if not bool(bad.any()):
        return
    names = list(indices) if indices is not None else list(range(first_index, first_index + len(bad)))
    bad_rows = bad.nonzero()[:, 0].tolist()
    named = sorted({int(names[row]) for row in bad_rows})
    kind = "NaN" if bool(torch.isnan(logits[bad_rows[0]]).any()) else "infinite"
    dtype = tl_backend.model_dtype(model) if model is not None else None
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "the model's dtype"
    more = ""
    if len(named) > 1:
        listed = ", ".join(str(i) for i in named[1:9]) + (", ..." if len(named) > 9 else "")
        more = f" (and {len(named) - 1} more: {listed})"
    if dtype is None or dtype in _LOW_PRECISION:
        hint = "Rerun with --dtype float32 (float16 and bfloat16 overflow easily)."
    else:
        hint = (
            f"In {dtype_name} this is no float16 overflow (--dtype float32 would not help): look for NaN or "
            "inf in the model's weights or in an edit or hook of the run."
        )
    raise NonFiniteLogitsError(
        f"{kind} logits for {what} {named[0]}{more} in {dtype_name}; no prediction can be made from them. {hint}"
    )


def score_dtype(model: tl_backend.Model, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype logits are log-softmaxed in: ``dtype`` when given, else float64 for a float64
    unembedding and float32 for any other (float16 / bfloat16 are upcast)."""
    if dtype is not None:
        return dtype
    return torch.float64 if model.unembed.W_U.dtype == torch.float64 else torch.float32


def prediction_logits(
    model: tl_backend.Model,
    residual: Float[Tensor, "*batch d_model"],
    *,
    dtype: torch.dtype | None = None,
    first_index: int = 0,
    indices: Sequence[int] | None = None,
    w_u_t: Tensor | None = None,
) -> Float[Tensor, "*batch d_vocab"]:
    """Logits over the whole vocabulary from final residual rows, in `score_dtype`, after
    `check_finite` (row ``r`` is prompt ``first_index + r``, or ``indices[r]``; a single row may be
    given without its batch dimension; ``w_u_t`` as in `unembed`)."""
    logits = unembed(model, residual, w_u_t=w_u_t).to(score_dtype(model, dtype))
    check_finite(logits if logits.ndim > 1 else logits[None], first_index=first_index, model=model, indices=indices)
    return logits


def label_scores(
    model: tl_backend.Model,
    residual: Float[Tensor, "batch d_model"],
    token_ids: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    first_index: int = 0,
    w_u_t: Tensor | None = None,
) -> Float[Tensor, "batch n_tokens"]:
    """log-softmax over the whole vocabulary of the logits of each residual row, read at
    ``token_ids`` (CPU). Non-finite logits raise `NonFiniteLogitsError` naming prompt
    ``first_index + row``; ``w_u_t`` as in `unembed`."""
    logits = prediction_logits(model, residual, dtype=dtype, first_index=first_index, w_u_t=w_u_t)
    ids = torch.as_tensor(list(token_ids), device=logits.device)
    return logits.log_softmax(-1)[:, ids].cpu()


# ------------------------------------------------------------------------------------------------
# Running to the unembedding input
# ------------------------------------------------------------------------------------------------


def final_residual(
    model: tl_backend.Model,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, " batch"] | None = None,
    *,
    hooks: Sequence[tuple[str, Callable]] = (),
    prefix: SharedPrefix | None = None,
    start: tuple[int, Tensor] | None = None,
) -> Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch d_model"]:
    """The input of the unembedding, without computing any logits: at every position, or at one
    position per row (``positions``).

    ``hooks`` run in the same forward pass (they fire before the stop). With ``prefix`` the
    ``tokens`` are suffixes run after it (`icl_kernels.engine.prefix_cache.prefix_forward`) and
    positions count within the suffix. With ``start = (layer, residual)`` only layers ``layer..`` run,
    from the residual stream entering ``layer`` of these tokens (`icl_kernels.engine.layer_start`).
    Not detached: under ``torch.enable_grad`` the rows carry gradients.
    """
    kept: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook) -> None:
        if positions is None:
            kept["x"] = tensor
        else:
            rows = torch.arange(tensor.shape[0], device=tensor.device)
            kept["x"] = tensor[rows, positions.to(tensor.device)]

    fwd_hooks = [*hooks, (STOP_HOOK, keep)]
    if prefix is not None and start is not None:
        raise ValueError("final_residual: give a shared prefix or a layer start, not both.")
    if prefix is not None:
        prefix_forward(model, prefix, tokens, fwd_hooks)
    elif start is not None:
        layer, residual = start
        if residual.shape[:2] != tokens.shape:
            raise ValueError(f"A residual of shape {tuple(residual.shape)} does not belong to tokens of shape "
                             f"{tuple(tokens.shape)}.")
        run_until(model, residual, fwd_hooks, **started_forward_kwargs(model, layer, tokens))
    else:
        run_until(model, tokens, fwd_hooks)
    if "x" not in kept:
        raise RuntimeError(f"{STOP_HOOK} did not fire; the forward pass did not reach the unembedding.")
    return kept["x"]


# ------------------------------------------------------------------------------------------------
# The scorer
# ------------------------------------------------------------------------------------------------


def _token_lists(prompts: Sequence) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in (p.tokens if isinstance(p, IclPrompt) else p)) for p in prompts]


def check_row_ids(row_ids: Sequence[int] | None, n_prompts: int) -> list[int]:
    """The row index each prompt's edits see: ``row_ids`` (one per prompt, checked) or ``0..n-1``."""
    if row_ids is None:
        return list(range(n_prompts))
    ids = [int(i) for i in row_ids]
    if len(ids) != n_prompts:
        raise ValueError(f"row_ids gives {len(ids)} rows for {n_prompts} prompts; give one per prompt.")
    return ids


def _suffix_start(prefix: SharedPrefix | None, token_lists: Sequence[tuple[int, ...]], edits: Sequence[Edit]) -> int:
    """Where the run of each prompt starts: after the shared prefix (checked), else at 0."""
    if prefix is None:
        return 0
    n = len(prefix)
    bad = [i for i, tokens in enumerate(token_lists) if len(tokens) <= n or tokens[:n] != prefix.tokens]
    if bad:
        raise ValueError(
            f"Prompts {bad[:5]} do not start with the shared prefix ({n} tokens) or have no token after it; "
            "encode the prefix from these prompts' common tokens (prefix_cache.common_prefix_length)."
        )
    readers = [edit.label or str(edit.fn) for edit in edits if edit.reads]
    if readers:
        raise ValueError(
            f"Edits {readers} recompute attention from q, k, v, but after a shared prefix a forward pass "
            "holds only the suffix's; score these prompts without prefix=."
        )
    return n


def _continuation_scores(
    model: tl_backend.Model,
    resid: Float[Tensor, "row pos d_model"],
    rows: Sequence[tuple[int, tuple[int, ...]]],
    predictions: Sequence[int],
    dtype: torch.dtype | None,
    first_index: int,
) -> Float[Tensor, " row"]:
    """log P(label continuation | prompt) of each (prompt, label) row, summed over the label's tokens:
    token ``j`` is read at position ``prediction + j`` (the prompt's last token, then the label's own
    tokens appended after it), each position unembedded row by row."""
    scores = torch.zeros(len(rows), dtype=score_dtype(model, dtype))
    for row, ((owner, label), start) in enumerate(zip(rows, predictions)):
        ids = torch.tensor(label, device=resid.device)
        positions = torch.arange(start, start + len(label), device=resid.device)
        logits = prediction_logits(model, resid[row, positions], dtype=dtype, indices=[first_index + owner] * len(label))
        scores[row] = logits.log_softmax(-1)[torch.arange(len(label)), ids].sum().cpu()
    return scores


def label_log_probs(
    model: tl_backend.Model,
    prompts: Sequence[IclPrompt] | Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    *,
    edits: Sequence[Edit] = (),
    prefix: SharedPrefix | None = None,
    whole_label: bool = True,
    keep: Sequence[str] = (),
    batch_size: int = 8,
    pad_token_id: int = 0,
    first_index: int = 0,
    dtype: torch.dtype | None = None,
    row_ids: Sequence[int] | None = None,
    start: LayerStart | None = None,
) -> Float[Tensor, "batch n_classes"] | tuple[Tensor, dict[str, Tensor]]:
    """log P(label | prompt) for each prompt and class, over the whole vocabulary (CPU).

    Args:
        model: a HookedTransformer or TransformerBridge.
        prompts: `IclPrompt`s or token lists; each is scored at its last token.
        label_ids: token ids of each class's label word.
        edits: `icl_kernels.engine.edits.Edit`s applied to every forward pass (`edits_on`); they
            see each batch row's prompt index, prediction position and length.
        prefix: a `icl_kernels.engine.prefix_cache.SharedPrefix` every prompt starts with; its
            keys and values are reused and only the rest of each prompt is run.
        whole_label: score a multi-token label as the full continuation (its tokens appended,
            log-probabilities summed); False reads the first token of each label only.
        keep: activation kinds (``"z"``, ``"resid_post"``, ...) to keep at every layer at the
            prediction positions, after the edits; then ``(scores, {kind: [prompt layer ...]})``
            is returned.
        batch_size: prompts per forward pass (with continuations, ``batch_size // n_classes``
            prompts, one row per prompt and class).
        pad_token_id: id used for right padding (never seen by a real token).
        first_index: index of ``prompts[0]`` in error messages (a caller scoring a slice can name
            the query).
        dtype: dtype of the log-softmax (`score_dtype`: float64 for a float64 model, else float32).
        row_ids: the row index the edits see for each prompt (``EditContext.rows``; default the
            prompt's position in ``prompts``), for a caller scoring some of the prompts its edits
            were built for.
        start: the residual entering a layer of every batch (`icl_kernels.engine.layer_start.layer_start`
            of the same prompts, batch size and padding): only the layers from there run, for edits
            that leave the layers below it alone; single-token scoring only (no continuations).

    Raises:
        NonFiniteLogitsError: NaN or infinite logits; the message names the prompts.
        ValueError: no prompts, a class without tokens, prompts that do not start with ``prefix``,
            or edits that read q/k/v with a prefix.
    """
    if not prompts:
        raise ValueError("label_log_probs needs at least one prompt.")
    if not label_ids or any(len(ids) == 0 for ids in label_ids):
        raise ValueError("label_ids must give at least one token id per class.")
    edits = check_edits(model, edits)
    token_lists = _token_lists(prompts)
    ids = check_row_ids(row_ids, len(token_lists))
    offset = _suffix_start(prefix, token_lists, edits)
    device = tl_backend.model_device(model)
    n_layers, n_classes = model.cfg.n_layers, len(label_ids)
    first = [int(ids[0]) for ids in label_ids]
    whole = whole_label and any(len(ids) > 1 for ids in label_ids)
    appended = [tuple(int(t) for t in ids) for ids in label_ids] if whole else [()]
    per_batch = max(1, batch_size // n_classes) if whole else batch_size
    if start is not None and (whole or prefix is not None):
        raise ValueError("label_log_probs(start=...) scores single-token labels without a shared prefix; give "
                         "whole_label=False (or one-token labels) and no prefix, or no start.")
    scores: list[Tensor] = []
    kept_parts: dict[str, list[Tensor]] = {kind: [] for kind in keep}
    for begin in range(0, len(token_lists), per_batch):
        owners = range(begin, min(begin + per_batch, len(token_lists)))
        rows = [(i, label) for i in owners for label in appended]
        suffixes = [token_lists[i][offset:] + label for i, label in rows]
        tokens = right_pad(suffixes, pad_token_id).to(device)
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        predictions = [len(token_lists[i]) - 1 - offset for i, _ in rows]
        positions = torch.tensor(predictions, device=device)
        kept: dict[tuple[str, int], Tensor] = {}

        def keep_at_prediction(kind: str, layer: int, positions=positions):
            def hook(tensor: Tensor, hook) -> None:
                kept[(kind, layer)] = tensor.detach()[torch.arange(tensor.shape[0], device=tensor.device), positions]

            return hook

        # registered inside edits_on (an inner hook context), so they see the edited values
        hooks = [(act_name(kind, layer), keep_at_prediction(kind, layer)) for kind in keep for layer in range(n_layers)]
        owner_rows = torch.tensor([ids[i] for i, _ in rows])
        with torch.no_grad(), edits_on(model, edits, rows=owner_rows, prediction_positions=positions, lengths=lengths):
            begun = None if start is None else (start.layer, start.batch(begin // per_batch, begin, len(owners), per_batch))
            resid = final_residual(model, tokens, None if whole else positions, hooks=hooks, prefix=prefix, start=begun)
        with torch.no_grad():
            if whole:
                scores.append(_continuation_scores(model, resid, rows, predictions, dtype, first_index).view(len(owners), n_classes))
            else:
                scores.append(label_scores(model, resid, first, dtype=dtype, first_index=first_index + begin))
        for kind in keep:
            stacked = torch.stack([kept[(kind, layer)].cpu() for layer in range(n_layers)], dim=1)
            kept_parts[kind].append(stacked[:: len(appended)])
    out = torch.cat(scores)
    return (out, {kind: torch.cat(parts) for kind, parts in kept_parts.items()}) if keep else out


def shared_label_log_probs(
    model: tl_backend.Model,
    prompts: Sequence[IclPrompt],
    label_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    min_prefix: int = 1,
) -> Float[Tensor, "batch n_classes"]:
    """`label_log_probs` with the prompts' common prefix run once
    (multi-token labels scored as full continuations, as there); the full forward where
    `reuse_reason` says reuse cannot be exact."""
    token_lists = [list(p.tokens) for p in prompts]
    n_prefix = common_prefix_length(token_lists)
    reused = reuse_reason(model, n_prefix, min_prefix) is None
    prefix = encode_prefix(model, token_lists[0][:n_prefix]) if reused else None
    return label_log_probs(model, prompts, label_ids, prefix=prefix, batch_size=batch_size, pad_token_id=pad_token_id)
