"""Patching engine identities and the causal study on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PARAMS, load_tiny
from test_kernel import _toy_task, label_head_model
from test_momentum import _naive_hooks

from icl_kernels.data.prompts import PromptBuilder, make_prompts
from icl_kernels.engine import hooks as H
from icl_kernels.engine.patching import (
    Edit,
    edits_on,
    effects_frame,
    head_means,
    mean_ablation,
    patch_heads,
    record_heads,
    run_with_edits,
    summarize_effects,
    zero_ablation,
    zero_attn_out,
)
from icl_kernels.families.head_ablation import CausalConfig, causal_study, random_head_sets, rank_heads
from icl_kernels.finetuning.momentum_attention import momentum_edits
from icl_kernels.finetuning.relaxation import relaxed_attention_edits
from icl_kernels.kernel.scores import HeadScores

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(tok, shots=3, n=12):
    task = _toy_task()
    data = task.load(seed=0)
    builder = PromptBuilder(task, tok)
    queries = data["test"].select(range(n))
    icl = make_prompts(builder, data["train"], queries, shots, seed=0)
    zsl = make_prompts(builder, data["train"], queries, 0, seed=0)
    return builder, icl, zsl


def _tiny(arch, backend):
    model = load_tiny(arch, backend)
    n_params = sum(p.numel() for p in model.parameters())
    # the HF model has TINY_PARAMS; a HookedTransformer unties the unembedding (+ vocab x (d + 1)) and adds zero biases
    assert TINY_PARAMS[arch] <= n_params <= TINY_PARAMS[arch] + 50257 * 65 + 50_000, n_params
    return model


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3", "llama"])
def test_patching_a_run_into_itself_changes_nothing(arch, backend):
    model = _tiny(arch, backend)
    builder, icl, _ = _prompts(model.tokenizer)
    clean, z = run_with_edits(model, icl, builder.label_ids, batch_size=5, record=True)
    assert z.shape == (len(icl), model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    torch.testing.assert_close(z, record_heads(model, icl, batch_size=3), atol=1e-6, rtol=1e-5)
    everything = [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    patched = run_with_edits(model, icl, builder.label_ids, patch_heads(everything, z), batch_size=5)
    torch.testing.assert_close(patched, clean, atol=1e-6, rtol=0)
    # ... while patching another prompt's outputs does change the scores
    shuffled = run_with_edits(model, icl, builder.label_ids, patch_heads(everything, z.roll(1, 0)), batch_size=5)
    assert (shuffled - clean).abs().max() > 1e-4
    assert H.active_hook_count(model) == 0


@pytest.mark.parametrize("arch", ["gemma-3", "llama"])  # no attention output bias
def test_zero_ablating_all_heads_of_a_layer_removes_its_attention_output(arch, backend):
    model = _tiny(arch, backend)
    builder, icl, _ = _prompts(model.tokenizer)
    clean = run_with_edits(model, icl, builder.label_ids)
    for layer in range(model.cfg.n_layers):
        heads = [(layer, h) for h in range(model.cfg.n_heads)]
        by_heads = run_with_edits(model, icl, builder.label_ids, zero_ablation(heads, positions="all"))
        by_layer = run_with_edits(model, icl, builder.label_ids, zero_attn_out([layer]))
        torch.testing.assert_close(by_heads, by_layer, atol=1e-5, rtol=1e-5)
        assert (by_heads - clean).abs().max() > 1e-4  # and it is an actual change


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_zero_ablation_with_output_bias_leaves_b_O():
    """GPT-Neo's attention has an output bias: zeroing every head leaves b_O, not 0."""
    model = _tiny("gpt-neo", "hooked")
    builder, icl, _ = _prompts(model.tokenizer)
    for layer in range(model.cfg.n_layers):
        b_o = model.blocks[layer].attn.b_O.detach()
        heads = [(layer, h) for h in range(model.cfg.n_heads)]
        by_heads = run_with_edits(model, icl, builder.label_ids, zero_ablation(heads, positions="all"))
        to_bias = Edit(layer, lambda out, ctx, b=b_o: torch.zeros_like(out) + b, "attn_out")
        torch.testing.assert_close(by_heads, run_with_edits(model, icl, builder.label_ids, [to_bias]), atol=1e-5, rtol=1e-5)


def test_per_head_outputs_sum_to_attention_output(backend):
    """attn_out = sum_h z_h W_O[h] + b_O at every position (b_O: attn_out of an all-zero z)."""
    model = _tiny("llama", backend)
    tokens = torch.tensor([model.tokenizer.encode(" the film was fine and the cast was great")])
    store = {}
    hooks = [(H.act_name("z", 1), lambda t, hook: store.__setitem__("z", t.detach())),
             (H.act_name("attn_out", 1), lambda t, hook: store.__setitem__("out", t.detach()))]
    with torch.no_grad(), H.hooks_on(model, hooks):
        model(tokens)
    w_o = model.blocks[1].attn.W_O.detach()  # [head d_head d_model]
    per_head = torch.einsum("bphd,hdm->bphm", store["z"], w_o)
    torch.testing.assert_close(per_head.sum(2), store["out"], atol=1e-5, rtol=1e-4)


