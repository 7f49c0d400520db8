"""The resolution cache: binary key -> TsdLayout / NotJemalloc / LayoutFailure, in memory
and optionally on disk (one JSON file per key, written atomically).

Keys are `file:<dev>:<ino>:<size>:<mtime_ns>` (a file as the kernel names it),
`build-id:<hex>:uid:<owner>` (a layout parsed from a file with that build-id and owner) or
`build-id:<hex>` (imported by the operator); either of the first two ending in
`:view:<view>` when learned in a target's view of the files that is not ctprofd's own (its
mount namespace or root: attach.view_of), where a debug file beside the object may be found
or hidden (all but "not jemalloc" and layouts from DWARF no view changes:
attach._same_in_every_view), which only processes of that view look up. Three stores, so
that nothing a user makes can push out what matters:

- **imported** layouts (`offsets import` into `DIR/imported.json`, and the configured offsets
  files): pinned, never evicted; removed only by the operator (`offsets remove`). The file is
  looked at (a stat) at every `refresh`: a change is read again, and every failure cached
  before it is dropped, so a binary that failed for want of these layouts is retried at once;
  a file that cannot be used is logged once, and the layouts read before are kept.
- **layouts** (`DIR/layouts/`): positive results, at most `max_entries` in memory and on
  disk, and `max_bytes` on disk.
- **negative** results (`DIR/negative/`: "not jemalloc" and failures), bounded alike on
  their own: however many a user makes, they never push out a layout. Failures expire after
  `failure_ttl` seconds, so newly installed debug info is picked up.

Each entry has an owner (the uid owning the file). In both bounded stores every owner holding
entries has an equal share: when one is full, the owner holding the most entries gives up its
least recently used (memory) or oldest written (disk) entry. A user who makes new file
identities at will (touching a binary, mapping thousands of files) evicts its own entries,
never another user's while that one holds no more than its share.

A cache opened read-only (`writable=False`: the CLI beside a daemon that owns the directory)
reads the directory and writes nothing to it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable

from ..files.atomic import write_json
from . import offsets_file
from .layout import LayoutFailure, Resolution, TsdLayout, resolution_from_dict

log = logging.getLogger(__name__)
# 2: layouts carry the arena statistics' layout (1 had none); 3: offsets from machine code
# may carry one from a layout table, and arena layouts what the live process is checked
# against; 4: a failure names the path its message begins with (`subject`); 5: arena
# layouts carry the allocator health members (layouts without them are parsed again); 6:
# positive and negative results in their own directories, each file named with its owner. An
# older entry is parsed again; a new layout table (arena_tables.json) warrants a new
# version, so that binaries it serves are no longer kept without one.
FORMAT_VERSION = 6
IMPORTED_FILE = "imported.json"


def imported_path(directory: str | None) -> str | None:
    """The file holding the layouts `offsets import` pinned in cache `directory`; None
    without one."""
    return os.path.join(directory, IMPORTED_FILE) if directory else None


class Shares:
    """Keys by owner, each owner's least recently used first. The victim, when a store is
    full, is the oldest key of the owner holding the most (equal shares for all owners)."""

    def __init__(self) -> None:
        self._by_owner: dict[int, OrderedDict[str, None]] = {}
        self._owner: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def touch(self, key: str, owner: int) -> None:
        """Add `key` for `owner`, or make it its most recently used."""
        if self._owner.get(key) == owner:  # a hit: most of a snapshot's lookups
            self._by_owner[owner].move_to_end(key)
            return
        self.discard(key)
        self._by_owner.setdefault(owner, OrderedDict())[key] = None
        self._owner[key] = owner

    def discard(self, key: str) -> None:
        owner = self._owner.pop(key, None)
        if owner is not None:
            keys = self._by_owner[owner]
            del keys[key]
            if not keys:
                del self._by_owner[owner]

    def victim(self) -> str:
        """The key to evict: the least recent of the owner holding the most (of equals,
        the highest uid: root's entries go last)."""
        owner = max(self._by_owner, key=lambda o: (len(self._by_owner[o]), o))
        return next(iter(self._by_owner[owner]))

    def owner_of(self, key: str) -> int:
        return self._owner[key]

    def keys(self) -> list[str]:
        return list(self._owner)


class _Store:
    """One bounded store (layouts, or negative results): memory by use, disk by age, both
    evicting by owner shares. Disk problems degrade it to memory only."""

    def __init__(self, directory: str | None, max_entries: int, max_bytes: int,
                 writable: bool, degrade: Callable[[str], None]) -> None:
        self.directory = directory
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.writable = writable
        self._degrade_cb = degrade
        self.memory: dict[str, tuple[Resolution, float]] = {}
        self.used = Shares()  # memory, least recently used first per owner
        self.files: dict[str, tuple[str, int]] = {}  # key -> (file name, bytes) on disk
        self.written = Shares()  # disk, oldest written first per owner
        self.disk_bytes = 0

    def open(self) -> int:
        """Index the directory's files (creating it when writable); returns how many files of
        an older format it removed (read-only: passed over)."""
        if not self.directory:
            return 0
        if self.writable:
            os.makedirs(self.directory, exist_ok=True)
        found, old = [], 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(".json") or not entry.is_file(follow_symlinks=False):
                continue
            stem, _, owner = entry.name[:-len(".json")].rpartition(".u")
            if not stem or not owner.isdigit():
                if self.writable:  # an older ctprofd's file: parsed again when needed
                    self._unlink(entry.name)
                    old += 1
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since listed (a daemon trimming its cache)
                continue
            found.append((st.st_mtime_ns, stem.replace("_", ":"), entry.name, int(owner),
                          st.st_size))
        for _, key, name, owner, size in sorted(found):
            self._index(key, name, owner, size)
        self.trim_disk()
        return old

    def get(self, key: str) -> tuple[Resolution, float] | None:
        """The entry for `key`, from memory or disk, made the most recently used."""
        entry = self.peek(key)
        if entry is not None:
            self.remember(key, entry, self.owner_of(key))
        return entry

    def peek(self, key: str) -> tuple[Resolution, float] | None:
        """The entry for `key`, from memory or disk, leaving what is used untouched."""
        return self.memory.get(key) or self._load(key)

    def owner_of(self, key: str) -> int:
        """The owner of `key`, held in memory or on disk."""
        return (self.used if key in self.used else self.written).owner_of(key)

    def keys(self) -> list[str]:
        """Every key held, in memory or on disk."""
        return list(dict.fromkeys([*self.used.keys(), *self.written.keys()]))

    def remember(self, key: str, entry: tuple[Resolution, float], owner: int) -> None:
        self.memory[key] = entry
        self.used.touch(key, owner)
        while len(self.used) > self.max_entries:
            victim = self.used.victim()
            self.used.discard(victim)
            del self.memory[victim]

    def put(self, key: str, entry: tuple[Resolution, float], owner: int) -> None:
        self.remember(key, entry, owner)
        if not self.directory or not self.writable:
            return
        name = f"{key.replace(':', '_')}.u{owner}.json"
        path = os.path.join(self.directory, name)
        data = {"version": FORMAT_VERSION, "key": key, "owner": owner, "stored_at": entry[1],
                "result": entry[0].to_dict()}
        try:
            size = write_json(path, data)  # ASCII JSON: characters are bytes
        except OSError as exc:
            self._degrade(f"cannot write cache directory {self.directory}: {exc.strerror}")
            return
        if key in self.files and self.files[key][0] != name:
            self._unlink(self.files[key][0])  # the same key under another owner
        self._forget_file(key)
        self._index(key, name, owner, size)
        self.trim_disk()

    def remove(self, key: str) -> None:
        """Forget `key`, in memory and on disk."""
        if key in self.memory:
            del self.memory[key]
            self.used.discard(key)
        if key in self.files and self.directory and self.writable:
            self._unlink(self.files[key][0])
        self._forget_file(key)

    def trim_disk(self) -> None:
        """Remove files, by owner shares, while over `max_entries` or `max_bytes`."""
        while self.files and (len(self.files) > self.max_entries
                              or self.disk_bytes > self.max_bytes):
            victim = self.written.victim()
            if self.writable:
                self._unlink(self.files[victim][0])
            self._forget_file(victim)

    def _index(self, key: str, name: str, owner: int, size: int) -> None:
        self.files[key] = (name, size)
        self.written.touch(key, owner)
        self.disk_bytes += size

    def _forget_file(self, key: str) -> None:
        if key in self.files:
            self.disk_bytes -= self.files.pop(key)[1]
            self.written.discard(key)

    def _load(self, key: str) -> tuple[Resolution, float] | None:
        if not self.directory or key not in self.files:
            return None
        path = os.path.join(self.directory, self.files[key][0])
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            if data.get("version") != FORMAT_VERSION or data.get("key") != key:
                raise ValueError("foreign format version or key")
            return resolution_from_dict(data["result"]), float(data["stored_at"])
        except FileNotFoundError:
            self._forget_file(key)
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._forget_file(key)
            if not self.writable:
                return None
            log.warning("setting aside unusable cache file %s (%s); it will be rebuilt",
                        path, exc)
            try:
                os.replace(path, path + ".corrupt")
            except OSError:
                pass
            return None

    def _unlink(self, name: str) -> None:
        assert self.directory is not None
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass

    def _degrade(self, message: str) -> None:
        self._degrade_cb(message)
        self.directory = None
        self.files.clear()
        self.written = Shares()
        self.disk_bytes = 0


class LayoutCache:
    """Imported layouts, learned layouts and negative results (see the module docstring).
    Safe to use from the snapshot loop and the background resolver at once."""

    def __init__(self, directory: str | None = None, failure_ttl: float = 600.0,
                 max_entries: int = 4096, max_bytes: int = 16 << 20,
                 writable: bool = True) -> None:
        self.root = directory
        self.failure_ttl = failure_ttl
        self.hits = 0
        self.misses = 0
        self._warned = False
        self._lock = threading.RLock()
        self._configured: dict[str, TsdLayout] = {}  # build-id -> layout (offsets_files)
        self._imported: dict[str, TsdLayout] = {}  # build-id -> layout (DIR/imported.json)
        self._imports_seen: tuple[int, int, int] | None = None  # its ino, size, mtime_ns
        self._imported_at = 0.0  # failures cached before this are stale
        self._started = False  # the first refresh (at start) was made
        join = (lambda name: os.path.join(directory, name)) if directory else (lambda _: None)
        self._layouts = _Store(join("layouts"), max_entries, max_bytes, writable, self._degrade)
        self._negative = _Store(join("negative"), max_entries, max_bytes, writable,
                                self._degrade)
        old = 0
        for store in (self._layouts, self._negative):
            try:
                old += store.open()
            except OSError as exc:
                self._degrade(f"cannot create cache directory {store.directory}: "
                              f"{exc.strerror}")
                store.directory = None
        if old:
            log.warning("removed %d cache files of an older ctprofd from %s: their binaries "
                        "are parsed again", old, directory)
        self.refresh()

    @property
    def directory(self) -> str | None:
        """The layouts' directory, None when caching in memory only."""
        return self._layouts.directory

    def __len__(self) -> int:
        """Layouts held in memory (imported ones included)."""
        return len(self._layouts.memory) + len(self._imported) + len(self._configured)

    def pin(self, layouts: list[TsdLayout]) -> None:
        """Layouts of the configured offsets files: held for the cache's life."""
        with self._lock:
            for layout in layouts:
                self._configured[layout.build_id] = layout

    def refresh(self) -> bool:
        """Read `imported.json` again when it changed (a stat otherwise); whether it did.
        Failures cached before the change are stale from then on. A file that cannot be used
        is logged once and the layouts read before are kept."""
        path = imported_path(self.root)
        if path is None:
            return False
        try:
            st = os.stat(path)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        with self._lock:
            first, self._started = not self._started, True
            if seen == self._imports_seen:
                return False
            self._imports_seen = seen
            try:
                layouts = offsets_file.load(path) if seen is not None else []
            except offsets_file.OffsetsFileError as exc:  # logged once: seen from now on
                log.warning("imported layouts unusable, the %d read before are kept: %s",
                            len(self._imported), exc)
                return False
            before = set(self._imported)
            self._imported = {layout.build_id: layout for layout in layouts}
            self._purge_builds(before - set(self._imported))
            # failures found before these layouts were read are stale: for an import seen
            # now, every one cached so far (also one stored after the file's mtime, which the
            # kernel's coarse clock may date a little early); at start, those before the file
            if seen is not None:
                self._imported_at = st.st_mtime_ns / 1e9 if first else time.time()
            if not first:
                log.info("imported layouts changed: %d held in %s; failures cached before are "
                         "tried again", len(self._imported), path)
            return True

    def holds_layout(self, key: str) -> bool:
        """Whether a layout (no negative result) is held in memory under `key` (where the
        background resolver puts what it learns); not counted, no disk read."""
        with self._lock:
            return key in self._layouts.memory

    def get(self, *keys: str) -> Resolution | None:
        """The cached result for the first of `keys` that has one, or None: one lookup,
        counted once (a hit, or a miss)."""
        with self._lock:
            found = next((r for r in map(self._get, keys) if r is not None), None)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
            return found

    def _get(self, key: str) -> Resolution | None:
        if key.startswith("build-id:") and key.count(":") == 1:
            build_id = key.partition(":")[2]
            return self._imported.get(build_id) or self._configured.get(build_id)
        entry = self._layouts.get(key)
        if entry is not None:
            return entry[0]
        entry = self._negative.get(key)
        if entry is None:
            return None
        resolution, stored_at = entry
        if isinstance(resolution, LayoutFailure) and (
                time.time() - stored_at > self.failure_ttl or stored_at < self._imported_at):
            self._negative.remove(key)  # expired, or older than the last import: try again
            return None
        return resolution

    def put(self, key: str, resolution: Resolution, owner: int = 0) -> None:
        """Cache `resolution` for `key`, owned by uid `owner` (the file's owner)."""
        with self._lock:
            entry = (resolution, time.time())
            if isinstance(resolution, TsdLayout):
                self._negative.remove(key)
                self._layouts.put(key, entry, owner)
            else:
                self._layouts.remove(key)
                self._negative.put(key, entry, owner)

    def layouts(self) -> list[TsdLayout]:
        """Every layout held in memory, imported ones included, each object once (a layout
        learned under a file's key and under its build's is one object; `offsets_file.dump`
        keeps one per build-id)."""
        with self._lock:
            found = {id(r): r for r, _ in self._layouts.memory.values()
                     if isinstance(r, TsdLayout)}
            for layout in (*self._configured.values(), *self._imported.values()):
                found[id(layout)] = layout
            return list(found.values())

    def imported(self) -> dict[str, TsdLayout]:
        """The layouts imported into the directory, by build-id."""
        with self._lock:
            return dict(self._imported)

    def configured(self) -> dict[str, TsdLayout]:
        """The layouts of the configured offsets files, by build-id."""
        with self._lock:
            return dict(self._configured)

    def _purge_builds(self, build_ids: set[str]) -> None:
        """Forget the layouts of these builds (their import was removed): what was learned
        through it is not kept, and is resolved again."""
        if not build_ids:
            return
        store = self._layouts
        for key in store.keys():
            entry = store.peek(key)
            if entry is not None and getattr(entry[0], "build_id", None) in build_ids:
                store.remove(key)

    def learned(self) -> list[tuple[str, int, TsdLayout]]:
        """Every learned layout (key, owner, layout), from memory and disk."""
        with self._lock:
            found = []
            for key in self._layouts.keys():
                entry = self._layouts.peek(key) if key.startswith("build-id:") else None
                if entry is not None:
                    found.append((key, self._layouts.owner_of(key), entry[0]))
            return found

    def _degrade(self, message: str) -> None:
        if not self._warned:
            log.warning("%s; caching in memory only", message)
            self._warned = True
