"""Attaching to one tgid: which binary it runs, whether jemalloc is in it, and where each
thread's TSD lies relative to its thread pointer. Results are cached per binary."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import tags
from .cache import LayoutCache
from .debuginfo import DebugSearch
from .layout import LayoutFailure, NotJemalloc, Resolution, TsdLayout, object_dirs_for
from .layout import resolve_executable
from .procfs import ProcessInfo, read_maps
from .tags import ProbeError
from . import elf


@dataclass(frozen=True)
class BinaryIdentity:
    """A file as the kernel sees it; stat of /proc/PID/exe, no open needed."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return f"file:{self.dev}:{self.ino}:{self.size}:{self.mtime_ns}"


@dataclass(frozen=True)
class Attachment:
    """A jemalloc process understood: addr(tsd) = fs_base + tsd_delta."""

    layout: TsdLayout
    tsd_delta: int


def exe_identity(process: ProcessInfo) -> BinaryIdentity:
    """Identity of the running executable; raises ProbeError(readlink-failure)."""
    try:
        st = os.stat(process.path("exe"))
    except OSError as exc:
        raise ProbeError(tags.READLINK_FAILURE,
                         f"pid {process.pid}: /proc/{process.pid}/exe: {exc.strerror}") from None
    return BinaryIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Attacher:
    """Resolves processes to Attachments, parsing each distinct binary at most once."""

    def __init__(self, cache: LayoutCache, search: DebugSearch) -> None:
        self.cache = cache
        self.search = search
        self.elf_opens = 0  # binaries parsed since start: zero growth on an unchanged host

    def resolve_binary(self, process: ProcessInfo, identity: BinaryIdentity) -> Resolution:
        """The executable's resolution, from the cache or by parsing it once."""
        cached = self.cache.get(identity.key)
        if cached is not None:
            return cached
        exe = process.exe
        try:
            stream = open(process.path("exe"), "rb")
        except OSError as exc:
            raise ProbeError(tags.READLINK_FAILURE, f"pid {process.pid}: open {exe}: "
                             f"{exc.strerror}") from None
        with stream:
            self.elf_opens += 1
            resolution = self._resolve_by_build_id(stream) or resolve_executable(
                stream, exe, object_dirs_for(exe, process.path("root")), self.search)
        self.cache.put(identity.key, resolution)
        if isinstance(resolution, TsdLayout) and resolution.build_id:
            self.cache.put(f"build-id:{resolution.build_id}", resolution)
        return resolution

    def _resolve_by_build_id(self, stream) -> Resolution | None:
        """A layout known for this build-id (resolved elsewhere, or imported)."""
        try:
            build_id = elf.build_id(elf.open_elf(stream))
        except Exception:  # a malformed file: resolve_executable reports it properly
            return None
        finally:
            stream.seek(0)
        return self.cache.get(f"build-id:{build_id}") if build_id else None

    def attach(self, process: ProcessInfo, identity: BinaryIdentity) -> Attachment | NotJemalloc:
        """Attach to a process; raises ProbeError with the attach tag on failure."""
        resolution = self.resolve_binary(process, identity)
        if isinstance(resolution, LayoutFailure):
            raise ProbeError(resolution.tag, resolution.message)
        if isinstance(resolution, TsdLayout):
            return Attachment(resolution, resolution.static_tsd_delta())
        self._check_shared_objects(process)
        return resolution

    def _check_shared_objects(self, process: ProcessInfo) -> None:
        try:
            mappings = read_maps(process)
        except OSError as exc:
            raise ProbeError(tags.MAPS_READ_FAILURE,
                             f"pid {process.pid}: maps: {exc.strerror}") from None
        for mapping in mappings:
            if "libjemalloc" in os.path.basename(mapping.path):
                raise ProbeError(tags.JEMALLOC_IN_DSO, f"pid {process.pid}: jemalloc in "
                                 f"{mapping.path}: shared objects are not supported yet")
