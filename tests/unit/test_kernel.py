"""Label-attention head scores, held-out head selection, kernel regression, probes, resampling."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_PARAMS

from icl_kernels.data.prompts import IclPrompt, PromptBuilder, make_prompts
from icl_kernels.data.tasks.registry import Task
from icl_kernels.engine import hooks as H
from icl_kernels.kernel import head_scan as S
from icl_kernels.kernel import scores as K
from icl_kernels.kernel.head_scan import analyze_heads
from icl_kernels.kernel.scores import (
    DemoLayout,
    Kernel,
    class_votes,
    demo_attention,
    head_correlation,
    heads_frame,
    held_out_best_head,
    kernel_regression,
    reconstruct,
    resample_rows,
    ridge_probe_accuracy,
    score_heads,
)
from icl_kernels.models.loading import build_tiny_hf_model, hf_to_transformer_lens
from icl_kernels.studies.heads import _held_out
from icl_kernels.utils.stats import split_indices

WORDS = (" negative", " positive")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("module", [K, S], ids=["kernel", "head_scan"])
def test_doctests(module):
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


# --------------------------------------------------------------------------------------------
# pure functions on hand-made tensors
# --------------------------------------------------------------------------------------------


def _layout():
    # row 0: demos [1,4) label 3, [4,7) label 6 ; row 1: one demo [1,3) label 2 (second is padding)
    return DemoLayout.from_spans(
        [[(1, 4), (4, 7)], [(1, 3)]], [[(3, 4), (6, 7)], [(2, 3)]], [[1, 0], [1]], width=8
    )


def test_demo_attention_aggregations():
    attn = torch.zeros(2, 1, 2, 8)
    attn[0, 0, 0] = torch.tensor([0.1, 0.3, 0.0, 0.1, 0.05, 0.05, 0.2, 0.2])
    attn[1, 0, 0, :3] = torch.tensor([0.5, 0.2, 0.3])
    layout = _layout()
    mx = demo_attention(attn, layout, "max")[:, 0, 0]
    mean = demo_attention(attn, layout, "mean")[:, 0, 0]
    lab = demo_attention(attn, layout, "label")[:, 0, 0]
    torch.testing.assert_close(mx, torch.tensor([[0.3, 0.2], [0.3, 0.0]]))
    torch.testing.assert_close(mean, torch.tensor([[0.4 / 3, 0.3 / 3], [0.25, 0.0]]))
    torch.testing.assert_close(lab, torch.tensor([[0.1, 0.2], [0.3, 0.0]]))
    votes = class_votes(demo_attention(attn, layout, "label"), layout.demo_labels, 2)
    torch.testing.assert_close(votes[0, 0, 0], torch.tensor([0.2, 0.1]))
    recon = reconstruct(votes)
    assert recon[:, 0, 0].tolist() == [0, 1]
    assert recon[:, 0, 1].tolist() == [-1, -1]  # head 1 attends nowhere: abstains


def test_bad_shapes_and_names_raise():
    layout = _layout()
    with pytest.raises(ValueError, match="key positions"):
        demo_attention(torch.zeros(2, 1, 1, 9), layout)
    with pytest.raises(ValueError, match="aggregation"):
        demo_attention(torch.zeros(2, 1, 1, 8), layout, "median")
    with pytest.raises(ValueError, match="n_classes"):
        class_votes(torch.zeros(2, 1, 1, 2), torch.tensor([[0, 3], [1, -1]]), 2)


def _synthetic_weights(n=60, layers=2, heads=3, demos=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n, demos), generator=gen)
    weights = torch.rand(n, layers, heads, demos, generator=gen)
    return weights, labels


def test_score_heads_finds_the_head_that_follows_the_model():
    weights, labels = _synthetic_weights()
    # head (1, 2) puts all its attention on demo 0: its reconstruction is labels[:, 0]
    weights[:, 1, 2] = 0
    weights[:, 1, 2, 0] = 1
    model_pred = labels[:, 0].clone()
    gold = torch.randint(0, 2, (len(labels),), generator=torch.Generator().manual_seed(5))
    scores = score_heads({"max": weights}, labels, model_pred, gold, 2)
    assert scores.agreement["max"][1, 2] == 1.0
    assert scores.best("max") == (1, 2)
    torch.testing.assert_close(scores.accuracy["max"][1, 2], (labels[:, 0] == gold).float().mean())
    frame = heads_frame({"all": scores}, rank_on="all")
    top = frame.iloc[0]
    assert (top["layer"], top["head"], top["agreement"], top["rank"]) == (1, 2, 1.0, 1)


def test_held_out_selection_never_sees_the_report_split():
    weights, labels = _synthetic_weights(n=100)
    model_pred = torch.randint(0, 2, (100,), generator=torch.Generator().manual_seed(1))
    gold = model_pred.clone()
    select, report = split_indices(100, 0.7, seed=3)
    assert len(set(select) | set(report)) == 100 and not set(select) & set(report)
    first = held_out_best_head(weights, labels, model_pred, gold, 2, select, report)
    # make head (0, 0) perfect on the report split only: the choice must not move
    tampered = weights.clone()
    r = torch.as_tensor(report)
    tampered[r, 0, 0] = 0
    tampered[r, 0, 0, 0] = 1
    labels_t = labels.clone()
    labels_t[r, 0] = model_pred[r]
    second = held_out_best_head(tampered, labels_t, model_pred, gold, 2, select, report)
    assert (second["layer"], second["head"]) == (first["layer"], first["head"])
    assert second["select_agreement"] == first["select_agreement"]
    # ... while tampering with the selection split does move it
    s = torch.as_tensor(select)
    tampered[s, 0, 0] = 0
    tampered[s, 0, 0, 0] = 1
    labels_t[s, 0] = model_pred[s]
    third = held_out_best_head(tampered, labels_t, model_pred, gold, 2, select, report)
    assert (third["layer"], third["head"], third["report_agreement"]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="overlap"):
        held_out_best_head(weights, labels, model_pred, gold, 2, select, [*map(int, report), int(select[0])])


def test_kernel_regression_identities():
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(5, 8, generator=gen), torch.randn(5, 6, 8, generator=gen)
    labels = torch.randint(0, 3, (5, 6), generator=gen)
    labels[0, 4:] = -1  # padding demonstrations are ignored
    # exp-dot KR is the softmax-attention-weighted class vote
    out = kernel_regression(q, keys, labels, 3, Kernel("exp_dot", temperature=2.0))
    w = (torch.einsum("bd,bnd->bn", q, keys) / 2.0).masked_fill(labels < 0, -torch.inf).softmax(-1)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 3).float() * (labels >= 0)[..., None]
    torch.testing.assert_close(out, torch.einsum("bn,bnc->bc", w, onehot))
    torch.testing.assert_close(out.sum(-1), torch.ones(5))
    # cosine kernel: (1 + cos) / 2 weights
    cos = torch.nn.functional.cosine_similarity(q[:, None], keys, dim=-1)
    wc = ((1 + cos) / 2) * (labels >= 0)
    torch.testing.assert_close(
        kernel_regression(q, keys, labels, 3, Kernel("cosine")),
        torch.einsum("bn,bnc->bc", wc / wc.sum(-1, keepdim=True), onehot),
    )
    # RBF with a tiny bandwidth is 1-nearest-neighbour
    nn_label = labels.gather(1, ((q[:, None] - keys).norm(dim=-1) + (labels < 0) * 1e9).argmin(-1, keepdim=True))[:, 0]
    assert kernel_regression(q, keys, labels, 3, Kernel("rbf", bandwidth=1e-3)).argmax(-1).tolist() == nn_label.tolist()
    # a row with no usable demonstration is a tie
    none = kernel_regression(q[:1], keys[:1], torch.full((1, 6), -1), 3)
    assert reconstruct(none).item() == -1
    with pytest.raises(ValueError, match="kernel"):
        Kernel("linear")


def test_head_correlation():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(50, 5, generator=gen)
    weights = torch.rand(50, 1, 3, 5, generator=gen)
    weights[:, 0, 0] = 2 * target + 1  # perfectly correlated
    weights[:, 0, 1] = -target  # perfectly anti-correlated
    valid = torch.ones(50, 5, dtype=torch.bool)
    valid[:, 4] = False
    weights[:, 0, 0, 4] = 100.0  # invalid pairs must not count
    corr = head_correlation(weights, target, valid)
    torch.testing.assert_close(corr[0, :2], torch.tensor([1.0, -1.0]))
    assert abs(corr[0, 2]) < 0.3
    within = head_correlation(weights, target, valid, within_prompt=True)
    torch.testing.assert_close(within[0, :2], torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("dim", [5, 80])  # primal (d < n) and dual (d > n) solutions
def test_ridge_probe_matches_closed_form(dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(2, 60, dim, generator=gen, dtype=torch.float64)
    y = (x[0, :, 0] > 0).long()
    train = torch.arange(60) < 40
    acc = ridge_probe_accuracy(x.float(), y, train, 2, lam=0.01)
    # reference: explicit ridge with an unpenalised intercept on the training samples
    for g in range(2):
        xt = torch.cat([x[g, train], torch.ones(40, 1, dtype=torch.float64)], 1)
        reg = torch.eye(dim + 1, dtype=torch.float64) * 0.01
        reg[-1, -1] = 0
        w = torch.linalg.lstsq(xt.T @ xt + reg, xt.T @ torch.nn.functional.one_hot(y[train], 2).double()).solution
        pred = (torch.cat([x[g, ~train], torch.ones(20, 1, dtype=torch.float64)], 1) @ w).argmax(-1)
        assert acc[g].item() == pytest.approx((pred == y[~train]).double().mean().item(), abs=1e-6)
    if dim == 5:
        assert acc[0] > 0.9  # the informative group separates


# --------------------------------------------------------------------------------------------
# a tiny model edited so that one head reads the labels
# --------------------------------------------------------------------------------------------


def _toy_task(n=80, seed=0) -> Task:
    rng = np.random.default_rng(seed)
    adjectives = ["fine", "dull", "great", "boring", "nice", "bad", "lovely", "awful", "odd", "sharp"]
    nouns = ["film", "plot", "cast", "score", "ending", "script", "pace", "set"]
    texts = [f"a {rng.choice(adjectives)} {rng.choice(nouns)} {i}" for i in range(n)]
    labels = rng.integers(0, 2, n).tolist()

    def loader(seed, cache_dir=None):
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
        )
        ds = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        return datasets.DatasetDict(train=ds.select(range(n // 2)), test=ds.select(range(n // 2, n)))

    return Task(name="toy-sentiment", description="toy", source="test", text_fields=("text",),
                template="Review: {text}\nSentiment:", label_words=WORDS, loader=loader)


def label_head_model(backend: str | None):
    """tiny-gpt-neo whose layer-0 head 0 attends to label tokens (class 1 a bit more) and whose output
    is driven by what that head reads, so its a-weighted class vote is the model's prediction."""
    hf, tok = build_tiny_hf_model("gpt-neo")
    assert sum(p.numel() for p in hf.parameters()) == TINY_PARAMS["gpt-neo"]
    ids = [tok.encode(w)[0] for w in WORDS]
    d, dh = hf.config.hidden_size, hf.config.hidden_size // hf.config.num_heads
    gen = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, 4, generator=gen)], 1))
    w, u, r0, r1 = basis[:, 1], basis[:, 2], basis[:, 3], basis[:, 4]  # orthogonal to LN's mean
    with torch.no_grad():
        emb, pos = hf.transformer.wte.weight, hf.transformer.wpe.weight
        for v in (w, u, r0, r1):
            emb -= (emb @ v)[:, None] * v
            pos -= (pos @ v)[:, None] * v
        emb += 0.3 * w  # every query reads w
        emb[ids[0]] += 0.30 * u + 0.3 * r0  # label keys carry u (class 1 more) and their class
        emb[ids[1]] += 0.36 * u + 0.3 * r1
        attn = hf.transformer.h[0].attn.attention
        rows = slice(0, dh)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[rows] = 0
        attn.out_proj.weight[:, rows] = 0
        attn.q_proj.weight[0], attn.k_proj.weight[0] = w, u
        attn.v_proj.weight[1], attn.v_proj.weight[2] = 10 * r0, 10 * r1
        attn.out_proj.weight[:, 1], attn.out_proj.weight[:, 2] = 1000 * r0, 1000 * r1
    return hf_to_transformer_lens(hf, tok, backend=backend, device="cpu"), tok


