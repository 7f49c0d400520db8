"""Small real filesystems for tests of full disks: a tmpfs mounted for a test, and a file
that fills one to its last byte."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's size=) at `directory`, made here, unmounted on exit."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "ctprofd-test",
                    directory], check=True, timeout=60)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", directory], check=True, timeout=60)


def fill(directory: Path, name: str) -> None:
    """Write a file in `directory` until the filesystem has not one byte left."""
    with open(directory / name, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
