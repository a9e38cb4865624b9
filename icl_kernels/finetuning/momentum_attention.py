"""Momentum attention (Dai et al. 2023, section 5): attention output plus a decaying sum of past values.

Dai et al. read attention as a meta-optimiser whose "updates" are the value vectors of earlier
tokens, and borrow the momentum trick of gradient descent: each head's output at position ``t``
gets an exponential moving average of the values before it,

    MoAttn(V, K, q_t) = Attn(V, K, q_t) + sum_{i < t} eta^(t - i) v_i,      0 <= eta < 1.

The sum is over strictly earlier positions (the token's own value is not included), so the patch is
causal, and it does not look at queries or keys: with ``eta = 0`` nothing changes.

Where it acts. The patch is a list of `icl_kernels.engine.patching.Edit`s (`momentum_edits`), applied at
``hook_z`` (per-head attention output before ``W_O``) on
the chosen layers, which changes the output on HookedTransformer and TransformerBridge alike; the
values come from ``hook_v`` of the same layer in the same forward (the edits read ``v``). Grouped-query models (Gemma,
Llama) have fewer value heads than query heads: each query head gets the momentum of the value
head it reads, as in the attention itself (`icl_kernels.engine.hooks.repeat_kv`). On sliding-window layers
(GPT-Neo local layers, Gemma-3) the sum still runs over every earlier position, as the formula is
written; the terms outside the window weigh at most ``eta^window`` (``0.9^256 ~ 2e-12``).

Cost. ``m_t = sum_{i<t} eta^(t-i) v_i`` obeys ``m_t = eta (m_{t-1} + v_{t-1})``. A step-by-step
loop is exact but slow in Python, and the closed form with ``eta^-i`` overflows, so `momentum_term`
uses a chunked scan: within a chunk of ``C`` positions a ``C x C`` matrix of powers ``eta^(j-i)``
(all <= 1, no overflow), and between chunks a carried state, decayed by ``eta^C``. Work is
``O(T C)`` per head and memory ``O(C^2 + T)``: linear in the sequence length, never a ``T x T``
matrix.

Padding. The package right-pads batches. A real token only sums values at earlier positions, which
are real, so right padding needs nothing. For other layouts (left padding) pass ``attention_mask``:
values at masked positions are zeroed, and since the weight depends only on the distance ``t - i``
the result then equals the unpadded one.

Use it as a context manager (`icl_kernels.engine.patching.edits_on` with `momentum_edits`); the hooks go
away on exit, also when the body raises::

    with momentum_attention(model, eta=0.3, layers=[0, 1]):
        logits = model(tokens)

or pass ``momentum_edits(model, eta, layers)`` to `icl_kernels.engine.patching.run_with_edits`, alone or
with other edits.

For training a Hugging Face model from scratch with momentum (``experiments/train_synthetic.py``),
`hf_momentum_attention` applies the same term with PyTorch hooks on the value and output projections
of each attention layer (``v_proj`` and ``out_proj``/``o_proj``, named by the architecture's record in
`icl_kernels.models.architectures`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from icl_kernels.engine.hooks import repeat_kv
from icl_kernels.engine.patching import Edit, EditContext, edits_on
from icl_kernels.models.architectures import Architecture, architecture_of
from icl_kernels.utils.config import parse_layer_set as parse_layers
from icl_kernels.utils.errors import InvalidOptionError

__all__ = [
    "MomentumConfigError",
    "check_eta",
    "momentum_term",
    "momentum_edits",
    "momentum_attention",
    "hf_momentum_attention",
    "compact_layers",
    "DEFAULT_CHUNK",
]

DEFAULT_CHUNK = 64


#: Bad momentum options (eta, layers) raise the package-wide option error.
MomentumConfigError = InvalidOptionError


def check_eta(eta: float) -> float:
    """``eta`` as a float, or a clear error unless ``0 <= eta < 1``.

    >>> check_eta(0.5)
    0.5
    """
    try:
        value = float(eta)
    except (TypeError, ValueError) as error:
        raise MomentumConfigError(f"eta must be a number in [0, 1), got {eta!r}.") from error
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise MomentumConfigError(
            f"eta must be in [0, 1) (the momentum sum diverges for eta >= 1), got {eta!r}. "
            "Dai et al. use 0 < eta < 1; eta = 0 switches momentum off."
        )
    return value


def momentum_term(
    v: Float[Tensor, "batch pos head_index d_head"],
    eta: float,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    attention_mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos head_index d_head"]:
    """``m_t = sum_{i<t} eta^(t-i) v_i`` for every position, by a chunked linear-time scan.

    Works for any trailing shape after ``pos`` (e.g. ``[batch pos d_model]`` for merged heads).
    Computed in float32 (float64 for float64 input) and returned in ``v``'s dtype. Differentiable.

    Args:
        v: value vectors, positions on dimension 1.
        eta: momentum coefficient in ``[0, 1)``.
        chunk_size: positions per chunk of the scan (cost ``O(pos * chunk_size)``).
        attention_mask: ``True`` for real tokens; values at other positions are left out.
    """
    eta = check_eta(eta)
    if v.ndim < 2:
        raise ValueError(f"v must have shape [batch, pos, ...], got {tuple(v.shape)}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    batch, n_pos = v.shape[0], v.shape[1]
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    x = v.to(compute)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, n_pos):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, n_pos)}."
            )
        x = x * attention_mask.to(device=x.device, dtype=compute).view(batch, n_pos, *([1] * (v.ndim - 2)))
    if eta == 0.0 or n_pos < 2:
        return torch.zeros_like(v)
    rest = tuple(x.shape[2:])
    x = x.reshape(batch, n_pos, -1)  # [batch, pos, features]
    size = min(chunk_size, n_pos)
    n_chunks = -(-n_pos // size)
    padded = n_chunks * size
    if padded != n_pos:
        x = torch.nn.functional.pad(x, (0, 0, 0, padded - n_pos))
    x = x.view(batch, n_chunks, size, -1)
    log_eta = math.log(eta)
    steps = torch.arange(size, device=x.device, dtype=torch.float64)
    gap = steps[:, None] - steps[None, :]  # j - i
    decay = torch.where(gap > 0, torch.exp(gap.clamp(min=0) * log_eta), torch.zeros_like(gap)).to(compute)
    intra = torch.einsum("ji,bnif->bnjf", decay, x)  # within-chunk sum over i < j
    to_next = torch.exp((size - steps) * log_eta).to(compute)  # weight of position i at the next chunk's start
    totals = torch.einsum("i,bnif->bnf", to_next, x)
    carry_decay = eta**size
    states = []
    state = torch.zeros_like(totals[:, 0])
    for chunk in range(n_chunks):  # O(pos / chunk_size) steps on [batch, features]
        states.append(state)
        state = state * carry_decay + totals[:, chunk]
    carried = torch.stack(states, dim=1)  # momentum at each chunk's first position
    from_carry = torch.exp(steps * log_eta).to(compute)  # eta^j
    out = intra + from_carry[None, None, :, None] * carried[:, :, None, :]
    out = out.reshape(batch, padded, -1)[:, :n_pos]
    return out.reshape(batch, n_pos, *rest).to(v.dtype)


def momentum_edits(
    model,
    eta: float,
    layers: str | int | Iterable[int] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    attention_mask: Bool[Tensor, "batch pos"] | None = None,
) -> list[Edit]:
    """The patch as `icl_kernels.engine.patching.Edit`s: on each chosen layer (default all), ``hook_z``
    becomes ``z_t + sum_{i<t} eta^(t-i) v_i`` with ``v`` read from the same forward pass (each
    query head gets the momentum of the value head it reads). ``eta = 0`` gives no edits.
    """
    eta = check_eta(eta)
    chosen = parse_layers(layers, model.cfg.n_layers)
    if eta == 0.0:
        return []
    n_heads = model.cfg.n_heads
    edits = []
    for layer in chosen:

        def add_momentum(z: Tensor, context: EditContext, layer=layer) -> Tensor:
            v = context.activations["v"]
            flat = z.ndim == 3
            z_heads = z.view(*z.shape[:2], n_heads, -1) if flat else z
            if v.ndim == 3:
                v = v.view(*v.shape[:2], -1, z_heads.shape[-1])
            if z_heads.shape[2] % v.shape[2]:
                raise RuntimeError(
                    f"Layer {layer}: {z_heads.shape[2]} query heads are not a multiple of {v.shape[2]} value heads."
                )
            if attention_mask is not None and attention_mask.shape[1] != v.shape[1]:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions but the forward has {v.shape[1]}."
                )
            term = momentum_term(v, eta, chunk_size=chunk_size, attention_mask=attention_mask)
            term = repeat_kv(term, z_heads.shape[2] // v.shape[2])
            out = z_heads + term.to(z.dtype)
            return out.view(z.shape) if flat else out

        edits.append(Edit(layer, add_momentum, "z", f"momentum eta={eta:g} L{layer}", reads=("v",)))
    return edits


@contextlib.contextmanager
def momentum_attention(
    model,
    eta: float,
    layers: str | int | Iterable[int] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    attention_mask: Bool[Tensor, "batch pos"] | None = None,
) -> Iterator[object]:
    """Momentum attention on ``layers`` (default all) for the duration of a ``with`` block:
    `icl_kernels.engine.patching.edits_on` with `momentum_edits`.

    Works on HookedTransformer and TransformerBridge. ``eta = 0`` adds no hooks. The hooks are
    removed on exit, also when the block raises. Other hook contexts may be nested inside.
    """
    with edits_on(model, momentum_edits(model, eta, layers, chunk_size=chunk_size, attention_mask=attention_mask)):
        yield model


def _hf_attention_modules(model, record: Architecture) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``(value projection, output projection)`` of each attention layer of a Hugging Face model, in order."""
    pairs = []
    for module in model.modules():
        v_proj = getattr(module, record.hf_value_proj, None)
        out_proj = getattr(module, record.hf_output_proj, None)
        if isinstance(v_proj, torch.nn.Linear) and isinstance(out_proj, torch.nn.Linear):
            pairs.append((v_proj, out_proj))
    return pairs


