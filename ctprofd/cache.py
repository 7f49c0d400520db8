"""The resolution cache: binary key -> TsdLayout / NotJemalloc / LayoutFailure, in memory
and optionally on disk (one JSON file per key, written atomically).

Keys are `build-id:<hex>` or, for binaries without one, `file:<dev>:<ino>:<size>:<mtime_ns>`.
Failures expire after `failure_ttl` seconds so newly installed debug info is picked up;
the other results describe an immutable file and never expire.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

from .layout import LayoutFailure, Resolution, TsdLayout, resolution_from_dict

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class LayoutCache:
    """Memory cache backed by a directory; any disk problem degrades to memory only."""

    def __init__(self, directory: str | None = None, failure_ttl: float = 600.0) -> None:
        self.directory = os.path.join(directory, "layouts") if directory else None
        self.failure_ttl = failure_ttl
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, tuple[Resolution, float]] = {}
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
                self._memory[key] = entry
                self.hits += 1
                return resolution
        self.misses += 1
        return None

    def put(self, key: str, resolution: Resolution) -> None:
        entry = (resolution, time.time())
        self._memory[key] = entry
        self._store(key, entry)

    def layouts(self) -> list[TsdLayout]:
        """Every layout held in memory, once per build."""
        found = {id(r): r for r, _ in self._memory.values() if isinstance(r, TsdLayout)}
        return list(found.values())

    def memory_keys(self) -> list[str]:
        return list(self._memory)

    def forget(self, keys: set[str]) -> None:
        """Drop memory entries (for example of binaries no process runs any more)."""
        for key in keys:
            self._memory.pop(key, None)

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
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            self._degrade(f"cannot write cache directory {self.directory}: {exc.strerror}")

    def _degrade(self, message: str) -> None:
        if not self._warned:
            log.warning("%s; caching in memory only", message)
            self._warned = True
        self.directory = None
