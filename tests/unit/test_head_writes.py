"""Each head's write into the residual stream: summed, it reproduces the attention block's output."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_PARAMS, load_tiny
from test_patching import _prompts

from icl_kernels.engine.head_writes import head_writes, mean_head_outputs, mean_head_writes, post_attention_gain
from icl_kernels.engine.patching import head_means
from icl_kernels.models import backend as tl_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny64(arch: str, backend: str):
    """A float64 copy of the tiny model whose post-attention gains (if any) are random, not 1."""
    model = copy.deepcopy(load_tiny(arch, backend, dtype=torch.float64))
    n_params = sum(p.numel() for p in model.parameters())
    assert TINY_PARAMS[arch] <= n_params <= TINY_PARAMS[arch] + 50257 * 65 + 50_000, n_params
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            norm = getattr(block, "ln1_post", None)
            if norm is None:
                continue
            inner = getattr(norm, "_original_component", None)
            weight = inner.weight if inner is not None else norm.w
            weight.copy_(torch.randn(weight.shape, generator=g, dtype=weight.dtype))
    return model


def _tokens():
    tokens = torch.tensor([[50256, 11, 407, 9, 3000, 25, 77, 1200], [50256, 5, 6, 7, 8, 9, 0, 0]])
    return tokens, torch.tensor([7, 5])


def test_summed_head_writes_reproduce_attn_out(arch, backend):
    model = _tiny64(arch, backend)
    tokens, positions = _tokens()
    writes = head_writes(model, tokens, positions)
    n_layers, n_heads, d_model = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model
    assert writes.heads.shape == (2, n_layers, n_heads, d_model)
    total = writes.heads.sum(2) + writes.bias
    # Hugging Face's Gemma RMSNorm casts to float32, so on a bridge the block output itself is float32-exact
    hf_float32 = tl_backend.is_bridge(model) and arch == "gemma-3"
    tol = 1e-6 if hf_float32 else 1e-10
    torch.testing.assert_close(total, writes.attn_out, atol=tol * writes.attn_out.abs().max().item(), rtol=0)
    if arch == "gemma-3":
        # z @ W_O alone is not the write: the post-attention norm rescales it
        gain = post_attention_gain(model, 0)
        assert gain is not None and not torch.allclose(gain, torch.ones_like(gain))
        z_wo = torch.zeros_like(total[:, 0])
        rows = torch.arange(2)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.attn.hook_z")
        z = cache["blocks.0.attn.hook_z"][rows, positions]
        z_wo = torch.einsum("bhd,hdm->bm", z, model.blocks[0].attn.W_O.detach())
        assert (z_wo - writes.attn_out[:, 0]).abs().max() > 1e-3
    else:
        assert post_attention_gain(model, 0) is None


def test_mean_head_writes_average_the_prediction_position_writes():
    model = _tiny64("gemma-3", tl_backend.AVAILABLE_BACKENDS[0])
    builder, icl, _ = _prompts(model.tokenizer, shots=2, n=5)
    means = mean_head_writes(model, icl, batch_size=2)
    one_by_one = []
    for prompt in icl:
        tokens = torch.tensor([prompt.tokens])
        one_by_one.append(head_writes(model, tokens, torch.tensor([len(prompt.tokens) - 1])).heads[0])
    torch.testing.assert_close(means, torch.stack(one_by_one).mean(0), atol=1e-10, rtol=0)


def test_a_post_norm_of_unknown_kind_is_refused():
    model = _tiny64("gemma-3", tl_backend.AVAILABLE_BACKENDS[0])
    block = model.blocks[1]
    inner = getattr(block.ln1_post, "_original_component", None)
    target = inner if inner is not None else block.ln1_post
    original = target.forward
    target.forward = lambda x: original(x) + 1.0  # no longer g * x / rms(x)
    with pytest.raises(NotImplementedError, match="does not compute g"):
        post_attention_gain(model, 1)


def test_mean_head_outputs_give_head_means_bit_for_bit_and_the_mean_writes(backend):
    """One pass for both: the mean z equals `head_means` (same batches) exactly; the mean write is
    the mean of each prompt's own `head_writes`."""
    model = load_tiny("gemma-3", backend)
    prompts = [*_prompts(model.tokenizer, shots=2, n=3)[1], *_prompts(model.tokenizer, shots=3, n=2)[1]]
    assert len({len(p.tokens) for p in prompts[2:4]}) > 1  # the second batch is padded
    z_means, writes = mean_head_outputs(model, prompts, batch_size=2)
    assert z_means.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    assert torch.equal(z_means, head_means(model, prompts, batch_size=2))
    alone = [head_writes(model, torch.tensor([p.tokens]), torch.tensor([len(p.tokens) - 1])).heads[0] for p in prompts]
    torch.testing.assert_close(writes, torch.stack(alone).mean(0), atol=1e-5, rtol=1e-4)
