"""Files as ctprofd accepts them: regular files of bounded size only, checked on the open
descriptor before anything is read, so a path that names a FIFO, a device or a huge file is
refused with one line instead of blocking or filling memory. `read_regular` reads the
operator's files (configuration, web config, offsets); `check_regular` also serves the
files a target controls (files.target)."""

from __future__ import annotations

import os
import stat

MAX_CONFIG_BYTES = 1 << 20


class FileRefused(OSError):
    """Not a regular file, or larger than allowed; `strerror` says which."""


def read_regular(path: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The whole file at `path`; FileRefused when it is not a regular file or holds more
    than `limit` bytes, OSError when it cannot be opened or read. Opened non-blocking, so
    a FIFO without a writer cannot stall the caller."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        check_regular(fd, limit, path)
        parts, left = [], limit + 1  # a file growing while read is still bounded
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            parts.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise FileRefused(0, f"too large (grew past the limit of {limit} bytes)", path)
        return b"".join(parts)
    finally:
        os.close(fd)


def check_regular(fd: int, limit: int, path: str) -> os.stat_result:
    """fstat an open descriptor: a regular file of at most `limit` bytes, else FileRefused."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise FileRefused(0, f"not a regular file ({_kind(info.st_mode)})", path)
    if info.st_size > limit:
        raise FileRefused(0, f"too large ({info.st_size} bytes, limit {limit})", path)
    return info


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"
