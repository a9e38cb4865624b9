"""The finetuning baseline: only key/value projections move, by plain SGD, the same on both backends."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import load_tiny
from test_relaxation import assert_tiny

from icl_kernels.engine import hooks as H
from icl_kernels.engine.capture import capture
from icl_kernels.finetuning import finetune as finetune_module
from icl_kernels.finetuning.finetune import (
    finetune,
    first_step,
    has_kv_bias,
    kv_parameters,
    kv_weights,
    select_lr,
)
from icl_kernels.models import backend as tl_backend
from icl_kernels.models.loading import load_model

SEQUENCES = [[50256, 464, 3290, 318, 922, 13], [50256, 40, 588, 340, 2089], [50256, 1212, 318, 257, 1332, 11, 0]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fresh(arch: str, backend: str):
    return load_model(f"tiny-{arch}", device="cpu", backend=backend)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_only_key_value_projections_change(arch, backend):
    model = load_tiny(arch, backend)
    assert_tiny(arch, model)
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    result = finetune(model, SEQUENCES, lr=0.05)
    # the original is untouched (weights, flags, gradients)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], atol=0, rtol=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    trained = set(kv_parameters(model))
    assert len(trained) == 2 * model.cfg.n_layers  # weights only: no architecture here has k/v biases
    assert not has_kv_bias(model)
    assert set(result.state) == trained
    with result.applied() as tuned:
        changed = {name for name, p in tuned.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed == trained
    for name, p in model.named_parameters():  # restored after applied()
        torch.testing.assert_close(p.detach(), before[name], atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="inside"):
        with result.applied():
            raise RuntimeError("raised inside applied()")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], atol=0, rtol=0)
    assert len(result.losses) == len(SEQUENCES) and all(loss > 0 for loss in result.losses)


def test_one_step_is_plain_sgd(backend):
    """After one sequence, each trained weight moved by exactly -lr * (its LM-loss gradient)."""
    model = load_tiny("gpt-j", backend)
    lr = 0.3
    result = finetune(model, SEQUENCES[:1], lr=lr, record_queries=False)
    reference = copy.deepcopy(load_tiny("gpt-j", backend)) if backend == "hooked" else _fresh("gpt-j", backend)
    params = kv_parameters(reference)
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    tokens = torch.tensor([SEQUENCES[0]])
    logits = reference(tokens)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
    loss.backward()
    for name, p in params.items():
        torch.testing.assert_close(result.state[name], p.detach() - lr * p.grad, atol=1e-6, rtol=1e-5)
    assert abs(result.losses[0] - float(loss.detach())) < 1e-5


def test_both_backends_train_the_same_model():
    if "hooked" not in tl_backend.AVAILABLE_BACKENDS:
        pytest.skip("needs TransformerLens 3.x (both backends)")
    tokens = torch.tensor([[50256, 464, 3290, 318, 922, 13, 40, 588]])
    outs, deltas = [], []
    for backend in ("hooked", "bridge"):
        model = load_tiny("gemma-3", backend)
        result = finetune(model, SEQUENCES, lr=0.5, record_queries=False)
        k0, v0 = kv_weights(model, 1)
        with torch.no_grad(), result.applied() as tuned:
            outs.append(tuned(tokens))
            k1, v1 = kv_weights(tuned, 1)
        deltas.append((k1 - k0, v1 - v0))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(deltas[0][0], deltas[1][0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(deltas[0][1], deltas[1][1], atol=1e-6, rtol=1e-4)
    assert deltas[0][0].abs().max() > 1e-4


def test_recorded_queries_are_the_first_steps_queries(backend):
    """The first sequence's queries come from the untouched model; rotary is removed (frame R(-t))."""
    model = load_tiny("llama", backend)
    result = finetune(model, SEQUENCES, lr=0.1)
    assert [q.shape for q in result.queries] == [
        (model.cfg.n_layers, len(s) - 1, model.cfg.n_heads, model.cfg.d_head) for s in SEQUENCES
    ]
    tokens = torch.tensor([SEQUENCES[0]])
    n = tokens.shape[1]
    got = capture(model, tokens, torch.tensor([n - 1]), attention=False, features=("q",),
                  feature_positions=torch.arange(n)[None], rotate=False, final_residual=False)
    pre_rotary = got.features["q"][0, 1:]  # [n_tok layer head d]: Llama's hook_q is pre-rotary
    torch.testing.assert_close(result.queries[0].transpose(0, 1), pre_rotary, atol=1e-5, rtol=1e-5)
    assert result.all_queries().shape[1] == sum(len(s) - 1 for s in SEQUENCES)


