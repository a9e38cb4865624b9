"""Recording after a shared demonstration prefix equals the full-prompt recording (float64, every tiny
architecture, both backends), and the compare study gives the same metrics with and without reuse."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_tiny

from icl_kernels.data.prompts import IclPrompt
from icl_kernels.finetuning import dai_metrics
from icl_kernels.finetuning.dai_metrics import ComparisonSettings, Episode, compare_icl_with_finetuning
from icl_kernels.finetuning.recording import encode_recording_prefix, record
from icl_kernels.models import backend as tl_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: float64: reuse changes only the shapes of the matrix products (summation order); measured <= 6e-15
#: on GPT-J (HookedTransformer), Gemma-3 and Llama (both backends)
TOL = 1e-10
#: float64 on the bridge's GPT-Neo and GPT-J: Hugging Face computes their attention scores in float32
#: (``query.to(torch.float32)`` in both models), so shapes show at float32 rounding; measured <= 5e-7
TOL_FLOAT32_SCORES = 1e-5
#: float32: the same shapes at float32 rounding (the bound of tests/unit/test_prefix_cache.py)
TOL_FLOAT32 = 1e-4


def _prompts(n: int = 3, demo_len: int = 30, seed: int = 0) -> list[list[int]]:
    """One demonstration block (longer than the tiny models' local window of 8), queries of 2, 5, 8 ... tokens."""
    g = torch.Generator().manual_seed(seed)
    demos = [50256, *torch.randint(10, 5000, (demo_len,), generator=g).tolist()]
    return [demos + torch.randint(10, 5000, (2 + 3 * i,), generator=g).tolist() for i in range(n)]


def _assert_same(full, reused, tol: float) -> None:
    assert (reused.label_log_probs - full.label_log_probs).abs().max() < tol
    assert (reused.attn_out - full.attn_out).abs().max() < tol
    finite = full.scores.isfinite()
    assert torch.equal(finite, reused.scores.isfinite())  # the same keys are masked
    assert (reused.scores[finite] - full.scores[finite]).abs().max() < tol
    assert (reused.q - full.q).abs().max() < tol
    for name in ("q_full", "k", "v"):
        for a, b in zip(getattr(full, name), getattr(reused, name)):
            assert a.shape == b.shape, name
            assert (a - b).abs().max() < tol, name


@pytest.mark.parametrize("position", ["prediction", "first-label"])
def test_record_after_prefix_equals_full_record(arch, backend, position):
    model = load_tiny(arch, backend, torch.float64)
    tol = TOL_FLOAT32_SCORES if backend == "bridge" and arch in ("gpt-neo", "gpt-j") else TOL
    prompts = _prompts()
    prefix = encode_recording_prefix(model, prompts[0][:31])
    labels = [311, 4000]
    for tokens in prompts:
        pred = len(tokens) - 1
        if position == "first-label":
            tokens = tokens + [labels[0]]
        rec_pos = len(tokens) - 1
        full = record(model, tokens, pred, rec_pos, labels, with_kv=True)
        reused = record(model, tokens, pred, rec_pos, labels, with_kv=True, prefix=prefix)
        _assert_same(full, reused, tol)


def test_record_after_prefix_float32(arch):
    model = load_tiny(arch, None, torch.float32)
    prompts = _prompts(2)
    prefix = encode_recording_prefix(model, prompts[0][:31])
    for tokens in prompts:
        p = len(tokens) - 1
        full = record(model, tokens, p, p, [311, 4000], with_kv=True)
        reused = record(model, tokens, p, p, [311, 4000], with_kv=True, prefix=prefix)
        _assert_same(full, reused, TOL_FLOAT32)


def test_prefix_that_does_not_start_the_prompt_is_refused():
    model = load_tiny("gpt-neo", None, torch.float64)
    prompts = _prompts(2)
    prefix = encode_recording_prefix(model, prompts[0][:31])
    other = [50256, 7, *prompts[1][2:]]
    with pytest.raises(ValueError, match="not the start"):
        record(model, other, len(other) - 1, len(other) - 1, [311], prefix=prefix)
    with pytest.raises(ValueError, match="lies inside"):
        record(model, prompts[0], 20, 20, [311], prefix=prefix)


def _leaves(tree, path=""):
    """(path, number) for every number in a nested dict/list (strings and None skipped)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)


def _assert_trees_close(a, b, tol: float) -> int:
    left, right = dict(_leaves(a)), dict(_leaves(b))
    assert left.keys() == right.keys()
    for key, x in left.items():
        y = right[key]
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * max(1.0, abs(x)), (key, x, y)
    return len(left)


@pytest.mark.parametrize("arch", ["llama", "gpt-neo"])
def test_compare_metrics_equal_with_and_without_prefix_reuse(arch, monkeypatch):
    """The whole comparison (trained side, controls, dW split) is the same with the shared prefix.

    On TransformerLens 4's bridge Hugging Face's attention rounds to float32 inside a float64 model
    (GPT-Neo and GPT-J compute their scores in float32; Llama's and Gemma's eager attention takes the
    softmax in float32, ``softmax(..., dtype=torch.float32)`` in ``eager_attention_forward``), and the
    prefix pass's own positions have softmax rows as long as the prefix where a full pass has rows as
    long as the prompt, which float32 sums in another order: the llama comparison differed by 8.6e-9
    (6e-7 on a dW norm of 57), and by exactly 0 with that softmax taken in float64. There the bound is
    float32's (``TOL_FLOAT32_SCORES``)."""
    monkeypatch.setattr(dai_metrics, "_RESAMPLES", 50)  # the intervals' inputs are what is compared

    backend = "hooked" if "hooked" in tl_backend.AVAILABLE_BACKENDS else None
    model = load_tiny(arch, backend, torch.float64)
    tol = TOL if tl_backend.backend_of(model) == "hooked" else TOL_FLOAT32_SCORES
    g = torch.Generator().manual_seed(1)

    def words(n: int) -> list[int]:
        return torch.randint(10, 5000, (n,), generator=g).tolist()

    episodes = []
    for e in range(2):
        demos = [words(5) + [311], words(4) + [4000]]
        tokens, spans = [50256], []
        for demo in demos:
            spans.append((len(tokens), len(tokens) + len(demo)))
            tokens += demo
        icl, zsl = [], []
        for _ in range(2):
            query = words(4)
            full = tokens + query
            icl.append(IclPrompt(tokens=tuple(full), demo_input_spans=tuple((a, b - 1) for a, b in spans),
                                 demo_label_spans=tuple((b - 1, b) for a, b in spans), separator_spans=(),
                                 demo_labels=(0, 1), query_span=(len(tokens), len(full)), bos_position=0))
            zsl.append(IclPrompt(tokens=(50256, *query), demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                                 demo_labels=(), query_span=(1, 1 + len(query)), bos_position=0))
        train = [[50256, *demo] for demo in demos]
        episodes.append(Episode(icl, zsl, [0, 1], train, name=f"set {e}"))
    runs = {}
    for reuse in (False, True):
        cfg = ComparisonSettings(lr=0.05, prefix_reuse=reuse)
        runs[reuse] = compare_icl_with_finetuning(model, episodes, [[311], [4000]], cfg, progress=False)
    slow, fast = runs[False], runs[True]
    assert [r["icl_pred"] for r in slow.examples] == [r["icl_pred"] for r in fast.examples]
    n = _assert_trees_close(slow.metrics, fast.metrics, tol)
    n += _assert_trees_close(slow.layers, fast.layers, tol) + _assert_trees_close(slow.heads, fast.heads, tol)
    assert n > 100
