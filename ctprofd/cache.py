"""The resolution cache: binary key -> TsdLayout / NotJemalloc / LayoutFailure, in memory
and optionally on disk (one JSON file per key, written atomically).

Keys are `build-id:<hex>` or, for binaries without one, `file:<dev>:<ino>:<size>:<mtime_ns>`.
Failures expire after `failure_ttl` seconds so newly installed debug info is picked up;
the other results describe an immutable file and never expire. Memory holds the
`max_entries` most recently used.
"""

from __future__ import annotations

import json
from collections import OrderedDict
import logging
import os
import time

from .atomic import write_json

from .layout import LayoutFailure, Resolution, TsdLayout, resolution_from_dict

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class LayoutCache:
    """Memory cache backed by a directory; any disk problem degrades to memory only."""

    def __init__(self, directory: str | None = None, failure_ttl: float = 600.0,
                 max_entries: int = 4096) -> None:
        self.directory = os.path.join(directory, "layouts") if directory else None
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, tuple[Resolution, float]] = OrderedDict()
        self._warned = False
        if self.directory:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as exc:
                self._degrade(f"cannot create cache directory {self.directory}: {exc.strerror}")

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: str) -> Resolution | None:
        """The cached result for `key`, or None (counted as a miss)."""
        entry = self._memory.get(key) or self._load(key)
        if entry is not None:
            resolution, stored_at = entry
            if not (isinstance(resolution, LayoutFailure)
                    and time.time() - stored_at > self.failure_ttl):
                self._remember(key, entry)
                self.hits += 1
                return resolution
        self.misses += 1
        return None

    def put(self, key: str, resolution: Resolution) -> None:
        entry = (resolution, time.time())
        self._remember(key, entry)
        self._store(key, entry)

    def _remember(self, key: str, entry: tuple[Resolution, float]) -> None:
        """Keep `entry` in memory as the most recently used, evicting the least."""
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def forget_failures(self) -> None:
        """Drop every cached failure, in memory and on disk, so that the next lookup tries
        again at once (after an offsets import, say) instead of after `failure_ttl`."""
        for key in [k for k, (r, _) in self._memory.items() if isinstance(r, LayoutFailure)]:
            del self._memory[key]
        if not self.directory:
            return
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as f:
                    failed = json.load(f)["result"]["kind"] == "failure"
                if failed:
                    os.unlink(path)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours to judge: _load sets unusable files aside

    def layouts(self) -> list[TsdLayout]:
        """Every layout held in memory, once per build."""
        found = {id(r): r for r, _ in self._memory.values() if isinstance(r, TsdLayout)}
        return list(found.values())

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, key.replace(":", "_") + ".json")

    def _load(self, key: str) -> tuple[Resolution, float] | None:
        if not self.directory:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            if data.get("version") != FORMAT_VERSION or data.get("key") != key:
                raise ValueError("foreign format version or key")
            return resolution_from_dict(data["result"]), float(data["stored_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("setting aside unusable cache file %s (%s); it will be rebuilt",
                        path, exc)
            try:
                os.replace(path, path + ".corrupt")
            except OSError:
                pass
            return None

    def _store(self, key: str, entry: tuple[Resolution, float]) -> None:
        if not self.directory:
            return
        data = {"version": FORMAT_VERSION, "key": key, "stored_at": entry[1],
                "result": entry[0].to_dict()}
        try:
            write_json(self._path(key), data)
        except OSError as exc:
            self._degrade(f"cannot write cache directory {self.directory}: {exc.strerror}")

    def _degrade(self, message: str) -> None:
        if not self._warned:
            log.warning("%s; caching in memory only", message)
            self._warned = True
        self.directory = None
