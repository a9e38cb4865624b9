"""A test seam for fault injection: interrupt a resumable run at a chosen, machine-independent point.

Resumable runs call `unit_done` once after each unit of work is durably written: the momentum
study after each cell x prompt set (or cell x perplexity) has its rows in ``out``, a sweep shard
after each cell's record is appended. Normally that call does nothing. With the environment
variable ``ICL_KERNELS_FAULT_AFTER=N`` (read here and nowhere else), the N-th call in a process
sends that process the signal named by ``ICL_KERNELS_FAULT_SIGNAL`` (``KILL``, the default,
``INT`` or ``TERM``), exactly as a user's Ctrl-C, a scheduler's ``kill`` or an OOM killer would
arrive between two units; ``STOP`` pauses the process there (holding its locks) until it gets
SIGCONT, so that a test can start a second run while the first one is mid-run. The fault-injection tests (``tests/faults``) use it to interrupt runs at
several points and check that a rerun ends with the table of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["FAULT_AFTER_ENV", "FAULT_SIGNAL_ENV", "unit_done"]

#: After this many finished units (per process), signal the process itself.
FAULT_AFTER_ENV = "ICL_KERNELS_FAULT_AFTER"
#: The signal sent: KILL (default), INT or TERM.
FAULT_SIGNAL_ENV = "ICL_KERNELS_FAULT_SIGNAL"

_SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP}
_count = [0]


def unit_done() -> None:
    """Count one finished unit; signal this process when ``ICL_KERNELS_FAULT_AFTER`` says so."""
    after = os.environ.get(FAULT_AFTER_ENV)
    if not after:
        return
    _count[0] += 1
    if _count[0] != int(after):
        return
    name = os.environ.get(FAULT_SIGNAL_ENV, "KILL").upper().removeprefix("SIG")
    if name not in _SIGNALS:
        raise ValueError(f"{FAULT_SIGNAL_ENV}={name!r}: use one of {sorted(_SIGNALS)}.")
    os.kill(os.getpid(), _SIGNALS[name])
    if name != "STOP":
        time.sleep(5)  # a handled signal (INT, TERM in the CLI) raises in this call; KILL ends the process first
