"""Issue 22's mapping attacker: distinct tiny ELF files, and a process mapping them all
executable (tests/test_hostile_targets.py, benchmarks/combined_attack.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# argv: directory count; maps lib0.so .. lib{count-1}.so, says READY; then for each line read
# maps 1 MiB of anonymous memory more and says MAPPED; exits at the end of its input.
MAPPER_SCRIPT = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
folder, count = sys.argv[1], int(sys.argv[2])
for i in range(count):  # libc's mmap: Python's would keep a descriptor open per mapping
    fd = os.open(os.path.join(folder, f"lib{i}.so"), os.O_RDONLY)
    address = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    os.close(fd)
print("READY", flush=True)
for line in sys.stdin:
    address = libc.mmap(None, 1 << 20, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    print("MAPPED", flush=True)
"""


def write_tiny_elf_files(directory: Path, count: int, owner: int | None = None) -> None:
    """lib0.so .. lib{count-1}.so in `directory`: 4 KiB each, an ELF header and bytes that
    make each file distinct; owned by uid and gid `owner` when given."""
    header = (b"\x7fELF\x02\x01\x01" + bytes(9) + (3).to_bytes(2, "little")
              + (62).to_bytes(2, "little") + (1).to_bytes(4, "little")).ljust(64, b"\0")
    for i in range(count):
        path = directory / f"lib{i}.so"
        path.write_bytes(header + i.to_bytes(8, "little") + bytes(4024))
        if owner is not None:
            os.chown(path, owner, owner)


def mapper_argv(directory: Path, count: int) -> list[str]:
    """The command of a process mapping what write_tiny_elf_files wrote."""
    return [sys.executable, "-c", MAPPER_SCRIPT, str(directory), str(count)]
