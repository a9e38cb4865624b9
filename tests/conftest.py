"""Shared fixtures: offline environment, tiny random models of every architecture on every backend."""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

import pytest
import torch

from icl_kernels.models import backend as tl_backend
from icl_kernels.models.architectures import ARCHITECTURES

# One tiny random model per architecture record (icl_kernels/models/architectures.py).
TINY_ARCHS = tuple(ARCHITECTURES)
# Parameter counts of the tiny models, kept in the records (asserted so "tiny" stays tiny; most of it
# is the GPT-2 vocab).
TINY_PARAMS = {name: record.tiny_params for name, record in ARCHITECTURES.items()}
BACKENDS = tl_backend.AVAILABLE_BACKENDS


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_CACHE: dict = {}


def load_tiny(arch: str, backend: str | None = None, dtype=torch.float32):
    """A tiny random model, cached per (arch, backend, dtype); its size is checked."""
    from icl_kernels.models.loading import load_model

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
