"""Many finetuning runs of the key/value baseline at once: one batch row per run.

The learning-rate search of the compare study (`icl_kernels.finetuning.dai_metrics.choose_lr`)
trains the baseline of `icl_kernels.finetuning.finetune` once per demonstration set and candidate
rate (20 x 7 runs by default), each run a few batch-1 SGD steps on short sequences, and then scores
each finetuned model on the development queries. Run one at a time, a small model spends that time
in per-call overhead and a large one in matrix products too small to use the machine.

Here a batch of runs trains together. Run ``r`` owns batch row ``r`` and its own copy of every
trained parameter (``[run, *parameter shape]``); at every layer the keys and values of row ``r`` are
recomputed from the attention input with run ``r``'s weights (`kv_per_row`, which replaces
``hook_k`` and ``hook_v``: they fire before Gemma-3's key norm and before rotary, exactly where
TransformerLens applies ``W_K`` and ``W_V``). Step ``j`` runs every run's ``j``-th sequence, right-padded,
the loss is the sum over rows of each row's mean LM loss over its own tokens, so each run's
gradient is the gradient of its own loss, and each run takes its own SGD step with its own rate.
That is `icl_kernels.finetuning.finetune.finetune` on every run, step for step: the same
sequences in the same order, the same loss, plain SGD, batch size 1 within each run. The finetuned
models are scored the same way (`row_label_log_probs`: each development prompt in the row of its
run's weights).

The results are those of the one-at-a-time runs up to rounding: equal to 1e-10 in float64 on tiny
models of every architecture (``tests/unit/test_batched_finetune.py``); in float32 the batched
products round differently, which can move a development prediction and so, at a near tie, the
chosen learning rate. ``ComparisonSettings(batched_finetuning=False)`` (``--no-batched-finetuning``)
runs them one at a time.

Only a HookedTransformer whose attention reads one input per layer is batched (`batch_reason` says
why not otherwise: a TransformerBridge wraps Hugging Face projections that no hook recomputes; split
or per-head attention inputs, ungrouped key/value heads and 4-bit weights are TransformerLens
options this does not follow); callers fall back to the one-at-a-time runs there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.batching import memory_budget
from icl_kernels.engine.hooks import act_name, apply_rotary, attention_spec, hooks_on, rotary_hook_kinds, rotate_by
from icl_kernels.engine.label_scoring import check_finite, final_residual, label_scores, score_dtype, unembed
from icl_kernels.engine.prefix_cache import right_pad
from icl_kernels.finetuning.finetune import (
    FinetuneResult,
    FirstStep,
    kv_parameters,
)
from icl_kernels.finetuning.lm_loss import chunk_tokens, row_lm_losses
from icl_kernels.models import backend as tl_backend

__all__ = ["batch_reason", "RunWeights", "kv_per_row", "length_buckets", "finetune_runs", "first_steps",
           "row_label_log_probs"]


def batch_reason(model: tl_backend.Model) -> str | None:
    """Why the runs of ``model`` cannot be batched (``None`` when they can; module docstring)."""
    if tl_backend.is_bridge(model):
        return "a TransformerBridge computes keys and values in the wrapped Hugging Face projections"
    cfg = model.cfg
    for option in ("use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention", "load_in_4bit"):
        if getattr(cfg, option, False):
            return f"the model sets TransformerLens's {option}"
    return None


@dataclass
class RunWeights:
    """Each run's copy of the trained parameters: ``tensors[name]`` is ``[run, *shape]`` of the
    parameter ``name`` of `icl_kernels.finetuning.finetune.kv_parameters` (on a HookedTransformer
    ``blocks.{l}.attn.W_K`` / ``_W_K`` ``[kv_head d_model d_head]``, the biases ``[kv_head d_head]``)."""

    tensors: dict[str, Tensor]

    @classmethod
    def stacked(cls, model: tl_backend.Model, states: Sequence[dict[str, Tensor] | None]) -> RunWeights:
        """One row per state (``None``: the model's own weights)."""
        params = kv_parameters(model)
        return cls({name: torch.stack([p.detach() if s is None else s[name].to(p) for s in states]).contiguous()
                    for name, p in params.items()})

    def row(self, r: int) -> dict[str, Tensor]:
        return {name: t[r].detach().clone() for name, t in self.tensors.items()}

    @property
    def n_runs(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


def _site(name: str) -> tuple[int, str, str]:
    """(layer, "k" or "v", "W" or "b") of a HookedTransformer key/value parameter name."""
    parts = name.split(".")
    leaf = parts[-1].lstrip("_")
    return int(parts[1]), leaf[-1].lower(), leaf[0]


@contextlib.contextmanager
def kv_per_row(model: tl_backend.Model, weights: RunWeights, owners: Tensor | None = None) -> Iterator[dict]:
    """Inside the block, batch row ``b`` computes its keys and values with run ``owners[b]``'s
    weights (default: row ``b`` with run ``b``). Rows must be grouped by run, in run order, each run
    with the same number of rows (``owners = arange(R).repeat_interleave(m)``) or one row each.

    Yields a dict whose ``"owners"`` and ``"weights"`` entries may be replaced between forward passes
    (the same parameters, other runs). The hooks are gone afterwards, also on error.

    Raises:
        ValueError: `batch_reason` gives a reason, or the owners are not grouped as above.
    """
    reason = batch_reason(model)
    if reason is not None:
        raise ValueError(f"Cannot give each batch row its own key/value weights: {reason}.")
    state = {"owners": owners, "weights": weights}
    names_at: dict[tuple[int, str], dict[str, str]] = {}  # (layer, "k"/"v") -> {"W"/"b": parameter name}
    for name in weights.tensors:
        layer, kind, part = _site(name)
        names_at.setdefault((layer, kind), {})[part] = name
    inputs: dict[int, dict[str, Tensor]] = {}

    def keep_inputs(layer: int):
        def pre_hook(module, args, kwargs):
            inputs[layer] = dict(k=kwargs.get("key_input", args[1] if len(args) > 1 else None),
                                 v=kwargs.get("value_input", args[2] if len(args) > 2 else None))

        return pre_hook

    def project(layer: int, kind: str):
        attn = model.blocks[layer].attn

        def hook(out: Tensor, hook) -> Tensor:
            current: RunWeights = state["weights"]
            own = {part: current.tensors[name] for part, name in names_at[(layer, kind)].items()}
            n_runs = current.n_runs
            x = inputs[layer][kind]  # [batch pos d_model]
            batch, pos, d_model = x.shape
            per_run = _rows_per_run(state["owners"], batch, n_runs)
            w = own["W"]  # [run kv_head d_model d_head]
            n_kv, d_head = w.shape[1], w.shape[3]
            flat = w.permute(0, 2, 1, 3).reshape(n_runs, d_model, n_kv * d_head)
            y = torch.bmm(x.reshape(n_runs, per_run * pos, d_model).to(flat.dtype), flat)
            y = y.view(batch, pos, n_kv, d_head)
            if "b" in own:
                bias = own["b"].repeat_interleave(per_run, dim=0)[:, None]
            else:
                bias = getattr(attn, f"_b_{kind.upper()}" if hasattr(attn, f"_b_{kind.upper()}") else f"b_{kind.upper()}")
            return (y + bias).to(out.dtype)

        return hook

    hooks = [(act_name(kind, layer), project(layer, kind)) for (layer, kind) in sorted(names_at)]
    handles = []
    try:
        handles += [model.blocks[layer].attn.register_forward_pre_hook(keep_inputs(layer), with_kwargs=True)
                    for layer in range(model.cfg.n_layers)]
        with hooks_on(model, hooks):
            yield state
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()


def _rows_per_run(owners: Tensor | None, batch: int, n_runs: int) -> int:
    if owners is None and batch != n_runs:
        raise ValueError(f"A batch of {batch} rows for {n_runs} runs: give owners (each run's rows) or one row per run.")
    if batch % n_runs:
        raise ValueError(f"A batch of {batch} rows cannot be split evenly over {n_runs} runs.")
    per_run = batch // n_runs
    if owners is not None:
        expected = torch.arange(n_runs).repeat_interleave(per_run)
        if owners.shape != expected.shape or not torch.equal(owners.cpu(), expected):
            raise ValueError("kv_per_row needs the rows grouped by run, in run order, the same number per run.")
    return per_run


def _row_losses(model: tl_backend.Model, w_u_t: Tensor, residual: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Each row's mean LM loss over its own tokens: ``finetune``'s loss (in float32, as there) on each row,
    from the final residual; only the real (unpadded) positions are unembedded, by ``w_u_t`` (``W_U``
    transposed and contiguous, made once per call of `finetune_runs`: the layout the products run fastest
    in), a chunk of tokens at a time with the gradient made on the way (`icl_kernels.finetuning.lm_loss`)."""
    sizes = [n - 1 for n in lengths.tolist()]
    real = torch.cat([residual[r, :n] for r, n in enumerate(sizes)])
    targets = torch.cat([tokens[r, 1:n + 1] for r, n in enumerate(sizes)])
    owners = torch.repeat_interleave(torch.arange(len(sizes), device=real.device),
                                     torch.tensor(sizes, device=real.device))
    return row_lm_losses(real, lambda x: unembed(model, x, w_u_t=w_u_t), targets, owners, len(sizes),
                         chunk=chunk_tokens(model.cfg.d_vocab))


def length_buckets(lengths: Sequence[int], waste: float = 1.25) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, shortest first: a group grows while its
    padded size (longest x count) stays within ``waste`` times its real tokens, so right padding
    costs at most a quarter more work.

    >>> length_buckets([30, 10, 12, 29, 11])
    [[1, 4, 2], [3, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            group = buckets[-1] + [i]
            if lengths[i] * len(group) <= waste * sum(lengths[j] for j in group):
                buckets[-1] = group
                continue
        buckets.append([i])
    return buckets


def _training_queries(model: tl_backend.Model, q_kind: str, seen: dict[int, Tensor], row: int, length: int) -> Tensor:
    """``[layer n_tokens head_index d_head]``: the queries of tokens 1.. of batch row ``row`` (``length``
    real tokens) at every layer, in the position-free frame, as `finetune` records them."""
    positions = torch.arange(1, length, device=seen[0].device)
    per_layer = []
    for layer in range(model.cfg.n_layers):
        spec = attention_spec(model, layer)
        q = seen[layer][row:row + 1, :length]
        if q_kind == "q":
            q = apply_rotary(q, spec)
        per_layer.append(rotate_by(q[0, 1:], spec, -positions))
    return torch.stack(per_layer).cpu()


def training_row_bytes(model: tl_backend.Model, width: int) -> int:
    """Estimated peak bytes of one training row ``width`` tokens wide: the float32 logits, their
    softmax and its gradient, and the activations kept for the backward pass."""
    cfg = model.cfg
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    per_token = 3 * 4 * cfg.d_vocab + cfg.n_layers * 4 * (8 * cfg.d_model + 2 * d_mlp + 2 * cfg.n_heads * width)
    return int(width * per_token)


def finetune_runs(
    model: tl_backend.Model,
    runs: Sequence[Sequence[Sequence[int]]],
    lrs: float | Sequence[float],
    *,
    record_queries: bool = True,
    firsts: Sequence[FirstStep | None] | None = None,
    budget: int | None = None,
) -> list[FinetuneResult]:
    """`icl_kernels.finetuning.finetune.finetune` of every run (its training sequences, BOS first)
    at its learning rate (one for all, or one per run), in batches of runs that fit ``budget`` bytes
    (default `icl_kernels.engine.batching.memory_budget`); see the module docstring.

    ``firsts``: `first_steps` of the runs (or None for a run without), as ``finetune(..., first=)``.

    Raises:
        ValueError: as `finetune`, a run count that does not match ``lrs`` / ``firsts``, runs of different
            numbers of sequences, or a model `batch_reason` rejects.
    """
    rates = [float(lrs)] * len(runs) if isinstance(lrs, (int, float)) else [float(x) for x in lrs]
    firsts = list(firsts) if firsts is not None else [None] * len(runs)
    if not len(rates) == len(runs) == len(firsts):
        raise ValueError(f"{len(runs)} runs, {len(rates)} learning rates and {len(firsts)} first steps: give one each.")
    if len({first is None for first in firsts}) > 1:
        raise ValueError("Give a first step for every run or for none.")
    if len({len(seqs) for seqs in runs}) > 1:
        raise ValueError("finetune_runs batches runs step by step: give runs with the same number of sequences.")
    for run, first in zip(runs, firsts):
        _check_run(run, first)
    width = max(len(seq) for run in runs for seq in run)
    size = max(1, (memory_budget(model) if budget is None else int(budget)) // training_row_bytes(model, width))
    out: list[FinetuneResult] = []
    w_u_t = model.unembed.W_U.detach().T.contiguous()  # once for every batch (a copy of the whole unembedding)
    for begin in range(0, len(runs), size):
        chunk = slice(begin, begin + size)
        out += _train(model, runs[chunk], rates[chunk], record_queries=record_queries, firsts=firsts[chunk],
                      w_u_t=w_u_t)
    return out


def first_steps(model: tl_backend.Model, runs: Sequence[Sequence[Sequence[int]]],
                budget: int | None = None) -> list[FirstStep]:
    """`icl_kernels.finetuning.finetune.first_step` of every run, batched."""
    for run in runs:
        _check_run(run, None)
    width = max(len(run[0]) for run in runs)
    size = max(1, (memory_budget(model) if budget is None else int(budget)) // training_row_bytes(model, width))
    out: list[FirstStep] = []
    w_u_t = model.unembed.W_U.detach().T.contiguous()
    for begin in range(0, len(runs), size):
        chunk = runs[begin:begin + size]
        captured: list[dict] = [{} for _ in chunk]
        _train(model, [run[:1] for run in chunk], [0.0] * len(chunk), record_queries=True,
               firsts=[None] * len(chunk), capture=captured, w_u_t=w_u_t)
        out += [FirstStep(tuple(tuple(int(t) for t in seq) for seq in run), c["grads"], c["loss"], c["queries"])
                for run, c in zip(chunk, captured)]
    return out


def _check_run(run: Sequence[Sequence[int]], first: FirstStep | None) -> None:
    if not run:
        raise ValueError("finetune needs at least one training sequence (a demonstration).")
    short = [i for i, s in enumerate(run) if len(s) < 2]
    if short:
        raise ValueError(f"Training sequences {short} have fewer than 2 tokens: nothing to predict.")
    if first is not None and tuple(tuple(int(t) for t in seq) for seq in run) != first.sequences:
        raise ValueError("A first step of other training sequences was given; make it with first_steps on the same runs.")


def _train(
    model: tl_backend.Model,
    runs: Sequence[Sequence[Sequence[int]]],
    rates: Sequence[float],
    *,
    record_queries: bool,
    firsts: Sequence[FirstStep | None],
    w_u_t: Tensor,
    capture: list[dict] | None = None,
) -> list[FinetuneResult]:
    """One batch of runs trained together (``w_u_t``: ``W_U`` transposed and contiguous); with ``capture``
    each run's gradients, loss and queries of its first pass are stored there (at rate 0 the backward
    pass runs for them only)."""
    reason = batch_reason(model)
    if reason is not None:
        raise ValueError(f"These finetuning runs cannot be batched: {reason}; use finetune on each.")
    if any(not (x == x and x >= 0 and x != float("inf")) for x in rates):
        raise ValueError(f"Every learning rate must be a finite number >= 0, not {list(rates)}.")
    n_runs = len(runs)
    device = tl_backend.model_device(model)
    was_training = model.training
    model.eval()
    flags = {id(p): p.requires_grad for p in model.parameters()}
    q_kind, _ = rotary_hook_kinds(model)
    seen: dict[int, Tensor] = {}
    weights = RunWeights.stacked(model, [None] * n_runs)
    for tensor in weights.tensors.values():
        tensor.requires_grad_(True)
    rate = torch.tensor(rates, dtype=next(iter(weights.tensors.values())).dtype, device=device)
    losses: list[list[float]] = [[] for _ in runs]
    queries: list[list[Tensor]] = [[] for _ in runs]

    def keep_q(layer: int):
        def hook(q: Tensor, hook) -> None:
            seen[layer] = q.detach()

        return hook

    def step(grads: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in weights.tensors.items():
                shape = (n_runs,) + (1,) * (tensor.ndim - 1)
                tensor.sub_(rate.view(shape) * grads[name])

    q_hooks = [(act_name(q_kind, layer), keep_q(layer)) for layer in range(model.cfg.n_layers)] if record_queries else []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with kv_per_row(model, weights) as state, hooks_on(model, q_hooks):
            for index in range(len(runs[0])):
                if index == 0 and firsts[0] is not None:  # the shared first pass of every run
                    step({name: torch.stack([f.grads[name] for f in firsts]).to(t) for name, t in weights.tensors.items()})
                    for r, first in enumerate(firsts):
                        losses[r].append(first.loss)
                        if record_queries:
                            queries[r].append(first.queries)
                    continue
                seqs = [list(run[index]) for run in runs]
                backward = any(x > 0 for x in rates) or (capture is not None and index == 0)
                grads = {name: torch.zeros_like(t) for name, t in weights.tensors.items()} if backward else {}
                row_loss = torch.zeros(n_runs)
                for bucket in length_buckets([len(seq) for seq in seqs]):
                    rows = torch.tensor(bucket, device=device)
                    tokens = right_pad([seqs[r] for r in bucket], 0).to(device)
                    lengths = torch.tensor([len(seqs[r]) for r in bucket], device=device)
                    with torch.enable_grad():
                        part = RunWeights({name: t[rows] for name, t in weights.tensors.items()})
                        state["weights"] = part
                        loss = _row_losses(model, w_u_t, final_residual(model, tokens), tokens, lengths)
                        if backward:
                            for name, g in zip(part.tensors, torch.autograd.grad(loss.sum(), list(part.tensors.values()))):
                                grads[name][rows] += g
                    row_loss[rows.cpu()] = loss.detach().float().cpu()
                    if record_queries:
                        for j, r in enumerate(bucket):
                            queries[r].append(_training_queries(model, q_kind, seen, j, len(seqs[r])))
                    seen.clear()
                state["weights"] = weights
                if capture is not None and index == 0:
                    for r in range(n_runs):
                        capture[r].update(grads={name: g[r].detach().clone() for name, g in grads.items()},
                                          loss=float(row_loss[r]),
                                          queries=queries[r][-1] if record_queries else None)
                if any(x > 0 for x in rates):
                    step(grads)
                for r in range(n_runs):
                    losses[r].append(float(row_loss[r]))
                seen.clear()
    finally:
        seen.clear()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        model.train(was_training)
    return [FinetuneResult(base=model, state=weights.row(r), lr=float(rates[r]), losses=losses[r], queries=queries[r])
            for r in range(n_runs)]


def row_label_log_probs(
    model: tl_backend.Model,
    results: Sequence[FinetuneResult],
    prompts: Sequence[Sequence[IclPrompt | Sequence[int]]],
    token_ids: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    normalise: bool = True,
) -> list[Float[Tensor, "prompt n_tokens"]]:
    """For each finetuned model ``results[r]``, the log-softmax at the last token of each of its
    ``prompts[r]``, read at ``token_ids``: `icl_kernels.engine.label_scoring.label_log_probs` with
    single-token labels under ``results[r].applied()``, for every model in one pass per batch (each
    model's prompts in the rows of its weights; every model is given the same number of prompts).

    ``normalise=False``: the logits of ``token_ids`` only (in the same dtype, checked finite), without
    the log-softmax over the whole vocabulary. They differ from the log-probabilities by one constant
    per prompt, so whatever compares the labels of a prompt with each other (the answer, the
    log-softmax over the labels) is the same up to rounding, and the vocabulary-wide product and
    normalisation (most of the work for a small model with a large vocabulary) are skipped.

    Raises:
        ValueError: models and prompt lists of different numbers, or prompt lists of different lengths.
    """
    if len(results) != len(prompts):
        raise ValueError(f"{len(results)} models and {len(prompts)} prompt lists: give one list per model.")
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("row_label_log_probs needs the same number of prompts for every model.")
    n_models, n_prompts = len(results), len(prompts[0])
    if n_prompts == 0:
        return [torch.empty((0, len(token_ids)), dtype=torch.float32) for _ in results]
    device = tl_backend.model_device(model)
    lists = [[tuple(int(t) for t in (p.tokens if isinstance(p, IclPrompt) else p)) for p in row] for row in prompts]
    per_model = max(1, batch_size // n_models)
    weights = RunWeights.stacked(model, [result.state for result in results])
    w_u_t = model.unembed.W_U.detach().T.contiguous() if normalise else None
    ids = None if normalise else torch.as_tensor(list(token_ids), device=device)  # the label columns
    # prompts in order of length (the longest of each index over the models), so a batch pads little
    order = sorted(range(n_prompts), key=lambda i: max(len(row[i]) for row in lists))
    out: list[list[Tensor]] = [[] for _ in results]
    for begin in range(0, n_prompts, per_model):
        end = min(begin + per_model, n_prompts)
        take = [lists[m][i] for m in range(n_models) for i in order[begin:end]]
        tokens = right_pad(take, 0).to(device)
        positions = torch.tensor([len(t) - 1 for t in take], device=device)
        with torch.no_grad(), kv_per_row(model, weights, torch.arange(n_models).repeat_interleave(end - begin)):
            resid = final_residual(model, tokens, positions)
            if normalise:
                scores = label_scores(model, resid, token_ids, dtype=dtype, first_index=begin, w_u_t=w_u_t)
            else:
                scores = unembed(model, resid, ids).to(score_dtype(model, dtype))
                check_finite(scores, first_index=begin, model=model)
                scores = scores.cpu()
        for m in range(n_models):
            out[m].append(scores[m * (end - begin):(m + 1) * (end - begin)])
    back = torch.argsort(torch.tensor(order))
    return [torch.cat(parts)[back] for parts in out]
