"""Attaching to one tgid: which binary it runs, whether jemalloc is in it (the executable
or a shared object), and where each thread's TSD lies relative to its thread pointer.
Every distinct binary is parsed at most once; results are cached by identity and build-id."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from elftools.common.exceptions import ELFError

from ..files.regular import FileRefused
from ..files.target import open_beneath, open_followed
from ..procfs.processes import (Mapping, ProcessInfo, code_objects, code_objects_digest,
                                parse_maps, read_maps, read_maps_bytes)
from ..report import tags
from ..report.tags import ProbeError
from . import elf
from .cache import LayoutCache
from .debuginfo import DebugSearch, ObjectDir
from .loader import LoaderFacts, LoaderLayout, place
from .layout import (LayoutFailure, NotJemalloc, ObjectFacts, Resolution, TsdLayout, applies_to,
                     object_dirs_for, resolve)
from .parse_worker import ParseWorker, WorkerLimits
from .resolver import BackgroundResolver
from .retry import RetrySchedule

Opener = Callable[[], tuple[int, os.stat_result]]  # opens a target's file once: fd, fstat
Found = tuple["BinaryIdentity", Opener]  # a mapped object's identity, and how to open it
Mapped = tuple[str, int, str]  # a code object as mapped: map_files name, inode and path

log = logging.getLogger(__name__)
# The loader's objects, by the names glibc gives them; what they hold is checked by their
# symbols (loader.py), the name only spares parsing every other mapped object for them.
LOADER_OBJECT = re.compile(r"^(?:ld-linux[\w.-]*\.so[\d.]*|ld-[\d.]+\.so|libc\.so\.6|libc-[\d.]+\.so)$")
LOADER_CACHE_MAX = 64
# Code objects of one process not resolved yet (not in the cache) looked at per attach: the
# background resolver takes no more jobs than this at a time anyway (max_jobs), so a process
# mapping 20,000 distinct files costs this many opens per snapshot, not 20,000, and its other
# objects wait for the next snapshots (the process stays pending meanwhile).
UNRESOLVED_MAX = 64
# What the stat of each code object gave, per process (pid, start time), while it stays
# mapped as it was: a process looked at again (pending, or failed) is not statted object by
# object again, whatever else it mapped since (anonymous memory, the heap growing). For at
# most MAPS_MEMO_PROCESSES processes (the least recently looked at forgotten first) and
# MAPS_MEMO_OBJECTS objects each, so that this memory never grows with what targets map.
MAPS_MEMO_PROCESSES = 64
MAPS_MEMO_OBJECTS = 1024
# A process still pending once its looks at its maps (each handing the resolver up to
# UNRESOLVED_MAX objects) have read more than PENDING_MAPS_LINES lines in all is looked at
# again after 1, 2, 4 ... PENDING_BACKOFF_MAX snapshots, not at every one: reading and parsing
# the maps of a process mapping 20,000 objects takes ~170 ms, and one mapping more distinct
# objects than the cache holds stays pending for ever. A process whose maps are a few
# thousand lines is looked at at every snapshot until it is attached, as before. Looks are
# counted for at most PENDING_PROCESSES processes (the least recently pending forgotten).
PENDING_MAPS_LINES = 16_384
PENDING_BACKOFF_MAX = 64
PENDING_PROCESSES = 4096
# Processes whose maps read the very same bytes (the fork() children of one parent, the
# workers of a pool), in the same view of the files and running the same executable, map
# the same files (device, inode, path) at the same addresses: once one of them was found to
# have no jemalloc, every object looked up, the others with those maps have none either, and
# their maps are neither parsed nor their objects statted and looked up again. Remembered
# within one snapshot only (`begin`), the maps' bytes themselves (no digest to collide), for
# at most SHAPES_MAX_BYTES of them in all.
SHAPES_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class BinaryIdentity:
    """A file as the kernel sees it, from a stat through /proc: no open needed."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    uid: int = field(default=0, compare=False)  # the owner: its share of the cache

    @property
    def key(self) -> str:
        return f"file:{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}"

    @classmethod
    def of(cls, st: os.stat_result) -> BinaryIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_uid)


@dataclass(frozen=True)
class Attachment:
    """A jemalloc process understood: addr(tsd) = fs_base + tsd_delta. For jemalloc in a
    shared object the delta is in the target's GOT slot at `got_slot`, read only once a
    thread was seized (so a refused ptrace shows as the privilege failure it is)."""

    layout: TsdLayout
    tsd_delta: int | None = None
    got_slot: int | None = None
    base: int | None = None  # where the jemalloc object is mapped, for its arena statistics
    loader: LoaderLayout | None = None  # general-dynamic TLS: the block is behind the DTV


