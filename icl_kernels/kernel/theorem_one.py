"""Theorem 1 of Han et al., simulated on the synthetic mixture-of-HMMs world (`icl_kernels.data.synthetic_world`).

The theorem: on an ICL prompt ``<d> x_1 y_1 <d> ... <d> x_n y_n <d> x`` drawn from one concept c*,
the Bayes predictive P(y | prompt) converges, as n grows, to a kernel regression

    y_hat(x) = sum_i e_{y_i} K(x, x_i) / sum_i K(x, x_i),   K(x, x') = phi(x)^T S^+ phi(x'),

with phi(x) built from the products of the HMM's observable operators along x.

Our computable construction (derived here; the paper's exact S is not reproduced). For concept c
let ``T^c_x = diag(emit[:, x_1]) trans_c diag(emit[:, x_2]) trans_c ... diag(emit[:, x_L]) trans_c``
(the observable-operator product along x, ending with one transition), so that

    P(x, y | c) = start_c^T T^c_x emit[:, y]    and    P(x | c) = start_c^T T^c_x 1,

both *linear* in ``T^c_x``. Take ``phi(x)`` to be ``(start_c^T T^c_x)_c`` (``features="forward"``,
C x S numbers: every concept's unnormalised predictive state after x) or ``(vec T^c_x)_c``
(``features="operator"``, C x S x S numbers, the theorem's vec(T_x)), and
``S = sum_{x in V^L} phi(x) phi(x)^T`` over *all* inputs of length L (unweighted). Then for
demonstrations drawn from c*, by the law of large numbers

    (1/n) sum_i e_{y_i} K(x, x_i) -> sum_{x', y'} P(x', y' | c*) e_{y'} phi(x')^T S^+ phi(x) = P(x, . | c*)

because P(x', y' | c*) = a_{y'}^T phi(x') is linear and S S^+ phi(x) = phi(x); likewise the
denominator -> P(x | c*). So y_hat(x) -> P(y | x, c*), which is also the limit of the Bayes
predictive (the posterior over concepts concentrates on c*). `expected_kr` evaluates the n -> infinity
limit exactly, and a test checks the identity to float precision. K = F S^+ F^T is the orthogonal
projection onto the column space of the feature matrix F (rows phi(x)), computed by SVD; it is
signed, so a finite-n denominator can be <= 0: such prompts abstain.

`simulate` compares, for growing n, the exact Bayes predictive, the concept-knowing oracle, the
kernel-regression estimates and the label-prior baseline (uniform kernel: the demonstrations'
majority label). With the ``features="operator"`` kernel the span is (nearly) every input, K is close
to the identity and kernel regression degenerates to counting exact repeats of x; the
``"forward"`` kernel shares strength between inputs that lead to similar predictive states.

`model_behaviour` asks the same of a trained model (``synthetic-gpt-neo``): its accuracy and
agreement with Bayes, and, per head, the label reconstruction of `icl_kernels.kernel.scores` (best head
chosen on one split of the prompts, reported on the other) and the correlation of the head's a_i with
the theorem's K(x, x_i).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from icl_kernels.data.synthetic_bayes import bayes_label_probs
from icl_kernels.data.synthetic_world import SyntheticPromptBatch, SyntheticWorld
from icl_kernels.engine.capture import capture
from icl_kernels.engine.label_scoring import unembed
from icl_kernels.kernel.scores import (
    DemoLayout,
    class_votes,
    demo_attention,
    head_correlation,
    held_out_best_head,
    reconstruct,
)
from icl_kernels.utils.plotting import colour_of
from icl_kernels.utils.stats import (
    majority_share,
    paired_bootstrap,
    proportion,
    rng,
    split_indices,
)

__all__ = [
    "TheoremKernel",
    "input_features",
    "theorem_kernel",
    "kernel_estimate",
    "expected_kr",
    "simulate",
    "model_behaviour",
    "theorem_figure",
]

FEATURES = ("forward", "operator")
#: A kernel-regression estimate is defined when sum_i K(x, x_i) > this x sum_i |K(x, x_i)|.
MIN_RELATIVE_DENOMINATOR = 1e-9


def all_inputs(world: SyntheticWorld, length: int | None = None) -> np.ndarray:
    """Every input x in V^L as rows, in base-V order (row index = `input_index`)."""
    L = world.config.x_len if length is None else length
    V = world.vocab_size
    grid = np.indices((V,) * L).reshape(L, -1).T
    return grid.astype(np.int64)


def input_index(world: SyntheticWorld, x: np.ndarray) -> np.ndarray | np.integer:
    """Row of each x (``[..., L]``) in `all_inputs`."""
    x = np.asarray(x, dtype=np.int64)
    weights = world.vocab_size ** np.arange(x.shape[-1] - 1, -1, -1)
    return (x * weights).sum(-1)


def input_features(world: SyntheticWorld, x: np.ndarray, features: str = "forward") -> np.ndarray:
    """phi(x) for inputs ``x`` [n, L]: ``[n, C*S]`` (forward) or ``[n, C*S*S]`` (operator)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, not {features!r}.")
    x = np.asarray(x, dtype=np.int64)
    if x.ndim != 2 or (x < 0).any() or (x >= world.vocab_size).any():
        raise ValueError(f"x must be [n, L] HMM tokens in [0, {world.vocab_size}), got shape {x.shape}.")
    n, L = x.shape
    C, S = world.n_concepts, world.n_states
    emit = world.emit  # [S, V]
    if features == "forward":
        # start_c^T diag(e_x1) trans_c diag(e_x2) trans_c ... : a row vector per concept
        v = np.broadcast_to(world.start[None], (n, C, S)).copy()
        for t in range(L):
            v = v * emit[:, x[:, t]].T[:, None, :]
            v = np.einsum("ncs,cst->nct", v, world.trans)
        return v.reshape(n, C * S)
    op = np.broadcast_to(np.eye(S)[None, None], (n, C, S, S)).copy()
    for t in range(L):
        op = op * emit[:, x[:, t]].T[:, None, None, :]  # right-multiply by diag(e_xt)
        op = np.einsum("ncab,cbd->ncad", op, world.trans)
    return op.reshape(n, C * S * S)


