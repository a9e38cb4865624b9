"""What every study records next to its results: package versions, git commit and machine."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

import torch

import icl_kernels


def environment() -> dict:
    """Versions of the packages results depend on, the git commit, Python and the machine."""

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return dict(
        icl_kernels=icl_kernels.__version__, git_commit=commit, python=platform.python_version(),
        platform=platform.platform(), torch=torch.__version__, transformer_lens=version("transformer-lens"),
        transformers=version("transformers"), numpy=version("numpy"), pandas=version("pandas"),
        cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
    )
