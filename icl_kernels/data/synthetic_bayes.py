"""Exact Bayes inference in the synthetic mixture-of-HMMs world, and accuracy vs shots of a model next to it.

The world (:mod:`icl_kernels.data.synthetic_world`) is a mixture of HMMs with a uniform prior over concepts;
an ICL prompt is ``<d> x_1 y_1 <d> ... <d> x_k y_k <d> x`` and its label is the next emission.

Exact Bayes predictor (``bayes_predictive``): for every concept a forward pass over the token
sequence (scaled forward algorithm: a normalised state vector plus the log of the normalisers, i.e.
the log-likelihood kept in log space), with every delimiter closing the running sequence and
resetting the state distribution to the concept's start distribution, exactly as the generator
does. The posterior over concepts is prior x product of the sequence likelihoods; the predictive of
the next (non-delimiter) token mixes the per-concept predictives with that posterior. Conditioning on
"the next token is not a delimiter" is exact because sequence lengths are independent of tokens.

From the predictive follow the label probabilities of prompts (``bayes_label_probs``; ``oracle``
conditions on the true concept instead of the posterior), the loss floor of a language model trained
on the world's documents (``bayes_document_nll``) and the Bayes accuracy vs shots
(``bayes_accuracy_table``). ``accuracy_vs_shots`` scores a model on the same fresh prompts as the
Bayes predictor and the oracle (argmax of its last-position logits over the label tokens, the
delimiter excluded); ``plot_accuracy_vs_shots`` draws any such table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from icl_kernels.data.synthetic_world import SyntheticPromptBatch, SyntheticWorld
from icl_kernels.utils.stats import wilson_interval

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import plotly.graph_objects as go
    import torch

__all__ = [
    "bayes_predictive",
    "bayes_label_probs",
    "bayes_document_nll",
    "accuracy",
    "bayes_accuracy_table",
    "model_label_logits",
    "accuracy_vs_shots",
    "plot_accuracy_vs_shots",
]


# ----------------------------------------------------------------------------------------------------
# Exact Bayes predictor
# ----------------------------------------------------------------------------------------------------


def bayes_predictive(
    world: SyntheticWorld,
    tokens: np.ndarray,
    all_positions: bool = False,
    concept_prior: np.ndarray | None = None,
    return_posterior: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact P(next token = v | tokens[:, :t+1], next token is not a delimiter) under the world.

    tokens: int [batch, pos] of HMM tokens and delimiters (the delimiter resets to the start
    distribution; the first token may be a delimiter or not: a sequence is running from the first
    non-delimiter token on).
    Returns float64 [batch, vocab_size] for the last position, or [batch, pos, vocab_size] with
    ``all_positions``. ``concept_prior`` ([C] or [batch, C]) replaces the uniform prior: a one-hot
    prior gives the oracle that knows the concept. ``return_posterior`` also returns the posterior
    over concepts after the last token, [batch, C].
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [batch, pos] with pos >= 1, got shape {tokens.shape}.")
    if tokens.min() < 0 or tokens.max() > world.delim_id:
        raise ValueError(f"tokens must be in [0, {world.delim_id}] (delimiter = {world.delim_id}).")
    Bn, T = tokens.shape
    C, S = world.n_concepts, world.n_states
    prior = world.concept_prior if concept_prior is None else np.asarray(concept_prior, np.float64)
    with np.errstate(divide="ignore"):
        log_prior = np.broadcast_to(np.log(prior), (Bn, C)).copy()
    trans_T = world.trans  # [C, S, S]
    log_done = np.zeros((Bn, C))  # log P(closed sequences | c)
    log_cur = np.zeros((Bn, C))  # log P(running sequence | c)
    # predicted state distribution for the next emission, per concept: start rows while fresh
    nxt = np.broadcast_to(world.start[None], (Bn, C, S)).copy()
    out = np.empty((Bn, T, world.vocab_size)) if all_positions else None
    for t in range(T):
        w = tokens[:, t]
        dl = w == world.delim_id
        if dl.any():
            log_done[dl] += log_cur[dl]
            log_cur[dl] = 0.0
            nxt[dl] = world.start[None]
        nd = ~dl
        if nd.any():
            e = world.emit[:, np.minimum(w[nd], world.vocab_size - 1)].T  # [b, S]
            un = nxt[nd] * e[:, None, :]
            z = un.sum(-1)  # [b, C]
            with np.errstate(divide="ignore", invalid="ignore"):
                alpha = np.where(z[..., None] > 0, un / z[..., None], 1.0 / S)
                log_cur[nd] += np.log(z)
            # alpha [b, C, S] @ trans [C, S, S] per concept
            nxt[nd] = np.matmul(alpha.transpose(1, 0, 2), trans_T).transpose(1, 0, 2)
        if all_positions or t == T - 1:
            logw = log_prior + log_done + log_cur
            m = logw.max(-1, keepdims=True)
            if not np.isfinite(m).all():
                bad = np.where(~np.isfinite(m[:, 0]))[0][:5]
                raise ValueError(f"Rows {bad.tolist()} are impossible under every concept with this prior.")
            post = np.exp(logw - m)
            post /= post.sum(-1, keepdims=True)
            pred = np.einsum("bc,bcs,sv->bv", post, nxt, world.emit)
            if all_positions:
                out[:, t] = pred
    if not all_positions:
        out = pred
    if return_posterior:
        return out, post
    return out


def bayes_document_nll(world: SyntheticWorld, tokens: np.ndarray) -> float:
    """Mean per-token cross-entropy (nats) of the exact Bayes predictor on documents, over tokens[:, 1:].

    The loss floor for a language model trained on ``sample_documents``: delimiters are predicted with
    the hazard of the uniform length distribution (P(length = l | length >= l) after l tokens), every
    other token with (1 - hazard) x ``bayes_predictive``.
    """
    tokens = np.asarray(tokens)
    cfg = world.config
    pred = bayes_predictive(world, tokens[:, :-1], all_positions=True)  # [B, T-1, V]
    lengths = np.arange(cfg.seg_len_min, cfg.seg_len_max + 1)
    hazard = np.zeros(cfg.seg_len_max + 2)
    for ell in range(1, cfg.seg_len_max + 1):
        at_least = (lengths >= ell).sum()
        hazard[ell] = ((lengths == ell).sum() / at_least) if at_least else 1.0
    hazard[cfg.seg_len_max + 1 :] = 1.0
    B, T = tokens.shape
    ell = np.zeros((B, T - 1), dtype=np.int64)  # tokens of the running sequence after position t
    run = np.zeros(B, dtype=np.int64)
    for t in range(T - 1):
        run = np.where(tokens[:, t] == world.delim_id, 0, run + 1)
        ell[:, t] = run
    h = hazard[np.minimum(ell, cfg.seg_len_max + 1)]
    tgt = tokens[:, 1:]
    is_d = tgt == world.delim_id
    p_tok = np.take_along_axis(pred, np.minimum(tgt, world.vocab_size - 1)[..., None], -1)[..., 0]
    with np.errstate(divide="ignore"):
        nll = np.where(is_d, -np.log(h), -np.log1p(-h) - np.log(p_tok))
    return float(nll.mean())


def bayes_label_probs(world: SyntheticWorld, batch: SyntheticPromptBatch, oracle: bool = False) -> np.ndarray:
    """P(label | prompt) [batch, vocab_size]; ``oracle`` conditions on the true concept."""
    prior = None
    if oracle:
        prior = np.zeros((len(batch), world.n_concepts))
        prior[np.arange(len(batch)), batch.concepts] = 1.0
    return bayes_predictive(world, batch.tokens, concept_prior=prior)


def accuracy(probs_or_logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((np.asarray(probs_or_logits).argmax(-1) == np.asarray(labels)).mean())


def bayes_accuracy_table(
    world: SyntheticWorld, shots: Sequence[int] = (0, 1, 2, 4, 8, 16, 32), n: int = 2000, seed: int = 1
) -> "pd.DataFrame":
    """Tidy accuracy of the Bayes predictor and the concept-knowing oracle vs shots."""
    rows = []
    for k in shots:
        batch = world.sample_prompts(n, k, np.random.default_rng([seed, k]))
        for name, oracle in (("bayes", False), ("oracle", True)):
            acc = accuracy(bayes_label_probs(world, batch, oracle=oracle), batch.labels)
            rows.append(dict(shots=k, predictor=name, accuracy=acc, n=n, se=float(np.sqrt(acc * (1 - acc) / n))))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# A model next to the Bayes predictor
# ----------------------------------------------------------------------------------------------------


def model_label_logits(
    logits_fn: Callable[["torch.Tensor"], "torch.Tensor"],
    world: SyntheticWorld,
    tokens: np.ndarray,
    batch_size: int = 256,
    device: str | None = None,
) -> np.ndarray:
    """Last-position logits of a model restricted to the label tokens: float64 [batch, vocab_size].

    ``logits_fn`` maps a LongTensor [batch, pos] of token ids to logits [batch, pos, d_vocab] (an HF
    model: ``lambda t: model(t).logits``; a HookedTransformer: ``model``). Only the ``vocab_size`` HMM
    tokens can be labels, so the delimiter's logit is dropped before any argmax.
    """
    outs = []
    with torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            t = torch.as_tensor(tokens[i : i + batch_size], dtype=torch.long)
            if device is not None:
                t = t.to(device)
            logits = logits_fn(t)
            if logits.ndim != 3 or logits.shape[-1] < world.n_tokens:
                raise ValueError(
                    f"logits_fn returned shape {tuple(logits.shape)}; expected [batch, pos, >= {world.n_tokens}]."
                )
            outs.append(logits[:, -1, : world.vocab_size].double().cpu().numpy())
    return np.concatenate(outs)


def accuracy_vs_shots(
    world: SyntheticWorld,
    logits_fn: Callable[["torch.Tensor"], "torch.Tensor"] | None = None,
    shots: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
    n: int = 2000,
    seed: int = 20240,
    batch_size: int = 256,
    oracle: bool = True,
    device: str | None = None,
    progress: bool = False,
) -> "pd.DataFrame":
    """Accuracy vs shots of a model (if ``logits_fn``), the exact Bayes predictor and the oracle.

    The same ``n`` fresh prompts per k (drawn with ``np.random.default_rng([seed, k])``) go to every
    predictor. Model accuracy = argmax of the last-position logits over the label tokens (every HMM
    token; the delimiter is excluded). Tidy columns: shots, predictor, accuracy, se, low and high
    (its 95% Wilson interval over the ``n`` prompts), n, and for the
    model ``agree_bayes`` (argmax agreement with Bayes) and ``nll`` / ``bayes_nll`` (mean -log p of
    the gold label, the model's softmax taken over the label tokens).
    """
    rows = []
    it: Any = shots
    if progress:
        it = tqdm(list(shots), desc=f"accuracy vs shots: demonstration counts ({n} prompts each)", unit="count")
    for k in it:
        batch = world.sample_prompts(n, int(k), np.random.default_rng([seed, int(k)]))
        pb = bayes_label_probs(world, batch)
        acc_b = accuracy(pb, batch.labels)
        idx = np.arange(n)
        bayes_nll = float(-np.log(pb[idx, batch.labels]).mean())
        base = dict(shots=int(k), n=n)
        rows.append(dict(base, predictor="bayes", accuracy=acc_b, nll=bayes_nll))
        if oracle:
            acc_o = accuracy(bayes_label_probs(world, batch, oracle=True), batch.labels)
            rows.append(dict(base, predictor="oracle", accuracy=acc_o))
        if logits_fn is not None:
            lg = model_label_logits(logits_fn, world, batch.tokens, batch_size=batch_size, device=device)
            lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
            rows.append(
                dict(
                    base,
                    predictor="model",
                    accuracy=accuracy(lg, batch.labels),
                    agree_bayes=float((lg.argmax(-1) == pb.argmax(-1)).mean()),
                    nll=float(-lp[idx, batch.labels].mean()),
                    bayes_nll=bayes_nll,
                )
            )
    df = pd.DataFrame(rows)
    df["se"] = np.sqrt(df["accuracy"] * (1 - df["accuracy"]) / df["n"])
    bounds = [wilson_interval(round(a * m), m) for a, m in zip(df["accuracy"], df["n"])]
    df["low"], df["high"] = [b[0] for b in bounds], [b[1] for b in bounds]
    return df


def plot_accuracy_vs_shots(df: "pd.DataFrame", title: str | None = None) -> "go.Figure":
    """Accuracy vs number of demonstrations, one line per predictor (error bars: +-1 s.e. when given).

    ``df`` is tidy with columns ``shots``, ``predictor``, ``accuracy`` (optional ``se``).
    """
    missing = {"shots", "predictor", "accuracy"} - set(df.columns)
    if missing:
        raise ValueError(f"plot_accuracy_vs_shots needs columns {sorted(missing)} in the table.")
    fig = go.Figure()
    for name, g in df.groupby("predictor", sort=False):
        g = g.sort_values("shots")
        err = dict(type="data", array=g["se"].to_numpy()) if "se" in g else None
        fig.add_trace(go.Scatter(x=g["shots"], y=g["accuracy"], mode="lines+markers", name=str(name), error_y=err))
    fig.update_layout(
        title=title or "Synthetic mixture-of-HMMs: label accuracy vs shots",
        xaxis=dict(title="demonstrations k", type="log" if (df["shots"] > 0).all() else "linear"),
        yaxis=dict(title="accuracy", range=[0, 1.02]),
        template="plotly_white",
    )
    return fig