@dataclass
class TheoremKernel:
    """K(x, x') = phi(x)^T S^+ phi(x') for every pair of inputs of length L (rows of `all_inputs`)."""

    world: SyntheticWorld
    features: str
    matrix: np.ndarray  # [V^L, V^L]
    rank: int

    def __call__(self, x: np.ndarray, x_prime: np.ndarray) -> np.ndarray:
        """K for inputs ``x`` [..., L] and ``x_prime`` [..., L] (broadcast over leading dims)."""
        return self.matrix[input_index(self.world, x), input_index(self.world, x_prime)]


def theorem_kernel(world: SyntheticWorld, features: str = "forward", rtol: float = 1e-10) -> TheoremKernel:
    """The theorem's kernel on all V^L inputs, by SVD of the feature matrix (K = U_r U_r^T)."""
    feats = input_features(world, all_inputs(world), features)
    u, s, _ = np.linalg.svd(feats, full_matrices=False)
    rank = int((s > rtol * s.max()).sum())
    basis = u[:, :rank]
    return TheoremKernel(world, features, basis @ basis.T, rank)


def kernel_estimate(kernel: TheoremKernel | None, batch: SyntheticPromptBatch, n_classes: int) -> np.ndarray:
    """Kernel-regression y_hat for each prompt ``[batch, V]``; NaN rows where sum_i K is not positive
    (below `MIN_RELATIVE_DENOMINATOR` x sum_i |K|; the kernel is signed).

    ``kernel=None`` is the uniform kernel: the demonstrations' label frequencies.
    """
    k = batch.k
    if k == 0:
        return np.full((len(batch), n_classes), np.nan)
    xs = batch.tokens[:, batch.x_positions[:k]]  # [n, k, L]
    ys = batch.tokens[:, batch.label_positions]  # [n, k]
    x_test = batch.tokens[:, batch.x_positions[k]]  # [n, L]
    if kernel is None:
        weights = np.ones(ys.shape)
    else:
        weights = kernel(np.broadcast_to(x_test[:, None], xs.shape), xs)
    onehot = np.eye(n_classes)[ys]  # [n, k, V]
    num = np.einsum("nk,nkv->nv", weights, onehot)
    den = weights.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.abs(weights).sum(-1, keepdims=True)
        out = np.where((den > MIN_RELATIVE_DENOMINATOR * scale) & (scale > 0), num / den, np.nan)
    return out


