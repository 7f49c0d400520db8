"""Finding an object's external debug file: build-id path, .gnu_debuglink with CRC, then
debuginfod.

Search order (REFERENCE.md §3): `<debug_dir>/.build-id/xx/rest.debug` for each configured
debug dir; then the debuglink name next to the object, in its `.debug/` subfolder and under
`<debug_dir>/<object dir>/`, rejecting a CRC mismatch; then the debuginfod servers.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

from .debuginfod import DebuginfodClient


@dataclass(frozen=True)
class DebugSearch:
    """Where external debug files are looked for."""

    debug_dirs: tuple[str, ...] = ("/usr/lib/debug",)
    debuginfod: DebuginfodClient | None = None


class DebugFileNotFound(Exception):
    """No usable debug file; the message lists what was tried."""


def build_id_path(debug_dir: str, build_id: str) -> str:
    return os.path.join(debug_dir, ".build-id", build_id[:2], build_id[2:] + ".debug")


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def debuglink_candidates(object_dirs: list[str], name: str, debug_dirs: tuple[str, ...]) -> list[str]:
    """Every path a debuglink name may point at, in gdb's order."""
    paths = []
    for directory in object_dirs:
        paths += [os.path.join(directory, name), os.path.join(directory, ".debug", name)]
    for debug_dir in debug_dirs:  # mirrors the object's own path, not a /proc/PID/root view
        for directory in object_dirs:
            if not directory.startswith("/proc/"):
                paths.append(os.path.join(debug_dir, directory.lstrip("/"), name))
    return list(dict.fromkeys(paths))


def find_debug_file(build_id: str | None, link: tuple[str, int] | None,
                    object_dirs: list[str], search: DebugSearch) -> tuple[str, str]:
    """(path, how it was found) of the external debug file; raises DebugFileNotFound."""
    tried = []
    if build_id:
        for debug_dir in search.debug_dirs:
            path = build_id_path(debug_dir, build_id)
            if os.path.isfile(path):
                return path, f"build-id {path}"
        tried.append(f"no .build-id/{build_id[:2]}/{build_id[2:]}.debug")
    if link:
        name, crc = link
        for path in debuglink_candidates(object_dirs, name, search.debug_dirs):
            if not os.path.isfile(path):
                continue
            actual = file_crc32(path)
            if actual == crc:
                return path, f"debuglink {path}"
            tried.append(f"debuglink {path}: CRC mismatch ({actual:08x} != {crc:08x})")
        if not any("CRC" in t for t in tried):
            tried.append(f"debuglink {name} not found")
    else:
        tried.append("no .gnu_debuglink")
    if build_id and search.debuginfod is not None:
        fetched = search.debuginfod.fetch(build_id)
        if fetched is not None:
            return fetched
        tried.append(search.debuginfod.why_not(build_id))
    raise DebugFileNotFound("; ".join(tried))