def test_label_head_has_agreement_one_and_ranks_first(backend):
    model, tok = label_head_model(backend)
    task = _toy_task()
    data = task.load(seed=0)
    builder = PromptBuilder(task, tok)
    prompts = make_prompts(builder, data["train"], data["test"], 5, seed=0)
    before = H.active_hook_count(model)
    run = analyze_heads(model, prompts, builder.label_ids, batch_size=8, progress=False,
                        head_features=True, resid_layers=(1,), probe_offsets=(-1, 0, 1))
    assert H.active_hook_count(model) == before
    preds = run.model_predictions
    assert 0 < preds.float().mean() < 1  # the model predicts both classes
    scores = run.scores()
    for how in ("max", "label"):
        agree = scores.agreement[how]
        assert agree[0, 0] == 1.0
        assert agree.flatten().topk(2).values[1] < 1.0  # strictly first
        assert scores.best(how) == (0, 0)
    frame = heads_frame({"all": scores}, rank_on="all")
    top = frame[frame.aggregation == "label"].iloc[0]
    assert (top["layer"], top["head"], top["rank"]) == (0, 0, 1)
    # local layers (window 8) see no demonstration from the prediction position: they abstain
    assert (scores.agreement["max"][1] == 0).all() and (scores.agreement["max"][3] == 0).all()
    # the head's own q/k under its (unscaled, GPT-Neo) exp-dot kernel reproduce its label votes
    kr = S.head_kernel_regression(run, 0, 0, Kernel("exp_dot", temperature=1.0))
    assert (reconstruct(kr) == preds).all()
    # the extras have the documented shapes
    n, n_demo = len(prompts), 5
    assert run.label_k.shape == (n, n_demo, 4, 4, 16) and run.query_q.shape == (n, 4, 4, 16)
    assert run.demo_resid.shape == (n, n_demo, 1, 64) and run.probe_k.shape == (n, n_demo, 3, 4, 4, 16)
    assert run.attention_map.shape[:2] == (4, 4) and run.attention_map_n == n


