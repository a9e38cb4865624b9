"""Function vectors as Todd et al.: a planted head is recovered and its vector transfers the task;
the identities of peers.md section 5; the ranking's split-half correlation by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ARCHS, TINY_PARAMS, load_tiny
from scipy.stats import rankdata
from test_kernel import _toy_task, label_head_model

from icl_kernels.data.prompts import PromptBuilder, make_prompts
from icl_kernels.engine.head_writes import head_writes, mean_head_outputs, mean_head_writes
from icl_kernels.engine.label_scoring import final_residual, prediction_logits
from icl_kernels.engine.patching import head_means
from icl_kernels.families.function_vectors import (
    answered_head_outputs,
    correct_answers,
    function_vector,
    function_vector_heads,
    function_vector_study,
    fv_correct,
    fv_top_k,
    label_stay_fraction,
    projected_function_vector,
    prompt_indirect_effects,
    random_function_vectors,
    shuffled_label_prompts,
    split_half_correlation,
    top_heads,
)
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.loading import build_tiny_hf_model, hf_to_transformer_lens
from icl_kernels.utils.stats import rng

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLANTED = (2, 1)


def _planted_model(arch: str, backend: str, dtype=torch.float32):
    """The tiny model with W_O zero for every head but ``PLANTED`` (and, on Gemma-3, random
    post-attention gains, so that a head's write is not z @ W_O)."""
    hf, tok = build_tiny_hf_model(arch, dtype=dtype)
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS[arch]
    cfg = hf.config
    n_heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.num_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if arch == "gpt-neo":
            layers = [block.attn.attention.out_proj for block in hf.transformer.h]
        else:
            layers = [block.self_attn.o_proj for block in hf.model.layers]
            for block in hf.model.layers:
                norm = block.post_attention_layernorm
                norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen, dtype=norm.weight.dtype))
        for layer, out_proj in enumerate(layers):
            for head in range(n_heads):
                if (layer, head) != PLANTED:
                    out_proj.weight[:, head * d_head:(head + 1) * d_head] = 0
    return hf_to_transformer_lens(hf, tok, backend=backend, device="cpu", dtype=dtype)


def _toy_prompts(tok, shots: int, n: int, only_label: int | None = None):
    task = _toy_task(n=160)
    data = task.load(seed=0)
    train, test = data["train"], data["test"]
    if only_label is not None:
        train = train.filter(lambda row: row["label"] == only_label)
        test = test.filter(lambda row: row["label"] == only_label)
    builder = PromptBuilder(task, tok)
    queries = test.select(range(n))
    return builder, make_prompts(builder, train, queries, shots, seed=0), make_prompts(builder, train, queries, 0, seed=0)


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3"])
def test_planted_head_is_recovered_alone_and_its_vector_is_its_mean_write(arch, backend):
    """peers.md 5(b): with W_O zero for every other head, only the planted head has a nonzero CIE on
    any prompt, so it ranks first by |AIE|; its function vector is its mean actual write. In float64:
    the unpatched row and the patched rows run in batches of other sizes (rows join at their head's
    layer), so "no effect" is rounding, 1e-6 of the planted head's largest effect at most."""
    model = _planted_model(arch, backend, torch.float64)
    builder, icl, _ = _toy_prompts(model.tokenizer, shots=4, n=12)
    heads = function_vector_heads(model, icl, builder.label_ids, scoring="label-words", seed=0)
    kept = [p for p, ok in zip(icl, heads.correct.tolist()) if ok]
    assert 2 <= len(kept) < len(icl)  # the filter kept the correctly answered prompts only
    others = heads.effects.clone()
    others[:, PLANTED[0], PLANTED[1]] = 0
    planted = heads.effects[:, PLANTED[0], PLANTED[1]].abs().max()
    assert planted > 0 and others.abs().max() <= 1e-6 * planted
    assert top_heads(heads.aie.abs(), 1) == [PLANTED]
    fv = function_vector(heads.write_means, [PLANTED])
    writes = [head_writes(model, torch.tensor([p.tokens]), torch.tensor([len(p) - 1])).heads[0, PLANTED[0], PLANTED[1]]
              for p in kept]
    torch.testing.assert_close(fv, torch.stack(writes).mean(0), atol=1e-5, rtol=1e-5)
    projected = projected_function_vector(model, heads.z_means, [PLANTED])
    if arch == "gpt-neo":  # no post-attention norm: the write is z @ W_O
        torch.testing.assert_close(fv.float(), projected, atol=1e-5, rtol=1e-5)
    else:  # Gemma-3: z @ W_O is not what the head writes
        assert (fv.float() - projected).norm() > 0.1 * fv.norm()


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3"])
def test_cie_is_zero_when_means_come_from_the_same_uncorrupted_prompt(arch, backend):
    """peers.md 5(a)."""
    model = _planted_model(arch, backend)
    builder, icl, _ = _toy_prompts(model.tokenizer, shots=2, n=1)
    means = head_means(model, icl)
    effects = prompt_indirect_effects(model, icl, builder.label_ids, means)
    assert effects.shape == (1, model.cfg.n_layers, model.cfg.n_heads)
    assert effects.abs().max() < 1e-6


