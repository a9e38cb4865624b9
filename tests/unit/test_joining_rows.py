"""Patched rows that join the batch at their head's layer (`icl_kernels.engine.joining_rows`) score as
the batch of whole rows after the same shared prefix: to 1e-10 in float64 and 2e-5 in float32, on tiny
models of every architecture, for one- and several-token suffixes, with chunks smaller than the head
count; a row runs only the layers from its head's; no hook is left behind; misuse is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny
from test_relaxation import assert_tiny

from icl_kernels.engine.hooks import act_name, active_hook_count, hooks_on
from icl_kernels.engine.joining_rows import head_patch_log_probs, joining_reason
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.prefix_cache import encode_prefix
from icl_kernels.families.function_vectors import _row_mean_patches

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.tl3_only(reason="rows join through HookedTransformer's start_at_layer; a TransformerBridge "
                                          "runs whole rows (test_a_bridge_is_refused)")]

ARCHS = ["gpt-neo", "gpt-j", "gemma-3", "llama"]
TOKENS = [311, 17, 4000]


def _case(model, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = [1, *torch.randint(10, 900, (24,), generator=g).tolist()]
    values = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, generator=g,
                         dtype=torch.float64).to(dtype)
    return prompt, values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_joined_rows_equal_whole_rows(arch, dtype):
    model = load_tiny(arch, dtype=dtype)
    assert_tiny(arch, model)
    prompt, values = _case(model, dtype)
    heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
    heads = heads[1::2] + heads[::2]  # not layer-major: results come back in the order asked
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for n_suffix in (1, 3):
        prefix = encode_prefix(model, prompt[:-n_suffix])
        base, patched = head_patch_log_probs(model, prefix, prompt[-n_suffix:], heads, values, TOKENS, max_rows=3)
        whole = label_log_probs(model, [prompt] * (1 + len(heads)), [[t] for t in TOKENS], prefix=prefix,
                                edits=_row_mean_patches([None, *heads], values), whole_label=False,
                                batch_size=1 + len(heads))
        assert patched.shape == (len(heads), len(TOKENS))
        torch.testing.assert_close(base, whole[0], atol=tol, rtol=0)
        torch.testing.assert_close(patched, whole[1:], atol=tol, rtol=0)
        assert (patched - base).abs().max() > 1e-3  # the patches move the scores: not two unpatched runs
    assert active_hook_count(model) == 0


def test_a_row_runs_only_from_its_heads_layer():
    model = load_tiny("llama")
    prompt, values = _case(model, torch.float32)
    n_layers = model.cfg.n_layers
    rows_at: dict[int, list[int]] = {layer: [] for layer in range(n_layers)}
    watch = [(act_name("resid_pre", layer), lambda x, hook, layer=layer: rows_at[layer].append(x.shape[0]))
             for layer in range(n_layers)]
    heads = [(layer, 0) for layer in range(n_layers)]
    prefix = encode_prefix(model, prompt[:-1])
    with hooks_on(model, watch):
        head_patch_log_probs(model, prefix, prompt[-1:], heads, values, TOKENS)
    # the unpatched row at every layer, then one batch that grows by one row per layer
    assert rows_at == {layer: [1, layer + 1] for layer in range(n_layers)}


def test_misuse_is_refused():
    model = load_tiny("gpt-neo")
    prompt, values = _case(model, torch.float32)
    prefix = encode_prefix(model, prompt[:-1])
    with pytest.raises(ValueError, match="at least one suffix token"):
        head_patch_log_probs(model, prefix, [], [(0, 0)], values, TOKENS)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        head_patch_log_probs(model, prefix, prompt[-1:], [(0, 0)], values, TOKENS, max_rows=0)
    with pytest.raises(ValueError, match=r"Head \(9, 0\) does not exist"):
        head_patch_log_probs(model, prefix, prompt[-1:], [(9, 0)], values, TOKENS)
    base, patched = head_patch_log_probs(model, prefix, prompt[-1:], [], values, TOKENS)
    assert base.shape == (len(TOKENS),) and patched.shape == (0, len(TOKENS))


def test_a_bridge_is_refused():
    model = load_tiny("gpt-neo", backend="bridge")
    assert "TransformerBridge" in joining_reason(model)
    prompt, values = _case(model, torch.float32)
    with pytest.raises(ValueError, match="cannot join at their layer"):
        head_patch_log_probs(model, encode_prefix(model, prompt[:-1]), prompt[-1:], [(0, 0)], values, TOKENS)
