"""The shared objects a program loads, found as the dynamic loader finds them: its
`DT_NEEDED` entries searched in `DT_RPATH` (when there is no `DT_RUNPATH`), `DT_RUNPATH`,
the directories of /etc/ld.so.conf and the system defaults. For an operator's
`ctprofd offsets PROGRAM`, which follows the program to the jemalloc it loads;
`LD_LIBRARY_PATH` is not read (it is the operator's environment, not the program's)."""

from __future__ import annotations

import glob
import os
from collections import deque
from typing import Iterator

from elftools.elf.dynamic import DynamicSection

from ..files.target import open_followed
from . import elf
from .layout import MALFORMED

# glibc's built-in search path on Debian x86_64, after ld.so.conf
DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64",
                "/lib", "/usr/lib")
MAX_OBJECTS = 256  # a dependency graph larger than any real program's is cut off here
MAX_CONF_FILES = 256
MAX_ENTRIES = 256  # DT_NEEDED, and search directories, read per object
MAX_FILE_BYTES = 1 << 30


def conf_dirs(path: str = "/etc/ld.so.conf", depth: int = 0) -> list[str]:
    """The directories ld.so.conf lists, `include` globs followed (bounded)."""
    dirs: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return dirs
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include") and depth < 4:
            pattern = line.split(None, 1)[1] if " " in line or "\t" in line else ""
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern))[:MAX_CONF_FILES]:
                dirs += conf_dirs(included, depth + 1)
        elif line.startswith("/"):
            dirs.append(line)
    return dirs


def _dynamic(path: str) -> tuple[list[str], list[str], list[str]]:
    """(DT_NEEDED, DT_RPATH, DT_RUNPATH) of an ELF file, MAX_ENTRIES of each at most; empty
    when it has none, is no ELF file, or is no regular file (a FIFO is not waited on)."""
    needed: list[str] = []
    rpath: list[str] = []
    runpath: list[str] = []
    try:
        fd, _ = open_followed(path, MAX_FILE_BYTES)
        with os.fdopen(fd, "rb") as stream:
            parsed = elf.open_elf(stream)
            for section in parsed.iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED" and len(needed) < MAX_ENTRIES:
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_RPATH":
                        rpath += tag.rpath.split(":")
                    elif tag.entry.d_tag == "DT_RUNPATH":
                        runpath += tag.runpath.split(":")
    except (*MALFORMED, AttributeError, RecursionError):
        pass  # a malformed object loads nothing we could follow
    return needed, rpath[:MAX_ENTRIES], runpath[:MAX_ENTRIES]


def _expand(entry: str, origin: str) -> str:
    return entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)


def loaded_objects(program: str, system_dirs: list[str] | None = None) -> Iterator[str]:
    """The real paths of the shared objects `program` loads, nearest first (breadth
    first over DT_NEEDED), each once; at most MAX_OBJECTS."""
    if system_dirs is None:
        system_dirs = conf_dirs() + list(DEFAULT_DIRS)
    seen = {os.path.realpath(program)}
    queue = deque([program])
    found = 0
    while queue and found < MAX_OBJECTS:
        current = queue.popleft()
        needed, rpath, runpath = _dynamic(current)
        origin = os.path.dirname(os.path.realpath(current))
        search = [_expand(d, origin) for d in (runpath or rpath)] + system_dirs
        for name in needed:
            candidates = [name] if "/" in name else [os.path.join(d, name) for d in search if d]
            for candidate in candidates:
                if os.path.isfile(candidate):
                    real = os.path.realpath(candidate)
                    if real not in seen:
                        seen.add(real)
                        found += 1
                        queue.append(real)
                        yield real
                    break
