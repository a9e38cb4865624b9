"""Which model a study runs and how: `ModelOptions`, embedded in every study's configuration.

Its fields are validated on construction (`icl_kernels.utils.config.Options`); `ModelOptions.load`
is the one call from options to a TransformerLens model (`icl_kernels.models.loading.load_model`).
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field

from icl_kernels.utils.config import BACKENDS, DTYPES, Options
from icl_kernels.utils.errors import InvalidOptionError

__all__ = ["ModelOptions"]


def _transformer_lens_major() -> int:
    """The installed TransformerLens's major version, from its metadata (nothing imported); 0 if absent."""
    try:
        return int(importlib.metadata.version("transformer-lens").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return 0


@dataclass
class ModelOptions(Options):
    """Which model to run and how (loading is `load`)."""

    model: str = field(default="gemma-3-270m", metadata={
        "help": "registered name (see `icl-kernels models`), hub id or local HF folder"})
    backend: str | None = field(default=None, metadata={
        "choices": ("hooked", "bridge"), "help": "TransformerLens backend (default: HookedTransformer where installed)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: cuda if available)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bf16, fp16, float64"})

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.model, str) or not self.model.strip():
            problems.append(f"model must be a model name or folder, not {self.model!r}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be 'hooked' or 'bridge', not {self.backend!r}")
        elif self.backend == "hooked" and _transformer_lens_major() >= 4:
            problems.append(f"backend 'hooked' (HookedTransformer) needs TransformerLens < 4, and "
                            f"{_transformer_lens_major()}.x is installed: use --backend bridge (or leave it unset)")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.device is not None and not re.fullmatch(r"(cpu|cuda|mps|meta)(:\d+)?", str(self.device)):
            problems.append(f"device must look like cpu, cuda or cuda:1, not {self.device!r}")
        if problems:
            raise InvalidOptionError("Invalid model options: " + "; ".join(problems) + ".")

    def load(self):
        """The model as a TransformerLens model (`icl_kernels.models.loading.load_model`)."""
        from icl_kernels.models import loading  # noqa: PLC0415 - torch and TransformerLens load with the model, not with its options (a fast `icl-kernels --help`)

        return loading.load_model(self.model, device=self.device, dtype=self.dtype, backend=self.backend)
