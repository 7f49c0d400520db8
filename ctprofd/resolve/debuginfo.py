"""Finding an object's external debug file: build-id path, .gnu_debuglink, then debuginfod.

Search order (REFERENCE.md §3): `<debug_dir>/.build-id/xx/rest.debug` for each configured
debug dir; then the debuglink name next to the object, in its `.debug/` subfolder and under
`<debug_dir>/<object dir>/`; then the debuginfod servers. Candidates are opened here, once
(files.target); whether a debuglink candidate has the CRC the object names is checked on
that descriptor by the caller (in the sandboxed worker).

The configured debug dirs and the debuginfod download dir are the operator's: their paths
are followed as they are. A directory beside the object belongs to the object's owner:
it is opened below the target's root without following any symlink, and a debug file there
is taken only when the object's owner or root owns it and neither group nor others may
write it (a user cannot vouch for another user's object, say root's library bind-mounted
into the user's directory). Whether each file is the object's (its build-id, a debuglink's
CRC) is checked on its descriptor by the caller, in the sandboxed worker.
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
    ("/", or /proc/PID/root for a process in another mount namespace). `view` names that
    view when it is not ctprofd's own ("" when it is): what is found there is cached
    under it."""

    root: str
    path: str
    view: str = ""


@dataclass
class Candidate:
    """An open debug file, how it was found, the CRC32 it must have (a debuglink's), and
    the view it was found in when beside the object in a view not ctprofd's own."""

    stream: BinaryIO
    source: str
    crc: int | None = None
    view: str = ""


def build_id_path(debug_dir: str, build_id: str) -> str:
    return os.path.join(debug_dir, ".build-id", build_id[:2], build_id[2:] + ".debug")


def stream_crc32(stream: BinaryIO) -> int:
    """CRC32 of a whole open file, read with pread (the file offset is left alone)."""
    crc, offset, fd = 0, 0, stream.fileno()
    while chunk := os.pread(fd, 1 << 20, offset):
        crc = zlib.crc32(chunk, crc)
        offset += len(chunk)
    return crc


def owner_refusal(st: os.stat_result, owner: int) -> str | None:
    """Why a debug file beside an object of uid `owner` cannot vouch for it, or None: it
    must be the object owner's or root's, and writable by neither group nor others."""
    if st.st_uid not in (owner, 0):
        return f"owned by uid {st.st_uid}, neither the object's owner (uid {owner}) nor root"
    if st.st_mode & 0o022:
        return f"writable by {'group' if st.st_mode & 0o020 else 'others'} (mode {st.st_mode & 0o7777:o})"
    return None


def _attempt(open_file: Callable[[], tuple[int, os.stat_result]], path: str,
             tried: list[str], beside: int | None) -> BinaryIO | None:
    """The file `open_file` opens, or None (a missing one silently, others said in
    `tried`). `beside`: the owner (uid) of the object a file beside it must pass
    `owner_refusal` for; None for a file in the operator's places, taken as it is."""
    try:
        fd, st = open_file()
    except FileNotFoundError:
        return None
    except OSError as exc:
        tried.append(f"{path}: {exc.strerror or exc}")
        return None
    if beside is not None and (why := owner_refusal(st, beside)):
        os.close(fd)
        tried.append(f"{path}: refused: {why}")
        return None
    return os.fdopen(fd, "rb")


def debug_files(build_id: str | None, link: tuple[str, int] | None,
                object_dirs: list[ObjectDir], search: DebugSearch,
                tried: list[str], owner: int) -> Iterator[Candidate]:
    """Every debug file that may be the object's (owned by uid `owner`), opened, in gdb's
    order; appends to `tried` why the others were not."""
    limit = search.max_bytes
    if build_id:
        for debug_dir in search.debug_dirs:
            path = build_id_path(debug_dir, build_id)
            if stream := _attempt(lambda: open_followed(path, limit), path, tried, None):
                yield Candidate(stream, f"build-id {path}")
        tried.append(f"no .build-id/{build_id[:2]}/{build_id[2:]}.debug")
    if link:
        name, crc = link
        found = False
        owners = [(d, os.path.join(d.path, sub, name))
                  for d in object_dirs for sub in ("", ".debug")]
        operators = [os.path.join(debug_dir, d.path.lstrip("/"), name)
                     for debug_dir in search.debug_dirs for d in object_dirs]
        openers = [(path, lambda d=d, path=path: open_beneath(d.root, path, limit), d.view,
                    owner) for d, path in owners]
        openers += [(path, lambda path=path: open_followed(path, limit), "", None)
                    for path in operators]
        for path, open_file, view, beside in openers:
            if stream := _attempt(open_file, f"debuglink {path}", tried, beside):
                found = True
                yield Candidate(stream, f"debuglink {path}", crc, view)
        if not found:
            tried.append(f"debuglink {name} not found")
    else:
        tried.append("no .gnu_debuglink")
    if build_id and search.debuginfod is not None:
        fetched = search.debuginfod.fetch(build_id)
        if fetched is None:
            tried.append(search.debuginfod.why_not(build_id))
        elif stream := _attempt(lambda: open_followed(fetched[0], limit), fetched[0], tried,
                                None):
            yield Candidate(stream, fetched[1])
