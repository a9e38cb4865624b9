"""``python -m experiments.columns_doc``: write the column dictionary, ``docs/columns.md``, from the code.

The page is `icl_kernels.studies.tidy.columns_markdown`: the columns of every run's ``summary.csv``
and of a sweep's long table, then, per registered study, each quantity pattern with the description
its study module registers (`icl_kernels.studies.tidy.register_quantities`). ``--check`` writes
nothing and exits 1 when the file differs from what the code generates (the tests run the same
comparison).

    python -m experiments.columns_doc
    python -m experiments.columns_doc --check
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from experiments.command_line import parse_config
from icl_kernels.studies.tidy import columns_markdown
from icl_kernels.utils.config import Options, add_arguments
from icl_kernels.utils.errors import InvalidOptionError
from icl_kernels.utils.io import atomic_write_text

__all__ = ["ColumnsDocConfig", "build_parser", "main", "parse_args"]


@dataclass
class ColumnsDocConfig(Options):
    """Where the column dictionary goes, and whether only to compare it with the code."""

    out: str = field(default="docs/columns.md", metadata={"help": "the markdown file to write"})
    check: bool = field(default=False, metadata={"help": "write nothing; exit 1 when the file differs from the code"})

    def __post_init__(self) -> None:
        if not self.out or not self.out.endswith(".md"):
            raise InvalidOptionError(f"Invalid ColumnsDocConfig: out must be a .md file, not {self.out!r}.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, ColumnsDocConfig)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> ColumnsDocConfig:
    """The configuration from a command line; a bad value is a usage error (exit 2)."""
    return parse_config(parser or build_parser(), ColumnsDocConfig, argv)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    text, out = columns_markdown(), Path(cfg.out)
    if cfg.check:
        same = out.is_file() and out.read_text(encoding="utf-8") == text
        print(f"{out} is " + ("up to date" if same else "out of date: run this command without --check"))
        return 0 if same else 1
    atomic_write_text(out, text)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
