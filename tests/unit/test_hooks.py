"""Hook names, hook contexts that clean up, and attention recomputed from hooked q/k/v."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny

from icl_kernels.engine import hooks as H

TEXT = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."


def test_hooks_removed_after_error(arch, backend):
    model = load_tiny(arch, backend)
    before = H.active_hook_count(model)

    def explode(tensor, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with H.hooks_on(model, [(H.act_name("z", 0), explode)]):
            model(torch.tensor([[1, 2, 3]]))
    assert H.active_hook_count(model) == before


def test_unknown_hook_name_raises(backend):
    model = load_tiny("gpt-neo", backend)
    with pytest.raises(KeyError, match="No hook point"):
        with H.hooks_on(model, [("blocks.0.attn.hook_nope", lambda t, hook: t)]):
            pass


def test_recomputed_attention_equals_model(arch, backend):
    model = load_tiny(arch, backend)
    tokens = model.tokenizer(TEXT, return_tensors="pt").input_ids
    q_kind, k_kind = H.rotary_hook_kinds(model)
    names = set()
    for layer in range(model.cfg.n_layers):
        names |= {H.act_name(kind, layer) for kind in (q_kind, k_kind, "v", "z", "pattern")}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    for layer in range(model.cfg.n_layers):
        spec = H.attention_spec(model, layer)
        q, k = H.rotated_qk(model, layer, cache[H.act_name(q_kind, layer)], cache[H.act_name(k_kind, layer)])
        pattern = H.attention_scores(q, k, spec).softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, H.repeat_kv(cache[H.act_name("v", layer)], spec.group_size))
        assert torch.allclose(pattern, cache[H.act_name("pattern", layer)], atol=1e-5)
        assert torch.allclose(z, cache[H.act_name("z", layer)], atol=1e-5)


def test_visibility_mask_window():
    mask = H.visibility_mask(5, 5, window=2)
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]


def test_act_name_rejects_unknown_kind():
    with pytest.raises(ValueError, match="Unknown activation kind"):
        H.act_name("qq", 0)
