"""An exclusive lock on a preparation's output folder, naming its holder.

The lock is a kernel lock (flock) on `<folder>/.prepare.lock`, so it dies with its process: a
killed run never blocks the next one. The file records the holder's host and PID for the error
message; a file that records a holder but is not locked was left by a killed run (stale).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_reweight.data.errors import DataPrepError

logger = logging.getLogger(__name__)

LOCK_FILE = ".prepare.lock"
_held_fds: set[int] = set()


def _close_inherited_locks() -> None:
    """In a forked child (a tokenising worker): drop the inherited lock descriptors, so the lock
    ends with the process that took it and not with the last of its workers."""
    for fd in _held_fds:
        os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the duration of the block, or fail naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _acquire(path)
    _held_fds.add(fd)
    try:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if holder:
            logger.warning(f"{path}: stale lock of a killed preparation ({holder}) taken over; resuming its work")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: no one can lock a file that is about to vanish
        _held_fds.discard(fd)
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise DataPrepError(
                f"{path.parent} is being written by another preparation ({holder}); wait for it to finish or "
                f"choose another --output-dir (if that process is gone, delete {path})"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning(f"{path.parent}: the file system has no file locks; concurrent preparations go undetected")
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and lock: lock the new one
