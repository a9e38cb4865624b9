"""The open-vocabulary scorer equals plain forwards: top-1 is the argmax of ``model(prompt)`` at the
last position, the answer log-prob the teacher-forced sum of one forward on prompt + answer, exact
match a greedy generation loop; batched equals unbatched and a shared prefix equals the full prompt
(float64, every tiny architecture, both backends); an edit changes only what it reaches; only the
scored rows are unembedded."""

from __future__ import annotations

import pytest
import torch
from conftest import load_tiny
from test_prefix_cache import _prompts as _shared_prompts

from icl_kernels.engine import vocab_scoring
from icl_kernels.engine.edits import Edit, edits_on
from icl_kernels.engine.prefix_cache import common_prefix_length, encode_prefix
from icl_kernels.engine.vocab_scoring import answer_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-10
ANSWERS = [[311], [4000, 17], [17, 18, 19], [2000, 50]]  # one, two and three tokens


def _plain_log_probs(model, tokens, edits=(), prediction=None, row=0):
    """log-softmax (float64) at every position of one plain forward, under ``edits`` told the prompt's
    index and its prediction position."""
    where = dict(rows=torch.tensor([row]), prediction_positions=torch.tensor([prediction if prediction is not None
                                                                               else len(tokens) - 1]),
                 lengths=torch.tensor([len(tokens)]))
    with torch.no_grad(), edits_on(model, edits, **where):
        return model(torch.tensor([list(tokens)]))[0].double().log_softmax(-1)


def _reference(model, prompts, answers, edits=()):
    """top-1 from ``model(prompt)``, first and whole-answer log-probs from ``model(prompt + answer)``."""
    top1, first, whole = [], [], []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens, n = list(prompt.tokens), len(prompt.tokens)
        top1.append(int(_plain_log_probs(model, tokens, edits, n - 1, i)[-1].argmax()))
        log_p = _plain_log_probs(model, tokens + list(answer), edits, n - 1, i)
        first.append(float(log_p[n - 1, answer[0]]))
        whole.append(float(sum(log_p[n - 1 + j, t] for j, t in enumerate(answer))))
    return torch.tensor(top1), torch.tensor(first, dtype=torch.float64), torch.tensor(whole, dtype=torch.float64)


def _greedy(model, tokens, n):
    """Greedy generation of ``n`` tokens, one plain forward per step."""
    tokens = list(tokens)
    for _ in range(n):
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[-n:]


