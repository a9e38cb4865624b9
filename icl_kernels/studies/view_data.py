"""What `icl-kernels view` shows of single prompts of a ``heads`` run: ``view_data.json``.

The layer x head maps of the view come from the run's tables (``heads.csv``, ``prompts.csv``); the
token view needs, for a few prompts (the first ``view_prompts`` of the run, `HeadsConfig`), what the
tables do not keep:

* ``tokens``: each prompt token as text (each id decoded alone; ``#<id>`` for a model without a
  tokenizer, such as the synthetic world's);
* ``roles``: what each token is, from the prompt's exact spans (`icl_kernels.data.prompts.IclPrompt`):
  ``bos``, ``demo_input`` (x_i), ``label`` (y_i, the label word), ``separator``, ``query``; the
  prediction position is the last token (``prediction_position``); ``demo`` gives the demonstration
  index i of every demonstration token (-1 elsewhere);
* ``attention_q16``: every head's attention from the prediction position over the prompt's tokens,
  ``[layer head pos]``, as base64 of little-endian uint16 fixed-point values (weight = value / 65535;
  resolution 1.5e-5, a quarter of float16's bytes as JSON text would take);
* ``votes`` and ``head_vote``: per aggregation of a_i (`icl_kernels.kernel.scores.AGGREGATIONS`), each
  head's class votes sum_i a_i [y_i = c] (``[layer head class]``) and the class they reconstruct
  (-1 for a tie), as in `icl_kernels.kernel.scores.class_votes` and `reconstruct`;
* the gold class, the model's answer (argmax of its label-word log-probabilities) and those
  log-probabilities, the demonstration labels and the prompt's split (``select`` or ``report``).

Nothing here writes a file: `icl_kernels.studies.heads.HeadsReport.attachments` hands the record to
`icl_kernels.studies.report.Report.write`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from icl_kernels.kernel.scores import class_votes, reconstruct

__all__ = ["VIEW_DATA_FILE", "token_roles", "token_texts", "encode_q16", "decode_q16", "view_data"]

#: The file a heads run writes for the view (beside its tables).
VIEW_DATA_FILE = "view_data.json"
#: Format version of `VIEW_DATA_FILE`.
VIEW_DATA_VERSION = 1


def token_roles(prompt) -> tuple[list[str], list[int]]:
    """The role of every token of an `IclPrompt` and its demonstration index (-1 outside demonstrations).

    >>> from icl_kernels.data.prompts import IclPrompt
    >>> p = IclPrompt(tokens=(0, 5, 6, 7, 9, 5, 8), demo_input_spans=((1, 3),), demo_label_spans=((3, 4),),
    ...               separator_spans=((4, 5),), demo_labels=(1,), query_span=(5, 7), bos_position=0)
    >>> token_roles(p)
    (['bos', 'demo_input', 'demo_input', 'label', 'separator', 'query', 'query'], [-1, 0, 0, 0, 0, -1, -1])
    """
    n = len(prompt.tokens)
    roles, demo = ["other"] * n, [-1] * n
    if prompt.bos_position is not None:
        roles[prompt.bos_position] = "bos"
    pieces = (("demo_input", prompt.demo_input_spans), ("label", prompt.demo_label_spans),
              ("separator", prompt.separator_spans))
    for role, spans in pieces:
        for i, (start, end) in enumerate(spans):
            for pos in range(start, end):
                roles[pos], demo[pos] = role, i
    start, end = prompt.query_span
    for pos in range(start, end):
        roles[pos] = "query"
    return roles, demo


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (``#<id>`` without a tokenizer)."""
    if tokenizer is None:
        return [f"#{int(i)}" for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def encode_q16(weights: np.ndarray) -> str:
    """Attention weights in [0, 1] as base64 of little-endian uint16 fixed-point (value / 65535).

    >>> decode_q16(encode_q16(np.array([0.0, 0.5, 1.0])), (3,)).round(4).tolist()
    [0.0, 0.5, 1.0]
    """
    q = np.rint(np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0) * 65535).astype("<u2")
    return base64.b64encode(q.tobytes()).decode("ascii")


def decode_q16(text: str, shape: Sequence[int]) -> np.ndarray:
    """The inverse of `encode_q16` (float64 weights of ``shape``)."""
    return np.frombuffer(base64.b64decode(text), dtype="<u2").astype(np.float64).reshape(tuple(shape)) / 65535


def view_data(prompts: Sequence, hrun, split_of: Sequence[str], tokenizer, label_words: Sequence[str] | None,
              model: str, task: str) -> dict[str, Any]:
    """The ``view_data.json`` record of a heads run: the first ``len(hrun.attention_rows)`` prompts.

    Args:
        prompts: the run's `IclPrompt`s, in the run's order (``hrun``'s rows).
        hrun: the `icl_kernels.kernel.head_scan.HeadRun` (with ``attention_rows``).
        split_of: ``select`` or ``report`` for every prompt.
        tokenizer: decodes the tokens (None: ``#<id>``).
        label_words: the label word of each class (None for the synthetic world: ``class <c>``).
    """
    n_classes = hrun.n_classes
    words = list(label_words) if label_words is not None else [f"class {c}" for c in range(n_classes)]
    records = []
    for index, rows in enumerate(hrun.attention_rows):
        prompt = prompts[index]
        if rows.shape[-1] != len(prompt.tokens):
            raise ValueError(f"prompt {index}: {rows.shape[-1]} attention positions for {len(prompt.tokens)} tokens")
        roles, demo = token_roles(prompt)
        labels = hrun.demo_labels[index : index + 1]
        votes, head_vote = {}, {}
        for how, weights in hrun.demo_weights.items():
            v = class_votes(weights[index : index + 1], labels, n_classes)  # [1 layer head class]
            votes[how] = [[[round(float(x), 6) for x in h] for h in layer] for layer in v[0].tolist()]
            head_vote[how] = reconstruct(v)[0].tolist()
        records.append({
            "prompt": index, "split": str(split_of[index]), "query_index": prompt.query_index,
            "tokens": token_texts(tokenizer, prompt.tokens), "roles": roles, "demo": demo,
            "prediction_position": prompt.prediction_position,
            "demo_labels": [int(x) for x in prompt.demo_labels],
            "gold": int(hrun.gold[index]), "model_answer": int(hrun.model_predictions[index]),
            "model_log_probs": [round(float(x), 6) for x in hrun.label_scores[index].tolist()],
            "attention_shape": list(rows.shape),
            "attention_q16": encode_q16(rows.to(torch.float32).numpy()),
            "votes": votes, "head_vote": head_vote,
        })
    return {
        "version": VIEW_DATA_VERSION, "model": model, "task": task, "layers": list(hrun.layers),
        "n_heads": hrun.n_heads, "label_words": words, "aggregations": list(hrun.demo_weights),
        "prompts": records,
    }