def expected_kr(kernel: TheoremKernel, concept: int) -> np.ndarray:
    """The n -> infinity limit of kernel regression on demonstrations of ``concept``: [V^L, V].

    sum_{x', y'} P(x', y' | c) e_{y'} K(x, x') / sum_{x'} P(x' | c) K(x, x') for every x.
    """
    world = kernel.world
    x_all = all_inputs(world)
    fwd = input_features(world, x_all, "forward").reshape(len(x_all), world.n_concepts, world.n_states)
    joint = fwd[:, concept] @ world.emit  # P(x', y' | c): [V^L, V]
    num = kernel.matrix @ joint
    den = kernel.matrix @ joint.sum(-1)
    return num / den[:, None]


def conditional(world: SyntheticWorld, concept: int) -> np.ndarray:
    """P(y | x, c) for every input x: [V^L, V]."""
    x_all = all_inputs(world)
    fwd = input_features(world, x_all, "forward").reshape(len(x_all), world.n_concepts, world.n_states)
    joint = fwd[:, concept] @ world.emit
    return joint / joint.sum(-1, keepdims=True)


def _argmax_or_abstain(probs: np.ndarray) -> np.ndarray:
    out = np.where(np.isfinite(probs).all(-1), np.nan_to_num(probs, nan=-np.inf).argmax(-1), -1)
    top = np.nan_to_num(probs, nan=-np.inf).max(-1, keepdims=True)
    tied = (np.nan_to_num(probs, nan=-np.inf) == top).sum(-1) > 1
    return np.where(tied, -1, out)


def simulate(
    world: SyntheticWorld,
    shots: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
    n: int = 1000,
    seed: int = 0,
    features: Sequence[str] = ("forward", "operator"),
    progress: bool = False,
) -> pd.DataFrame:
    """Accuracy and agreement vs number of demonstrations, tidy: one row per (shots, predictor).

    ``progress``: a bar over the demonstration counts (``n`` prompts each; the long prompts take longest).

    Predictors: ``bayes`` (exact), ``oracle`` (knows the concept), ``kr_<features>`` (the theorem's
    kernel), ``kr_uniform`` (label frequencies). Columns: accuracy vs the sampled gold label,
    ``agree_bayes`` (argmax equal to Bayes'), ``agree_oracle``, ``l1_bayes`` (mean L1 distance of the
    predicted distribution to Bayes', over prompts where it is defined), ``abstain`` (fraction of
    prompts with no estimate or a tie), and the binomial standard error of the accuracy.
    """
    kernels = {f"kr_{f}": theorem_kernel(world, f) for f in features}
    V = world.vocab_size
    rows = []
    for k in tqdm(list(shots), desc=f"theorem simulation: demonstration counts ({n} prompts each)", unit="count",
                  disable=not progress):
        batch = world.sample_prompts(n, k, rng("theorem_simulation", seed, k))
        bayes = bayes_label_probs(world, batch)
        oracle = bayes_label_probs(world, batch, oracle=True)
        preds = {"bayes": bayes, "oracle": oracle}
        for name, kern in kernels.items():
            preds[name] = kernel_estimate(kern, batch, V)
        preds["kr_uniform"] = kernel_estimate(None, batch, V)
        bayes_arg = bayes.argmax(-1)
        oracle_arg = oracle.argmax(-1)
        for name, probs in preds.items():
            arg = _argmax_or_abstain(probs)
            defined = np.isfinite(probs).all(-1)
            acc = float((arg == batch.labels).mean())
            rows.append(dict(
                shots=k, predictor=name, accuracy=acc, se=float(np.sqrt(acc * (1 - acc) / n)),
                agree_bayes=float((arg == bayes_arg).mean()), agree_oracle=float((arg == oracle_arg).mean()),
                l1_bayes=float(np.abs(probs[defined] - bayes[defined]).sum(-1).mean()) if defined.any() else float("nan"),
                abstain=float((arg < 0).mean()), n=n,
                kernel_rank=kernels[name].rank if name in kernels else None,
            ))
    return pd.DataFrame(rows)