def test_resampled_rows_keep_label_mass():
    model_free_prompts = []

    for length in (5, 9):
        x1, y1, s1 = (1, 1 + length), (1 + length, 2 + length), (2 + length, 3 + length)
        q = (3 + length, 3 + 2 * length)
        model_free_prompts.append(IclPrompt(
            tokens=tuple(range(q[1])), demo_input_spans=(x1,), demo_label_spans=(y1,), separator_spans=(s1,),
            demo_labels=(1,), query_span=q, query_label=0, bos_position=0,
        ))
    width = max(len(p) for p in model_free_prompts)
    attn = torch.zeros(2, 1, 1, width)
    for row, p in enumerate(model_free_prompts):
        attn[row, 0, 0, p.demo_label_spans[0][0]] = 0.25
        attn[row, 0, 0, p.query_span[1] - 1] = 0.75
    rows, segments = resample_rows(attn, model_free_prompts, input_length=7)
    names = [s.name for s in segments]
    assert names == ["bos", "x_1", "y_1", "sep_1", "query"] and rows.shape == (2, 1, 1, 1 + 7 + 1 + 1 + 7)
    assert torch.allclose(rows[:, 0, 0, 8], torch.tensor(0.25))  # the y_1 point
    assert torch.allclose(rows[:, 0, 0, -1], torch.tensor(0.75))  # last query token kept by the ends


