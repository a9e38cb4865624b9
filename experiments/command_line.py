"""The one way an experiment reads its command line into its configuration.

Each experiment builds an ``argparse`` parser with `icl_kernels.utils.config.add_arguments` (plus any
positional argument of its own) and hands it here: a value the configuration's ``__post_init__``
refuses becomes a usage error (exit 2, with the configuration's message), as argparse's own errors are.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypeVar

from icl_kernels.utils.config import Options, from_arguments
from icl_kernels.utils.errors import InvalidOptionError

__all__ = ["parse_config"]

T = TypeVar("T", bound=Options)


def parse_config(parser: argparse.ArgumentParser, config: type[T], argv: Sequence[str] | None) -> T:
    """``config`` from ``argv`` (None: ``sys.argv``) through ``parser``; a refused value exits 2."""
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return from_arguments(config, args)
    except InvalidOptionError as error:
        parser.error(str(error))
