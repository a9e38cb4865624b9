"""Runs that start at a layer (`icl_kernels.engine.layer_start`) give the full pass's scores bit for bit
under edits on the layers from there (momentum attention), in float32 and float64 on tiny models of
every architecture; the layers below run only once; misuse is refused; the momentum study's numbers are
the same with the reuse on and off."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny
from test_relaxation import assert_tiny

from icl_kernels.engine.hooks import act_name, active_hook_count, hooks_on
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.layer_start import layer_start, start_reason
from icl_kernels.engine.perplexity import sequence_nll
from icl_kernels.finetuning.momentum_attention import momentum_attention
from icl_kernels.studies import get_study, momentum

pytestmark = pytest.mark.usefixtures("one_torch_thread")
hooked_only = pytest.mark.tl3_only(reason="a run from a residual uses HookedTransformer's start_at_layer; a "
                                          "TransformerBridge runs every layer (test_a_bridge_runs_every_layer)")

ARCHS = ["gpt-neo", "gpt-j", "gemma-3", "llama"]
LABELS = [[311], [4000], [17]]


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(10, 900, (n,), generator=g).tolist()] for n in (6, 11, 3, 9, 7)]


@hooked_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ARCHS)
def test_started_scores_equal_the_full_pass_bit_for_bit(arch, dtype):
    model = load_tiny(arch, dtype=dtype)
    assert_tiny(arch, model)
    prompts, last = _prompts(), model.cfg.n_layers - 1
    for first in range(1, model.cfg.n_layers):
        start = layer_start(model, prompts, first, batch_size=2, pad_token_id=0)
        assert [b.shape[0] for b in start.batches] == [2, 2, 1]
        with momentum_attention(model, 0.4, list(range(first, last + 1))):
            full = label_log_probs(model, prompts, LABELS, batch_size=2)
            started = label_log_probs(model, prompts, LABELS, batch_size=2, start=start)
        assert torch.equal(started, full), (first, (started - full).abs().max())
        window = torch.tensor([_prompts(1)[1]])
        with momentum_attention(model, 0.4, [first]):
            assert torch.equal(sequence_nll(model, window, start=layer_start(model, window.tolist(), first, batch_size=1)),
                               sequence_nll(model, window))
    assert active_hook_count(model) == 0


@hooked_only
def test_a_started_run_skips_the_layers_below():
    model = load_tiny("llama")
    prompts = _prompts()
    start = layer_start(model, prompts, 1, batch_size=8)
    fired: list[str] = []
    watch = [(act_name("resid_post", layer), lambda t, hook: fired.append(hook.name)) for layer in range(2)]
    with hooks_on(model, watch):
        label_log_probs(model, prompts, LABELS, batch_size=8, start=start)
    assert fired == [act_name("resid_post", 1)]


@hooked_only
def test_misuse_is_refused():
    model = load_tiny("gpt-neo")
    prompts = _prompts()
    start = layer_start(model, prompts, 1, batch_size=2)
    with pytest.raises(ValueError, match="batches of 2"):
        label_log_probs(model, prompts, LABELS, batch_size=4, start=start)
    with pytest.raises(ValueError, match="single-token"):
        label_log_probs(model, prompts, [[311, 5], [4000]], batch_size=2, start=start)
    with pytest.raises(ValueError, match="layer 0 saves nothing"):
        layer_start(model, prompts, 0, batch_size=2)
    assert "not inside the model" in start_reason(model, model.cfg.n_layers)


def test_a_bridge_runs_every_layer():
    model = load_tiny("llama", backend="bridge")
    assert "TransformerBridge" in start_reason(model, 1)


@hooked_only
def test_momentum_study_numbers_are_the_same_with_and_without_layer_reuse(monkeypatch):
    """Every table and summary number of a momentum grid whose layer subsets start above layer 0; the
    starts are kept from the baseline's own pass (no extra partial pass)."""
    made = []
    monkeypatch.setattr(momentum, "layer_start", lambda *a, **k: made.append(a) or layer_start(*a, **k))
    study = get_study("momentum")
    options = dict(model="tiny-gpt-neo", device="cpu", etas=(0.3, 0.6), layer_sets=("1", "2-3", "all"), shots=(2,),
                   n_test=5, ppl_tokens=16, ppl_windows=2, n_boot=20, batch_size=2)
    runs = [study(dict(options, layer_reuse=reuse), progress=False) for reuse in (False, True)]
    assert made == []
    assert runs[0].summary == runs[1].summary
    for name in ("grid", "prompts", "perplexity"):
        assert runs[0].tables[name].to_csv(index=False) == runs[1].tables[name].to_csv(index=False)
    assert runs[1].tables["prompts"]["cell_id"].nunique() == 7  # the baseline and 3 x 2 cells


@hooked_only
@pytest.mark.parametrize("arch", ["gemma-3", "gpt-neo"])
def test_a_left_padding_tokenizer_gets_the_full_pass_mask(arch, monkeypatch):
    """Where the tokenizer pads on the left (gemma-3-270m's does), TransformerLens masks the full pass by
    the tokens; every started block gets the same mask as in the full pass, and the scores stay equal."""
    model = load_tiny(arch)
    monkeypatch.setattr(model.tokenizer, "padding_side", "left")
    pad = model.tokenizer.pad_token_id or 0
    prompts = _prompts(2)
    start = layer_start(model, prompts, 1, batch_size=3, pad_token_id=pad)
    masks: dict[str, list] = {"full": [], "started": []}
    run = {"name": "full"}

    def keep(module, args, kwargs):
        masks[run["name"]].append(kwargs.get("attention_mask"))

    handle = model.blocks[1].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with momentum_attention(model, 0.5, [1]):
            full = label_log_probs(model, prompts, LABELS, batch_size=3, pad_token_id=pad)
            run["name"] = "started"
            started = label_log_probs(model, prompts, LABELS, batch_size=3, pad_token_id=pad, start=start)
    finally:
        handle.remove()
    assert torch.equal(started, full)
    assert len(masks["full"]) == len(masks["started"]) == 2
    for full_mask, started_mask in zip(masks["full"], masks["started"]):
        assert full_mask is not None and started_mask is not None and torch.equal(full_mask, started_mask)