def test_ridge_probe_is_the_same_on_several_threads():
    """Regression: batched LU solves failed inside MKL with 2 threads for gemma-sized probes
    (18 groups x 560 training samples x 256 dims); the Cholesky solve gives one answer on 1 or 2."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(18, 800, 256, generator=generator) * 50
    targets = torch.randint(0, 2, (800,), generator=generator)
    train = torch.zeros(800, dtype=torch.bool)
    train[:560] = True
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ridge_probe_accuracy(x, targets, train, 2)
        torch.set_num_threads(2)
        two = ridge_probe_accuracy(x, targets, train, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and one.shape == (18,)


def test_held_out_summary_pairs_the_head_with_each_baseline_on_the_report_prompts():
    model_pred = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 0, 0])
    hrun = SimpleNamespace(model_predictions=model_pred, gold=model_pred.clone(), n_classes=2)
    report = [2, 3, 4, 5, 6, 7, 8, 9]  # rows 0 and 1 are selection prompts and must not count
    head = model_pred.clone()
    head[[0, 1, 2]] = 1 - model_pred[[0, 1, 2]]  # on the report rows the head disagrees once (row 2)
    vote = model_pred.clone()
    vote[[3, 4]] = -1  # abstains twice: an abstention is a disagreement, never an agreement
    vote[5] = 1 - model_pred[5]
    out = _held_out(hrun, report, {"max": head}, {"demo_majority": vote}, None)
    diff = out["best_head_minus_baseline"]["max"]["demo_majority"]
    assert out["best_head"]["max"]["agreement"]["value"] == pytest.approx(7 / 8)
    assert out["kernel_regression"]["demo_majority"]["agreement"]["value"] == pytest.approx(5 / 8)
    assert diff["value"] == pytest.approx(7 / 8 - 5 / 8)
    assert (diff["n"], diff["unit"]) == (8, "prompts")
    assert diff["low"] <= diff["value"] <= diff["high"]
