"""Names resolve to what is registered, not to a same-named folder of the current directory.

A folder ``./tiny-gpt-neo`` or ``./gemma-3-270m`` must not replace the registered model, a folder
``./fancyzhx/ag_news`` must not replace the hub data of ``ag_news``, and the run's record must say which
was read. A local folder is read when the name is written as a path (``./tiny-gpt-neo``).
"""

from __future__ import annotations

import pytest
import transformers

from icl_kernels.data.synthetic_world import synthetic_world
from icl_kernels.data.tasks.registry import get_task
from icl_kernels.models import loading
from icl_kernels.studies.identity import model_identity
from icl_kernels.utils.errors import IclKernelsError, InvalidOptionError, TaskDataError, UnknownTaskError
from icl_kernels.utils.paths import is_explicit_path


def _plant_model(folder) -> None:
    """A GPT-Neo with a 256-token vocabulary (the registered tiny models have GPT-2's 50257)."""
    config = transformers.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
                                       vocab_size=256, max_position_embeddings=32)
    transformers.GPTNeoForCausalLM(config).save_pretrained(str(folder))


def test_explicit_paths_are_told_from_names():
    assert all(is_explicit_path(p) for p in ("./x", "../x", "/x", "~/x", ".", "..", "~"))
    assert not any(is_explicit_path(p) for p in ("tiny-gpt-neo", "EleutherAI/gpt-neo-125M", "runs/model", ".x"))


def test_registered_model_wins_over_a_same_named_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _plant_model(tmp_path / "tiny-gpt-neo")
    hf, _ = loading.load_hf_model("tiny-gpt-neo")  # before the fix: the planted folder, vocabulary 256
    assert hf.config.vocab_size == 50257
    assert model_identity("tiny-gpt-neo")["source"] == "tiny"
    hf, _ = loading.load_hf_model("./tiny-gpt-neo")  # written as a path: the folder
    assert hf.config.vocab_size == 256
    identity = model_identity("./tiny-gpt-neo")
    assert identity["source"] == "folder" and identity["path"] == str((tmp_path / "tiny-gpt-neo").resolve())


def test_explicit_path_that_is_no_model_folder_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma-3-270m").mkdir()
    with pytest.raises(InvalidOptionError, match=r"has no config\.json.*registered model of that name"):
        loading.load_hf_model("./gemma-3-270m")
    with pytest.raises(InvalidOptionError, match="does not exist"):
        loading.load_tokenizer("./absent")
    assert loading.model_folder("gemma-3-270m") is None  # the bare name is the registered model


def test_hub_model_shadowed_by_a_folder_is_refused_not_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _plant_model(tmp_path / "EleutherAI" / "gpt-neo-125M")  # transformers would read this as the hub model
    with pytest.raises(InvalidOptionError, match=r"current directory.*'\./EleutherAI/gpt-neo-125M'"):
        loading.load_hf_model("EleutherAI/gpt-neo-125M")
    hf, _ = loading.load_hf_model("./EleutherAI/gpt-neo-125M")
    assert hf.config.vocab_size == 256


def test_synthetic_world_of_a_registered_name_ignores_a_same_named_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = synthetic_world("synthetic-gpt-neo")
    planted = tmp_path / "synthetic-gpt-neo"
    planted.mkdir()
    (planted / "world.json").write_text("not the world")  # read in place of the shipped one before the fix
    assert synthetic_world("synthetic-gpt-neo").checksum() == expected.checksum()


def test_hub_task_is_not_read_from_a_same_named_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)  # no download in any environment
    task = get_task("ag_news")
    planted = tmp_path / "fancyzhx" / "ag_news"
    planted.mkdir(parents=True)
    for split in ("train", "test"):
        (planted / f"{split}.csv").write_text("text,label\nplanted world news,0\nplanted sports,1\n"
                                              "planted business,2\nplanted tech,3\n")
    try:  # an empty cache: the hub data cannot be had offline, and the planted folder must not stand in
        data = task.load(cache_dir=tmp_path / "empty-cache")
    except TaskDataError as error:
        assert "was not read" in str(error)
    else:  # a machine with hub access: the hub data, recorded as hub
        assert "planted" not in " ".join(data["train"]["text"][:4]) and data.data_source["kind"] == "hub"


def test_task_written_as_a_path_is_refused_with_the_local_data_route():
    with pytest.raises(UnknownTaskError, match="ICL_KERNELS_DATA_DIR"):
        get_task("./fancyzhx/ag_news")
    assert issubclass(UnknownTaskError, IclKernelsError)