def test_layer_sum_of_mean_writes_plus_bias_is_the_mean_attn_out(backend):
    """peers.md 5(c), with the writes after Gemma's post-attention norm (float64)."""
    model = _planted_model("gemma-3", backend, torch.float64)
    builder, icl, _ = _toy_prompts(model.tokenizer, shots=2, n=4)
    means = mean_head_writes(model, icl, batch_size=3)
    outs, biases = [], []
    for p in icl:
        w = head_writes(model, torch.tensor([p.tokens]), torch.tensor([len(p) - 1]))
        outs.append(w.attn_out[0])
        biases.append(w.bias[0])
    expected = torch.stack(outs).mean(0) - torch.stack(biases).mean(0)
    tol = 1e-6 if tl_backend.is_bridge(model) else 1e-10  # Hugging Face's Gemma RMSNorm runs in float32
    torch.testing.assert_close(means.sum(1), expected, atol=tol * float(expected.abs().max()), rtol=0)


def test_a_planted_function_vector_transfers_the_task_to_zero_shot_prompts(backend):
    """A head that alone carries the task (tiny GPT-Neo whose layer-0 head 0 reads the label words
    and writes its class into the unembedding; the task: every answer is one class): its function
    vector, added after layer 0 at the last token, makes cue-free zero-shot prompts answer as ICL
    does, and random-head vectors of the same norm do not (on average)."""
    model, tok = label_head_model(backend)
    planted = (0, 0)
    # the task's one answer: the class that zero-shot prompts do not give on their own
    zero_shot = []
    for label in (0, 1):
        builder, icl, zsl = _toy_prompts(tok, shots=4, n=16, only_label=label)
        zero_shot.append(float(correct_answers(model, zsl, builder.label_ids, scoring="label-words").float().mean()))
    label = int(np.argmin(zero_shot))
    assert zero_shot[label] <= 0.5
    builder, icl, zsl = _toy_prompts(tok, shots=4, n=16, only_label=label)
    icl_correct = correct_answers(model, icl, builder.label_ids, scoring="label-words")
    assert icl_correct.float().mean() == 1.0  # in context, the head answers
    writes = mean_head_writes(model, icl)
    fv = function_vector(writes, [planted])
    kw = dict(scoring="label-words")
    with_fv = fv_correct(model, zsl, builder.label_ids, 0, fv, **kw).float().mean()
    randoms, sets = random_function_vectors(writes, 1, 10, float(fv.norm()), exclude=[planted], seed=0)
    assert all(planted not in s for s in sets) and torch.allclose(randoms.norm(dim=-1), fv.norm().expand(10))
    random_acc = torch.stack([fv_correct(model, zsl, builder.label_ids, 0, r, **kw).float().mean() for r in randoms])
    assert with_fv == 1.0 and with_fv > zero_shot[label] + 0.4
    assert random_acc.mean() < with_fv - 0.2
    # a vector of the wrong scale (z @ W_O would be one on Gemma; here: a hundredth) does not carry it
    assert fv_correct(model, zsl, builder.label_ids, 0, fv / 1e4, **kw).float().mean() == zero_shot[label]


def test_the_study_chooses_the_layer_on_the_selection_split_and_reports_paired_differences(backend):
    """function_vector_study: layer = first best on the selection split's zero-shot prompts of the
    correctly answered queries; report accuracies equal their per-layer rows; >= 10 random vectors."""
    model = _planted_model("gpt-neo", backend)
    builder, icl, zsl = _toy_prompts(model.tokenizer, shots=2, n=16)
    sel, rep = list(range(8)), list(range(8, 16))
    heads = function_vector_heads(model, [icl[i] for i in sel], builder.label_ids, scoring="label-words")
    report_correct = correct_answers(model, [icl[i] for i in rep], builder.label_ids, scoring="label-words")
    tables, summary = function_vector_study(
        model, heads, [zsl[i] for i in sel], [zsl[i] for i in rep], builder.label_ids, k=2, random_draws=10,
        report_correct=report_correct, bootstrap=200)
    selection = tables["function_vector_selection"]
    fv_rows = selection[selection["vector"] == "function vector"]
    assert set(fv_rows["n"]) == {int(heads.correct.sum())}
    best = fv_rows[fv_rows["accuracy"] == fv_rows["accuracy"].max()]["layer"].min()
    assert summary["fv_selected_layer"] == best
    report = tables["function_vectors"].set_index(["vector", "layer"])
    assert set(report["n"]) == {int(report_correct.sum())} == {summary["fv_n_report"]}
    assert summary["fv_selected_accuracy"]["value"] == pytest.approx(report.loc[("function vector", best), "accuracy"])
    assert summary["fv_selected_random_accuracy"]["draws"] == 10 == len(tables["function_vector_random"])
    assert summary["fv_selected_random_accuracy"]["value"] == pytest.approx(tables["function_vector_random"]["accuracy"].mean())
    diff = summary["fv_selected_minus_zero_shot"]["value"]
    assert diff == pytest.approx(report.loc[("function vector", best), "accuracy"] - report.loc[("none", -1), "accuracy"])
    assert summary["fv_k"] == 2 and len(tables["function_vector_heads"]) == 2
    assert summary["fv_heads"][0] == list(top_heads(heads.aie, 1)[0])


