"""The README's Python examples run as written (on a tiny model instead of gemma-3-270m, and on the
CPU), and import only from ``icl_kernels`` and ``icl_kernels.studies``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
#: The examples' offline default model -> a tiny model of the same interface (GPT-2 tokenizer).
SUBSTITUTIONS = {'"gemma-3-270m"': '"tiny-gpt-neo"'}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def python_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def runnable(block: str) -> bool:
    """Blocks that need a GPU or the hub (outside comments) are documentation only."""
    code = "\n".join(line.split("#", 1)[0] for line in block.splitlines())
    return "cuda" not in code and "EleutherAI/" not in code


def test_readme_examples_import_only_the_public_api():
    blocks = python_blocks()
    assert blocks, "the README has no Python example"
    for block in blocks:
        for line in block.splitlines():
            match = re.match(r"\s*from (\S+) import|\s*import (\S+)", line)
            if match:
                module = match.group(1) or match.group(2)
                assert module in ("icl_kernels", "icl_kernels.studies", "torch"), line


def test_readme_examples_run():
    namespace: dict = {}
    blocks = [b for b in python_blocks() if runnable(b)]
    assert len(blocks) >= 2
    for block in blocks:
        for old, new in SUBSTITUTIONS.items():
            block = block.replace(old, new)
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
