"""The chunked LM loss (`icl_kernels.finetuning.lm_loss`) against the whole-array loss it replaces."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from icl_kernels.engine.label_scoring import unembed
from icl_kernels.finetuning.lm_loss import chunk_tokens, row_lm_losses

ARCHS = ["gpt-neo", "gpt-j", "gemma-3", "llama"]


def _rows(model, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(sum(sizes), model.cfg.d_model, generator=g, dtype=model.cfg.dtype)
    targets = torch.randint(0, model.cfg.d_vocab, (sum(sizes),), generator=g)
    owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return residual, targets, owners


def _whole(model, residual, targets, sizes):
    """What batched_finetune computed before: every logit at once, one mean cross-entropy per row."""
    logits = unembed(model, residual).float().split(sizes)
    return torch.stack([torch.nn.functional.cross_entropy(row, t) for row, t in zip(logits, targets.split(sizes))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ARCHS)
def test_losses_and_gradients_equal_the_whole_array_loss(arch, dtype):
    model = load_tiny(arch, dtype=dtype)
    sizes = [5, 1, 12, 7]
    residual, targets, owners = _rows(model, sizes)
    weights = torch.tensor([1.0, 0.5, -2.0, 3.0])  # any incoming gradient per row, not only the sum's ones
    x = residual.clone().requires_grad_(True)
    expected = _whole(model, x, targets, sizes)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    assert expected_grad.abs().max() > 0
    for chunk in (1, 3, 7, 64, chunk_tokens(model.cfg.d_vocab)):
        y = residual.clone().requires_grad_(True)
        got = row_lm_losses(y, lambda r: unembed(model, r), targets, owners, len(sizes), chunk=chunk)
        (grad,) = torch.autograd.grad((got * weights).sum(), y)
        assert got.dtype == torch.float32 and grad.dtype == dtype
        # The loss is taken in float32 (as finetune takes it), so even a float64 model's losses and
        # gradients carry float32 rounding, and products of another shape (a chunk's logits; the
        # gradient's sum over the vocabulary) round differently: float32 tolerances, the gradient's
        # relative to its largest entry (seen: 5e-6 at one token per chunk). A wrong scale, owner or
        # target is off by far more.
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=0, msg=lambda m, c=chunk: f"chunk {c}: {m}")
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=2e-5 * float(expected_grad.abs().max()),
                                   msg=lambda m, c=chunk: f"chunk {c}: {m}")
    # one chunk and the sum of the losses (what training differentiates): the same products in the same
    # order as the whole array, so the same bits
    y = residual.clone().requires_grad_(True)
    got = row_lm_losses(y, lambda r: unembed(model, r), targets, owners, len(sizes), chunk=len(owners))
    (grad,) = torch.autograd.grad(got.sum(), y)
    x = residual.clone().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(_whole(model, x, targets, sizes).sum(), x)
    assert torch.equal(got, expected) and torch.equal(grad, expected_grad)


def test_rows_in_any_order_and_a_chunk_spanning_rows():
    model = load_tiny("llama", dtype=torch.float64)
    sizes = [4, 6, 3]
    residual, targets, owners = _rows(model, sizes, seed=1)
    order = torch.randperm(len(owners), generator=torch.Generator().manual_seed(2))
    x = residual.clone().requires_grad_(True)
    expected = _whole(model, x, targets, sizes)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    y = residual[order].clone().requires_grad_(True)
    got = row_lm_losses(y, lambda r: unembed(model, r), targets[order], owners[order], len(sizes), chunk=5)
    (grad,) = torch.autograd.grad(got.sum(), y)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad[order], rtol=0, atol=2e-5 * float(expected_grad.abs().max()))


def test_bad_input_is_refused():
    model = load_tiny("llama")
    residual, targets, owners = _rows(model, [3, 2])

    def logits(r):
        return unembed(model, r)

    # (the test suite's jaxtyping hook refuses the lengths first, with a TypeError naming n_tokens)
    with pytest.raises((ValueError, TypeError), match="one entry per token|n_tokens"):
        row_lm_losses(residual, logits, targets[:-1], owners, 2, chunk=4)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        row_lm_losses(residual, logits, targets, owners, 2, chunk=0)
    with pytest.raises(ValueError, match=r"owners must lie in 0\.\.1"):
        row_lm_losses(residual, logits, targets, owners + 1, 2, chunk=4)
    with pytest.raises(ValueError, match=r"rows \[2\] have no token"):
        row_lm_losses(residual, logits, targets, owners, 3, chunk=4)
    assert chunk_tokens(262_144) == 16 and chunk_tokens(50_257) == 83 and chunk_tokens(10**9) == 1