def learned_key(build_id: str, owner: int) -> str:
    """Cache key of a layout parsed from a file with this build-id and owner (uid): one
    user's file never vouches for another's. `build-id:<hex>` alone is the operator's
    (offsets files)."""
    return f"build-id:{build_id}:uid:{owner}"


def view_key(key: str, view: str) -> str:
    """A cache key for what was learned in a target's own view of the files (its mount
    namespace or root), where a debug file beside the object may be found or hidden (see
    _same_in_every_view): only that view hits it."""
    return f"{key}:view:{view}" if view else key


def _cached_under(key: str, view: str) -> tuple[str, ...]:
    """Where a file of identity `key` resolved in `view` may be cached: its plain key (what
    every view shares) and, for a view not ctprofd's own, that view's key."""
    return (key, view_key(key, view)) if view else (key,)


def _same_in_every_view(resolution: Resolution) -> bool:
    """Whether a file resolved in a target's view of the files resolves alike in every view:
    "not jemalloc" (told by the file alone), or a layout from DWARF no view changes (the
    file's own, the operator's debug dirs, debuginfod, offsets files). Not a layout from a
    debug file beside the object in that view, nor one from machine code, nor a failure: a
    debug file beside it in another view (hidden in this one) may give another."""
    return isinstance(resolution, NotJemalloc) or (
        isinstance(resolution, TsdLayout) and resolution.code_source is None
        and not resolution.view)


def _own_view() -> tuple[int, int, int]:
    """ctprofd's own mount namespace and root directory."""
    ns, root = os.stat("/proc/self/ns/mnt"), os.stat("/")
    return ns.st_ino, root.st_dev, root.st_ino


def view_of(process: ProcessInfo, own: tuple[int, int, int]) -> str:
    """A name for the process's view of the files: its mount namespace, root directory and
    uid (a namespace's number may be reused by another user's); one process's own when they
    cannot be read; empty when it sees the files as ctprofd does (same namespace and root)."""
    try:
        ns, root = _namespace_inode(process.path("ns/mnt")), os.stat(process.path("root"))
    except OSError:
        return f"pid:{process.pid}:{process.start_time}"
    if (ns, root.st_dev, root.st_ino) == own:
        return ""
    return f"mnt:{ns}:root:{root.st_dev}:{root.st_ino}:uid:{process.uid}"


def _namespace_inode(link: str) -> int:
    """The inode number of the namespace a /proc/PID/ns/* link names ("mnt:[4026531841]"),
    from the link's text: cheaper than a stat() through it. Raises OSError."""
    text = os.readlink(link)
    kind, _, rest = text.partition(":[")
    if not kind or not rest.endswith("]") or not rest[:-1].isdecimal():
        raise OSError(f"{link}: {text!r}: not a namespace")
    return int(rest[:-1])


def identity_of(path: str) -> BinaryIdentity:
    """stat() of a /proc magic link (exe, map_files/…); raises OSError."""
    return BinaryIdentity.of(os.stat(path))


def exe_identity(process: ProcessInfo) -> BinaryIdentity:
    """Identity of the running executable; raises ProbeError(readlink-failure)."""
    try:
        return identity_of(process.path("exe"))
    except OSError as exc:
        raise ProbeError(tags.READLINK_FAILURE,
                         f"pid {process.pid}: /proc/{process.pid}/exe: {exc.strerror}",
                         exc.errno) from None


def _mapped_file(process: ProcessInfo, mapping: Mapping,
                 max_bytes: int) -> tuple[BinaryIdentity, Opener] | None:
    """The identity of the very file behind a mapping, and how to open it.

    /proc/PID/map_files needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE) unless we are root;
    without it, the path inside the target's root is used when it is still the same inode
    (opened without following a symlink). None when neither works (unmapped since the maps
    were read, or replaced on disk)."""
    link = process.path("map_files", mapping.map_files_name)
    try:
        return identity_of(link), lambda: open_followed(link, max_bytes)
    except PermissionError:
        pass
    except OSError:
        return None
    root = process.path("root")
    try:
        identity = identity_of(os.path.join(root, mapping.path.lstrip("/")))
    except OSError:
        return None
    if identity.ino != mapping.inode:
        return None

    def open_same_inode() -> tuple[int, os.stat_result]:
        fd, st = open_beneath(root, mapping.path, max_bytes)
        if st.st_ino != mapping.inode:
            os.close(fd)
            raise FileNotFoundError(f"{mapping.path}: replaced on disk")
        return fd, st
    return identity, open_same_inode


