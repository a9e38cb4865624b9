"""Scoring label words and measuring zero-shot and k-shot accuracy.

Each class is scored by the log-probability of its full label continuation at the prediction
position (the sum over its tokens), so multi-token label words are handled exactly. Logits are
computed only where they are needed: the forward pass stops at the input of the unembedding
(`icl_kernels.engine.hooks.STOP_HOOK`) and only the scored positions are unembedded, which matters
for Gemma's 262k vocabulary (`icl_kernels.engine.label_scoring`).

Open-vocabulary tasks (`evaluate_open`) are scored by `icl_kernels.engine.vocab_scoring.answer_scores`:
top-1 first-token accuracy over the whole vocabulary, greedy exact match and the answer's
log-probability, zero-shot on the cue-free query against k-shot; calibration does not apply to them.

Accuracy comes with a Wilson 95% interval. Contextual calibration (Zhao et al. 2021) divides the
label probabilities by those the same prompt gives to a content-free query (``"N/A"``), then
renormalises; it corrects the label prior that demonstrations set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from icl_kernels.data.prompts import (
    IclPrompt,
    PromptBuilder,
    RandomSelector,
    gold_answer_ids,
    make_prompts,
    pad_id,
)
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.vocab_scoring import answer_scores
from icl_kernels.utils.errors import InvalidOptionError, NonFiniteLogitsError
from icl_kernels.utils.stats import wilson_interval


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
    An open-vocabulary task is refused (`evaluate_open` scores it).
    """
    if getattr(task, "kind", "classification") == "open":
        raise InvalidOptionError(
            f"Task {task.name!r} is an open-vocabulary task: its answers are scored over the whole vocabulary "
            "with evaluate_open, not as label words."
        )
    data = task.load(seed=seed)
    pool, test = data["train"], data["test"]
    if n_test > len(test):
        raise InvalidOptionError(f"n_test={n_test} but task {task.name!r} has {len(test)} test examples; use fewer.")
    queries = test.select(range(n_test))
    builder = builder or PromptBuilder(
        task, model.tokenizer, n_ctx=model.cfg.n_ctx, drop_demos_to_fit=drop_demos_to_fit
    )
    pad = pad_id(model)
    selector = RandomSelector(balanced=balanced)
    zsl_prompts = make_prompts(builder, pool, queries, 0, seed=seed)
    icl_prompts = make_prompts(builder, pool, queries, shots, seed=seed, selector=selector)
    to_score = [("zsl", zsl_prompts), ("icl", icl_prompts)]
    if calibrated:
        to_score.append(("cf", [_content_free(builder, p, pool) for p in icl_prompts]))
    scores = {}
    what = {"zsl": "zero-shot", "icl": f"{shots}-shot", "cf": "content-free (calibration)"}
    # one bar over every prompt scored: each query is scored once per pass (zero-shot, k-shot, and the
    # content-free prompt of calibration), so the bar says how many passes make up its total
    passes = ", ".join(what[name] for name, _ in to_score)
    bar = tqdm(total=sum(len(p) for _, p in to_score), unit="prompt", disable=not progress,
               desc=f"{task.name}: prompts ({len(to_score)} per query: {passes})")
    for name, prompts in to_score:
        parts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            try:
                parts.append(label_log_probs(model, chunk, builder.label_ids, batch_size=batch_size,
                                             pad_token_id=pad, first_index=start))
            except NonFiniteLogitsError as error:
                bar.close()
                raise NonFiniteLogitsError(f"{what[name]} prompts (prompt i is test query i): {error}") from None
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
            "demo_indices": " ".join(str(j) for j in icl_prompts[i].demo_indices),  # which were used
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


# ------------------------------------------------------------------------------------------------
# Open-vocabulary tasks
# ------------------------------------------------------------------------------------------------

#: What an open task's summary says about contextual calibration.
CALIBRATION_NOT_APPLICABLE = (
    "not applicable: an open-vocabulary task has no fixed label set to renormalise over (Zhao et al.'s "
    "calibration divides label-word probabilities by a content-free prompt's); no calibrated number is reported"
)


def _rate(hits: np.ndarray) -> Accuracy:
    """A share with its Wilson 95% interval (no per-class prediction rates: the classes are the vocabulary)."""
    correct = int(hits.sum())
    low, high = wilson_interval(correct, len(hits))
    return Accuracy(correct / max(1, len(hits)), low, high, len(hits), [])


