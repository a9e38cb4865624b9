"""The cache of converted offline models: atomic conversion, checksums, and cleaning up after killed runs.

Offline models that ship as GGUF files (``gemma-3-270m``, ``smollm2-135m-instruct``) are dequantised
once into a folder ``cache_root() / name`` of safetensors, config and tokenizer files with a
``COMPLETE`` marker: JSON with the size and sha256 of every file, written at conversion.

* The conversion runs in a staging folder ``cache_root() / ".staging-<name>-<pid>-<random>"`` (the
  GGUF is assembled there too) that is renamed into place only when complete, so an interrupted
  conversion (Ctrl-C, a kill) leaves no folder that looks complete and no partial GGUF in the way.
* Staging folders whose process is gone (killed runs) are removed, with a message, on the next
  conversion; so are the staging folders and assembled GGUFs older versions left behind.
* Every load compares sizes and sha256 checksums with the marker (hashing once per process and file
  state); a truncated or corrupted folder is reported (a ``RuntimeWarning`` naming the file) and
  rebuilt from the GGUF.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__all__ = [
    "MARKER",
    "STAGING_PREFIX",
    "cache_root",
    "converted_model_folder",
    "converted_model_problem",
    "dequantise_gguf",
    "file_sha256",
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
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


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
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")
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
    """None when ``folder`` holds a complete, intact converted model; else what is wrong with it.

    Sizes and sha256 checksums are compared with those recorded at conversion. A marker written by
    an older version (plain text, no checksums) is accepted when every safetensors file is
    consistent with its header, and upgraded with checksums.
    """
    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (an interrupted conversion)" if folder.exists() else "absent"
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


def remove_stale_staging(root: Path | None = None, names: Sequence[str] = ()) -> list[Path]:
    """Remove what killed conversions left in the cache; returns the removed paths (each reported).

    That is: staging folders whose process is gone (same host) or older than a day, staging folders
    of older versions (``.<name>-xxxx`` for ``names``, an hour old), and assembled GGUFs of older versions
    (``gguf/*.gguf``, which were only kept while a conversion ran).
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
        elif path.is_dir() and path.name == "gguf":
            for gguf in sorted(path.glob("*.gguf")):
                if now - gguf.stat().st_mtime > 3600:
                    warnings.warn(f"Removing {gguf} ({_size_mb(gguf):.0f} MB), a GGUF left by an interrupted conversion.",
                                  RuntimeWarning, stacklevel=2)
                    gguf.unlink(missing_ok=True)
                    removed.append(gguf)
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


def converted_model_folder(name: str, gguf_source: Callable[[Path], Path]) -> Path:
    """``cache_root() / name``, converted from a GGUF first when absent or damaged.

    ``gguf_source(staging)`` returns the GGUF's path (it may assemble it inside ``staging``, which
    is deleted afterwards). The conversion is written to a staging folder and renamed into place.
    """
    root = cache_root()
    folder = root / name
    remove_stale_staging(root, [name])
    problem = converted_model_problem(folder)
    if problem is None:
        return folder
    if problem != "absent":
        warnings.warn(f"The converted model {name!r} in {folder} is damaged: {problem}. Rebuilding it from the GGUF.",
                      RuntimeWarning, stacklevel=2)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-{os.getpid()}-", dir=root))
    try:
        (staging / "OWNER").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
        gguf_path = Path(gguf_source(staging))
        hf, tokenizer = dequantise_gguf(gguf_path)
        out = staging / "model"
        hf.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        write_conversion_marker(out, f"dequantised from {gguf_path.name}")
        if folder.exists():
            folder.rename(staging / "replaced")  # out of the way in one step; deleted with the staging folder
        try:
            out.rename(folder)
        except OSError:
            if converted_model_problem(folder) is not None:  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _VERIFIED[str(folder)] = _signature(folder)
    return folder
