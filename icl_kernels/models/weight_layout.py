"""Weights stored in the memory layout TransformerLens's forward pass multiplies with.

A HookedTransformer keeps its weights in TransformerLens's shapes (``W_Q`` ``[head_index d_model
d_head]``, ``W_O`` ``[head_index d_head d_model]``, a gated MLP's ``W_gate``/``W_in`` ``[d_model
d_mlp]`` and ``W_out`` ``[d_mlp d_model]``), but its forward pass multiplies with another layout and
copies every weight into it on every call (TransformerLens 3.9):

* ``simple_attn_linear`` rearranges ``W_Q``/``W_K``/``W_V`` to ``[(head_index d_head) d_model]``, a
  copy for every layer and pass (a view when there is one head, e.g. one key/value head: left as it is);
* the attention output rearranges ``W_O`` to ``[d_model (head_index d_head)]`` and calls
  ``.contiguous()``;
* ``GatedMLP`` (Gemma, Llama) calls ``F.linear(x, W.T.contiguous())`` for each of its three weights.

On gemma-3-270m a forward pass without hooks takes 5.38 s with the weights as TransformerLens loads
them and 5.09 s without the copies (``benchmarks/bench_forward.py``,
``results/benchmarks/bench_forward_gemma.txt``). `use_forward_layout` keeps every such weight as a
view of a tensor that already has the layout the forward pass asks for: same shape, same values, same
``Parameter`` objects, only the strides change, so each rearrangement is a view and each
``.contiguous()`` returns its input. The matrix products receive exactly the tensors they received
before (same values, same contiguous layout), so every activation and logit is bit for bit the same
(``tests/unit/test_weight_layout.py``: every tiny architecture, whole activation caches, and studies
that train and patch).

`load_model` applies it to every HookedTransformer it returns. A TransformerBridge runs the wrapped
Hugging Face modules, whose weights already have their own layout; it is left alone.
`use_default_layout` makes every weight contiguous again (what TransformerLens loads; code that calls
``.view`` on a weight needs it).

Code of ours that multiplies with one of these weights itself (``head_writes``, the function vectors'
per-head writes) makes it contiguous first, so its rounding does not depend on the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from icl_kernels.models import backend as tl_backend

__all__ = ["use_forward_layout", "use_default_layout", "has_forward_layout"]

#: ``(parameter name, permutation)``: the parameter is stored as
#: ``base.permute(inverse)`` with ``base = parameter.permute(permutation).contiguous()``, the layout
#: TransformerLens's forward pass copies it into.
_ATTENTION = (("W_Q", (0, 2, 1)), ("W_K", (0, 2, 1)), ("W_V", (0, 2, 1)), ("_W_K", (0, 2, 1)), ("_W_V", (0, 2, 1)),
              ("W_O", (2, 0, 1)))
_GATED_MLP = (("W_gate", (1, 0)), ("W_in", (1, 0)), ("W_out", (1, 0)))


def _inverse(permutation: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(permutation)
    for i, p in enumerate(permutation):
        out[p] = i
    return tuple(out)


def _parameters(model: tl_backend.Model) -> Iterator[tuple[torch.nn.Parameter, tuple[int, ...]]]:
    """Each weight the forward pass copies, with the permutation to the layout it copies into."""
    for block in model.blocks:
        for name, permutation in _ATTENTION:
            param = block.attn._parameters.get(name)
            # W_Q/W_K/W_V of one head (or d_head 1) reach the product as a view, not a copy: left as
            # they are, so that the product sees the same strides (and rounds the same) as before
            if param is not None and (name == "W_O" or (param.shape[0] > 1 and param.shape[2] > 1)):
                yield param, permutation
        if type(block.mlp).__name__ == "GatedMLP":  # a plain MLP multiplies W_in / W_out as they are
            for name, permutation in _GATED_MLP:
                param = block.mlp._parameters.get(name)
                if param is not None:
                    yield param, permutation


def _relayout(model: tl_backend.Model, change: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]) -> None:
    if tl_backend.is_bridge(model):
        return
    with torch.no_grad():
        for param, permutation in _parameters(model):
            param.data = change(param.data, permutation)


def use_forward_layout(model: tl_backend.Model) -> tl_backend.Model:
    """Store ``model``'s weights in the layout its forward pass multiplies with (in place; module
    docstring); returns ``model``. A TransformerBridge is returned unchanged."""
    _relayout(model, lambda t, p: t.permute(p).contiguous().permute(_inverse(p)))
    return model


def use_default_layout(model: tl_backend.Model) -> tl_backend.Model:
    """Make every weight `use_forward_layout` moved contiguous again (in place); returns ``model``."""
    _relayout(model, lambda t, p: t.contiguous())
    return model


def has_forward_layout(model: tl_backend.Model) -> bool:
    """Whether every weight the forward pass would copy is already stored in its layout (True for a
    TransformerBridge, which has none)."""
    if tl_backend.is_bridge(model):
        return True
    return all(param.permute(permutation).is_contiguous() for param, permutation in _parameters(model))
