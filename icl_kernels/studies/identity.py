"""What identifies a run, and the guard that keeps two different runs out of one output folder.

A run is identified by its study, its full configuration (``config.to_dict()``), the identity of
its model and the source of its data:

* model identity (`model_identity`): the name as given, and ``source``, which says what loading reads
  (``folder`` for a local folder, as `icl_kernels.models.loading.model_folder` decides; else the
  registered model's source or ``hub``); for a local Hugging Face folder a SHA-256
  over its ``config.json`` and weight files (contents when they are small, name/size/mtime
  otherwise); for a converted offline model the marker file its cache records at conversion; for a
  hub id the cached revision when the Hugging Face cache has one;
* data source (`data_source`): `icl_kernels.data.tasks.sources.loaded_task_data_source` of the task
  (package file with its rows read and dropped, local path with content hash, or hub revision), the
  task loaded first unless its data is on the hub, so that the record before a run equals the one
  after it; the task name alone when the task cannot be loaded (the study then says why).

`run_record` hashes these into ``fingerprint`` (everything) and ``resume_key`` (everything except
the study's *grid keys*: options such as the momentum grid's etas that add rows rather than change
them, so a grid can be extended in place). The study call (`icl_kernels.studies.registry.Study`)
gathers a `RunIdentity` once per run (the model identity, hashed once) and takes two records from
it: one before the run for `check_output` (and a resumable run's first ``fingerprint.json``), one
after it for the `Report` it returns, whose data source includes what loading the task saw;
`Report.write` writes that one into ``fingerprint.json``, ``config.json`` and the summary.

`check_output` runs before any work: ``out`` must be a folder that can be written (or created),
and when it already holds a report or resumable rows of another configuration the run is refused
with an `OutputConflictError` naming the options that differ, unless ``force`` clears those files.

This module knows nothing of the registry: what it needs of a study (its name, grid keys and state
files) comes in as arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icl_kernels.data.tasks import sources as task_data
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.models.loading import cache_root, get_model_spec, model_folder
from icl_kernels.utils.errors import IclKernelsError
from icl_kernels.utils.io import write_json

__all__ = [
    "OutputConflictError", "OutputNotWritableError", "RECORD_FILE", "model_identity", "data_source",
    "RunIdentity", "run_record", "read_record", "check_output", "write_record", "clear_output", "check_writable",
]

#: The file in an output folder that identifies the run whose files it holds.
RECORD_FILE = "fingerprint.json"
#: Summary file names a report may have (`Report.summary_file`).
SUMMARY_FILES = ("summary.json", "metrics.json")
#: Local weight files are hashed by content below this total size, by name/size/mtime above it.
HASH_CONTENT_BELOW = 256 * 2**20


class OutputConflictError(IclKernelsError, FileExistsError):
    """The output folder holds the report or resumable rows of another configuration."""


class OutputNotWritableError(IclKernelsError, OSError):
    """The output folder cannot be created or written."""


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hash_files(files: list[Path]) -> str:
    sha = hashlib.sha256()
    by_content = sum(f.stat().st_size for f in files) <= HASH_CONTENT_BELOW
    for f in sorted(files):
        sha.update(f.name.encode())
        if by_content:
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(2**20), b""):
                    sha.update(block)
        else:
            stat = f.stat()
            sha.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return ("sha256:" if by_content else "stat:") + sha.hexdigest()[:16]


def model_identity(model: Any) -> dict[str, Any]:
    """Name plus what tells two models of that name apart (see the module docstring).

    ``model`` is a `ModelOptions` or a model name/folder. Cheap: no weights are loaded.
    """
    name = model if isinstance(model, str) else model.model  # backend, device, dtype: in the config
    identity: dict[str, Any] = {"model": name}
    folder = model_folder(name)  # the folder loading reads: registered names win over same-named folders
    if folder is not None and folder.is_dir():
        files = [f for f in folder.iterdir() if f.is_file() and (
            f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".gguf", ".json"))]
        identity.update(source="folder", path=str(folder.resolve()), weights=_hash_files(files) if files else None)
        return identity
    try:
        spec = get_model_spec(name)
    except (IclKernelsError, ImportError, KeyError):
        spec = None
    if spec is not None:
        identity["source"] = spec.source
        if spec.source == "offline":
            for marker in ("COMPLETE", "checksums.json", "CHECKSUM"):
                path = cache_root() / spec.name / marker
                if path.is_file() and path.stat().st_size < 2**20:
                    identity[f"cache_{marker}"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        return identity
    if "/" in name:  # a hub id: the revision the Hugging Face cache resolved, when it has one
        identity["source"] = "hub"
        hub_cache = Path(os.environ.get("HF_HUB_CACHE") or Path(
            os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub")
        ref = hub_cache / ("models--" + name.replace("/", "--")) / "refs" / "main"
        if ref.is_file():
            identity["revision"] = ref.read_text().strip()
    return identity


def data_source(config: Any) -> dict[str, Any] | None:
    """Where the configuration's task data comes from, as its load sees it (the task is loaded here when
    this process has not loaded it yet, so a rerun's check and the first run's record agree); None
    for a study without a task."""
    task_name = config.flat().get("task") if hasattr(config, "flat") else None
    if not task_name:
        return None
    try:
        result = task_data.loaded_task_data_source(get_task(task_name))
        return {"task": task_name, **result} if isinstance(result, Mapping) else {"task": task_name, "source": result}
    except (IclKernelsError, OSError, ValueError):
        return {"task": task_name}  # an unknown task fails in the study, with its own message


def _resume_view(config: Mapping[str, Any], grid_keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in grid_keys}


@dataclass(frozen=True)
class RunIdentity:
    """What identifies one run, gathered once per run by the study call.

    The model identity (`model_identity`: it hashes a local model folder) is computed once, when
    this is made. The data source is read by each `record` call instead: loading a task records
    what the load saw (rows read, rows dropped, the hub revision), so the record taken after the
    run says more than the one taken before it (the check of ``out``, a resumable run's first
    ``fingerprint.json``).

    Attributes:
        study: the study name.
        config: the run's configuration (an `icl_kernels.utils.config.Options`).
        grid_keys: the study's options left out of ``resume_key`` (`Study.grid_keys`).
        model: `model_identity` of ``config.model`` (None for a configuration without a model).
    """

    study: str
    config: Any
    grid_keys: tuple[str, ...] = ()
    model: dict[str, Any] | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_keys", tuple(self.grid_keys))
        given = getattr(self.config, "model", None)  # ModelOptions, or a model name (theorem), or None
        object.__setattr__(self, "model", model_identity(given) if given else None)

    def record(self) -> dict[str, Any]:
        """``{"study", "fingerprint", "resume_key", "config", "model", "data_source"}``, with the
        data source as known now."""
        study, config, model = self.study, self.config, self.model
        values = config.to_dict()
        source = data_source(config)
        display_only = config.display_only_fields()
        return {
            "study": study,
            "fingerprint": _digest([study, config.identity_dict(), model, source]),
            "resume_key": _digest([study, _resume_view(config.flat(), self.grid_keys + tuple(display_only)), model, source]),
            "config": values,
            "model": model,
            "data_source": source,
        }


def run_record(study: str, config: Any, grid_keys: Sequence[str] = ()) -> dict[str, Any]:
    """``{"study", "fingerprint", "resume_key", "config", "model", "data_source"}`` of a run.

    ``grid_keys``: the study's options left out of ``resume_key`` (`Study.grid_keys`). Hashes a local
    model folder each call: within a run, use the study call's one `RunIdentity` instead.
    """
    return RunIdentity(study, config, tuple(grid_keys)).record()


def read_record(out: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the run whose files ``out`` holds: ``fingerprint.json``, else the ``config.json``
    of a report written before fingerprints (``{"study", "config"}``), else None."""
    out = Path(out)
    for name in (RECORD_FILE, "config.json"):
        path = out / name
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {"study": "?", "config": {}, "unreadable": name}
            if name == RECORD_FILE:
                return record
            config = {k: v for k, v in record.items() if k not in ("study", "fingerprint", "resume_key", "data_source")}
            return {"study": record.get("study", "?"), "config": config}
    return None


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value))
        else:
            out[key] = value
    return out


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], grid: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` for every option, model or data-source entry that differs."""
    if old.get("study") != new.get("study"):  # another study's options are all different
        return [f"study: {old.get('study')!r} -> {new.get('study')!r}"]
    a = {**_resume_view(_flat(old.get("config", {})), grid)}
    b = {**_resume_view(_flat(new.get("config", {})), grid)}
    for part in ("model", "data_source"):
        if old.get(part) is not None or "fingerprint" in old:
            for k, v in (old.get(part) or {}).items():
                if k not in a:  # the model name and the task are already among the options
                    a[f"{part}.{k}"] = v
            for k, v in (new.get(part) or {}).items():
                if k not in b:
                    b[f"{part}.{k}"] = v
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_writable(out: str | os.PathLike) -> Path:
    """``out`` is a folder, or can be made one, and a file can be written there (nothing is created).

    Raises:
        OutputNotWritableError: ``out`` is a file, lies under a file, or cannot be written.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(f"--out {str(out)!r} is a file, not a folder; give a folder path.")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputNotWritableError(f"--out {str(out)!r} lies under {str(probe)!r}, which is a file; give a folder path.")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise OutputNotWritableError(
            f"--out {str(out)!r} cannot be written ({error.strerror or error} in {str(probe)!r}); choose a writable folder."
        ) from error
    return out


def check_output(
    out: str | os.PathLike, record: Mapping[str, Any], *, grid_keys: Sequence[str] = (),
    state_files: Sequence[str] = (), force: bool = False,
) -> None:
    """Refuse to mix two runs in ``out`` (see the module docstring).

    ``record`` is this run's `run_record`; ``grid_keys`` and ``state_files`` are its study's
    (`Study.grid_keys`, `Study.state_files`). With ``force`` the files of the other run that a
    rerun would read or keep (record, config, summary, resumable rows) are deleted instead.

    Raises:
        OutputNotWritableError: see `check_writable`.
        OutputConflictError: ``out`` holds the report or rows of another configuration.
    """
    out = check_writable(out)
    if not out.is_dir():
        return
    study = record["study"]
    old = read_record(out)
    state = [name for name in state_files if (out / name).exists()]
    if old is None and not state:
        return
    grid = tuple(grid_keys)
    if old is None:
        problem = f"holds rows ({', '.join(state)}) of a run whose options were not recorded"
    elif "unreadable" in old:  # truncated or overwritten: which run made the files cannot be told
        problem = f"holds a damaged run record ({old['unreadable']} is not valid JSON), so its run cannot be identified"
    elif "resume_key" in old:
        same = old.get("resume_key") == record["resume_key"] and old.get("study") == study
        if same and not grid:
            same = old.get("fingerprint") == record["fingerprint"]
        problem = None if same else "holds a report of another configuration"
    else:  # a report written before fingerprints: compare its configuration
        same = old.get("study") == study and not _differences(old, record, grid)
        problem = None if same else "holds a report of another configuration"
    if problem is None:
        return
    if force:
        clear_output(out, state_files)
        return
    changed = _differences(old, record, grid) if old is not None and "unreadable" not in old else []
    detail = f" ({'; '.join(changed)})" if changed else ""
    raise OutputConflictError(
        f"--out {str(out)!r} {problem}{detail}; its results would be mixed with or replaced by this run's. "
        "Use a fresh --out, or pass --force to delete that run's files and rerun."
    )


def clear_output(out: str | os.PathLike, state_files: Sequence[str] = ()) -> None:
    """Delete the record, configuration, summaries and resumable rows (``state_files``) in ``out``
    (other files stay)."""
    out = Path(out)
    for name in (RECORD_FILE, "config.json", *SUMMARY_FILES, *state_files):
        path = out / name
        if path.is_file():
            path.unlink()


def write_record(out: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Create ``out`` and write ``fingerprint.json`` there."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RECORD_FILE, dict(record))
    return out