def test_scores_equal_plain_forwards_and_batching_changes_nothing(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _shared_prompts(n=4, demo_len=12)
    top1, first, whole = _reference(model, prompts, ANSWERS)
    one = answer_scores(model, prompts, ANSWERS, batch_size=1)
    assert torch.equal(one.top1, top1)
    assert torch.equal(one.first_token_correct, top1 == torch.tensor([a[0] for a in ANSWERS]))
    assert one.answer_log_prob.dtype == torch.float64
    torch.testing.assert_close(one.first_log_prob, first, atol=TOL, rtol=0)
    torch.testing.assert_close(one.answer_log_prob, whole, atol=TOL, rtol=0)
    assert torch.equal(one.n_answer_tokens, torch.tensor([1, 2, 3, 2]))
    assert one.exact_match is None and one.greedy_matched is None
    for batch_size in (3, 8):
        batched = answer_scores(model, [p.tokens for p in prompts], ANSWERS, batch_size=batch_size)
        assert torch.equal(batched.top1, one.top1)
        torch.testing.assert_close(batched.answer_log_prob, one.answer_log_prob, atol=TOL, rtol=0)
        torch.testing.assert_close(batched.first_log_prob, one.first_log_prob, atol=TOL, rtol=0)


def test_exact_match_equals_a_greedy_generation_loop(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _shared_prompts(n=3, demo_len=12)
    generated = [_greedy(model, p.tokens, 3) for p in prompts]
    wrong_last = [*generated[1][:2], (generated[1][2] + 1) % model.cfg.d_vocab]
    wrong_first = [(generated[2][0] + 1) % model.cfg.d_vocab, *generated[2][1:]]
    scores = answer_scores(model, prompts, [generated[0], wrong_last, wrong_first], greedy=True, batch_size=2)
    assert scores.exact_match.tolist() == [True, False, False]
    assert scores.greedy_matched.tolist() == [3, 2, 0]
    assert scores.first_token_correct.tolist() == [True, True, False]
    assert scores.top1.tolist() == [g[0] for g in generated]


@pytest.mark.parametrize("arch", ["gpt-neo", "gemma-3", "llama"])
def test_an_edit_changes_only_what_it_reaches(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _shared_prompts(n=3, demo_len=12)
    answers = ANSWERS[1:]
    clean = answer_scores(model, prompts, answers, batch_size=2)
    shift = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50

    def only_prompt_one(resid, context):
        out = resid.clone()
        rows = (context.rows == 1).nonzero()[:, 0].to(resid.device)
        out[rows, context.predictions(resid.device)[rows]] += shift
        return out

    for layer in (0, model.cfg.n_layers - 1):
        edits = [Edit(layer, only_prompt_one, "resid_post", f"shift L{layer}")]
        got = answer_scores(model, prompts, answers, edits=edits, batch_size=2)
        top1, first, whole = _reference(model, prompts, answers, edits)
        assert torch.equal(got.top1, top1)
        torch.testing.assert_close(got.first_log_prob, first, atol=TOL, rtol=0)
        torch.testing.assert_close(got.answer_log_prob, whole, atol=TOL, rtol=0)
        # prompts 0 and 2 are untouched; prompt 1's first token moves
        for i in (0, 2):
            assert got.answer_log_prob[i] == clean.answer_log_prob[i]
        assert abs(got.first_log_prob[1] - clean.first_log_prob[1]) > 1e-6
        later = got.answer_log_prob[1] - got.first_log_prob[1]
        clean_later = clean.answer_log_prob[1] - clean.first_log_prob[1]
        if layer == model.cfg.n_layers - 1:
            # the last layer's output at the prediction position reaches no later answer position
            torch.testing.assert_close(later, clean_later, atol=TOL, rtol=0)
        else:
            assert abs(later - clean_later) > 1e-6  # later answer tokens attend to the edited position


def test_a_shared_prefix_gives_the_full_prompts_scores(arch, backend):
    model = load_tiny(arch, backend, torch.float64)
    prompts = _shared_prompts(n=4)
    n_prefix = common_prefix_length([p.tokens for p in prompts])
    prefix = encode_prefix(model, prompts[0].tokens[:n_prefix])
    full = answer_scores(model, prompts, ANSWERS, batch_size=3, greedy=True)
    got = answer_scores(model, prompts, ANSWERS, batch_size=3, greedy=True, prefix=prefix)
    assert torch.equal(got.top1, full.top1) and torch.equal(got.exact_match, full.exact_match)
    torch.testing.assert_close(got.answer_log_prob, full.answer_log_prob, atol=1e-8, rtol=0)


def test_only_the_scored_rows_are_unembedded(monkeypatch):
    model = load_tiny("gemma-3", None, torch.float64)
    prompts = _shared_prompts(n=4, demo_len=12)
    shapes = []
    real = vocab_scoring.prediction_logits

    def spy(model, rows, **kwargs):
        shapes.append(tuple(rows.shape))
        return real(model, rows, **kwargs)

    monkeypatch.setattr(vocab_scoring, "prediction_logits", spy)
    answer_scores(model, prompts, ANSWERS, batch_size=4)
    assert shapes == [(sum(len(a) for a in ANSWERS), model.cfg.d_model)]


def test_bad_input_is_refused():
    model = load_tiny("gpt-neo", None, torch.float64)
    prompts = _shared_prompts(n=2, demo_len=4)
    with pytest.raises(ValueError, match="one per prompt"):
        answer_scores(model, prompts, [[1]])
    with pytest.raises(ValueError, match=r"Prompts \[1\] have an empty gold answer"):
        answer_scores(model, prompts, [[1], []])
    with pytest.raises(ValueError, match="at least one prompt"):
        answer_scores(model, [], [])