def test_no_hook_remains_after_an_edit_raises(backend):
    model = _tiny("gpt-neo", backend)
    builder, icl, _ = _prompts(model.tokenizer, n=4)

    def boom(z, ctx):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        run_with_edits(model, icl, builder.label_ids, [Edit(0, boom)])
    assert H.active_hook_count(model) == 0
    with pytest.raises(ValueError, match="shape"):
        run_with_edits(model, icl, builder.label_ids, [Edit(0, lambda z, ctx: z[:, :1])])
    assert H.active_hook_count(model) == 0


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_bad_input_raises_clear_errors():
    model = _tiny("gpt-neo", "hooked")
    builder, icl, zsl = _prompts(model.tokenizer, n=4)
    with pytest.raises(ValueError, match="layer 9"):
        run_with_edits(model, icl, builder.label_ids, [Edit(9, lambda z, c: z)])
    with pytest.raises(ValueError, match="site"):
        Edit(0, lambda z, c: z, site="pattern")
    with pytest.raises(ValueError, match="positions"):
        zero_ablation([(0, 0)], positions="last")
    with pytest.raises(ValueError, match="source"):
        patch_heads([(7, 0)], torch.zeros(4, 4, 4, 16))
    with pytest.raises(ValueError, match="at least one prompt"):
        run_with_edits(model, [], builder.label_ids)
    with pytest.raises(ValueError, match="same query"):
        causal_study(model, icl, list(reversed(zsl)), builder.label_ids, progress=False)
    with pytest.raises(ValueError, match="k must be"):
        CausalConfig(k=0)


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_mean_ablation_and_tables():
    model = _tiny("gpt-neo", "hooked")
    builder, icl, _ = _prompts(model.tokenizer)
    means = head_means(model, icl)
    clean = run_with_edits(model, icl, builder.label_ids)
    edited = {"mean L0": run_with_edits(model, icl, builder.label_ids, mean_ablation([(0, 0), (0, 1)], means)),
              "zero L0": run_with_edits(model, icl, builder.label_ids, zero_ablation([(0, 0), (0, 1)]))}
    gold = torch.tensor([p.query_label for p in icl])
    frame = effects_frame(clean, edited, gold)
    assert set(frame["condition"]) == {"clean", "mean L0", "zero L0"} and len(frame) == 3 * len(icl)
    summary = summarize_effects(frame).set_index("condition")
    assert summary.loc["clean", "agreement"] == 1.0
    assert summary.loc["clean", "accuracy_low"] <= summary.loc["clean", "accuracy"] <= summary.loc["clean", "accuracy_high"]
    assert (frame[frame.condition == "clean"]["margin_change"] == 0).all()


def test_random_head_sets_exclude_top_and_are_seeded():
    sets = random_head_sets(4, 4, 3, 5, exclude=[(0, 0), (1, 1)], seed=2)
    assert len(sets) == 5 and all(len(set(s)) == 3 for s in sets)
    assert not any((0, 0) in s or (1, 1) in s for s in sets)
    assert sets == random_head_sets(4, 4, 3, 5, exclude=[(0, 0), (1, 1)], seed=2)
    with pytest.raises(ValueError, match="random heads"):
        random_head_sets(1, 2, 2, 1, exclude=[(0, 0)])


def test_causal_study_finds_the_label_head(backend):
    """In the tiny model whose layer-0 head 0 reads the labels and drives the output, that head
    ranks first on the selection split, and ablating it costs far more agreement than random heads."""
    model, tok = label_head_model(backend)
    builder, icl, zsl = _prompts(tok, shots=5, n=40)
    cfg = CausalConfig(k=1, random_draws=4, ablation="zero", aggregation="label", bootstrap=200, batch_size=8)
    before = H.active_hook_count(model)
    result = causal_study(model, icl, zsl, builder.label_ids, cfg, progress=False)
    assert H.active_hook_count(model) == before
    assert result.top_heads == [(0, 0)]
    assert result.ranking.iloc[0][["layer", "head"]].tolist() == [0, 0]
    s = result.summary.set_index("condition")
    top_agree = s.loc["ablate top", "agreement_icl"]
    random_agree = s.loc["ablate random (mean of 4)", "agreement_icl"]
    assert top_agree < random_agree - 0.2, (top_agree, random_agree)
    n_report = result.info["n_report"]
    assert n_report == 20 and set(result.effects["prompt"]).isdisjoint(set(range(40)) - set(result.effects["prompt"]))
    # every condition has one row per report prompt, no more
    counts = result.effects.groupby(["run", "condition"]).size()
    assert (counts == n_report).all()
    assert set(result.layers["layer"]) == set(range(model.cfg.n_layers))
    drop = s.loc["ablate top"]
    assert drop["drop_low"] <= drop["accuracy_drop"] <= drop["drop_high"]


