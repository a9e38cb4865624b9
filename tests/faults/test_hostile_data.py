"""Hostile local data files, through the user-task route (``ICL_KERNELS_DATA_DIR=<dir>`` holding
``subj/train.csv`` and ``subj/test.csv``) and the ``eval`` command.

Each file either gives the predictions of the clean file (a byte-order mark, CRLF line ends, texts
with embedded newlines compared with the same texts as JSON lines) or ends the run with one
``error:`` line, exit code 2 and no traceback (a 1 MB text that no prompt can hold, ``/dev/zero``
linked as the CSV, a folder named ``train.csv``, a FIFO).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from faultkit import assert_one_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["a calm account of the events", "I adored every minute", "the report lists the dates",
         "what a dreadful bore", "the film follows two brothers", "so moving, so funny",
         "it was shot in Lisbon", "I will never watch it again", "the sequel opens in May",
         "an absolute delight"]
TRAIN = [(t, i % 2) for i, t in enumerate(TEXTS)]
TEST = [("a plain list of facts", 0), ("my favourite film this year", 1), ("the cast includes six actors", 0),
        ("dull and far too long", 1)]
EVAL = ["eval", "--model", "tiny-gpt-neo", "--task", "subj", "--shots", "2", "--n-test", "4", "--device", "cpu"]


def _csv(rows) -> str:
    quoted = ['"' + text.replace('"', '""') + '"' for text, _ in rows]
    return "text,label\n" + "".join(f"{q},{label}\n" for q, (_, label) in zip(quoted, rows))


def _jsonl(rows) -> str:
    return "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows)


def _data_dir(root: Path, train: bytes | None, test: bytes, ext: str = "csv") -> Path:
    folder = root / "subj"
    folder.mkdir(parents=True)
    if train is not None:
        (folder / f"train.{ext}").write_bytes(train)
    (folder / f"test.{ext}").write_bytes(test)
    return root


def _eval(data: Path, out: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setenv("ICL_KERNELS_DATA_DIR", str(data))
    return run_cli([*EVAL, "--out", str(out)], capsys)


def _predictions(out: Path) -> bytes:
    return (out / "predictions.csv").read_bytes()


@pytest.fixture
def clean(tmp_path, capsys, monkeypatch) -> bytes:
    """The predictions of the clean files."""
    data = _data_dir(tmp_path / "clean", _csv(TRAIN).encode(), _csv(TEST).encode())
    code, _, err = _eval(data, tmp_path / "clean-out", capsys, monkeypatch)
    assert code == 0, err
    return _predictions(tmp_path / "clean-out")


@pytest.mark.parametrize("variant", ["bom", "crlf", "bom-and-crlf"])
def test_bom_and_crlf_files_give_the_clean_files_predictions(variant, clean, tmp_path, capsys, monkeypatch):
    def hostile(rows) -> bytes:
        text = _csv(rows)
        if "crlf" in variant:
            text = text.replace("\n", "\r\n")
        return (b"\xef\xbb\xbf" if "bom" in variant else b"") + text.encode()

    data = _data_dir(tmp_path / "data", hostile(TRAIN), hostile(TEST))
    code, _, err = _eval(data, tmp_path / "out", capsys, monkeypatch)
    assert code == 0, err
    assert _predictions(tmp_path / "out") == clean


def test_embedded_newlines_in_quoted_fields_read_like_the_same_texts_as_json_lines(tmp_path, capsys, monkeypatch):
    train = [(text.replace(" ", "\n", 1) if i % 3 == 0 else text, label) for i, (text, label) in enumerate(TRAIN)]
    test = [(text.replace(" ", "\r\n", 1), label) for text, label in TEST]
    as_csv = _data_dir(tmp_path / "csv", _csv(train).encode(), _csv(test).encode())
    as_jsonl = _data_dir(tmp_path / "jsonl", _jsonl(train).encode(), _jsonl(test).encode(), ext="jsonl")
    assert _eval(as_csv, tmp_path / "out-csv", capsys, monkeypatch)[0] == 0
    assert _eval(as_jsonl, tmp_path / "out-jsonl", capsys, monkeypatch)[0] == 0
    assert _predictions(tmp_path / "out-csv") == _predictions(tmp_path / "out-jsonl")


@pytest.mark.parametrize("where", ["train", "test"])
def test_a_one_megabyte_text_is_one_error_line(where, tmp_path, capsys, monkeypatch):
    huge = ("word " * 200_000).strip()  # 1 MB, ~200k tokens
    train = [(huge, 0) if i == 0 else row for i, row in enumerate(TRAIN)] if where == "train" else TRAIN
    test = [(huge, 0), *TEST[1:]] if where == "test" else TEST
    if where == "train":
        train = [(huge, label) for _, label in TRAIN]  # every demonstration is huge
    data = _data_dir(tmp_path / "data", _csv(train).encode(), _csv(test).encode())
    code, _, err = _eval(data, tmp_path / "out", capsys, monkeypatch)
    assert_one_error(code, err, "context")
    assert not (tmp_path / "out" / "summary.json").exists()


def _special_train(kind: str, folder: Path) -> None:
    path = folder / "subj" / "train.csv"
    if kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "folder":
        path.mkdir()
        (path / "part.csv").write_text(_csv(TRAIN))
    else:
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["dev-zero", "folder", "fifo"])
def test_a_train_csv_that_is_no_regular_file_is_one_error_line(kind, tmp_path, capsys, monkeypatch):
    data = _data_dir(tmp_path / "data", None, _csv(TEST).encode())
    _special_train(kind, data)
    code, _, err = _eval(data, tmp_path / "out", capsys, monkeypatch)  # before: a hang on /dev/zero or a FIFO
    assert_one_error(code, err, "train.csv", "not a regular file")
