"""Exclusive locks on output folders, and files opened without following symbolic links.

`folder_lock` holds a lock file in a folder (``.icl-kernels.lock`` for a study run, ``.sweep.lock``
for a sweep) for as long as one run writes there; a second run into the same folder stops at once
with an `OutputLockedError` that names the holder (pid, host, start time, command). The lock is an
``flock`` on the lock file, so the operating system drops it when the holding process dies, however
it dies; the file also holds a line describing the holder, for the message a refused run prints.
A clean release deletes the file. A file still there when the lock is free was left by a run that
died: it is taken over, with a warning that names that run.

Lock files are opened by `open_no_follow` (``O_NOFOLLOW``): a symbolic link planted at a lock or
state path is refused with an `UnsafePathError` and never written through, so a run cannot be made
to truncate or overwrite the file the link points to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from icl_kernels.utils.errors import OutputLockedError, UnsafePathError

__all__ = ["LOCK_FILE", "Holder", "folder_lock", "open_no_follow", "read_holder"]

#: The lock file a study run holds in its ``--out`` folder.
LOCK_FILE = ".icl-kernels.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: process id, host, start time and command line."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        """The holder record of the running process."""
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S %z"), shlex.join(sys.argv))

    def describe(self) -> str:
        """One line: ``pid N on HOST, started T, command: C``."""
        return f"pid {self.pid} on {self.host}, started {self.started}, command: {self.command}"

    def is_running(self) -> bool | None:
        """Whether the process still runs; None when it ran on another host (unknown here)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` of a regular file that never follows a symbolic link at ``path``.

    Raises:
        UnsafePathError: ``path`` is a symbolic link, or not a regular file.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno == errno.ELOOP or os.path.islink(path):
            raise _unsafe(path, "is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _unsafe(path, "is not a regular file")
    return fd


def _unsafe(path: str | os.PathLike, what: str) -> UnsafePathError:
    target = f" (to {os.readlink(path)!r})" if os.path.islink(path) else ""
    return UnsafePathError(
        f"{str(path)!r} {what}{target}; a lock or state file must be a plain file the run creates itself, "
        "so it is not followed or written. Remove it (check first that nothing else put it there) and rerun."
    )


def read_holder(text: str) -> Holder | str | None:
    """The holder a lock file's text describes: a `Holder`, the text itself when it is in another
    form (a lock file of an older version), or None when it is empty."""
    text = text.strip()
    if not text:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return text


def _describe(holder: Holder | str | None) -> str:
    if holder is None:
        return "another process (it has not written its name yet)"
    return holder.describe() if isinstance(holder, Holder) else holder


def _read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a released lock deletes its file)."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _refusal(path: Path, fd: int) -> OutputLockedError:
    """The error of a run refused the lock at ``path``; ``holder`` on it is the holder's line."""
    holder = read_holder(_read_all(fd))
    message = f"{path.parent} is in use by {_describe(holder)}"
    if isinstance(holder, Holder) and holder.is_running() is False:
        message += (f" (pid {holder.pid} has ended, but a process it started still holds the lock; "
                    f"stop that process, or delete {path} if none is left)")
    error = OutputLockedError(message + "; wait for that run to finish, or use another --out.")
    error.holder = _describe(holder)
    return error


def _take(path: Path) -> int:
    """Open, lock and return the lock file at ``path``; `OutputLockedError` when another run holds it."""
    while True:
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _refusal(path, fd)
            os.close(fd)
            raise error from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder released it (and deleted the file) between our open and lock: again


def _warn_if_stale(path: Path, fd: int) -> None:
    """Warn when the lock just taken still names a run: that run died without releasing it."""
    holder = read_holder(_read_all(fd))
    if holder is None:
        return
    ended = isinstance(holder, Holder) and holder.is_running() is False
    state = "is no longer running" if ended else "no longer holds it"
    warnings.warn(f"Taking over the lock {path} left by {_describe(holder)}, which {state} "
                  "(that run ended without releasing it; its files in the folder may be incomplete).", stacklevel=2)


def _write_holder(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(holder)) + "\n").encode())
    os.fsync(fd)


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, deepest first."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote there), or already gone
            return


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = LOCK_FILE) -> Iterator[Holder]:
    """Hold an exclusive lock on ``folder`` (the file ``name`` in it) for the ``with`` block.

    The folder is created if needed; if the block leaves it empty, the folders created here are
    removed again, so a refused or failed run leaves no trace. The lock is released (its file
    deleted) when the block ends, also when it raises.

    Raises:
        OutputLockedError: another run holds the lock; the message names it.
        UnsafePathError: the lock path is a symbolic link or not a regular file.
    """
    folder = Path(folder)
    created = _make_folder(folder)
    try:
        path = folder / name
        fd = _take(path)
        try:
            _warn_if_stale(path, fd)
            holder = Holder.this_process()
            _write_holder(fd, holder)
            yield holder
        finally:
            if _same_file(fd, path):
                path.unlink()
            os.close(fd)  # releases the flock
    finally:
        _remove_if_empty(created)
