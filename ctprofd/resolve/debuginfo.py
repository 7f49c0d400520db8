"""Finding an object's external debug file: build-id path, .gnu_debuglink, then debuginfod.

Search order (REFERENCE.md §3): `<debug_dir>/.build-id/xx/rest.debug` for each configured
debug dir; then the debuglink name next to the object, in its `.debug/` subfolder and under
`<debug_dir>/<object dir>/`; then the debuginfod servers. Candidates are opened here, once
(files.target); whether a debuglink candidate has the CRC the object names is checked on
that descriptor by the caller (in the sandboxed worker).

The configured debug dirs and the debuginfod download dir are the operator's: their paths
are followed as they are. A directory beside the object belongs to the object's owner:
it is opened below the target's root without following any symlink.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from ..files.target import open_beneath, open_followed
from .debuginfod import DebuginfodClient


@dataclass(frozen=True)
class DebugSearch:
    """Where external debug files are looked for, and the largest one opened."""

    debug_dirs: tuple[str, ...] = ("/usr/lib/debug",)
    debuginfod: DebuginfodClient | None = None
    max_bytes: int = 4 << 30


@dataclass(frozen=True)
class ObjectDir:
    """The directory an object was loaded from: `path` (absolute) as seen from `root`
    ("/", or /proc/PID/root for a process in another mount namespace)."""

    root: str
    path: str


@dataclass
class Candidate:
    """An open debug file, how it was found, and the CRC32 it must have (a debuglink's)."""

    stream: BinaryIO
    source: str
    crc: int | None = None


def build_id_path(debug_dir: str, build_id: str) -> str:
    return os.path.join(debug_dir, ".build-id", build_id[:2], build_id[2:] + ".debug")


def stream_crc32(stream: BinaryIO) -> int:
    """CRC32 of a whole open file, read with pread (the file offset is left alone)."""
    crc, offset, fd = 0, 0, stream.fileno()
    while chunk := os.pread(fd, 1 << 20, offset):
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
    return crc


def _attempt(open_file: Callable[[], tuple[int, os.stat_result]], path: str,
             tried: list[str]) -> BinaryIO | None:
    """The file `open_file` opens, or None (a missing one silently, others said in
    `tried`)."""
    try:
        fd, _ = open_file()
    except FileNotFoundError:
        return None
    except OSError as exc:
        tried.append(f"{path}: {exc.strerror or exc}")
        return None
    return os.fdopen(fd, "rb")


def debug_files(build_id: str | None, link: tuple[str, int] | None,
                object_dirs: list[ObjectDir], search: DebugSearch,
                tried: list[str]) -> Iterator[Candidate]:
    """Every debug file that may be the object's, opened, in gdb's order; appends to
    `tried` why the others were not."""
    limit = search.max_bytes
    if build_id:
        for debug_dir in search.debug_dirs:
            path = build_id_path(debug_dir, build_id)
            if stream := _attempt(lambda: open_followed(path, limit), path, tried):
                yield Candidate(stream, f"build-id {path}")
        tried.append(f"no .build-id/{build_id[:2]}/{build_id[2:]}.debug")
    if link:
        name, crc = link
        found = False
        owners = [(d.root, os.path.join(d.path, sub, name))
                  for d in object_dirs for sub in ("", ".debug")]
        operators = [os.path.join(debug_dir, d.path.lstrip("/"), name)
                     for debug_dir in search.debug_dirs for d in object_dirs]
        openers = [(path, lambda root=root, path=path: open_beneath(root, path, limit))
                   for root, path in owners]
        openers += [(path, lambda path=path: open_followed(path, limit)) for path in operators]
        for path, open_file in openers:
            if stream := _attempt(open_file, f"debuglink {path}", tried):
                found = True
                yield Candidate(stream, f"debuglink {path}", crc)
        if not found:
            tried.append(f"debuglink {name} not found")
    else:
        tried.append("no .gnu_debuglink")
    if build_id and search.debuginfod is not None:
        fetched = search.debuginfod.fetch(build_id)
        if fetched is None:
            tried.append(search.debuginfod.why_not(build_id))
        elif stream := _attempt(lambda: open_followed(fetched[0], limit), fetched[0], tried):
            yield Candidate(stream, fetched[1])
