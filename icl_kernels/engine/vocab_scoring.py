"""Open-vocabulary answer scores: top-1 over the whole vocabulary, the answer's log-probability and
greedy exact match, for prompts whose answer is a free continuation.

Classification tasks read a few label tokens (`icl_kernels.engine.label_scoring`). An open task
(`icl_kernels.data.tasks.open_vocab.OpenVocabTask`) has one gold continuation per prompt, and is
scored as the papers score it:

* **top-1 first-token accuracy** over the full vocabulary (Todd et al. 2024, ``ericwtodd/function_vectors``
  ``src/utils/eval_utils.py`` ``compute_dataset_baseline`` / ``fv_to_vocab``: the argmax of the
  next-token distribution at the last prompt token equals the first token of the gold answer);
* **greedy exact match** of the whole answer (Hendel et al. 2023, ``roeehendel/icl_task_vectors``
  ``core/models/utils/inference.py`` ``decode_predictions`` and ``core/analysis/evaluation.py``:
  the model generates as many tokens as the answer has, compared with the answer);
* the **answer's log-probability** under teacher forcing: the sum over its tokens of
  log P(token j | prompt, answer[:j]) (exact for multi-token answers).

All three come from **one** teacher-forced forward pass per prompt over ``prompt + answer``:
position ``prediction + j`` holds the next-token distribution after the prompt and the first ``j``
answer tokens. Greedy decoding reproduces the gold answer exactly when, at every such position, the
argmax is the gold token (each step of a greedy decode that has matched so far sees exactly the
teacher-forced prefix), so `exact_match` needs no generation loop. The forward pass stops at the
unembedding input (`icl_kernels.engine.hooks.STOP_HOOK`) and only the ``len(answer)`` scored rows
of each prompt are unembedded: Gemma's vocabulary has 262k tokens, and logits for every position
are never formed.

Edits (`icl_kernels.engine.edits.Edit`) are applied in that forward pass with
``EditContext.prediction_positions`` = the prompt's last token, so an edit that writes at the
prediction position (a function vector, a patched head) acts there only; the answer tokens that
follow see its effect through attention, as they would during generation with the edit applied at
the original prediction position only (Todd et al.'s and Hendel et al.'s interventions act there).
Batches are right-padded as in `icl_kernels.engine.label_scoring`; a shared ``prefix``
(`icl_kernels.engine.prefix_cache.encode_prefix`) is run once and reused as there.

Precision: log-softmax in `icl_kernels.engine.label_scoring.score_dtype` (float64 for a float64
model, else float32); non-finite logits raise `icl_kernels.utils.errors.NonFiniteLogitsError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.edits import Edit, check_edits, edits_on
from icl_kernels.engine.label_scoring import _suffix_start, _token_lists, check_row_ids, final_residual, prediction_logits
from icl_kernels.engine.prefix_cache import SharedPrefix, right_pad
from icl_kernels.models import backend as tl_backend

__all__ = ["AnswerScores", "answer_scores"]


@dataclass
class AnswerScores:
    """Per-prompt scores of a gold continuation (CPU tensors, one entry per prompt).

    Attributes:
        top1: argmax token id over the whole vocabulary at the prediction position.
        first_token_correct: ``top1`` equals the gold answer's first token.
        first_log_prob: log P(first gold token | prompt).
        answer_log_prob: sum over the gold tokens of log P(token j | prompt, answer[:j]).
        n_answer_tokens: number of gold tokens of each prompt.
        exact_match: greedy decoding of ``n_answer_tokens`` tokens equals the gold tokens (None
            unless asked for with ``greedy=True``).
        greedy_matched: how many leading gold tokens greedy decoding reproduces (None unless
            ``greedy=True``).
    """

    top1: Int[Tensor, " batch"]
    first_token_correct: Bool[Tensor, " batch"]
    first_log_prob: Float[Tensor, " batch"]
    answer_log_prob: Float[Tensor, " batch"]
    n_answer_tokens: Int[Tensor, " batch"]
    exact_match: Bool[Tensor, " batch"] | None = None
    greedy_matched: Int[Tensor, " batch"] | None = None

    def __len__(self) -> int:
        return len(self.top1)


def answer_scores(
    model: tl_backend.Model,
    prompts: Sequence[IclPrompt] | Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    edits: Sequence[Edit] = (),
    batch_size: int = 8,
    prefix: SharedPrefix | None = None,
    greedy: bool = False,
    pad_token_id: int = 0,
    first_index: int = 0,
    dtype: torch.dtype | None = None,
    row_ids: Sequence[int] | None = None,
) -> AnswerScores:
    """Score each prompt's gold continuation over the whole vocabulary (see the module docstring).

    Args:
        model: a HookedTransformer or TransformerBridge.
        prompts: `IclPrompt`s or token lists; each is scored at its last token.
        answer_ids: ``answer_ids[i]`` are the gold continuation's token ids for prompt ``i`` (at
            least one; tokenise the answer with its leading space as it follows the prompt).
        edits: `icl_kernels.engine.edits.Edit`s applied in every forward pass; they see each row's
            prompt index, the prompt's last token as prediction position, and the row's length.
        batch_size: prompts per forward pass.
        prefix: a `icl_kernels.engine.prefix_cache.SharedPrefix` every prompt starts with.
        greedy: also compute `AnswerScores.exact_match` and `AnswerScores.greedy_matched`.
        pad_token_id: id used for right padding.
        first_index: index of ``prompts[0]`` in error messages.
        dtype: dtype of the log-softmax (default `icl_kernels.engine.label_scoring.score_dtype`).
        row_ids: the row index the edits see for each prompt (``EditContext.rows``; default the
            prompt's position in ``prompts``).

    Raises:
        ValueError: no prompts, a count of answers different from the prompts', an empty answer,
            prompts that do not start with ``prefix``, or edits that read q/k/v with a prefix.
        NonFiniteLogitsError: NaN or infinite logits; the message names the prompts.
    """
    if not prompts:
        raise ValueError("answer_scores needs at least one prompt.")
    if len(answer_ids) != len(prompts):
        raise ValueError(f"answer_ids gives {len(answer_ids)} answers for {len(prompts)} prompts; give one per prompt.")
    answers = [tuple(int(t) for t in ids) for ids in answer_ids]
    empty = [i for i, ids in enumerate(answers) if not ids]
    if empty:
        raise ValueError(f"Prompts {empty[:5]} have an empty gold answer; every answer needs at least one token.")
    edits = check_edits(model, edits)
    token_lists = _token_lists(prompts)
    ids = check_row_ids(row_ids, len(token_lists))
    start = _suffix_start(prefix, token_lists, edits)
    device = tl_backend.model_device(model)
    top1, first_lp, answer_lp, matched = [], [], [], []
    for begin in range(0, len(token_lists), batch_size):
        owners = list(range(begin, min(begin + batch_size, len(token_lists))))
        # the whole answer is appended, as `label_log_probs` appends a label (its last token is read
        # nowhere, but the rows then equal that scorer's to the bit)
        suffixes = [token_lists[i][start:] + answers[i] for i in owners]
        tokens = right_pad(suffixes, pad_token_id).to(device)
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        predictions = [len(token_lists[i]) - 1 - start for i in owners]
        positions = torch.tensor(predictions, device=device)
        with torch.no_grad(), edits_on(model, edits, rows=torch.tensor([ids[i] for i in owners]), prediction_positions=positions,
                                       lengths=lengths):
            resid = final_residual(model, tokens, prefix=prefix)
        with torch.no_grad():
            # only the scored rows: position prediction + j for j < len(answer), per prompt
            row_of = [r for r, i in enumerate(owners) for _ in answers[i]]
            pos_of = [p + j for p, i in zip(predictions, owners) for j in range(len(answers[i]))]
            gold = torch.tensor([t for i in owners for t in answers[i]], device=resid.device)
            rows = resid[torch.tensor(row_of, device=resid.device), torch.tensor(pos_of, device=resid.device)]
            owner_index = [first_index + owners[r] for r in row_of]
            logits = prediction_logits(model, rows, dtype=dtype, indices=owner_index)
            log_p = logits.log_softmax(-1)
            gold_lp = log_p[torch.arange(len(gold), device=log_p.device), gold].cpu()
            hits = (logits.argmax(-1) == gold).cpu()
            argmax = logits.argmax(-1).cpu()
        offset = 0
        for i in owners:
            n = len(answers[i])
            top1.append(argmax[offset])
            first_lp.append(gold_lp[offset])
            answer_lp.append(gold_lp[offset : offset + n].sum())
            run = hits[offset : offset + n]
            matched.append(int(run.long().cumprod(0).sum()))
            offset += n
    n_tokens = torch.tensor([len(a) for a in answers])
    top1_t = torch.stack(top1)
    first_gold = torch.tensor([a[0] for a in answers])
    matched_t = torch.tensor(matched)
    return AnswerScores(
        top1=top1_t,
        first_token_correct=top1_t == first_gold,
        first_log_prob=torch.stack(first_lp),
        answer_log_prob=torch.stack(answer_lp),
        n_answer_tokens=n_tokens,
        exact_match=(matched_t == n_tokens) if greedy else None,
        greedy_matched=matched_t if greedy else None,
    )