@contextlib.contextmanager
def hf_momentum_attention(
    model,
    eta: float,
    layers: str | int | Iterable[int] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[object]:
    """The same patch on a Hugging Face causal LM (GPT-Neo, Llama, Gemma-3 ...), e.g. for training.

    A forward hook on each chosen layer's ``v_proj`` keeps the values; a forward pre-hook on its
    output projection (``out_proj``/``o_proj``) adds their momentum to the merged head outputs.
    Handles are removed on exit, also when the block raises. Gradients flow through the term.
    """
    eta = check_eta(eta)
    record = architecture_of(model.config)
    pairs = _hf_attention_modules(model, record)
    if not pairs:
        raise MomentumConfigError(
            f"{type(model).__name__} has no attention modules with {record.hf_value_proj} and {record.hf_output_proj}."
        )
    chosen = parse_layers(layers, len(pairs))
    config = model.config
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", None)
    n_kv = record.n_kv_heads(config, n_heads)
    handles = []
    try:
        if eta > 0.0:
            for layer in chosen:
                v_proj, out_proj = pairs[layer]
                store: dict[str, Tensor] = {}

                def keep_v(module, inputs, output, store=store) -> None:
                    store["v"] = output

                def add_momentum(module, inputs, store=store, layer=layer):
                    v = store.pop("v", None)
                    if v is None:
                        raise RuntimeError(f"v_proj of layer {layer} did not run before its output projection.")
                    (z, *others) = inputs
                    d_head = z.shape[-1] // n_heads
                    v_heads = v.view(*v.shape[:2], n_kv, d_head)
                    term = repeat_kv(momentum_term(v_heads, eta, chunk_size=chunk_size), n_heads // n_kv)
                    return (z + term.reshape(z.shape).to(z.dtype), *others)

                handles.append(v_proj.register_forward_hook(keep_v))
                handles.append(out_proj.register_forward_pre_hook(add_momentum))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def compact_layers(layers: Sequence[int]) -> str:
    """``[0,1,2,5]`` -> ``"0-2,5"``.

    >>> compact_layers([0, 1, 2, 5])
    '0-2,5'
    """
    parts, run = [], []
    for layer in sorted(layers):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [layer]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)
