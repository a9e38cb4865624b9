"""Scoring label words and measuring zero-shot and k-shot accuracy.

Each class is scored by the log-probability of its full label continuation at the prediction
position (the sum over its tokens), so multi-token label words are handled exactly. Logits are
computed only where they are needed: the forward pass stops at the input of the unembedding
(``unembed.hook_in``) and only the scored positions are unembedded, which matters for Gemma's 262k
vocabulary.

Accuracy comes with a Wilson 95% interval. Contextual calibration (Zhao et al. 2021) divides the
label probabilities by those the same prompt gives to a content-free query (``"N/A"``), then
renormalises; it corrects the label prior that demonstrations set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels import backend as tl_backend
from icl_kernels.hooks import hooks_on
from icl_kernels.prompts import IclPrompt, PromptBatch, PromptBuilder, batches, make_prompts


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


def final_residual(model, tokens: Tensor) -> Float[Tensor, "batch pos d_model"]:
    """The input of the unembedding at every position, without computing any logits."""
    captured: dict[str, Tensor] = {}

    def grab(tensor: Tensor, hook) -> None:
        captured["x"] = tensor
        raise _StopForward

    try:
        with hooks_on(model, [("unembed.hook_in", grab)]):
            model(tokens)
    except _StopForward:
        pass
    if "x" not in captured:
        raise RuntimeError("unembed.hook_in did not fire; cannot score positions.")
    return captured["x"]


def unembed(
    model, residual: Float[Tensor, "... d_model"], token_ids: Int[Tensor, " n_tokens"] | None = None
) -> Float[Tensor, "... d_vocab"]:
    """Logits from the unembedding input, only for ``token_ids`` when given (then the last dimension
    is ``n_tokens``), with Gemma-style soft-capping when configured.

    Multiplies by ``W_U`` directly: TransformerLens' ``Unembed`` copies the transposed ``W_U`` on
    every call (0.7 s for Gemma's 262k x 640 on one CPU thread), and scoring a few label tokens
    needs only their columns.
    """
    w_u, b_u = model.unembed.W_U, getattr(model.unembed, "b_U", None)
    if token_ids is not None:
        w_u = w_u[:, token_ids]
        b_u = b_u[token_ids] if b_u is not None else None
    logits = residual.to(w_u.dtype) @ w_u
    if b_u is not None:
        logits = logits + b_u
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def label_log_probs(
    model, prompts: Sequence[IclPrompt], label_ids: Sequence[Sequence[int]], *, batch_size: int = 8,
    pad_token_id: int = 0,
) -> Float[Tensor, "batch n_classes"]:
    """log P(label continuation | prompt) for each prompt and class (summed over label tokens)."""
    device = tl_backend.model_device(model)
    single = all(len(ids) == 1 for ids in label_ids)
    out = []
    with torch.no_grad():
        if single:
            first = torch.tensor([ids[0] for ids in label_ids], device=device)
            for batch in batches(prompts, batch_size, pad_token_id, device):
                resid = final_residual(model, batch.tokens)
                rows = torch.arange(len(batch.prompts), device=device)
                logits = unembed(model, resid[rows, batch.prediction_positions]).float()
                out.append(logits.log_softmax(-1)[:, first].cpu())
            return torch.cat(out)
        # Multi-token labels: append each continuation and sum its token log-probs.
        n_classes = len(label_ids)
        for batch in batches(prompts, max(1, batch_size // n_classes), pad_token_id, device):
            extended = [
                IclPrompt(
                    tokens=p.tokens + tuple(ids), demo_input_spans=(), demo_label_spans=(),
                    separator_spans=(), demo_labels=(), query_span=p.query_span,
                )
                for p in batch.prompts for ids in label_ids
            ]
            ext = PromptBatch.from_prompts(extended, pad_token_id, device)
            resid = final_residual(model, ext.tokens)
            scores = torch.zeros(len(extended))
            for row, (prompt_index, c) in enumerate(
                (i, c) for i in range(len(batch.prompts)) for c in range(n_classes)
            ):
                start = len(batch.prompts[prompt_index]) - 1
                ids = torch.tensor(label_ids[c], device=device)
                positions = torch.arange(start, start + len(ids), device=device)
                logp = unembed(model, resid[row, positions]).float().log_softmax(-1)
                scores[row] = logp[torch.arange(len(ids)), ids].sum().cpu()
            out.append(scores.view(len(batch.prompts), n_classes))
    return torch.cat(out)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Accuracy:
    """Accuracy with its Wilson 95% interval and how often each class was predicted."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    prediction_rate: list[float]

    @classmethod
    def of(cls, predictions: np.ndarray, gold: np.ndarray, n_classes: int) -> Accuracy:
        correct = int((predictions == gold).sum())
        low, high = wilson_interval(correct, len(gold))
        rate = np.bincount(predictions, minlength=n_classes) / max(1, len(predictions))
        return cls(correct / max(1, len(gold)), low, high, len(gold), [float(r) for r in rate])


def calibrate(
    log_probs: Float[Tensor, "batch n_classes"], content_free_log_probs: Float[Tensor, "batch n_classes"]
) -> Float[Tensor, "batch n_classes"]:
    """Contextual calibration: p(y) / p_cf(y), both normalised over the classes, in log space."""
    return log_probs.log_softmax(-1) - content_free_log_probs.log_softmax(-1)


CONTENT_FREE_TEXT = "N/A"


@dataclass
class IclEvaluation:
    """Zero-shot and k-shot results on one task, model, shot count and seed."""

    model: str
    task: str
    shots: int
    n_test: int
    seed: int
    zsl: Accuracy
    icl: Accuracy
    icl_calibrated: Accuracy | None
    n_demos_used: list[int]
    label_words: list[str]
    rows: list[dict] = field(repr=False, default_factory=list)

    def metrics(self) -> dict:
        """The flat dictionary written to ``metrics.json``."""
        out = {
            "model": self.model, "task": self.task, "shots": self.shots, "n_test": self.n_test,
            "seed": self.seed, "label_words": self.label_words,
            "zsl_accuracy": self.zsl.accuracy, "zsl_ci95": [self.zsl.ci_low, self.zsl.ci_high],
            "icl_accuracy": self.icl.accuracy, "icl_ci95": [self.icl.ci_low, self.icl.ci_high],
            "zsl_prediction_rate": self.zsl.prediction_rate,
            "icl_prediction_rate": self.icl.prediction_rate,
            "mean_demos_used": float(np.mean(self.n_demos_used)) if self.n_demos_used else 0.0,
        }
        if self.icl_calibrated is not None:
            out.update(
                icl_calibrated_accuracy=self.icl_calibrated.accuracy,
                icl_calibrated_ci95=[self.icl_calibrated.ci_low, self.icl_calibrated.ci_high],
                icl_calibrated_prediction_rate=self.icl_calibrated.prediction_rate,
            )
        return out


def _content_free(builder: PromptBuilder, prompt: IclPrompt, pool) -> IclPrompt:
    fields = {name: CONTENT_FREE_TEXT for name in builder.task.text_fields}
    demos = [pool[i] for i in prompt.demo_indices]
    return builder.build(demos, fields, demo_labels=list(prompt.demo_labels), demo_indices=prompt.demo_indices)


def evaluate_icl(
    model,
    task,
    *,
    shots: int = 8,
    n_test: int = 100,
    seed: int = 0,
    batch_size: int = 4,
    balanced: bool = True,
    calibrated: bool = True,
    drop_demos_to_fit: bool = False,
    builder: PromptBuilder | None = None,
    progress: bool = True,
) -> IclEvaluation:
    """Zero-shot and ``shots``-shot accuracy on the first ``n_test`` test examples (seeded split).

    Demonstrations are drawn per query from the train split (class-balanced by default).
    """
    from icl_kernels.prompts import RandomSelector

    data = task.load(seed=seed)
    pool, test = data["train"], data["test"]
    if n_test > len(test):
        raise ValueError(f"n_test={n_test} but task {task.name!r} has {len(test)} test examples.")
    queries = test.select(range(n_test))
    builder = builder or PromptBuilder(
        task, model.tokenizer, n_ctx=model.cfg.n_ctx, drop_demos_to_fit=drop_demos_to_fit
    )
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    selector = RandomSelector(balanced=balanced)
    zsl_prompts = make_prompts(builder, pool, queries, 0, seed=seed)
    icl_prompts = make_prompts(builder, pool, queries, shots, seed=seed, selector=selector)
    to_score = [("zsl", zsl_prompts), ("icl", icl_prompts)]
    if calibrated:
        to_score.append(("cf", [_content_free(builder, p, pool) for p in icl_prompts]))
    scores = {}
    bar = tqdm(total=sum(len(p) for _, p in to_score), desc=f"{task.name} {shots}-shot", disable=not progress)
    for name, prompts in to_score:
        parts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            parts.append(label_log_probs(model, chunk, builder.label_ids, batch_size=batch_size, pad_token_id=pad))
            bar.update(len(chunk))
        scores[name] = torch.cat(parts)
    bar.close()
    gold = np.asarray(queries["label"])
    n_classes = task.n_classes
    zsl_pred = scores["zsl"].argmax(-1).numpy()
    icl_pred = scores["icl"].argmax(-1).numpy()
    cal_pred = calibrate(scores["icl"], scores["cf"]).argmax(-1).numpy() if calibrated else None
    rows = []
    text_field = task.text_fields[0]
    for i in range(n_test):
        row = {
            "index": i, "text": queries[i][text_field], "gold": int(gold[i]),
            "zsl_pred": int(zsl_pred[i]), "icl_pred": int(icl_pred[i]),
            "n_demos": icl_prompts[i].n_demos, "prompt_tokens": len(icl_prompts[i]),
        }
        if cal_pred is not None:
            row["icl_calibrated_pred"] = int(cal_pred[i])
        for c in range(n_classes):
            row[f"icl_logp_{c}"] = float(scores["icl"][i, c])
            row[f"zsl_logp_{c}"] = float(scores["zsl"][i, c])
        rows.append(row)
    return IclEvaluation(
        model=str(getattr(model, "_icl_model_name", "")),
        task=task.name, shots=shots, n_test=n_test, seed=seed,
        zsl=Accuracy.of(zsl_pred, gold, n_classes),
        icl=Accuracy.of(icl_pred, gold, n_classes),
        icl_calibrated=Accuracy.of(cal_pred, gold, n_classes) if cal_pred is not None else None,
        n_demos_used=[p.n_demos for p in icl_prompts],
        label_words=list(builder.label_words),
        rows=rows,
    )


def accuracy_dict(acc: Accuracy) -> dict:
    return asdict(acc)
