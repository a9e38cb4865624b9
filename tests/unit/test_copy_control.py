"""The copy control of open tasks: which prompts echoing the input would answer, and the steering
results without them (`icl_kernels.data.prompts.input_copy_matches`, `icl_kernels.families.copy_control`)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tiny

from icl_kernels.data.prompts import PromptBuilder, input_copy_matches, make_prompts
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.families.copy_control import copy_control
from icl_kernels.studies.families import FamiliesConfig, _task_vectors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _zero_shot(task_name: str, n: int = 40):
    model = load_tiny("gpt-neo")
    task = get_task(task_name)
    data = task.load(seed=0)
    builder = PromptBuilder(task, model.tokenizer)
    queries = data["test"].select(range(n))
    return model, builder, list(queries), make_prompts(builder, data["train"], queries, 0, seed=0)


def test_copy_matches_are_the_prompts_whose_answer_starts_with_the_inputs_first_token():
    """Counted by hand with the tokenizer: ' <input>' and the gold answer (with its leading space)
    begin with the same token. present-past has both kinds among its first 40 test pairs; the letter
    tasks never share a first token with their input."""
    model, builder, queries, prompts = _zero_shot("present-past")
    tok = model.tokenizer
    by_hand = [tok.encode(" " + queries[p.query_index]["input"])[0] == tok.encode(builder.label_words[p.query_label])[0]
               for p in prompts]
    got = input_copy_matches(builder, queries, prompts)
    assert got.tolist() == by_hand
    assert 0 < sum(by_hand) < len(by_hand)  # both kinds, or the test would not tell them apart
    _, builder, queries, prompts = _zero_shot("capitalize-first-letter")
    assert not input_copy_matches(builder, queries, prompts).any()


def test_copy_control_scores_the_vector_on_the_prompts_copying_cannot_answer():
    """A 'vector' right exactly on the copy prompts has accuracy 0 without them; a vector right on
    every prompt keeps 1; the differences are taken on the same prompts."""
    copies = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    echo = copies.astype(float)
    zero = np.zeros(8)
    args = dict(unit="prompts", resamples=200, seed=0)
    out = copy_control("fv", copies, echo, ("random", zero), zero, args)
    assert out["fv_copy_share"]["value"] == pytest.approx(3 / 8) and out["fv_n_no_copy"] == 5
    assert out["fv_accuracy_no_copy"]["value"] == 0.0 and out["fv_minus_random_no_copy"]["value"] == 0.0
    right = copy_control("tv", copies, np.ones(8), ("zero_shot", zero), zero, args)
    assert right["tv_accuracy_no_copy"]["value"] == 1.0 and right["tv_minus_zero_shot_no_copy"]["value"] == 1.0
    assert set(copy_control("fv", np.ones(4, dtype=bool), np.ones(4), ("random", zero[:4]), zero[:4], args)) == {
        "fv_copy_share", "fv_n_no_copy"}


def test_task_vectors_of_an_open_task_report_the_copy_control():
    """The families study's task vectors on present-past carry the copy share of their test split,
    and the copy-free accuracies count the other test prompts."""
    cfg = FamiliesConfig.from_dict({"model": "tiny-gpt-neo", "task": "present-past", "shots": 2, "n_test": 8,
                                    "tv_shots": 2, "tv_prompts": 16, "bootstrap": 100, "control_task": "none",
                                    "device": "cpu"})
    model = load_tiny("gpt-neo")
    _, summary = _task_vectors(cfg, model)
    n_test = summary["n_tv_test"]
    assert summary["tv_copy_share"]["n"] == n_test
    assert summary["tv_n_no_copy"] == n_test - round(summary["tv_copy_share"]["value"] * n_test)
    assert summary["tv_n_no_copy"] >= 2  # (3 of 8 here) so the copy-free numbers exist
    assert summary["tv_accuracy_no_copy"]["n"] == summary["tv_n_no_copy"]
    assert summary["tv_minus_zero_shot_no_copy"]["n"] == summary["tv_n_no_copy"]