def test_rank_heads_orders_by_metric():
    agree = torch.tensor([[0.2, 0.9], [0.9, 0.1]])
    scores = HeadScores({"label": agree}, {"label": torch.zeros(2, 2)}, n=10)
    frame = rank_heads(scores, "label", "agreement")
    assert frame[["layer", "head"]].values.tolist()[:2] == [[0, 1], [1, 0]]  # ties: earlier layer first
    assert frame["rank"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3"])
def test_momentum_edits_equal_the_double_loop(arch, backend):
    """Momentum edits run by the engine give the scores of the double-loop reference hooks (the
    definition, `test_momentum._naive_hooks`), and leave no hook behind; eta = 0 is no edit."""
    model = _tiny(arch, backend)
    builder, icl, _ = _prompts(model.tokenizer, n=6)
    clean = run_with_edits(model, icl, builder.label_ids)
    layers = [0, model.cfg.n_layers - 1]
    ours = run_with_edits(model, icl, builder.label_ids, momentum_edits(model, 0.5, layers))
    with H.hooks_on(model, _naive_hooks(model, 0.5, layers)):
        want = run_with_edits(model, icl, builder.label_ids)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert (ours - clean).abs().max() > 1e-4
    assert momentum_edits(model, 0.0, layers) == []
    assert H.active_hook_count(model) == 0


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3"])
def test_relaxed_edits_in_the_engine(arch, backend):
    """Relaxed attention as edits changes the scores; at the prediction position only, a change
    too; combined with other edits on the same layers; no hook remains."""
    model = _tiny(arch, backend)
    builder, icl, _ = _prompts(model.tokenizer, n=6)
    clean = run_with_edits(model, icl, builder.label_ids)
    layers = [0, model.cfg.n_layers - 1]
    relaxed = run_with_edits(model, icl, builder.label_ids, relaxed_attention_edits(model, layers))
    assert (relaxed - clean).abs().max() > 1e-4
    at_pred = run_with_edits(model, icl, builder.label_ids, relaxed_attention_edits(model, layers, "prediction"))
    assert 0 < (at_pred - clean).abs().max()
    # zeroing every head of the last layer after relaxing it: the relaxed output is gone again
    last = model.cfg.n_layers - 1
    heads = [(last, h) for h in range(model.cfg.n_heads)]
    both = run_with_edits(model, icl, builder.label_ids,
                          relaxed_attention_edits(model, [last]) + zero_ablation(heads, positions="all"))
    alone = run_with_edits(model, icl, builder.label_ids, zero_ablation(heads, positions="all"))
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-5)
    assert H.active_hook_count(model) == 0
    with pytest.raises(ValueError, match="reads"):
        Edit(0, lambda z, c: z, reads=("pattern",))
    with pytest.raises(ValueError, match="Layers"):
        relaxed_attention_edits(model, [9])


def test_edits_on_any_forward(backend):
    """edits_on applies edits to a plain forward; reads are released after their layer; an edit at
    the prediction positions without prompts fails clearly; a raising block leaves no hook."""
    model = _tiny("gpt-neo", backend)
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    kept = {}

    def spy(z, context):
        kept["reads"] = dict(context.activations)
        kept["context"] = context
        return z * 0

    with torch.no_grad():
        plain = model(tokens)
        with edits_on(model, [Edit(1, spy, reads=("v",))]):
            assert H.active_hook_count(model) == 2
            edited = model(tokens)
            assert not kept["context"].activations  # released once the layer's edit ran
    assert set(kept["reads"]) == {"v"} and kept["context"].rows is None
    assert (edited - plain).abs().max() > 1e-4
    assert H.active_hook_count(model) == 0
    # the same edit under run_with_edits sees the batch rows and prediction positions
    builder, icl, _ = _prompts(model.tokenizer, n=3)
    run_with_edits(model, icl, builder.label_ids, [Edit(1, spy, reads=("v",))], batch_size=3)
    assert kept["context"].rows.tolist() == [0, 1, 2]
    assert kept["context"].prediction_positions.tolist() == [p.prediction_position for p in icl]
    with pytest.raises(ValueError, match="prediction positions"), torch.no_grad():
        with edits_on(model, zero_ablation([(0, 0)])):
            model(tokens)
    assert H.active_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with edits_on(model, zero_ablation([(0, 0)], positions="all")):
            raise RuntimeError("boom")
    assert H.active_hook_count(model) == 0