def _exe_base(process: ProcessInfo, identity: BinaryIdentity) -> int | None:
    """Where the executable's first page is mapped; None when the maps do not say."""
    try:
        mappings = read_maps(process)
    except OSError:
        return None
    for mapping in mappings:
        if mapping.offset == 0 and mapping.inode == identity.ino:
            return mapping.start
    return None


class Pending(Exception):
    """The binary (or a shared object) of the process is being resolved in the background:
    the process is not attached yet, and that is no failure. `keys`: the cache keys the
    files it waits for may be resolved under (each one's plain key, and its view's)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


class Attacher:
    """Resolves processes to Attachments. Binaries are parsed in a sandboxed worker
    process (parse_worker); `close()` stops it."""

    def __init__(self, cache: LayoutCache, search: DebugSearch,
                 limits: WorkerLimits = WorkerLimits(),
                 background: BackgroundResolver | None = None) -> None:
        self.cache = cache
        self.search = search
        self.worker = ParseWorker(limits)
        self.background = background  # None: parse right away, in the caller's thread
        self.elf_opens = 0  # binaries parsed since start: no growth on an unchanged host
        self.submitted = 0  # binaries handed to the background resolver since start
        self.retries = RetrySchedule()
        self.loaders: dict[str, LoaderFacts | LayoutFailure] = {}  # "loader:" + identity key
        self.own_view = _own_view()
        self._mapped: OrderedDict[tuple[int, int], dict[Mapped, Found | None]] = (
            OrderedDict())  # see MAPS_MEMO_PROCESSES
        # the files a process's last look left in the background resolver's queue (as many
        # processes): while they are still being resolved its maps are not read again
        self._waiting: OrderedDict[tuple[int, int], tuple[str, ...]] = OrderedDict()
        # per pending process: (maps lines its looks read, looks put off since, snapshots
        # left before the next one)
        self._looks: OrderedDict[tuple[int, int], tuple[int, int, int]] = OrderedDict()
        # see SHAPES_MAX_BYTES: (view, executable's identity and path, maps) -> the result
        self._shapes: dict[tuple[str, str, str, bytes], NotJemalloc] = {}
        self._shapes_bytes = 0

    def begin(self) -> None:
        """A new snapshot: forget the maps found to have no jemalloc in the last one."""
        self._shapes.clear()
        self._shapes_bytes = 0

    def close(self) -> None:
        """Stop the worker; when a background parse is still running, the worker is left
        to it (it ends with the daemon's process)."""
        if self.background is not None:
            self.background.close()
            if self.background.busy:
                return
        self.worker.close()

    def attach(self, process: ProcessInfo, identity: BinaryIdentity) -> Attachment | NotJemalloc:
        """Attach to a process; raises ProbeError with the attach tag on failure."""
        exe = process.path("exe")
        view = view_of(process, self.own_view)
        resolution = self._resolve(lambda: open_followed(exe, self.worker.limits.max_file_bytes),
                                   identity, process.exe, view,
                                   lambda: object_dirs_for(process.exe, process.path("root"),
                                                           view), False)
        if isinstance(resolution, TsdLayout):
            base = _exe_base(process, identity) if resolution.arena is not None else None
            return Attachment(resolution, tsd_delta=resolution.static_tsd_delta(), base=base)
        return self._attach_shared(process, identity, view)

    def resolve_file(self, path: str) -> Resolution:
        """A file the operator names (`ctprofd offsets BINARY`), looked up and parsed as a
        process's binary is: cache, offsets files, debug dirs and debuginfod. A shared
        library or an executable by its ELF type. Raises OSError when it cannot be opened."""
        limit = self.worker.limits.max_file_bytes
        fd, st = open_followed(path, limit)
        with os.fdopen(fd, "rb") as stream:
            try:
                shared = elf.is_shared_library(elf.open_elf(stream))
            except (ELFError, ValueError) as exc:
                return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{path}: not an ELF file: {exc}")
        try:
            return self._resolve(lambda: open_followed(path, limit), BinaryIdentity.of(st),
                                 path, "", lambda: object_dirs_for(path, "/"), shared)
        except ProbeError as error:
            return LayoutFailure(error.tag, error.message)

    def _resolve(self, open_file: Opener, identity: BinaryIdentity, what: str, view: str,
                 dirs: Callable[[], list[ObjectDir]], shared: bool) -> Resolution:
        """A binary's resolution from the cache, or by parsing it once: opened once, and
        that descriptor parsed in the worker (in the background resolver when there is
        one: Pending is raised meanwhile). Raises ProbeError for a LayoutFailure. `view`:
        the target's view of the files (view_of); `dirs`: where its debug files may be
        (object_dirs_for, in that view), asked only for a parse."""
        resolution = self.cache.get(*_cached_under(identity.key, view))
        if resolution is None:
            if self.background is not None and self.background.queued(identity.key):
                raise Pending(f"{what}: being resolved", _cached_under(identity.key, view))
            postponed = self.retries.postponed(identity.key)
            if postponed:
                raise ProbeError(tags.DWARF_PARSE_FAILURE, f"{what}: {postponed}")
            try:
                fd, st = open_file()
            except FileRefused as exc:
                resolution = LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{what}: {exc.strerror}",
                                           subject=what)
                self.cache.put(identity.key, resolution, identity.uid)
            except OSError as exc:
                raise ProbeError(tags.READLINK_FAILURE, f"open {what}: {exc.strerror or exc}",
                                 exc.errno) from None
            else:
                object_dirs = dirs()
                if self.background is None:
                    resolution = self._parse(fd, st, what, object_dirs, shared)
                else:
                    key = BinaryIdentity.of(st).key
                    if self.background.submit(
                            key, st.st_uid,
                            lambda: self._parse_quietly(fd, st, what, object_dirs, shared)):
                        self.submitted += 1
                    else:
                        os.close(fd)  # queued already, or the queues are full: next time
                    raise Pending(f"{what}: being resolved", _cached_under(key, view))
        if isinstance(resolution, LayoutFailure):  # named as this process has the file
            raise ProbeError(resolution.tag, resolution.about(what).message)
        return resolution

    def _parse(self, fd: int, st: os.stat_result, what: str, object_dirs: list[ObjectDir],
               shared: bool) -> Resolution:
        """Parse an opened file (closing it) and cache what it gave. Raises ProbeError when
        the worker was lost: not the binary's doing, so parsed again later, never cached."""
        identity = BinaryIdentity.of(st)  # of the file opened
        with os.fdopen(fd, "rb") as stream:
            self.elf_opens += 1
            view = object_dirs[0].view  # object_dirs_for gives one directory
            resolution = resolve(self.worker, stream, what, object_dirs, self.search, shared,
                                 known=lambda facts: self._known(facts, st.st_uid, view))
        if isinstance(resolution, LayoutFailure) and resolution.lost:
            delay = self.retries.failed(identity.key)
            log.warning("%s; parsing it again in %g s", resolution.message, delay)
            raise ProbeError(resolution.tag, resolution.message)
        self.retries.succeeded(identity.key)
        if isinstance(resolution, LayoutFailure):
            resolution = resolution.about(what)  # the path its message names, kept with it
        scope = "" if _same_in_every_view(resolution) else view
        if isinstance(resolution, TsdLayout) and resolution.build_id:
            self.cache.put(view_key(learned_key(resolution.build_id, st.st_uid), scope),
                           resolution, st.st_uid)
        self.cache.put(view_key(identity.key, scope), resolution, st.st_uid)
        return resolution

    def _parse_quietly(self, fd: int, st: os.stat_result, what: str,
                       object_dirs: list[ObjectDir], shared: bool) -> None:
        """`_parse` in the background resolver: a lost worker is already logged."""
        try:
            self._parse(fd, st, what, object_dirs, shared)
        except ProbeError:
            pass

    def _known(self, facts: ObjectFacts, owner: int, view: str) -> TsdLayout | None:
        """A layout for this build-id learned from a file of the same owner (in any view,
        or in this `view` from a debug file found there), or imported by the operator, that
        is shown to apply to the file `facts` describe."""
        assert facts.build_id is not None
        learned = learned_key(facts.build_id, owner)
        keys = [*_cached_under(learned, view), f"build-id:{facts.build_id}"]
        for key in keys:
            found = self.cache.get(key)
            if isinstance(found, TsdLayout) and applies_to(found, facts):
                return found
        return None

    def _mapped_memo(self, process: ProcessInfo,
                     objects: list[Mapping]) -> dict[Mapped, Found | None]:
        """What the stats of `process`'s code objects gave (identity and opener), kept for
        those of `objects` still mapped as they were."""
        present = {(m.map_files_name, m.inode, m.path) for m in objects}
        held = self._mapped.pop(process.key, {})
        memo = self._mapped[process.key] = {k: v for k, v in held.items() if k in present}
        while len(self._mapped) > MAPS_MEMO_PROCESSES:
            self._mapped.popitem(last=False)
        return memo

    def _still_waiting(self, process: ProcessInfo) -> bool:
        """Whether files `process` waits for are still queued and none of those resolved
        yet is jemalloc: its maps are not read again meanwhile (a process mapping 20,000
        objects would cost 170 ms of reading and parsing them every snapshot)."""
        keys = self._waiting.get(process.key, ())
        return (self.background is not None and any(self.background.queued(k) for k in keys)
                and not any(self.cache.holds_layout(k) for k in keys))

    def _attach_shared(self, process: ProcessInfo, identity: BinaryIdentity,
                       view: str) -> Attachment | NotJemalloc:
        """Attach through a shared object holding jemalloc; `identity`: its executable's,
        `view`: the process's view of the files (view_of)."""
        if self._backing_off(process) or self._still_waiting(process):
            raise Pending(f"pid {process.pid}: its objects are being resolved")
        self._waiting.pop(process.key, None)
        try:
            data = read_maps_bytes(process)
        except OSError as exc:
            raise ProbeError(tags.MAPS_READ_FAILURE,
                             f"pid {process.pid}: maps: {exc.strerror}") from None
        shape = (view, identity.key, process.exe, data)  # see SHAPES_MAX_BYTES
        result = self._shapes.get(shape)
        if result is None:
            mappings = parse_maps(data.decode("utf-8", "replace"))
            result, complete = self._attach_mapped(process, mappings, view)
            if (complete and isinstance(result, NotJemalloc)
                    and self._shapes_bytes + len(data) <= SHAPES_MAX_BYTES):
                self._shapes[shape] = result
                self._shapes_bytes += len(data)
        self._mapped.pop(process.key, None)  # attached, or no jemalloc: not looked at again
        self._looks.pop(process.key, None)
        return result

    def _backing_off(self, process: ProcessInfo) -> bool:
        """Whether `process`'s next look at its maps is still put off (one snapshot fewer
        now): see PENDING_MAPS_LINES."""
        lines, misses, skip = self._looks.get(process.key, (0, 0, 0))
        if skip:
            self._looks[process.key] = (lines, misses, skip - 1)
        return skip > 0

    def _looked(self, process: ProcessInfo, lines: int) -> None:
        """Count a look at `lines` lines of maps that left `process` pending, and put off
        the next once they pass PENDING_MAPS_LINES."""
        lines_read, misses, _ = self._looks.pop(process.key, (0, 0, 0))
        lines_read += lines
        if lines_read > PENDING_MAPS_LINES:
            misses += 1
        self._looks[process.key] = (lines_read, misses,
                                    min(1 << (misses - 1), PENDING_BACKOFF_MAX) if misses else 0)
        while len(self._looks) > PENDING_PROCESSES:
            self._looks.popitem(last=False)

    def _attach_mapped(self, process: ProcessInfo, mappings: list[Mapping],
                       view: str) -> tuple[Attachment | NotJemalloc, bool]:
        """`_attach_shared` once the maps are read, and whether every code object's file was
        found (none unmapped or replaced meanwhile); each code object is statted once while
        it stays mapped (see MAPS_MEMO_PROCESSES)."""
        exe = process.exe  # as the maps name it: " (deleted)" in both once it is gone
        objects = code_objects(mappings)
        memo = self._mapped_memo(process, objects)
        pending: Pending | None = None  # objects not resolved yet are queued at once
        queued: list[str] = []  # their identity keys
        unresolved = 0  # ... up to UNRESOLVED_MAX of them
        complete = True
        for mapping in objects:
            if mapping.path == exe:
                continue
            mapped = (mapping.map_files_name, mapping.inode, mapping.path)
            if mapped in memo:
                found = memo[mapped]
            else:
                found = _mapped_file(process, mapping, self.worker.limits.max_file_bytes)
                if len(memo) < MAPS_MEMO_OBJECTS:
                    memo[mapped] = found
            if found is None and "jemalloc" in os.path.basename(mapping.path):
                raise ProbeError(tags.JEMALLOC_IN_DSO, f"pid {process.pid}: {mapping.path}: "
                                 "the mapped file is gone or replaced on disk, and "
                                 "/proc/PID/map_files needs CAP_SYS_ADMIN or "
                                 "CAP_CHECKPOINT_RESTORE")
            if found is None:
                complete = False
                continue
            identity, open_file = found
            try:
                resolution = self._resolve(
                    open_file, identity, mapping.path, view,
                    lambda: object_dirs_for(mapping.path, process.path("root"), view), True)
            except Pending as waiting:
                pending = waiting
                queued.extend(waiting.keys)
                unresolved += 1
                if unresolved >= UNRESOLVED_MAX:
                    break
                continue
            if isinstance(resolution, TsdLayout) and resolution.dynamic_tls:
                return Attachment(resolution, base=mapping.start,
                                  loader=self._loader(process, mappings, mapping.path)), True
            if isinstance(resolution, TsdLayout):
                assert resolution.tpoff_got is not None
                return Attachment(resolution, got_slot=mapping.start + resolution.tpoff_got,
                                  base=mapping.start), True
        if pending is not None:
            self._waiting[process.key] = tuple(queued)
            while len(self._waiting) > MAPS_MEMO_PROCESSES:
                self._waiting.popitem(last=False)
            self._looked(process, len(mappings))
            raise pending
        return NotJemalloc(mapped=code_objects_digest(mappings)), complete

    def _loader(self, process: ProcessInfo, mappings: list[Mapping], what: str) -> LoaderLayout:
        """The loader's layouts in this process (libc's descriptors, ld.so's symbols), from
        the first mapping of each name: each file parsed once, in the background resolver
        when there is one (Pending is raised meanwhile), never beside the snapshot's own
        reads. Raises ProbeError(jemalloc-in-dso) saying what is missing."""
        found: list[tuple[LoaderFacts, int]] = []
        pending: Pending | None = None
        seen: set[str] = set()
        for mapping in code_objects(mappings):
            name = os.path.basename(mapping.path)
            kind = "ld" if name.startswith("ld") else "libc"
            if not LOADER_OBJECT.match(name) or kind in seen:
                continue  # a process maps one of each; any more are nobody's loader
            seen.add(kind)
            mapped = _mapped_file(process, mapping, self.worker.limits.max_file_bytes)
            if mapped is None:
                continue
            identity, open_file = mapped
            try:
                facts = self._loader_facts(identity, open_file, mapping.path)
            except Pending as waiting:
                pending = waiting
                continue
            if isinstance(facts, LoaderFacts):
                found.append((facts, mapping.start))
        if pending is not None:
            raise pending
        libc = next((f for f in found if f[0].fields), None)
        ld = next((f for f in found if "_r_debug" in f[0].symbols), None)
        placed = (place(libc[0], ld[0], ld[1]) if libc and ld
                  else "no glibc loader (libc.so.6 and ld.so) mapped")
        if isinstance(placed, str):
            raise ProbeError(tags.JEMALLOC_IN_DSO, f"pid {process.pid}: {what}: general-dynamic "
                             f"TLS, but {placed}")
        return placed

    def _loader_facts(self, identity: BinaryIdentity, open_file: Opener,
                      what: str) -> LoaderFacts | LayoutFailure | None:
        """A loader object's facts, cached per file; None when it cannot be opened or the
        worker was lost on it (looked at again next time). Raises Pending while the
        background resolver parses it."""
        key = f"loader:{identity.key}"
        facts = self.loaders.get(key)
        if facts is not None:
            return facts
        if self.background is not None and self.background.queued(key):
            raise Pending(f"{what}: being resolved")
        try:
            fd, st = open_file()
        except (OSError, FileRefused):
            return None
        if self.background is None:
            return self._parse_loader(key, fd, what)
        if self.background.submit(key, st.st_uid, lambda: self._parse_loader(key, fd, what)):
            self.submitted += 1
        else:
            os.close(fd)  # queued already, or the queues are full: next time
        raise Pending(f"{what}: being resolved")

    def _parse_loader(self, key: str, fd: int, what: str) -> LoaderFacts | LayoutFailure | None:
        """Parse an opened loader object (closing it) and cache what it gave."""
        with os.fdopen(fd, "rb") as stream:
            self.elf_opens += 1
            facts = self.worker.loader(stream, what)
        if isinstance(facts, LayoutFailure) and facts.lost:
            return None
        if len(self.loaders) >= LOADER_CACHE_MAX:
            self.loaders.clear()
        self.loaders[key] = facts
        return facts