@dataclass
class OpenEvaluation:
    """Zero-shot (cue-free ``Q: x\\nA:``) and k-shot results on an open-vocabulary task.

    ``zsl`` / ``icl``: top-1 first-token accuracy over the whole vocabulary (Todd et al.);
    ``zsl_exact`` / ``icl_exact``: greedy exact match of the whole answer (Hendel et al.);
    ``*_answer_log_prob``: mean teacher-forced log-probability of the whole answer (nats).
    """

    model: str
    task: str
    shots: int
    n_test: int
    seed: int
    zsl: Accuracy
    icl: Accuracy
    zsl_exact: Accuracy
    icl_exact: Accuracy
    zsl_answer_log_prob: float
    icl_answer_log_prob: float
    n_demos_used: list[int]
    multi_token_share: float
    rows: list[dict] = field(repr=False, default_factory=list)

    def metrics(self) -> dict:
        """The flat dictionary written to ``metrics.json`` (``kind`` ``open``; no calibration)."""
        return {
            "model": self.model, "task": self.task, "kind": "open", "shots": self.shots, "n_test": self.n_test,
            "seed": self.seed, "metric": "top-1 first answer token over the whole vocabulary",
            "zsl_accuracy": self.zsl.accuracy, "zsl_ci95": [self.zsl.ci_low, self.zsl.ci_high],
            "icl_accuracy": self.icl.accuracy, "icl_ci95": [self.icl.ci_low, self.icl.ci_high],
            "zsl_exact_match": self.zsl_exact.accuracy, "zsl_exact_match_ci95": [self.zsl_exact.ci_low, self.zsl_exact.ci_high],
            "icl_exact_match": self.icl_exact.accuracy, "icl_exact_match_ci95": [self.icl_exact.ci_low, self.icl_exact.ci_high],
            "zsl_answer_log_prob": self.zsl_answer_log_prob, "icl_answer_log_prob": self.icl_answer_log_prob,
            "multi_token_answer_share": self.multi_token_share,
            "mean_demos_used": float(np.mean(self.n_demos_used)) if self.n_demos_used else 0.0,
            "calibration": CALIBRATION_NOT_APPLICABLE,
        }


def evaluate_open(
    model,
    task,
    *,
    shots: int = 8,
    n_test: int = 100,
    seed: int = 0,
    batch_size: int = 4,
    drop_demos_to_fit: bool = False,
    builder: PromptBuilder | None = None,
    progress: bool = True,
) -> OpenEvaluation:
    """Zero-shot and ``shots``-shot scores of an open-vocabulary task on the first ``n_test`` test queries.

    The zero-shot prompt is the query alone (``Q: x\\nA:``: no task cue); k-shot prompts draw their
    demonstrations per query from the train split at random (no class balancing: most answers occur
    once). Each prompt is scored once by `icl_kernels.engine.vocab_scoring.answer_scores`.
    """
    if getattr(task, "kind", "classification") != "open":
        raise InvalidOptionError(f"Task {task.name!r} is a classification task; evaluate it with evaluate_icl.")
    data = task.load(seed=seed)
    pool, test = data["train"], data["test"]
    if n_test > len(test):
        raise InvalidOptionError(f"n_test={n_test} but task {task.name!r} has {len(test)} test examples; use fewer.")
    queries = test.select(range(n_test))
    builder = builder or PromptBuilder(task, model.tokenizer, n_ctx=model.cfg.n_ctx, drop_demos_to_fit=drop_demos_to_fit)
    pad = pad_id(model)
    prompts = {
        "zsl": make_prompts(builder, pool, queries, 0, seed=seed),
        "icl": make_prompts(builder, pool, queries, shots, seed=seed, selector=RandomSelector(balanced=False)),
    }
    gold = gold_answer_ids(builder, prompts["icl"])
    what = {"zsl": "zero-shot", "icl": f"{shots}-shot"}
    bar = tqdm(total=2 * n_test, unit="prompt", disable=not progress, desc=f"{task.name}: prompts (zero-shot, {shots}-shot)")
    scores = {}
    for name, group in prompts.items():
        parts = []
        for start in range(0, n_test, batch_size):
            try:
                parts.append(answer_scores(model, group[start : start + batch_size], gold[start : start + batch_size],
                                           batch_size=batch_size, greedy=True, pad_token_id=pad, first_index=start))
            except NonFiniteLogitsError as error:
                bar.close()
                raise NonFiniteLogitsError(f"{what[name]} prompts (prompt i is test query i): {error}") from None
            bar.update(min(batch_size, n_test - start))
        scores[name] = {key: torch.cat([getattr(p, key) for p in parts]) for key in
                        ("top1", "first_token_correct", "answer_log_prob", "exact_match", "n_answer_tokens")}
    bar.close()
    decode = model.tokenizer.decode
    rows = []
    for i in range(n_test):
        row = {"index": i, "input": queries[i]["input"], "answer": queries[i]["answer"],
               "answer_tokens": int(scores["icl"]["n_answer_tokens"][i])}
        for name in ("zsl", "icl"):
            s = scores[name]
            row |= {f"{name}_top1": decode([int(s["top1"][i])]), f"{name}_first_correct": bool(s["first_token_correct"][i]),
                    f"{name}_exact_match": bool(s["exact_match"][i]), f"{name}_answer_logp": float(s["answer_log_prob"][i])}
        row |= {"n_demos": prompts["icl"][i].n_demos, "prompt_tokens": len(prompts["icl"][i]),
                "demo_indices": " ".join(str(j) for j in prompts["icl"][i].demo_indices)}
        rows.append(row)
    return OpenEvaluation(
        model=str(getattr(model, "_icl_model_name", "")), task=task.name, shots=shots, n_test=n_test, seed=seed,
        zsl=_rate(scores["zsl"]["first_token_correct"].numpy()), icl=_rate(scores["icl"]["first_token_correct"].numpy()),
        zsl_exact=_rate(scores["zsl"]["exact_match"].numpy()), icl_exact=_rate(scores["icl"]["exact_match"].numpy()),
        zsl_answer_log_prob=float(scores["zsl"]["answer_log_prob"].mean()),
        icl_answer_log_prob=float(scores["icl"]["answer_log_prob"].mean()),
        n_demos_used=[p.n_demos for p in prompts["icl"]],
        multi_token_share=float((scores["icl"]["n_answer_tokens"] > 1).double().mean()),
        rows=rows,
    )
