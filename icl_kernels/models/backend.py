"""The one place that knows which TransformerLens is installed.

TransformerLens 3.x ships both backends: the legacy ``HookedTransformer`` (what our users asked for)
and the newer ``TransformerBridge`` (``transformer_lens.model_bridge``). TransformerLens 4.x removed
``HookedTransformer`` and exports ``TransformerBridge`` at top level. Everything else in the package
asks this module which classes exist and which backend a model uses; nothing else imports them.

The two backends share hook names (``blocks.{l}.attn.hook_q/k/v/z`` ...), but differ where it
matters for interventions: a bridge discards edits to ``hook_pattern``, fires no ``hook_rot_q/k``,
and keeps the local/global layer layout in the Hugging Face config rather than ``cfg.attn_types``.
`icl_kernels.engine.hooks` builds on the helpers here to make every intervention at ``hook_z``.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any, Literal

import torch

from icl_kernels.models.architectures import architecture_of
from icl_kernels.utils.errors import InvalidOptionError

Backend = Literal["hooked", "bridge"]

TRANSFORMER_LENS_VERSION: str = importlib.metadata.version("transformer-lens")
TRANSFORMER_LENS_MAJOR: int = int(TRANSFORMER_LENS_VERSION.split(".")[0])


def _import_hooked_transformer() -> type | None:
    if TRANSFORMER_LENS_MAJOR >= 4:
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer  # noqa: PLC0415 - exists only in some TransformerLens versions

    return HookedTransformer


def _import_bridge() -> type:
    try:
        from transformer_lens import TransformerBridge  # noqa: PLC0415 - exists only in some TransformerLens versions
    except ImportError:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: PLC0415 - exists only in some TransformerLens versions
    return TransformerBridge


HookedTransformer = _import_hooked_transformer()
TransformerBridge = _import_bridge()
AVAILABLE_BACKENDS: tuple[Backend, ...] = (
    ("hooked", "bridge") if HookedTransformer is not None else ("bridge",)
)

# What a loaded model is, for type hints: either backend.
Model = Any


def default_backend() -> Backend:
    """``hooked`` where HookedTransformer exists (TransformerLens < 4), else ``bridge``."""
    return AVAILABLE_BACKENDS[0]


def resolve_backend(backend: str | None) -> Backend:
    """Check a backend name against what the installed TransformerLens offers: ``None`` and ``"auto"``
    are `default_backend`; an impossible choice is an `InvalidOptionError` (a ``ValueError``) that says
    what to install or choose instead."""
    if backend is None or backend == "auto":
        return default_backend()
    if backend not in ("hooked", "bridge"):
        raise InvalidOptionError(f"backend must be 'hooked', 'bridge' or 'auto', not {backend!r}.")
    if backend not in AVAILABLE_BACKENDS:
        raise InvalidOptionError(
            f"backend={backend!r} needs TransformerLens < 4 (installed: {TRANSFORMER_LENS_VERSION}); "
            "HookedTransformer was removed in 4.0. Use backend='bridge', or "
            "`pip install 'transformer-lens>=3.9,<4'`."
        )
    return backend  # type: ignore[return-value]


def is_bridge(model: Model) -> bool:
    """True for a TransformerBridge, False for a HookedTransformer."""
    return isinstance(model, TransformerBridge)


def backend_of(model: Model) -> Backend:
    return "bridge" if is_bridge(model) else "hooked"


def hf_config(model: Model) -> Any | None:
    """The Hugging Face config behind a model (a bridge keeps it; we attach it to ours)."""
    for attr in ("_icl_hf_config",):
        if getattr(model, attr, None) is not None:
            return getattr(model, attr)
    original = getattr(model, "original_model", None)
    return getattr(original, "config", None)


def layer_attention_types(model: Model) -> list[str]:
    """``"global"`` or ``"local"`` for each layer (all global for models without local layers)."""
    n_layers = model.cfg.n_layers
    types = getattr(model.cfg, "attn_types", None)
    if types:
        return list(types)
    config = hf_config(model)
    if config is None:
        return ["global"] * n_layers
    return architecture_of(config).layer_attention_types(config, n_layers)


def local_window(model: Model) -> int | None:
    """The local-attention window (keys with query - window < key <= query are visible)."""
    window = getattr(model.cfg, "window_size", None)
    if window:
        return int(window)
    config = hf_config(model)
    if config is None:
        return None
    return architecture_of(config).local_window(config)


def model_device(model: Model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Model) -> torch.dtype:
    return next(model.parameters()).dtype
