"""One owner per directory: an advisory lock (`flock`) on `DIR/.lock`, which holds the
owner's pid, kept until the owner exits. The kernel releases it then, also after SIGKILL, so
a lock is never stale; the pid written is only there to name the holder. The descriptor is
close-on-exec: a program the owner starts (the parse worker) never holds it."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time

from .regular import FileRefused, check_regular

LOCK_FILE = ".lock"
ATTEMPTS, PAUSE = 20, 0.025  # a `holder` check holds the lock for microseconds: wait it out
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # no symlink, and a FIFO cannot block us


class DirectoryBusy(Exception):
    """Another process holds the directory; `pid` is the one it wrote (0 when unknown)."""

    def __init__(self, directory: str, pid: int) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{directory} is in use by {holder}")
        self.directory = directory
        self.pid = pid


class LockRefused(OSError):
    """The lock file is not a regular file (a symlink, FIFO, device or directory put there)."""


def _open(path: str, flags: int) -> int:
    """Open the lock file, refusing anything but a regular file; raises OSError."""
    try:
        fd = os.open(path, flags | _OPEN, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockRefused(errno.ELOOP, f"{path} is a symlink, not a lock file: remove "
                              "it") from None
        raise
    try:
        check_regular(fd, sys.maxsize, path)  # of any size: the pid is written over it
    except FileRefused as exc:
        os.close(fd)
        raise LockRefused(errno.EINVAL, f"{path} is {exc.strerror}: remove it") from None
    return fd


def _holder_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    except OSError:
        return 0


def acquire(directory: str) -> int:
    """Take `directory`'s lock for this process's lifetime and write our pid in it; the
    descriptor returned holds it (closing it releases it). Raises DirectoryBusy when another
    process holds it, LockRefused when the lock file is not a regular file, OSError when it
    cannot be opened."""
    fd = _open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    for attempt in range(ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno != errno.EWOULDBLOCK or attempt == ATTEMPTS - 1:
                pid = _holder_pid(fd)
                os.close(fd)
                if exc.errno == errno.EWOULDBLOCK:
                    raise DirectoryBusy(directory, pid) from None
                raise
            time.sleep(PAUSE)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder(directory: str) -> int | None:
    """The pid holding `directory`'s lock (0 when it wrote none), or None when nobody
    holds it or there is no usable lock file to ask."""
    try:
        fd = _open(os.path.join(directory, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder_pid(fd)
        return None
    finally:
        os.close(fd)