def test_no_hook_remains_after_errors(backend):
    model = load_tiny("gpt-neo", backend)
    finetune(model, SEQUENCES[:1], lr=0.1)
    before = H.active_hook_count(model)
    with pytest.raises((IndexError, RuntimeError)):
        finetune(model, [[50256, 10**7, 5]], lr=0.1)
    assert H.active_hook_count(model) == before
    assert all(p.requires_grad is False or p.grad is None for p in model.parameters())


def test_bad_inputs_raise_clear_errors():
    model = load_tiny("gpt-neo")
    with pytest.raises(ValueError, match="lr"):
        finetune(model, SEQUENCES, lr=-0.1)  # lr=0 is allowed: the identity control (test_dai_definitions)
    with pytest.raises(ValueError, match="lr"):
        finetune(model, SEQUENCES, lr=float("nan"))
    with pytest.raises(ValueError, match="at least one"):
        finetune(model, [], lr=0.1)
    with pytest.raises(ValueError, match="fewer than 2"):
        finetune(model, [[50256]], lr=0.1)
    with pytest.raises(ValueError, match="at least one"):
        select_lr(lambda lr: [], lambda models: (0.0, 0.0), lrs=())


def test_select_lr_takes_the_best_dev_accuracy_then_log_prob():
    scores = {1e-3: (0.5, -1.0), 1e-2: (0.75, -2.0), 1e-1: (0.75, -0.5)}
    picked = select_lr(lambda lr: [lr], lambda models: scores[models[0]], lrs=tuple(scores))
    assert picked.lr == 1e-1
    assert [row["lr"] for row in picked.table] == list(scores)


def _equal_results(a, b) -> None:
    assert a.state.keys() == b.state.keys()
    for name in a.state:
        assert torch.equal(a.state[name], b.state[name]), name
    assert a.losses == b.losses
    assert len(a.queries) == len(b.queries)
    for x, y in zip(a.queries, b.queries):
        assert torch.equal(x, y)


def test_shared_first_step_gives_the_same_run_bit_for_bit(arch, backend):
    """`first_step` computed once stands in for every learning rate's first pass: weights, losses and
    queries equal a run from scratch exactly; with or without recorded queries the weights are the same."""
    model = load_tiny(arch, backend)
    assert_tiny(arch, model)
    first = first_step(model, SEQUENCES)
    for lr in (0.01, 0.3):
        plain = finetune(model, SEQUENCES, lr=lr)
        shared = finetune(model, SEQUENCES, lr=lr, first=first)
        _equal_results(plain, shared)
        silent = finetune(model, SEQUENCES, lr=lr, record_queries=False, first=first)
        assert not silent.queries and all(torch.equal(silent.state[n], plain.state[n]) for n in plain.state)
        assert any(not torch.equal(plain.state[n], p.detach()) for n, p in kv_parameters(model).items())
    # lr 0 (no step, so no backward pass): the original weights, the same losses and queries
    zero = finetune(model, SEQUENCES, lr=0.0)
    for name, p in kv_parameters(model).items():
        assert torch.equal(zero.state[name], p.detach())
    assert zero.losses[0] == first.loss and torch.equal(zero.queries[0], first.queries)
    _equal_results(zero, finetune(model, SEQUENCES, lr=0.0, first=first))
    with pytest.raises(ValueError, match="other training sequences"):
        finetune(model, SEQUENCES[1:], lr=0.1, first=first)


def test_select_lr_keeps_the_chosen_rates_models():
    """``keep_best``: the models of the chosen rate (ties: the first, as the choice), not of another."""
    scores = {1e-3: (0.5, -1.0), 1e-2: (0.75, -0.5), 3e-2: (0.75, -0.5), 1e-1: (0.25, -0.1)}
    picked = select_lr(lambda lr: [f"model at {lr}"], lambda models: scores[float(models[0].split()[-1])],
                       lrs=tuple(scores), keep_best=True)
    assert picked.lr == 1e-2 and picked.models == ["model at 0.01"]
    assert select_lr(lambda lr: [lr], lambda models: scores[models[0]], lrs=tuple(scores)).models is None


def test_unembedding_copied_once_gives_the_same_run(arch, backend, monkeypatch):
    """A run that copies the frozen ``W_U.T`` once (HookedTransformer) trains the same weights and
    losses bit for bit as TransformerLens' own forward, which copies it on every pass."""
    model = load_tiny(arch, backend)
    fast = finetune(model, SEQUENCES, lr=0.2)
    monkeypatch.setattr(finetune_module, "_COPY_UNEMBED_ONCE", False)
    _equal_results(finetune(model, SEQUENCES, lr=0.2), fast)
    if backend == "hooked":  # the copy is made once only where TransformerLens 3's forward is the known line
        assert finetune_module._known_unembed(type(model.unembed))
