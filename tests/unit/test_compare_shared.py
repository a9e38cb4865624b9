"""The compare study's shared work gives the same numbers bit for bit: finetuning shared across the
learning-rate search, the trained side and the controls (``shared_finetuning``), and vectorised bootstrap
intervals (``vectorised_intervals``), on tiny models of every architecture."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tiny
from test_relaxation import assert_tiny

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.finetuning import dai_metrics
from icl_kernels.finetuning.dai_metrics import ComparisonSettings, Episode, compare_icl_with_finetuning

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _episodes(n_episodes: int = 3, n_queries: int = 2, seed: int = 1) -> list[Episode]:
    """Two demonstrations per set (labels 311 / 4000), random queries, two development prompts per set
    (one gold label, so that no rate counts as collapsed to a constant answer)."""
    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> list[int]:
        return torch.randint(10, 5000, (n,), generator=g).tolist()

    def zero_shot(query: list[int]) -> IclPrompt:
        return IclPrompt(tokens=(50256, *query), demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                         demo_labels=(), query_span=(1, 1 + len(query)), bos_position=0)

    episodes = []
    for e in range(n_episodes):
        demos = [words(5) + [311], words(4) + [4000]]
        tokens, spans = [50256], []
        for demo in demos:
            spans.append((len(tokens), len(tokens) + len(demo)))
            tokens += demo
        icl, zsl = [], []
        for _ in range(n_queries):
            query = words(4)
            full = tokens + query
            icl.append(IclPrompt(tokens=tuple(full), demo_input_spans=tuple((a, b - 1) for a, b in spans),
                                 demo_label_spans=tuple((b - 1, b) for a, b in spans), separator_spans=(),
                                 demo_labels=(0, 1), query_span=(len(tokens), len(full)), bos_position=0))
            zsl.append(zero_shot(query))
        train = [[50256, *demo] for demo in demos]
        dev = [zero_shot(words(3)) for _ in range(2)]
        episodes.append(Episode(icl, zsl, [0, 1] * (n_queries // 2), train, dev, [0, 0], name=f"set {e}"))
    return episodes


@pytest.mark.parametrize("arch", ["gpt-neo", "gpt-j", "gemma-3", "llama"])
def test_shared_work_gives_the_same_comparison_bit_for_bit(arch, monkeypatch):
    """Every number of the whole comparison (lr search, trained side, controls, untrained copy,
    intervals) is identical with the shared work on and off (prefix reuse and batched finetuning off, so
    that only the shared finetuning and the vectorised intervals differ; the batched runs are compared
    with these in test_batched_finetune.py)."""
    monkeypatch.setattr(dai_metrics, "_RESAMPLES", 200)
    model = load_tiny(arch)
    assert_tiny(arch, model)
    untrained = dai_metrics.untrained_copy(model, f"tiny-{arch}")
    episodes = _episodes()
    runs = {}
    for shared in (False, True):
        cfg = ComparisonSettings(lrs=(0.02, 0.3), collapse_margin=1.0, prefix_reuse=False,
                                 shared_finetuning=shared, vectorised_intervals=shared, batched_finetuning=False)
        result = compare_icl_with_finetuning(model, episodes, [[311], [4000]], cfg, untrained=untrained,
                                             progress=False)
        runs[shared] = json.dumps([result.metrics, result.layers, result.heads, result.examples, result.lr_table],
                                  sort_keys=True, default=str)
    assert runs[True] == runs[False]
    metrics = json.loads(runs[True])[0]
    assert metrics["controls"]["lr0"] and metrics["controls"]["mismatched"]  # both controls ran
    assert len(metrics["lr_selection"]["trained"]["candidates"]) == 2