def _synthetic_layout(batch: SyntheticPromptBatch):
    k = batch.k
    spans = [(int(batch.x_positions[i, 0]), int(batch.label_positions[i]) + 1) for i in range(k)]
    labels = [(int(p), int(p) + 1) for p in batch.label_positions]
    n = len(batch)
    ys = batch.tokens[:, batch.label_positions]
    return DemoLayout.from_spans([spans] * n, [labels] * n, ys.tolist(), width=batch.tokens.shape[1])


def model_behaviour(
    model,
    world: SyntheticWorld,
    shots: Sequence[int] = (1, 2, 4, 8, 16, 32),
    n: int = 300,
    seed: int = 0,
    select_fraction: float = 0.7,
    batch_size: int = 32,
    aggregation: str = "max",
    kernel_features: str = "forward",
    progress: bool = False,
) -> pd.DataFrame:
    """How a model trained on the world behaves as n grows, tidy (shots, metric, value, low, high, n, unit).

    Metrics: ``model_accuracy``, ``bayes_accuracy``, ``model_agree_bayes``; for the best head on the
    selection split (by agreement with the model): ``head_agree_model`` and ``head_accuracy`` and
    ``head_agree_bayes`` on the held-out split, with ``best_layer``/``best_head``, next to
    ``model_majority_share``, the baseline the head's agreement must beat (the share of held-out
    prompts on which the model gives its most frequent answer there: the agreement of a head that
    always votes that class), and ``head_minus_majority_share``, their difference with a paired
    bootstrap over the held-out prompts; and the largest per-head Pearson correlation between a_i
    and the theorem's K(x, x_i) (``kernel_corr_max``, with its head), over all prompts. Rates carry
    95% Wilson intervals (``low``, ``high``) over ``n`` prompts: all prompts for the model's own
    rates, the held-out ones for the head's; counts and choices have no interval.
    """
    device = next(model.parameters()).device
    n_ctx = int(model.cfg.n_ctx)
    kern = theorem_kernel(world, kernel_features)
    V = world.vocab_size
    label_ids = torch.arange(V, device=device)
    rows = []
    for k in tqdm(list(shots), desc=f"theorem model: demonstration counts ({n} prompts each)", unit="count",
                  disable=not progress):
        if world.prompt_len(k) > n_ctx:
            raise ValueError(
                f"A {k}-shot prompt is {world.prompt_len(k)} tokens, longer than the model's context {n_ctx}; "
                "use fewer shots."
            )
        batch = world.sample_prompts(n, k, rng("theorem_model", seed, k))
        tokens = torch.as_tensor(batch.tokens, dtype=torch.long)
        pred_pos = torch.full((n,), tokens.shape[1] - 1, dtype=torch.long)
        attn, logits = [], []
        for start in range(0, n, batch_size):
            cap = capture(model, tokens[start : start + batch_size], pred_pos[start : start + batch_size])
            with torch.no_grad():
                logits.append(unembed(model, cap.final_residual.to(device), label_ids).float().cpu())
            attn.append(cap.attention.float())
        attention = torch.cat(attn)
        model_pred = torch.cat(logits).argmax(-1)
        bayes = bayes_label_probs(world, batch)
        bayes_pred = torch.as_tensor(bayes.argmax(-1))
        gold = torch.as_tensor(batch.labels)
        layout = _synthetic_layout(batch)
        weights = demo_attention(attention, layout, aggregation)
        record = dict(
            model_accuracy=proportion(model_pred == gold),
            bayes_accuracy=proportion(bayes_pred == gold),
            model_agree_bayes=proportion(model_pred == bayes_pred),
        )
        if k >= 1:
            select, report = split_indices(n, select_fraction, seed)
            best = held_out_best_head(weights, layout.demo_labels, model_pred, gold, V, select, report)
            recon = reconstruct(class_votes(weights, layout.demo_labels, V))[:, best["layer"], best["head"]]
            r = torch.as_tensor(report)
            head_agrees = (recon[r] == model_pred[r]).numpy().astype(float)
            record.update(
                head_agree_model=proportion(head_agrees > 0),
                model_majority_share={"value": majority_share(model_pred[r]), "n": len(r)},
                head_minus_majority_share=paired_bootstrap(
                    lambda a, m: float(a.mean() - majority_share(m)), [head_agrees, model_pred[r].numpy()], "prompts"),
                head_accuracy=proportion(recon[r] == gold[r]),
                head_agree_bayes=proportion(recon[r] == bayes_pred[r]),
                best_layer=best["layer"], best_head=best["head"],
            )
            if k >= 2:
                xs = batch.tokens[:, batch.x_positions[:k]]
                x_test = np.broadcast_to(batch.tokens[:, batch.x_positions[k]][:, None], xs.shape)
                kvals = torch.as_tensor(kern(x_test, xs), dtype=torch.float32)
                corr = head_correlation(weights, kvals, layout.valid)
                flat = torch.nan_to_num(corr, nan=-2.0).flatten()
                j = int(flat.argmax())
                record.update(kernel_corr_max=float(flat[j]), kernel_corr_layer=j // corr.shape[1],
                              kernel_corr_head=j % corr.shape[1])
        for metric, value in record.items():
            entry = value if isinstance(value, dict) else {"value": value}
            rows.append(dict(shots=k, metric=metric, value=float(entry["value"]), low=entry.get("low", np.nan),
                             high=entry.get("high", np.nan), n=entry.get("n", n), unit="prompts"))
    return pd.DataFrame(rows)


