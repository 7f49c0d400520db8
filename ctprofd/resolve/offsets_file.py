"""Portable offsets: layouts keyed by build-id, written where debug info is installed and
read on hosts that only have the stripped binaries."""

from __future__ import annotations

import json
import re

from ..files.atomic import write_json
from ..files.regular import read_regular
from .layout import TsdLayout, resolution_from_dict

FORMAT = "ctprofd-offsets"
VERSION = 1
MAX_BYTES = 64 << 20  # about 100,000 layouts
_BUILD_ID = re.compile(r"^[0-9a-f]{8,128}$")


class OffsetsFileError(Exception):
    """An offsets file that cannot be used; the message names the file and the entry."""


def dump(layouts: list[TsdLayout], path: str) -> int:
    """Write the layouts that have a build-id, atomically; returns how many."""
    entries = {layout.build_id: layout.to_dict() for layout in layouts if layout.build_id}
    data = {"format": FORMAT, "version": VERSION, "layouts": dict(sorted(entries.items()))}
    write_json(path, data, indent=2)
    return len(entries)


def load(path: str) -> list[TsdLayout]:
    """Read and validate an offsets file; raises OffsetsFileError with a one-line reason."""
    try:
        data = json.loads(read_regular(path, MAX_BYTES))
    except OSError as exc:
        raise OffsetsFileError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise OffsetsFileError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OffsetsFileError(f"{path}: not a ctprofd offsets file (format != {FORMAT!r})")
    if data.get("version") != VERSION:
        raise OffsetsFileError(f"{path}: unsupported version {data.get('version')!r}")
    entries = data.get("layouts")
    if not isinstance(entries, dict):
        raise OffsetsFileError(f"{path}: layouts: expected a mapping of build-id to layout")
    layouts = []
    for build_id, entry in entries.items():
        where = f"{path}: layouts.{build_id}"
        if not _BUILD_ID.match(build_id):
            raise OffsetsFileError(f"{where}: not a build-id")
        try:
            layout = resolution_from_dict(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OffsetsFileError(f"{where}: invalid layout: {exc}") from None
        if not isinstance(layout, TsdLayout) or layout.build_id != build_id:
            raise OffsetsFileError(f"{where}: entry is not a layout for this build-id")
        layouts.append(layout)
    return layouts
