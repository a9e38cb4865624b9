"""Truncated and corrupted state files: a resumable run's row files and record, a sweep's record and
state files, lock files, and planted symbolic links. Each either ends the run with one ``error:``
line or gives the tables of a clean run; none is used silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from faultkit import MOMENTUM, MOMENTUM_TABLES, assert_one_error, run_cli, same_files

from icl_kernels.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "momentum"
    assert main([*MOMENTUM, "--out", str(out)]) == 0
    return out


def _copy(clean: Path, tmp_path: Path) -> Path:
    out = tmp_path / "momentum"
    shutil.copytree(clean, out)
    for name in ("metrics.json", "summary.json", "grid.csv"):  # as if killed before the report was written
        (out / name).unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("name", ["prompts.csv", "perplexity.csv"])
@pytest.mark.parametrize("cut", [0.5, 0.97], ids=["half", "last-row-torn"])
def test_a_truncated_row_file_is_repaired_and_the_rerun_equals_a_clean_run(name, cut, clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    data = (out / name).read_bytes()
    (out / name).write_bytes(data[: int(len(data) * cut)])
    with pytest.warns(UserWarning, match=f"{name} is damaged"):  # said, not used silently
        code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    same_files(clean, out, MOMENTUM_TABLES)


@pytest.mark.parametrize("damage", ["garbage", "header-only", "edited-value"])
def test_a_corrupted_row_file_is_repaired_or_refused(damage, clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    path = out / "prompts.csv"
    if damage == "garbage":
        path.write_bytes(os.urandom(3000))
    elif damage == "header-only":
        path.write_text(path.read_text().splitlines()[0] + "\n")
    else:  # a number changed by hand: not detectable from the file itself, so the rerun keeps it
        lines = path.read_text().splitlines(True)
        lines[1] = lines[1].replace(",1,", ",0,", 1) if ",1," in lines[1] else lines[1].replace(",0,", ",1,", 1)
        path.write_text("".join(lines))
    with pytest.warns(UserWarning, match="prompts.csv is damaged") if damage == "garbage" else contextlib.nullcontext():
        code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    if damage == "edited-value":
        return  # documented limit: row files carry no checksum (the run record does not hash them)
    same_files(clean, out, MOMENTUM_TABLES)


@pytest.mark.parametrize("damage", ["truncated", "not-json", "empty"])
def test_a_damaged_run_record_is_one_error_line(damage, clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    path = out / "fingerprint.json"
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "not-json": "<html>", "empty": ""}[damage])
    code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert_one_error(code, err, "fingerprint.json")
    code, _, err = run_cli([*MOMENTUM, "--out", str(out), "--force"], capsys)
    assert code == 0, err
    same_files(clean, out, MOMENTUM_TABLES)


def test_a_garbage_lock_file_is_taken_over_with_a_warning(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    (out / ".icl-kernels.lock").write_bytes(b"\x00\xff garbage")
    with pytest.warns(UserWarning, match="Taking over the lock"):
        code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0, err
    same_files(clean, out, MOMENTUM_TABLES)


def test_a_symlink_planted_at_the_lock_is_refused_and_its_target_kept(tmp_path, capsys):
    out = tmp_path / "momentum"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".icl-kernels.lock").symlink_to(victim)
    code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert_one_error(code, err, "is a symbolic link")
    assert victim.read_text() == "precious\n"


def test_a_symlink_planted_at_a_row_file_is_replaced_not_written_through(clean, tmp_path, capsys):
    out = _copy(clean, tmp_path)
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    (out / "perplexity.csv").unlink()
    (out / "perplexity.csv").symlink_to(victim)
    code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
    assert code == 0 or "symbolic link" in err, err
    assert victim.read_text() == "precious\n"
    if code == 0:
        assert not (out / "perplexity.csv").is_symlink()
        same_files(clean, out, MOMENTUM_TABLES)


def test_a_sweep_with_torn_records_and_state_files_reruns_only_what_is_lost(tmp_path, capsys):
    from test_sweep_workers import _config, _table  # noqa: PLC0415 - the same tiny sweep

    from icl_kernels.sweeps import command as sweep  # noqa: PLC0415

    path = _config(tmp_path)
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert sweep.main([str(path), "--out", str(whole), "--executor", "inline", "--no-progress"]) == 0
    shutil.copytree(whole, out)
    records = sorted((out / "shards").glob("*.jsonl"))
    lines = records[0].read_text().splitlines(True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"  # a torn line in the middle
    lines[-1] = lines[-1][:10]  # and at the end
    records[0].write_text("".join(lines))
    for state in (out / "shards").glob("*.state.json"):
        state.write_text("{not json")
    (out / "shards" / "plan.json").write_text('{"run": "cut sh')
    (out / "results.csv").write_text("cell_id\n")
    assert sweep.main([str(path), "--out", str(out), "--status"]) == 0
    assert sweep.main([str(path), "--out", str(out), "--executor", "inline", "--no-progress"]) == 0
    assert "2 of 6 cells to run" in capsys.readouterr().err
    assert json.loads(json.dumps(_table(out).to_dict())) == json.loads(json.dumps(_table(whole).to_dict()))
