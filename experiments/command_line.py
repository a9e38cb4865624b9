"""The one way an experiment reads its command line into its configuration.

Each experiment builds an ``argparse`` parser with `icl_kernels.utils.config.add_arguments` (plus any
positional argument of its own) and hands it to `parse_config`
(`icl_kernels.utils.config.parse_config`): a value the configuration's ``__post_init__`` refuses
becomes a usage error (exit 2, with the configuration's message), as argparse's own errors are.
"""

from __future__ import annotations

from icl_kernels.utils.config import parse_config

__all__ = ["parse_config"]
