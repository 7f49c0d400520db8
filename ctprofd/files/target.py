"""Opening the files a target controls (its binary, its mapped objects, its debug files):
once, without blocking, only a regular file of bounded size, and never through a symlink
the target's owner could have planted. The open descriptor is what gets parsed (in the
sandboxed worker); nothing reopens the file by path.

Two kinds of path:
- the kernel's own links to a process's files, /proc/PID/exe and /proc/PID/map_files/…,
  and the operator's directories (debug dirs, the debuginfod downloads): followed (the
  kernel's links cannot be redirected; O_NOFOLLOW would refuse them with ELOOP);
- paths inside a directory a user may own (a debug file beside a binary): opened with
  openat2(RESOLVE_NO_SYMLINKS) below the target's root, so no symlink, magic link or
  `..` in them lends root's eyes to the user.
"""

from __future__ import annotations

import ctypes
import os

from .regular import check_regular

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO never blocks the open
SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08

_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def checked(fd: int, path: str, max_bytes: int) -> os.stat_result:
    """`regular.check_regular` on a descriptor just opened, closing it when refused."""
    try:
        return check_regular(fd, max_bytes, path)
    except OSError:
        os.close(fd)
        raise


def open_followed(path: str, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open a /proc magic link (exe, map_files/…) or an operator's path: fd and fstat."""
    fd = os.open(path, OPEN_FLAGS)
    return fd, checked(fd, path, max_bytes)


def open_beneath(root: str, path: str, max_bytes: int) -> tuple[int, os.stat_result]:
    """Open `path` (absolute, inside `root`: "/" or /proc/PID/root) following no symlink
    and never leaving `root`: fd and its fstat. Raises OSError (ELOOP for a symlink,
    EXDEV for a way out)."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(OPEN_FLAGS, 0,
                       RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_BENEATH)
        relative = path.lstrip("/").encode() or b"."
        fd = _libc.syscall(SYS_OPENAT2, root_fd, relative, ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), path)
    finally:
        os.close(root_fd)
    return fd, checked(fd, path, max_bytes)
