"""Writing a file so that readers see the old or the new content, never a part; and state
files written even on a full disk, in space set aside for them beforehand."""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
MIN_RESERVE = 1 << 20  # bytes set aside for a state file, at least


def write_json(path: str, data: object, indent: int | None = None) -> int:
    """Serialize `data` to a temporary file beside `path`, then rename it over `path`;
    the bytes written."""
    text = json.dumps(data, indent=indent) + "\n"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(text)


class ReservedWriter:
    """Writes one state file atomically, keeping beside it a preallocated file of twice its
    size (`.NAME.reserve`). When the disk is full, the reserve is given up and the write
    made in the space it held; the reserve is made again once a write finds room (as a
    rename frees the file it replaces, a state that does not grow keeps being written on a
    full disk). A write that fails even so is counted, warned about once (with what it
    costs, `failing`) and left to the caller to try again."""

    def __init__(self, path: str, failing: str) -> None:
        self.path = path
        self.reserve = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.reserve")
        self.failing = failing
        self.failures = 0  # writes that failed
        self._reserved = 0  # bytes the reserve holds, as far as this writer knows
        self._state = "ok"  # or "reserve" (the disk full, writes made in the reserve), "failed"

    def write(self, data: object) -> bool:
        """Write `data` as JSON; whether it was written."""
        try:
            try:
                size = write_json(self.path, data)
                state = "ok"
            except OSError as exc:
                if exc.errno not in DISK_FULL or not self._give_up_reserve():
                    raise
                size = write_json(self.path, data)
                state = "reserve"
        except OSError as exc:
            self.failures += 1
            if self._state != "failed":
                log.warning("cannot write %s (%s); %s", self.path, exc.strerror, self.failing)
            self._state = "failed"
            return False
        if state != self._state:
            if state == "reserve":
                log.warning("the disk of %s is full: written in the space set aside for it "
                            "(%s)", self.path, self.reserve)
            else:
                log.warning("%s written again with room to spare", self.path)
        self._state = state
        self._set_aside(max(MIN_RESERVE, 2 * size))
        return True

    def _give_up_reserve(self) -> bool:
        try:
            os.unlink(self.reserve)
        except FileNotFoundError:
            return False
        self._reserved = 0
        return True

    def _set_aside(self, size: int) -> None:
        """Grow the reserve to `size` bytes if it holds less; best effort (a full disk now
        leaves it to a later write)."""
        if self._reserved >= size:
            return
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, size)
            self._reserved = size
        except OSError:
            pass
        finally:
            os.close(fd)
