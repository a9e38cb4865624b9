"""What each attention head actually writes into the residual stream.

A head's output ``z_h`` (``hook_z``, ``[d_head]`` per position) enters the residual stream through
the layer's output projection. Without a post-attention normalisation (GPT-Neo, GPT-J, Llama) the
layer adds ``attn_out = sum_h z_h @ W_O[h] + b_O``, so head ``h`` writes ``z_h @ W_O[h]`` and the bias
``b_O`` belongs to the layer. Gemma-2 and Gemma-3 normalise the attention output before the residual
add (TransformerLens ``blocks.l.ln1_post``, an RMSNorm with gain ``g``):

    attn_out = g * pre / rms(pre),   pre = sum_h z_h @ W_O[h] + b_O,   rms(pre) = sqrt(mean(pre^2) + eps)

The scale ``rms(pre)`` is one number per position, so the output is still a sum of one term per head:
head ``h`` writes ``g * (z_h @ W_O[h]) / rms(pre)`` and the bias term is ``g * b_O / rms(pre)``
(`head_writes`). The sum over heads plus the bias term equals ``hook_attn_out`` exactly (to float
error; ``tests/unit/test_head_writes.py`` checks it on every tiny architecture, both backends). ``z_h @
W_O[h]`` alone is off by the factor ``g / rms(pre)``: on gemma-3-270m about 525x too small for the top
function-vector heads (issue 28).

The scale is read at ``blocks.l.ln1_post.hook_scale`` (a hook on TransformerLens 3.9's
HookedTransformer and on the TransformerBridge of TL 3.9 / 4.3); the gain is ``ln1_post.w`` on a
HookedTransformer (TransformerLens folds Gemma's ``1 + weight`` into ``w`` when it converts) and
``1 + weight`` of the wrapped Hugging Face ``Gemma*RMSNorm`` on a bridge (``weight`` for another
RMSNorm). `post_attention_gain` checks the gain on a random vector against the module itself and
raises if the module is not such an RMSNorm. Hugging Face computes Gemma's RMSNorm in float32, so on
a bridge the identity holds to float32 precision even for a float64 model.

`mean_head_writes` averages each head's write at the prediction position over prompts: the mean
head output that Todd et al.'s function vector sums (`icl_kernels.families.function_vectors`);
`mean_head_outputs` gives it with the mean ``z`` (the patch of the indirect effects) from the same pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.data.prompts import PromptBatch, batches, pad_id
from icl_kernels.engine.hooks import STOP_HOOK, act_name, run_until
from icl_kernels.models import backend as tl_backend

__all__ = ["HeadWrites", "post_attention_gain", "head_writes", "mean_head_writes", "mean_head_outputs"]


@dataclass(frozen=True)
class HeadWrites:
    """Each head's write into the residual stream at one position per batch row.

    Attributes:
        heads: ``[batch layer head_index d_model]`` head ``h`` of layer ``l``'s term of ``hook_attn_out``.
        bias: ``[batch layer d_model]`` the layer's bias term (``b_O``, normalised like the heads;
            zero where the projection has no bias).
        attn_out: ``[batch layer d_model]`` ``hook_attn_out`` itself (the identity's right-hand side).
        z: ``[batch layer head_index d_head]`` each head's output ``hook_z`` (what the writes are made of).
        final: ``[batch d_model]`` the unembedding input at the position, when asked for
            (``head_writes(..., final=True)``), else None.
    """

    heads: Float[Tensor, "batch layer head_index d_model"]
    bias: Float[Tensor, "batch layer d_model"]
    attn_out: Float[Tensor, "batch layer d_model"]
    z: Float[Tensor, "batch layer head_index d_head"]
    final: Float[Tensor, "batch d_model"] | None = None


def _post_norm(model: tl_backend.Model, layer: int):
    block = model.blocks[layer]
    return getattr(block, "ln1_post", None)


def post_attention_gain(model: tl_backend.Model, layer: int) -> Float[Tensor, " d_model"] | None:
    """The gain ``g`` of layer ``layer``'s post-attention RMSNorm (``ln1_post``), or None where the
    attention output enters the residual stream as it is. Checked against the module on a random
    vector; a post-attention norm of another kind raises ``NotImplementedError``."""
    norm = _post_norm(model, layer)
    if norm is None or isinstance(norm, torch.nn.Identity):
        return None
    inner = getattr(norm, "_original_component", None)
    if inner is not None:  # TransformerBridge: the Hugging Face module
        weight = getattr(inner, "weight", None)
        if weight is None:
            raise NotImplementedError(f"Layer {layer}'s post-attention norm {type(inner).__name__} has no weight.")
        gain = 1 + weight.detach() if re.fullmatch(r"Gemma\d*RMSNorm", type(inner).__name__) else weight.detach()
        module, eps = inner, float(getattr(inner, "eps", getattr(inner, "variance_epsilon", model.cfg.eps)))
    elif hasattr(norm, "w") and not hasattr(norm, "b"):  # HookedTransformer RMSNorm
        gain, module, eps = norm.w.detach(), norm, float(model.cfg.eps)
    else:
        raise NotImplementedError(
            f"Layer {layer}'s post-attention norm is a {type(norm).__name__}, not an RMSNorm; head writes "
            "are defined here for RMSNorm (Gemma-2/3) only.")
    probe = torch.randn(1, 1, gain.shape[-1], generator=torch.Generator().manual_seed(0)).to(gain.device, gain.dtype)
    with torch.no_grad():
        expected = (probe / (probe.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gain).float()
        got = module(probe).float()
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise NotImplementedError(
            f"Layer {layer}'s post-attention norm ({type(module).__name__}) does not compute g * x / rms(x) with the "
            f"gain read from it (max difference {float((got - expected).abs().max()):.3g}); head writes are unknown.")
    return gain


def head_writes(
    model: tl_backend.Model,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, " batch"],
    *,
    layers: Sequence[int] | None = None,
    final: bool = False,
) -> HeadWrites:
    """Every head's write into the residual stream at ``positions[b]`` of row ``b`` (one forward pass;
    CPU tensors in the model's dtype). See the module docstring for the formula. ``final``: the pass
    runs on to the unembedding input and `HeadWrites.final` keeps it at the positions (on the model's
    device), so a prediction can be read from the same pass."""
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    if tokens.ndim != 2 or positions.shape != (tokens.shape[0],):
        raise ValueError(f"tokens must be [batch pos] and positions [batch]; got {tuple(tokens.shape)} and "
                         f"{tuple(positions.shape)}.")
    rows = torch.arange(tokens.shape[0])
    kept: dict[tuple[str, int], Tensor] = {}

    def keep(kind: str, layer: int):
        def hook(tensor: Tensor, hook) -> None:
            kept[kind, layer] = tensor[rows.to(tensor.device), positions.to(tensor.device)].detach()

        return hook

    gains = {layer: post_attention_gain(model, layer) for layer in layers}
    hooks = []
    for layer in layers:
        hooks += [(act_name("z", layer), keep("z", layer)), (act_name("attn_out", layer), keep("attn_out", layer))]
        if gains[layer] is not None:
            hooks.append((f"blocks.{layer}.ln1_post.hook_scale", keep("scale", layer)))
    if final:
        hooks.append((STOP_HOOK, keep("final", -1)))
    with torch.no_grad():  # the pass ends at the last layer's hook_attn_out, or at the unembedding input
        run_until(model, tokens.to(tl_backend.model_device(model)), hooks,
                  stop=STOP_HOOK if final else act_name("attn_out", max(layers)))
    heads, biases, outs, zs = [], [], [], []
    for layer in layers:
        attn = model.blocks[layer].attn
        z = kept["z", layer]  # [batch head_index d_head]
        w_o = attn.W_O.detach().to(z.device).contiguous()  # its rounding independent of the weight layout
        per_head = torch.einsum("bhd,hdm->bhm", z.to(w_o.dtype), w_o)
        b_o = getattr(attn, "b_O", None)
        bias = torch.zeros(z.shape[0], w_o.shape[-1], dtype=per_head.dtype, device=z.device)
        if b_o is not None:
            bias = bias + b_o.detach().to(bias.device, bias.dtype)
        if gains[layer] is not None:
            factor = gains[layer].to(z.device, per_head.dtype) / kept["scale", layer].to(per_head.dtype)  # [batch d_model]
            per_head, bias = per_head * factor[:, None], bias * factor
        heads.append(per_head.cpu())
        biases.append(bias.cpu())
        outs.append(kept["attn_out", layer].cpu())
        zs.append(z.cpu())
    return HeadWrites(torch.stack(heads, 1), torch.stack(biases, 1), torch.stack(outs, 1), torch.stack(zs, 1),
                      kept.get(("final", -1)))


def mean_head_writes(
    model: tl_backend.Model,
    prompts: Sequence,
    *,
    batch_size: int = 4,
    pad_token_id: int | None = None,
) -> Float[Tensor, "layer head_index d_model"]:
    """Mean over ``prompts`` of each head's write (`head_writes`) at the prompt's prediction
    position (CPU, float32 or the model's float64)."""
    return mean_head_outputs(model, prompts, batch_size=batch_size, pad_token_id=pad_token_id)[1]


def mean_head_outputs(
    model: tl_backend.Model,
    prompts: Sequence,
    *,
    batch_size: int = 4,
    pad_token_id: int | None = None,
    keep: Callable[[PromptBatch, HeadWrites], Bool[Tensor, " batch"]] | None = None,
) -> tuple[Float[Tensor, "layer head_index d_head"], Float[Tensor, "layer head_index d_model"]]:
    """In one pass over ``prompts``: each head's mean output ``z`` at the prediction position (what
    `icl_kernels.engine.patching.head_means` returns, bit for bit: the same batches) and its mean
    write (`mean_head_writes`).

    ``keep(batch, writes)``: average only over the rows of each batch it marks; the pass then runs on
    to the unembedding input (`HeadWrites.final`), so ``keep`` can read each row's prediction from the
    same pass (`icl_kernels.families.function_vectors.answered_head_outputs`). NaN where it keeps none.
    """
    if not prompts:
        raise ValueError("mean_head_outputs (and mean_head_writes) need at least one prompt.")
    device = tl_backend.model_device(model)
    total, zs = None, []
    for batch in batches(list(prompts), batch_size, pad_id(model, pad_token_id), device):
        out = head_writes(model, batch.tokens, batch.prediction_positions, final=keep is not None)
        rows = slice(None) if keep is None else keep(batch, out)
        writes = out.heads[rows].double().sum(0)
        total = writes if total is None else total + writes
        zs.append(out.z[rows])
    z = torch.cat(zs)
    dtype = torch.float64 if tl_backend.model_dtype(model) == torch.float64 else torch.float32
    return z.mean(0), (total / len(z)).to(dtype)