def theorem_figure(simulation: pd.DataFrame, behaviour: pd.DataFrame | None = None, title: str = ""):
    """Accuracy (left) and agreement with Bayes (right) vs number of demonstrations.

    Each predictor keeps one colour in both panels (the legend names it once); the simulation's
    accuracy carries +-1 s.e. bars, the trained model's and its head's rates their 95% intervals.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy vs gold", "agreement with the Bayes argmax"))
    names = list(dict.fromkeys(simulation["predictor"]))
    for i, name in enumerate(names):
        g = simulation[simulation["predictor"] == name].sort_values("shots")
        style = dict(mode="lines+markers", name=name, legendgroup=name, line=dict(color=colour_of(i)),
                     marker=dict(color=colour_of(i)))
        fig.add_trace(go.Scatter(x=g["shots"], y=g["accuracy"], error_y=dict(type="data", array=g["se"]), **style),
                      row=1, col=1)
        if name != "bayes":
            fig.add_trace(go.Scatter(x=g["shots"], y=g["agree_bayes"], showlegend=False, **style), row=1, col=2)
    if behaviour is not None and not behaviour.empty:
        labels = {"trained model": len(names), "best head (held out)": len(names) + 1}
        for metric, label, col in (
            ("model_accuracy", "trained model", 1), ("head_accuracy", "best head (held out)", 1),
            ("model_agree_bayes", "trained model", 2), ("head_agree_bayes", "best head (held out)", 2),
        ):
            g = behaviour[behaviour["metric"] == metric].sort_values("shots")
            if len(g):
                err = None
                if {"low", "high"} <= set(g.columns) and g["low"].notna().any():
                    err = dict(type="data", symmetric=False, array=g["high"] - g["value"], arrayminus=g["value"] - g["low"])
                colour = colour_of(labels[label])
                fig.add_trace(go.Scatter(x=g["shots"], y=g["value"], error_y=err, mode="lines+markers", name=label,
                                         line=dict(dash="dash", color=colour), marker=dict(color=colour),
                                         legendgroup=label, showlegend=col == 1),
                              row=1, col=col)
    for col, y_title in ((1, "accuracy"), (2, "agreement with Bayes")):
        fig.update_xaxes(type="log", title_text="demonstrations n", row=1, col=col)
        fig.update_yaxes(range=[0, 1.02], title_text=y_title, row=1, col=col)
    fig.update_layout(title=title or "Theorem 1 on the synthetic world: Bayes vs kernel regression",
                      template="plotly_white")
    return fig
