"""One study at a time per output folder: an advisory lock held for the whole run (:func:`output_lock`)."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".geomed-study.lock"


class OutputInUseError(RuntimeError):
    """Another study holds the output folder."""


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold ``output/.geomed-study.lock`` (an OS file lock: released even when the holder is killed) while the
    block runs.

    Raises
    ------
    OutputInUseError
        If another process holds it, naming that process and when it started.
    """
    path = output / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(descriptor):
            holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputInUseError(f"output folder {output} is in use by another geomed study ({holder}); wait for "
                                   "it to finish or choose another output folder")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} since {started}\n".encode(), 0)
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock


def _try_lock(descriptor: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
