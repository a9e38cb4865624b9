"""Shared fixtures: offline environment, tiny random models of every architecture on every backend."""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import pytest
import torch

from icl_kernels.models import backend as tl_backend
from icl_kernels.models.architectures import ARCHITECTURES
from icl_kernels.models.loading import load_model

# One tiny random model per architecture record (icl_kernels/models/architectures.py).
TINY_ARCHS = tuple(ARCHITECTURES)
# Parameter counts of the tiny models, kept in the records (asserted so "tiny" stays tiny; most of it
# is the GPT-2 vocab).
TINY_PARAMS = {name: record.tiny_params for name, record in ARCHITECTURES.items()}
BACKENDS = tl_backend.AVAILABLE_BACKENDS

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist (`pytest -n 2`, scripts/test.sh) runs a worker per core: one torch thread each, as
    # threads beyond the cores are many times slower on a shared CPU (see `one_torch_thread`).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Every test runs on TransformerLens 3.9 and 4.x unless marked ``tl3_only(reason=...)``.

    Without CUDA, ``gpu`` tests are skipped. On TransformerLens 4.x (no HookedTransformer),
    ``tl3_only`` tests and the ``backend="hooked"`` cases of parametrized tests are skipped
    (scripts/test.sh deselects them with ``-m "not tl3_only"``). A ``tl3_only`` without a reason
    is an error.
    """
    no_cuda = not torch.cuda.is_available()
    no_hooked = "hooked" not in BACKENDS
    for item in items:
        if no_cuda and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
        tl3_only = item.get_closest_marker("tl3_only")
        if tl3_only is not None and not tl3_only.kwargs.get("reason"):
            raise pytest.UsageError(f"{item.nodeid}: give @pytest.mark.tl3_only a reason=... (why not on TransformerLens 4)")
        if no_hooked and tl3_only is not None:
            item.add_marker(pytest.mark.skip(reason=f"TransformerLens 3 only: {tl3_only.kwargs['reason']}"))
        elif no_hooked and getattr(item, "callspec", None) and item.callspec.params.get("backend") == "hooked":
            item.add_marker(pytest.mark.skip(reason="backend='hooked' needs TransformerLens < 4"))


_CACHE: dict = {}


def load_tiny(arch: str, backend: str | None = None, dtype=torch.float32):
    """A tiny random model, cached per (arch, backend, dtype); its size is checked."""
    key = (arch, backend, dtype)
    if key not in _CACHE:
        model = load_model(f"tiny-{arch}", device="cpu", backend=backend, dtype=dtype)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad or True)
        assert n_params <= 10_000_000, f"tiny-{arch} has {n_params} parameters"
        _CACHE[key] = model
    return _CACHE[key]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread (~40x faster than two when the shared CPU is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param