def test_split_half_correlation_equals_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    effects = torch.randn(7, 3, 2, generator=gen, dtype=torch.float64)
    order = rng("fv_split_half", 5).permutation(7)
    a = effects[list(order[:3])].mean(0).flatten().numpy()
    b = effects[list(order[3:])].mean(0).flatten().numpy()
    ra, rb = rankdata(a), rankdata(b)
    by_hand = 1 - 6 * ((ra - rb) ** 2).sum() / (len(a) * (len(a) ** 2 - 1))  # no ties
    assert split_half_correlation(effects, seed=5) == pytest.approx(by_hand, abs=1e-12)
    assert np.isnan(split_half_correlation(effects[:3]))
    same = effects[:1].expand(6, -1, -1)  # every prompt ranks the heads alike
    assert split_half_correlation(same) == pytest.approx(1.0)


def test_label_stay_fraction_counts_demonstration_labels_left_in_place():
    model = _planted_model("gpt-neo", tl_backend.AVAILABLE_BACKENDS[0])
    builder, icl, _ = _toy_prompts(model.tokenizer, shots=4, n=10)
    corrupted = shuffled_label_prompts(icl, seed=0)
    by_hand = np.mean([a == b for c, x in zip(icl, corrupted) for a, b in zip(c.demo_labels, x.demo_labels)])
    assert label_stay_fraction(icl, corrupted) == pytest.approx(by_hand)
    assert label_stay_fraction(icl, icl) == 1.0


def test_top_k_scales_with_the_model():
    assert fv_top_k(28, 16) == 10  # GPT-J, Todd et al.
    assert fv_top_k(18, 4) == 10 and fv_top_k(30, 9) == 10  # gemma-3-270m, smollm2-135m
    assert fv_top_k(80, 64) == 100 and fv_top_k(32, 32) == 23
    assert fv_top_k(4, 4) == 4  # a quarter of a tiny model's heads


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_answers_and_mean_outputs_from_one_pass_equal_the_two_passes(arch, backend):
    """`answered_head_outputs` (issue 26): the same prompts answered correctly as `correct_answers`,
    and the same mean z and writes as `mean_head_outputs` over them, in float64 (the prompts are
    batched differently, so to 1e-10, not bit for bit); `function_vector_heads` agrees either way."""
    model = load_tiny(arch, backend, dtype=torch.float64)
    builder, icl, _ = _toy_prompts(model.tokenizer, shots=4, n=12)
    correct, z_means, writes = answered_head_outputs(model, icl, builder.label_ids, scoring="label-words", batch_size=5)
    assert torch.equal(correct, correct_answers(model, icl, builder.label_ids, scoring="label-words", batch_size=4))
    kept = [p for p, ok in zip(icl, correct.tolist()) if ok]
    assert 2 <= len(kept) < len(icl)
    z_two, writes_two = mean_head_outputs(model, kept)
    torch.testing.assert_close(z_means, z_two, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(writes, writes_two, rtol=1e-10, atol=1e-12)
    # top-1 scoring: each class's answer is the model's top-1 token on the first prompt of that class
    first_of = {p.query_label: p for p in reversed(icl)}
    top1 = {c: int(prediction_logits(model, final_residual(model, torch.tensor([p.tokens]), torch.tensor([len(p) - 1])))
                   .argmax()) for c, p in first_of.items()}
    vocab_answers = [[top1.get(c, 0)] for c in range(len(builder.label_ids))]
    vocab_correct = answered_head_outputs(model, icl, vocab_answers, scoring="vocab")[0]
    assert vocab_correct.sum() >= len(first_of)
    assert torch.equal(vocab_correct, correct_answers(model, icl, vocab_answers, scoring="vocab"))
    one, two = (function_vector_heads(model, icl, builder.label_ids, scoring="label-words", one_pass=flag)
                for flag in (True, False))
    assert torch.equal(one.correct, two.correct)
    torch.testing.assert_close(one.effects, two.effects, rtol=1e-8, atol=1e-12)


def test_one_pass_names_what_is_wrong():
    model = load_tiny("gpt-neo")
    with pytest.raises(ValueError, match="at least one prompt"):
        answered_head_outputs(model, [], [[1], [2]])
    with pytest.raises(ValueError, match="scoring must be one of"):
        answered_head_outputs(model, [], [[1], [2]], scoring="top-5")
