"""Sweeps of registered studies over models x tasks x shots x seeds x layers, and their summaries.

`icl_kernels.sweeps.config` reads a sweep config into cells, `icl_kernels.sweeps.shards` runs them
(as jobs) and merges their rows into ``results.csv``, `icl_kernels.sweeps.command` is ``icl-kernels
sweep``, and `icl_kernels.sweeps.summary` (with `icl_kernels.sweeps.headline`) is ``icl-kernels
summarize``. Importing this package imports none of them: the command line loads a module only when
its subcommand runs.
"""
