"""Waiting for another process to read a file: an inotify IN_ACCESS watch, so a test can
wait for that event instead of for time to pass."""

from __future__ import annotations

import ctypes
import os
import select

IN_ACCESS = 0x1
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


class ReadWatch:
    """Armed at construction; `wait` returns once some process has read from the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ACCESS) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {path}")

    def wait(self, hang_guard: float) -> None:
        """Until the file is read; AssertionError only if nothing read it for `hang_guard`
        seconds (a guard against hanging the suite, not a timing claim)."""
        readable, _, _ = select.select([self.fd], [], [], hang_guard)
        assert readable, f"nothing read the file within {hang_guard} s"
        os.read(self.fd, 4096)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ReadWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
