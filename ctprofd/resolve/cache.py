"""The resolution cache: binary key -> TsdLayout / NotJemalloc / LayoutFailure, in memory
and optionally on disk (one JSON file per key, written atomically).

Keys are `file:<dev>:<ino>:<size>:<mtime_ns>` (a file as the kernel names it),
`build-id:<hex>:uid:<owner>` (a layout parsed from a file with that build-id and owner) or
`build-id:<hex>` (imported from an offsets file); either of the first two ending in
`:view:<view>` when learned from a debug file beside the object in a target's view of the
files that is not ctprofd's own (its mount namespace or root: attach.view_of), which only
processes of that view look up. Failures expire after `failure_ttl`
seconds so newly installed debug info is picked up, and are then removed; the other
results describe an immutable file. Both memory and disk hold at most `max_entries`, and
the disk at most `max_bytes`, evicting the least recently used (memory) or written (disk):
a user who makes new file identities at will (touching a binary) cannot grow either. A
cache opened read-only (`writable=False`: the CLI beside a daemon that owns the directory)
reads the directory and writes nothing to it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict

from ..files.atomic import write_json
from .layout import LayoutFailure, Resolution, TsdLayout, resolution_from_dict

log = logging.getLogger(__name__)
# 2: layouts carry the arena statistics' layout (1 had none); 3: offsets from machine code
# may carry one from a layout table, and arena layouts what the live process is checked
# against; 4: a failure names the path its message begins with (`subject`); 5: arena
# layouts carry the allocator health members (layouts without them are parsed again). An
# older entry is parsed again; a new layout table (arena_tables.json) warrants a new
# version, so that binaries it serves are no longer kept without one.
FORMAT_VERSION = 5


class LayoutCache:
    """Memory cache backed by a directory; any disk problem degrades to memory only. Safe
    to use from the snapshot loop and the background resolver at once."""

    def __init__(self, directory: str | None = None, failure_ttl: float = 600.0,
                 max_entries: int = 4096, max_bytes: int = 16 << 20,
                 writable: bool = True) -> None:
        self.directory = os.path.join(directory, "layouts") if directory else None
        self.writable = writable
        self.failure_ttl = failure_ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._memory: OrderedDict[str, tuple[Resolution, float]] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()  # on disk: name -> bytes, by age
        self._warned = False
        self._lock = threading.RLock()
        if self.directory and writable:
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._files = _existing_files(self.directory)
            except OSError as exc:
                self._degrade(f"cannot create cache directory {self.directory}: {exc.strerror}")
            self._trim_disk()

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: str) -> Resolution | None:
        """The cached result for `key`, or None (counted as a miss)."""
        with self._lock:
            entry = self._memory.get(key) or self._load(key)
            if entry is not None:
                resolution, stored_at = entry
                if not (isinstance(resolution, LayoutFailure)
                        and time.time() - stored_at > self.failure_ttl):
                    self._remember(key, entry)
                    self.hits += 1
                    return resolution
                self._memory.pop(key, None)  # an expired failure: gone from memory and disk
                if self.directory and self.writable:
                    self._remove(os.path.basename(self._path(key)))
            self.misses += 1
            return None

    def put(self, key: str, resolution: Resolution) -> None:
        with self._lock:
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
        with self._lock:
            for key in [k for k, (r, _) in self._memory.items()
                        if isinstance(r, LayoutFailure)]:
                del self._memory[key]
            if not self.directory or not self.writable:
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
                        self._remove(name)
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # not ours to judge: _load sets unusable files aside

    def layouts(self) -> list[TsdLayout]:
        """Every layout held in memory, once per build."""
        with self._lock:
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
            version = data.get("version")
            if type(version) is int and 0 < version < FORMAT_VERSION:
                return None  # an older ctprofd's: parsed again, and overwritten
            if version != FORMAT_VERSION or data.get("key") != key:
                raise ValueError("foreign format version or key")
            return resolution_from_dict(data["result"]), float(data["stored_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            if not self.writable:
                return None
            log.warning("setting aside unusable cache file %s (%s); it will be rebuilt",
                        path, exc)
            try:
                os.replace(path, path + ".corrupt")
            except OSError:
                pass
            self._files.pop(os.path.basename(path), None)
            return None

    def _store(self, key: str, entry: tuple[Resolution, float]) -> None:
        if not self.directory or not self.writable:
            return
        data = {"version": FORMAT_VERSION, "key": key, "stored_at": entry[1],
                "result": entry[0].to_dict()}
        path = self._path(key)
        try:
            write_json(path, data)
            size = os.path.getsize(path)
        except OSError as exc:
            self._degrade(f"cannot write cache directory {self.directory}: {exc.strerror}")
            return
        name = os.path.basename(path)
        self._files[name] = size
        self._files.move_to_end(name)
        self._trim_disk()

    def _trim_disk(self) -> None:
        """Remove the oldest files while over `max_entries` or `max_bytes`."""
        total = sum(self._files.values())
        while self._files and (len(self._files) > self.max_entries or total > self.max_bytes):
            name, size = next(iter(self._files.items()))
            self._remove(name)
            total -= size

    def _remove(self, name: str) -> None:
        """Delete one cache file (already gone is fine)."""
        self._files.pop(name, None)
        assert self.directory is not None
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass

    def _degrade(self, message: str) -> None:
        if not self._warned:
            log.warning("%s; caching in memory only", message)
            self._warned = True
        self.directory = None


def _existing_files(directory: str) -> OrderedDict[str, int]:
    """The cache files in `directory`, oldest written first, with their sizes."""
    found = []
    for entry in os.scandir(directory):
        if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            found.append((st.st_mtime_ns, entry.name, st.st_size))
    return OrderedDict((name, size) for _, name, size in sorted(found))
