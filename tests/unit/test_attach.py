"""Attaching to a tgid (resolve.attach): which binary it runs, whether jemalloc is in it, and
where its TSD lies. Most tests give the attacher a /proc of their own (a directory holding
one process's exe, root, ns/mnt, status, maps and map_files, as resolve.attach reads them,
its links pointing at real files) and a real cache that already knows what each file is,
so no binary is parsed; a few attach to real processes (`sleep`, and `sleep` with Debian's
libjemalloc.so.2 preloaded) and parse their files in the real sandboxed worker. Nothing
here is traced: attaching reads /proc only."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ctprofd
from ctprofd.procfs.processes import (Mapping, ProcessInfo, StatLine, code_objects,
                                      code_objects_digest, parse_maps, read_maps,
                                      read_process)
from ctprofd.report import tags
from ctprofd.report.tags import ProbeError
from ctprofd.resolve import attach
from ctprofd.resolve.attach import (Attacher, Attachment, BinaryIdentity, Pending,
                                    _same_in_every_view, exe_identity, identity_of,
                                    learned_key, view_key, view_of)
from ctprofd.resolve.cache import LayoutCache
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import ArenaLayout, LayoutFailure, NotJemalloc, TsdLayout
from ctprofd.resolve.loader import LoaderFacts, loader_facts, place
from ctprofd.resolve.parse_worker import WorkerLimits
from ctprofd.resolve.resolver import BackgroundResolver

SLEEP = os.path.realpath(shutil.which("sleep") or "/usr/bin/sleep")
LIBC = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
LD_SO = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
STOCK = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
BID = "5e" * 20
ARENA = ArenaLayout(**{f.name: ("" if f.name == "table" else 8)
                       for f in dataclasses.fields(ArenaLayout)})
SHARED = TsdLayout(BID, "je_tsd_tls", 0x40, 824, 840, tpoff_got=0x2000)
DYNAMIC = TsdLayout(BID, "je_tsd_tls", 0x40, 824, 840, dynamic_tls=True)
IN_EXE = TsdLayout(BID, "je_tsd_tls", 0x40, 824, 840, static_block_offset=2632)
OWN_NS = os.stat("/proc/self/ns/mnt").st_ino
WAIT = 30.0  # a hang guard, never a timing claim


def key_of(path: str) -> str:
    return BinaryIdentity.of(os.stat(path)).key


class FakeProc:
    """One process under a /proc of our own: `map` adds a line to its maps and, unless
    told not to, its map_files link to the real file."""

    def __init__(self, root: Path, exe: str = SLEEP, pid: int = 4242, start: int = 777,
                 uid: int = 1000, ns: int | str | None = OWN_NS, fs_root: str = "/") -> None:
        self.root, self.pid, self.start = root, pid, start
        self.dir = root / str(pid)
        (self.dir / "map_files").mkdir(parents=True)
        (self.dir / "ns").mkdir()
        os.symlink(exe, self.dir / "exe")
        os.symlink(fs_root, self.dir / "root")
        if ns is not None:
            os.symlink(ns if isinstance(ns, str) else f"mnt:[{ns}]", self.dir / "ns" / "mnt")
        (self.dir / "status").write_text(f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        self.lines: list[str] = []
        self.next = 0x7F0000000000
        self.write()

    def map(self, path: str, start: int | None = None, *, perms: str = "r-xp",
            offset: int = 0, inode: int | None = None, link: bool = True,
            size: int = 0x10000) -> int:
        """Map `path` (its inode unless given) at `start` (the next free address unless
        given); its start."""
        start = self.next if start is None else start
        self.next = max(self.next, start + size)
        if inode is None:
            inode = os.stat(path.removesuffix(" (deleted)")).st_ino
        self.lines.append(f"{start:x}-{start + size:x} {perms} {offset:08x} fe:00 {inode} "
                          f"{'':20}{path}")
        if link:
            os.symlink(path.removesuffix(" (deleted)"),
                       self.dir / "map_files" / f"{start:x}-{start + size:x}")
        self.write()
        return start

    def write(self) -> None:
        (self.dir / "maps").write_text("".join(line + "\n" for line in self.lines))

    @property
    def process(self) -> ProcessInfo:
        return ProcessInfo(str(self.root), self.pid, StatLine("x", "S", self.start))


def cache_knowing(*known: tuple[str, object], cache: LayoutCache | None = None) -> LayoutCache:
    """A real (memory) cache holding each (path, resolution) under the file's identity."""
    cache = LayoutCache(None) if cache is None else cache
    for path, resolution in known:
        cache.put(key_of(path), resolution, 0)  # type: ignore[arg-type]
    return cache


@pytest.fixture
def attachers() -> Iterator[Callable[..., Attacher]]:
    """Attacher(cache, ...) with no debug dirs; each closed at the end."""
    made: list[Attacher] = []

    def make(cache: LayoutCache, **kw: object) -> Attacher:
        made.append(Attacher(cache, DebugSearch(()), **kw))  # type: ignore[arg-type]
        return made[-1]
    yield make
    for attacher in made:
        attacher.close()


@pytest.fixture
def lib_copy(tmp_path: Path) -> Callable[[str], str]:
    """A copy of libc under a name of our choosing (a file of its own: its own identity)."""
    def copy(name: str) -> str:
        path = tmp_path / "lib" / name
        path.parent.mkdir(exist_ok=True)
        shutil.copy(LIBC, path)
        return str(path)
    return copy


def no_jemalloc() -> LayoutCache:
    return cache_knowing((SLEEP, NotJemalloc()), (LIBC, NotJemalloc()), (LD_SO, NotJemalloc()))


def sleeper(tmp_path: Path, **kw: object) -> FakeProc:
    """sleep with libc and ld.so mapped."""
    fake = FakeProc(tmp_path / "proc", **kw)  # type: ignore[arg-type]
    fake.map(SLEEP, 0x555500000000)
    fake.map(LIBC)
    fake.map(LD_SO)
    return fake


# --- identities, keys and views ------------------------------------------------------------

def test_an_identity_is_the_files_device_inode_size_and_mtime_not_its_owner():
    st = os.stat(SLEEP)
    identity = BinaryIdentity.of(st)
    assert identity.key == f"file:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    assert identity.uid == st.st_uid and identity_of(SLEEP) == identity
    assert dataclasses.replace(identity, uid=1000) == identity


def test_view_keys_name_the_view_and_only_a_view():
    assert view_key("file:1", "mnt:2") == "file:1:view:mnt:2" and view_key("file:1", "") == "file:1"
    assert learned_key("ab", 7) == "build-id:ab:uid:7"


def test_what_resolves_alike_in_every_view():
    assert _same_in_every_view(NotJemalloc())
    assert _same_in_every_view(SHARED)  # DWARF ctprofd found itself
    assert not _same_in_every_view(dataclasses.replace(SHARED, code_source="fast paths"))
    assert not _same_in_every_view(dataclasses.replace(SHARED, view="mnt:1"))
    assert not _same_in_every_view(LayoutFailure(tags.DWARF_PARSE_FAILURE, "x"))


def test_a_process_seeing_the_files_as_we_do_has_no_view_of_its_own(tmp_path: Path):
    assert view_of(FakeProc(tmp_path).process, attach._own_view()) == ""
    own = read_process("/proc", os.getpid())
    assert own is not None and view_of(own, attach._own_view()) == ""


def test_another_mount_namespace_or_root_is_a_view_named_with_the_uid(tmp_path: Path):
    root = os.stat("/")
    other_ns = FakeProc(tmp_path / "a", ns=4026532000, uid=1000).process
    assert view_of(other_ns, attach._own_view()) == (
        f"mnt:4026532000:root:{root.st_dev}:{root.st_ino}:uid:1000")
    chrooted = FakeProc(tmp_path / "b", fs_root=str(tmp_path), uid=0).process
    st = os.stat(tmp_path)
    assert view_of(chrooted, attach._own_view()) == (
        f"mnt:{OWN_NS}:root:{st.st_dev}:{st.st_ino}:uid:0")


@pytest.mark.parametrize("link", [None, "mnt:4026531841", "mnt:[4026531841", ":[4026531841]",
                                  "mnt:[]", "mnt:[40265x1841]"])
def test_a_namespace_that_cannot_be_read_is_the_processs_own_view(tmp_path: Path,
                                                                  link: str | None):
    fake = FakeProc(tmp_path, ns=link, pid=99, start=1234)
    assert view_of(fake.process, attach._own_view()) == "pid:99:1234"


def test_an_unreadable_root_is_the_processs_own_view(tmp_path: Path):
    fake = FakeProc(tmp_path, fs_root=str(tmp_path / "missing"), pid=98, start=5)
    assert view_of(fake.process, attach._own_view()) == "pid:98:5"


def test_the_executables_identity_or_why_not(tmp_path: Path):
    assert exe_identity(FakeProc(tmp_path / "a").process) == identity_of(SLEEP)
    gone = FakeProc(tmp_path / "b", exe=str(tmp_path / "gone"), pid=5)
    with pytest.raises(ProbeError) as raised:
        exe_identity(gone.process)
    assert (raised.value.tag, raised.value.message, raised.value.errno) == (
        tags.READLINK_FAILURE, "pid 5: /proc/5/exe: No such file or directory", errno.ENOENT)


# --- attaching through the cache -----------------------------------------------------------

def test_a_process_without_jemalloc_anywhere(tmp_path: Path, attachers):
    fake = sleeper(tmp_path)
    attacher = attachers(no_jemalloc())
    result = attacher.attach(fake.process, identity_of(SLEEP))
    assert result == NotJemalloc()
    assert result.mapped == code_objects_digest(parse_maps((fake.dir / "maps").read_text()))
    assert (attacher.elf_opens, attacher.submitted) == (0, 0)


def test_jemalloc_in_a_shared_object_is_its_got_slot(tmp_path: Path, attachers, lib_copy):
    fake = sleeper(tmp_path)
    lib = lib_copy("libjemalloc.so.2")
    start = fake.map(lib, 0x7F5500000000)
    attacher = attachers(cache_knowing((lib, SHARED), cache=no_jemalloc()))
    assert attacher.attach(fake.process, identity_of(SLEEP)) == Attachment(
        SHARED, got_slot=start + 0x2000, base=start)


def test_the_first_object_holding_jemalloc_is_taken(tmp_path: Path, attachers, lib_copy):
    fake = sleeper(tmp_path)
    first, second = lib_copy("liba.so"), lib_copy("libb.so")
    start = fake.map(first)
    fake.map(second)
    other = dataclasses.replace(SHARED, tpoff_got=0x3000)
    attacher = attachers(cache_knowing((first, SHARED), (second, other), cache=no_jemalloc()))
    assert attacher.attach(fake.process, identity_of(SLEEP)).got_slot == start + 0x2000


def test_jemalloc_in_the_executable_is_its_static_tls_delta(tmp_path: Path, attachers):
    fake = sleeper(tmp_path)
    attacher = attachers(cache_knowing((SLEEP, IN_EXE)))
    assert attacher.attach(fake.process, identity_of(SLEEP)) == Attachment(
        IN_EXE, tsd_delta=IN_EXE.static_tsd_delta(), base=None)  # no arena: no base needed


def test_an_executable_with_arena_statistics_has_the_base_of_its_first_page(
        tmp_path: Path, attachers):
    fake = FakeProc(tmp_path)
    fake.map(SLEEP, 0x555500000000, offset=0x1000, perms="r-xp", inode=1)  # another file
    fake.map(SLEEP, 0x555500020000, offset=0x1000, perms="r-xp")  # not its first page
    fake.map(SLEEP, 0x555500010000, offset=0, perms="r--p")
    fake.map(SLEEP, 0x555500030000, offset=0, perms="r--p")
    layout = dataclasses.replace(IN_EXE, arena=ARENA)
    attacher = attachers(cache_knowing((SLEEP, layout)))
    assert attacher.attach(fake.process, identity_of(SLEEP)) == Attachment(
        layout, tsd_delta=layout.static_tsd_delta(), base=0x555500010000)


def test_an_executable_whose_maps_say_nothing_has_no_base(tmp_path: Path, attachers):
    layout = dataclasses.replace(IN_EXE, arena=ARENA)
    attacher = attachers(cache_knowing((SLEEP, layout)))
    fake = FakeProc(tmp_path / "a")  # maps empty
    assert attacher.attach(fake.process, identity_of(SLEEP)).base is None
    unreadable = FakeProc(tmp_path / "b")
    (unreadable.dir / "maps").unlink()
    assert attacher.attach(unreadable.process, identity_of(SLEEP)).base is None


def test_general_dynamic_tls_is_placed_by_the_loader_mapped_first(tmp_path: Path, attachers,
                                                                 lib_copy):
    fake = FakeProc(tmp_path)
    fake.map(SLEEP)
    fake.map(LIBC)
    ld = fake.map(LD_SO)
    lib = lib_copy("libj.so")
    base = fake.map(lib)
    fake.map(lib_copy("libc.so.6"))  # a second libc.so.6 and ld.so: nobody's loader
    fake.map(lib_copy("ld-linux-x86-64.so.2"))
    fake.map(LIBC.replace("libc.so.6", "libm.so.6"))  # not a loader's name
    attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()))
    with open(LIBC, "rb") as f:
        libc_facts = loader_facts(f)
    with open(LD_SO, "rb") as f:
        ld_facts = loader_facts(f)
    attacher.loaders[f"loader:{key_of(LIBC)}"] = libc_facts
    attacher.loaders[f"loader:{key_of(LD_SO)}"] = ld_facts
    assert attacher.attach(fake.process, identity_of(SLEEP)) == Attachment(
        DYNAMIC, base=base, loader=place(libc_facts, ld_facts, ld))
    assert attacher.elf_opens == 0  # the other loader names were not parsed


def test_general_dynamic_tls_without_a_loader_says_what_is_missing(tmp_path: Path, attachers,
                                                                   lib_copy):
    lib = lib_copy("libj.so")
    for case, mapped in (("none", []), ("libc only", [LIBC]), ("no map_files", ["gone"])):
        fake = FakeProc(tmp_path / case.replace(" ", "-"), pid=7)
        fake.map(SLEEP)
        for path in mapped:
            if path == "gone":
                fake.map(LD_SO, link=False)
            else:
                fake.map(path)
        fake.map(lib)
        attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()))
        with open(LIBC, "rb") as f:
            attacher.loaders[f"loader:{key_of(LIBC)}"] = loader_facts(f)
        with pytest.raises(ProbeError) as raised:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert raised.value.tag == tags.JEMALLOC_IN_DSO
        assert raised.value.message == (f"pid 7: {lib}: general-dynamic TLS, but no glibc "
                                        "loader (libc.so.6 and ld.so) mapped")


def test_a_loader_that_does_not_describe_itself_is_named(tmp_path: Path, attachers, lib_copy):
    fake = FakeProc(tmp_path, pid=8)
    fake.map(SLEEP)
    fake.map(LIBC)
    fake.map(LD_SO)
    lib = lib_copy("libj.so")
    fake.map(lib)
    attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()))
    with open(LIBC, "rb") as f:
        libc_facts = loader_facts(f)
    partial = dataclasses.replace(libc_facts, fields={
        k: v for k, v in libc_facts.fields.items() if k != "dtv_dtv"})
    attacher.loaders[f"loader:{key_of(LIBC)}"] = partial
    attacher.loaders[f"loader:{key_of(LD_SO)}"] = LoaderFacts({}, {}, {"_r_debug": 8,
                                                                     "_rtld_global": 16})
    with pytest.raises(ProbeError) as raised:
        attacher.attach(fake.process, identity_of(SLEEP))
    assert raised.value.message == (f"pid 8: {lib}: general-dynamic TLS, but the loader does "
                                    "not describe dtv_dtv")


def test_the_loaders_files_are_parsed_once_each_in_the_worker(tmp_path: Path, attachers,
                                                              lib_copy,
                                                              monkeypatch: pytest.MonkeyPatch):
    fake = FakeProc(tmp_path)
    fake.map(SLEEP)
    fake.map(LIBC)
    ld = fake.map(LD_SO)
    lib = lib_copy("libj.so")
    base = fake.map(lib)
    attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()))
    first = attacher.attach(fake.process, identity_of(SLEEP))
    assert attacher.elf_opens == 2
    with open(LIBC, "rb") as f, open(LD_SO, "rb") as g:
        assert first == Attachment(DYNAMIC, base=base,
                                   loader=place(loader_facts(f), loader_facts(g), ld))
    assert attacher.attach(fake.process, identity_of(SLEEP)) == first
    assert attacher.elf_opens == 2  # each loader object parsed once
    monkeypatch.setattr(attach, "LOADER_CACHE_MAX", 1)  # full: emptied before the next
    attacher.loaders.clear()
    assert attacher.attach(fake.process, identity_of(SLEEP)) == first
    assert attacher.elf_opens == 4 and list(attacher.loaders) == [f"loader:{key_of(LD_SO)}"]


def test_a_loader_object_that_cannot_be_opened_or_parsed_is_looked_at_again(
        tmp_path: Path, attachers, lib_copy):
    fake = FakeProc(tmp_path, pid=9)
    fake.map(SLEEP)
    fake.map(LIBC)
    fake.map(LD_SO)
    lib = lib_copy("libj.so")
    fake.map(lib)
    lost = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()),
                     limits=WorkerLimits(uid=1 << 40, gid=1 << 40))  # cannot start
    refused = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()),
                        limits=WorkerLimits(max_file_bytes=100))  # cannot open them
    for attacher, opened in ((lost, 2), (refused, 0)):
        for _ in range(2):  # nothing cached: looked at again
            with pytest.raises(ProbeError) as raised:
                attacher.attach(fake.process, identity_of(SLEEP))
            assert raised.value.message == (f"pid 9: {lib}: general-dynamic TLS, but no glibc "
                                            "loader (libc.so.6 and ld.so) mapped")
            assert attacher.loaders == {}
        assert attacher.elf_opens == 2 * opened


def test_a_deleted_executables_own_mapping_is_not_looked_up_again(tmp_path: Path, attachers):
    # without map_files, a file gone from disk named like jemalloc would be an error
    fake = FakeProc(tmp_path, exe="/opt/jemalloc-bench (deleted)")
    fake.map("/opt/jemalloc-bench (deleted)", inode=12345, link=False)
    fake.map(LIBC)
    attacher = attachers(no_jemalloc())
    assert attacher.attach(fake.process, identity_of(SLEEP)) == NotJemalloc()


def test_a_jemalloc_object_that_cannot_be_found_is_an_error(tmp_path: Path, attachers):
    fake = sleeper(tmp_path, pid=11)
    fake.map("/usr/lib/libjemalloc.so.2", inode=999, link=False)
    attacher = attachers(no_jemalloc())
    with pytest.raises(ProbeError) as raised:
        attacher.attach(fake.process, identity_of(SLEEP))
    assert (raised.value.tag, raised.value.message) == (
        tags.JEMALLOC_IN_DSO, "pid 11: /usr/lib/libjemalloc.so.2: the mapped file is gone or "
        "replaced on disk, and /proc/PID/map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")


def test_maps_that_cannot_be_read_are_an_error(tmp_path: Path, attachers):
    fake = FakeProc(tmp_path, pid=12)
    (fake.dir / "maps").unlink()
    with pytest.raises(ProbeError) as raised:
        attachers(no_jemalloc()).attach(fake.process, identity_of(SLEEP))
    assert (raised.value.tag, raised.value.message) == (
        tags.MAPS_READ_FAILURE, "pid 12: maps: No such file or directory")


def test_maps_read_alike_within_a_snapshot_are_taken_as_without_jemalloc(
        tmp_path: Path, attachers, lib_copy, monkeypatch: pytest.MonkeyPatch):
    lib = lib_copy("libx.so")
    first, second = FakeProc(tmp_path, pid=21), FakeProc(tmp_path, pid=22)
    for fake in (first, second):
        fake.map(SLEEP, 0x555500000000)
        fake.map(lib, 0x7F0000000000)
    cache = cache_knowing((SLEEP, NotJemalloc()), (lib, NotJemalloc()))
    attacher = attachers(cache)
    assert attacher.attach(first.process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)  # as if learned since: not looked at in this snapshot
    assert attacher.attach(second.process, identity_of(SLEEP)) == NotJemalloc()
    attacher.begin()
    assert attacher.attach(second.process, identity_of(SLEEP)).got_slot == 0x7F0000002000
    # maps over the bound are not remembered
    monkeypatch.setattr(attach, "SHAPES_MAX_BYTES", len((first.dir / "maps").read_bytes()) - 1)
    cache.put(key_of(lib), NotJemalloc())
    assert attacher.attach(first.process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)
    assert attacher.attach(second.process, identity_of(SLEEP)).got_slot == 0x7F0000002000


def test_the_shape_is_remembered_up_to_its_bound_exactly(tmp_path: Path, attachers, lib_copy,
                                                         monkeypatch: pytest.MonkeyPatch):
    lib = lib_copy("libx.so")
    first, second = FakeProc(tmp_path, pid=21), FakeProc(tmp_path, pid=22)
    for fake in (first, second):
        fake.map(SLEEP, 0x555500000000)
        fake.map(lib, 0x7F0000000000)
    monkeypatch.setattr(attach, "SHAPES_MAX_BYTES", len((first.dir / "maps").read_bytes()))
    cache = cache_knowing((SLEEP, NotJemalloc()), (lib, NotJemalloc()))
    attacher = attachers(cache)
    assert attacher.attach(first.process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)
    assert attacher.attach(second.process, identity_of(SLEEP)) == NotJemalloc()
    attacher.begin()  # the next snapshot has the whole bound again
    cache.put(key_of(lib), NotJemalloc())
    assert attacher.attach(first.process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)
    assert attacher.attach(second.process, identity_of(SLEEP)) == NotJemalloc()


def test_maps_with_a_file_not_found_are_not_remembered_as_without_jemalloc(
        tmp_path: Path, attachers, lib_copy):
    lib = lib_copy("libx.so")
    first, second = FakeProc(tmp_path, pid=21), FakeProc(tmp_path, pid=22)
    for fake in (first, second):
        fake.map(SLEEP, 0x555500000000)
        fake.map(lib, 0x7F0000000000)
    os.unlink(first.dir / "map_files" / "7f0000000000-7f0000010000")  # unmapped meanwhile
    cache = cache_knowing((SLEEP, NotJemalloc()), (lib, NotJemalloc()))
    attacher = attachers(cache)
    assert attacher.attach(first.process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)
    assert attacher.attach(second.process, identity_of(SLEEP)).got_slot == 0x7F0000002000


def test_the_shape_holds_the_view_the_executable_and_its_path(tmp_path: Path, attachers,
                                                             lib_copy):
    lib, exe_copy = lib_copy("libx.so"), lib_copy("prog")
    shapes = [FakeProc(tmp_path / "a", pid=21),
              FakeProc(tmp_path / "b", pid=22, ns=4026532000),  # another view
              FakeProc(tmp_path / "c", pid=23, exe=exe_copy),  # another executable
              FakeProc(tmp_path / "d", pid=24, exe=SLEEP + "-link")]  # another path to it
    for fake in shapes:
        fake.map(SLEEP, 0x555500000000)
        fake.map(lib, 0x7F0000000000)
    cache = cache_knowing((SLEEP, NotJemalloc()), (lib, NotJemalloc()), (exe_copy, NotJemalloc()))
    attacher = attachers(cache)
    assert attacher.attach(shapes[0].process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)
    cache.put(view_key(key_of(lib), view_of(shapes[1].process, attach._own_view())), SHARED)
    for fake, exe in zip(shapes[1:], (SLEEP, exe_copy, SLEEP)):
        assert attacher.attach(fake.process, identity_of(exe)).got_slot == 0x7F0000002000


# --- the cache, and parsing ----------------------------------------------------------------

def test_a_layout_cached_for_the_processs_view_is_found(tmp_path: Path, attachers, lib_copy):
    fake = sleeper(tmp_path, ns=4026532000)
    lib = lib_copy("libj.so")
    start = fake.map(lib)
    view = view_of(fake.process, attach._own_view())
    cache = no_jemalloc()
    cache.put(view_key(key_of(lib), view), SHARED)
    attacher = attachers(cache)
    assert attacher.attach(fake.process, identity_of(SLEEP)).got_slot == start + 0x2000
    own = sleeper(tmp_path / "own", pid=5)
    own.map(lib)
    assert attacher.attach(own.process, identity_of(SLEEP)) == NotJemalloc()  # not its view


def test_a_cached_failure_is_raised_naming_the_path_this_process_has(tmp_path: Path,
                                                                    attachers, lib_copy):
    fake = sleeper(tmp_path)
    lib = lib_copy("libj.so")
    fake.map(lib)
    failure = LayoutFailure(tags.DWARF_PARSE_FAILURE, "/elsewhere/libj.so: no DWARF",
                            subject="/elsewhere/libj.so")
    attacher = attachers(cache_knowing((lib, failure), cache=no_jemalloc()))
    with pytest.raises(ProbeError) as raised:
        attacher.attach(fake.process, identity_of(SLEEP))
    assert (raised.value.tag, raised.value.message) == (tags.DWARF_PARSE_FAILURE,
                                                        f"{lib}: no DWARF")


def test_a_file_refused_is_cached_as_a_failure_of_its_owner(tmp_path: Path, attachers):
    exe = owned_copy(tmp_path, SLEEP, "prog")
    fake = FakeProc(tmp_path / "proc", exe=exe)
    cache = LayoutCache(str(tmp_path / "cache"))
    attacher = attachers(cache, limits=WorkerLimits(max_file_bytes=100))
    with pytest.raises(ProbeError) as raised:
        attacher.attach(fake.process, identity_of(exe))
    assert raised.value.tag == tags.DWARF_PARSE_FAILURE
    assert raised.value.message.startswith(f"{exe}: ") and "100" in raised.value.message
    cached = cache.get(key_of(exe))
    assert isinstance(cached, LayoutFailure) and cached.message == raised.value.message
    assert cache_key_files(tmp_path / "cache") == {key_of(exe): 1000}
    assert attacher.elf_opens == 0


def test_a_file_that_cannot_be_opened_is_a_readlink_failure(tmp_path: Path, attachers):
    fake = FakeProc(tmp_path, exe=str(tmp_path / "gone"))
    with pytest.raises(ProbeError) as raised:
        attachers(LayoutCache(None)).attach(fake.process, identity_of(SLEEP))
    assert (raised.value.tag, raised.value.message, raised.value.errno) == (
        tags.READLINK_FAILURE, f"open {tmp_path / 'gone'}: No such file or directory",
        errno.ENOENT)


def test_a_lost_worker_postpones_the_file_and_caches_nothing(tmp_path: Path, attachers,
                                                             caplog: pytest.LogCaptureFixture):
    fake = sleeper(tmp_path)
    cache = LayoutCache(None)
    attacher = attachers(cache, limits=WorkerLimits(uid=1 << 40, gid=1 << 40))
    with caplog.at_level(logging.WARNING, logger="ctprofd.resolve.attach"):
        with pytest.raises(ProbeError) as raised:
            attacher.attach(fake.process, identity_of(SLEEP))
    assert raised.value.message.startswith(f"{SLEEP}: parser worker cannot start")
    assert [r.getMessage() for r in caplog.records if r.name == "ctprofd.resolve.attach"] == [
        f"{raised.value.message}; parsing it again in 1 s"]
    assert cache.get(key_of(SLEEP)) is None and attacher.elf_opens == 1
    with pytest.raises(ProbeError) as again:  # postponed: not opened or parsed
        attacher.attach(fake.process, identity_of(SLEEP))
    assert again.value.tag == tags.DWARF_PARSE_FAILURE
    assert again.value.message.startswith(f"{SLEEP}: parse postponed for ")
    assert attacher.elf_opens == 1


def test_resolve_file_reads_an_operators_file(tmp_path: Path, attachers):
    not_elf = tmp_path / "notes.txt"
    not_elf.write_text("hello")
    attacher = attachers(cache_knowing((LIBC, SHARED)))
    failure = attacher.resolve_file(str(not_elf))
    assert isinstance(failure, LayoutFailure) and failure.tag == tags.DWARF_PARSE_FAILURE
    assert failure.message.startswith(f"{not_elf}: not an ELF file: ")
    assert attacher.resolve_file(LIBC) == SHARED  # cached by identity
    with pytest.raises(OSError):
        attacher.resolve_file(str(tmp_path / "missing"))
    refused = attachers(LayoutCache(None), limits=WorkerLimits(max_file_bytes=100))
    with pytest.raises(OSError):
        refused.resolve_file(LIBC)  # too large to open at all


def test_resolve_file_turns_a_cached_failure_into_its_result(tmp_path: Path, attachers):
    failure = LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{LIBC}: no DWARF")
    assert attachers(cache_knowing((LIBC, failure))).resolve_file(LIBC) == failure


def test_resolve_file_parses_a_library_as_a_shared_object(attachers):
    cache = LayoutCache(None)
    attacher = attachers(cache)
    layout = attacher.resolve_file(STOCK)
    assert isinstance(layout, TsdLayout) and layout.tpoff_got is not None
    assert layout.code_source is not None and layout.static_block_offset is None
    assert cache.get(key_of(STOCK)) == layout  # this view is ctprofd's own: the plain key
    assert cache.get(learned_key(layout.build_id, os.stat(STOCK).st_uid)) == layout
    assert attacher.elf_opens == 1


def test_parsing_in_a_view_caches_what_the_view_may_change_for_that_view_only(
        tmp_path: Path, attachers, lib_copy):
    fake = FakeProc(tmp_path, ns=4026532000)
    fake.map(SLEEP)
    libc = fake.map(lib_copy("libc.so.6"))
    start = fake.map(STOCK)
    view = view_of(fake.process, attach._own_view())
    cache = cache_knowing((SLEEP, NotJemalloc()))
    attacher = attachers(cache)
    found = attacher.attach(fake.process, identity_of(SLEEP))
    assert libc and cache.get(key_of(str(tmp_path / "lib" / "libc.so.6"))) == NotJemalloc()
    assert isinstance(found, Attachment) and found.base == start
    layout = found.layout
    assert layout.code_source is not None  # from machine code: another view may differ
    owner = os.stat(STOCK).st_uid
    assert cache.get(key_of(STOCK)) is None
    assert cache.get(view_key(key_of(STOCK), view)) == layout
    assert cache.get(learned_key(layout.build_id, owner)) is None
    assert cache.get(view_key(learned_key(layout.build_id, owner), view)) == layout


def test_a_real_process_without_jemalloc_is_parsed_once(attachers, tmp_path: Path):
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        process = wait_mapped(proc.pid, LD_SO)
        attacher = attachers(LayoutCache(None))
        assert attacher.attach(process, exe_identity(process)) == NotJemalloc()
        parsed = attacher.elf_opens
        assert parsed == len(code_objects(read_maps(process)))
        assert attacher.attach(process, exe_identity(process)) == NotJemalloc()
        assert attacher.elf_opens == parsed
    finally:
        proc.kill()
        proc.wait()


def wait_mapped(pid: int, path: str) -> ProcessInfo:
    """The process once it maps `path` (it has exec'd and its loader has run)."""
    for _ in range(int(WAIT * 100)):
        process = read_process("/proc", pid)
        assert process is not None
        try:
            if any(m.path == path for m in read_maps(process)):
                return read_process("/proc", pid)  # type: ignore[return-value]
        except OSError:
            pass
        threading.Event().wait(0.01)
    raise AssertionError(f"pid {pid} never mapped {path}")


# --- the background resolver ---------------------------------------------------------------

def blocked_resolver(**kw: int) -> tuple[BackgroundResolver, threading.Event]:
    resolver = BackgroundResolver(**kw)
    running, gate = threading.Event(), threading.Event()
    assert resolver.submit("gate", 99, lambda: (running.set(), gate.wait(WAIT)))
    assert running.wait(WAIT)
    return resolver, gate


def test_in_the_background_a_file_not_cached_is_pending_until_parsed(tmp_path: Path,
                                                                     attachers):
    fake = sleeper(tmp_path)
    resolver, gate = blocked_resolver()
    cache = cache_knowing((LIBC, NotJemalloc()), (LD_SO, NotJemalloc()))
    attacher = attachers(cache, background=resolver)
    try:
        with pytest.raises(Pending) as pending:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert pending.value.keys == (key_of(SLEEP),) and attacher.submitted == 1
        assert str(pending.value) == f"{SLEEP}: being resolved"
        with pytest.raises(Pending) as again:  # queued: not opened or submitted again
            attacher.attach(fake.process, identity_of(SLEEP))
        assert again.value.keys == (key_of(SLEEP),) and attacher.submitted == 1
    finally:
        gate.set()
    assert resolver.wait_idle(WAIT)
    assert attacher.attach(fake.process, identity_of(SLEEP)) == NotJemalloc()
    assert attacher.elf_opens == 1


def test_in_the_background_a_view_waits_for_both_its_keys(tmp_path: Path, attachers):
    fake = sleeper(tmp_path, ns=4026532000)
    view = view_of(fake.process, attach._own_view())
    resolver, gate = blocked_resolver()
    attacher = attachers(LayoutCache(None), background=resolver)
    try:
        with pytest.raises(Pending) as pending:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert pending.value.keys == (key_of(SLEEP), view_key(key_of(SLEEP), view))
        with pytest.raises(Pending) as again:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert again.value.keys == pending.value.keys
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_a_job_the_resolver_refuses_is_offered_again_and_its_file_closed(tmp_path: Path,
                                                                         attachers):
    fake = sleeper(tmp_path)
    resolver, gate = blocked_resolver(max_jobs=1)  # full
    attacher = attachers(LayoutCache(None), background=resolver)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(2):
            with pytest.raises(Pending):
                attacher.attach(fake.process, identity_of(SLEEP))
        assert attacher.submitted == 0 and len(os.listdir("/proc/self/fd")) == fds
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_a_lost_worker_in_the_background_is_quiet_and_caches_nothing(tmp_path: Path,
                                                                     attachers):
    fake = sleeper(tmp_path)
    resolver = BackgroundResolver()
    cache = LayoutCache(None)
    attacher = attachers(cache, background=resolver,
                         limits=WorkerLimits(uid=1 << 40, gid=1 << 40))
    with pytest.raises(Pending):
        attacher.attach(fake.process, identity_of(SLEEP))
    assert resolver.wait_idle(WAIT)
    assert cache.get(key_of(SLEEP)) is None
    with pytest.raises(ProbeError) as raised:
        attacher.attach(fake.process, identity_of(SLEEP))
    assert "parse postponed" in raised.value.message


def test_objects_not_resolved_are_all_queued_at_once_and_the_maps_not_read_meanwhile(
        tmp_path: Path, attachers, lib_copy, monkeypatch: pytest.MonkeyPatch):
    fake = sleeper(tmp_path, pid=31)
    lib = lib_copy("libj.so")
    fake.map(lib)
    resolver, gate = blocked_resolver()
    cache = cache_knowing((SLEEP, NotJemalloc()))
    attacher = attachers(cache, background=resolver)
    reads: list[int] = []
    real = attach.read_maps_bytes
    monkeypatch.setattr(attach, "read_maps_bytes", lambda p: reads.append(p.pid) or real(p))
    try:
        with pytest.raises(Pending) as pending:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert pending.value.keys == (key_of(lib),)  # the last object queued names its keys
        assert attacher.submitted == 3 and reads == [31]
        with pytest.raises(Pending) as waiting:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert str(waiting.value) == "pid 31: its objects are being resolved"
        assert reads == [31]  # still queued: the maps are not read again
    finally:
        gate.set()
    assert resolver.wait_idle(WAIT)
    cache.put(key_of(lib), SHARED)  # as if the parse had found it
    assert isinstance(attacher.attach(fake.process, identity_of(SLEEP)), Attachment)
    assert reads == [31, 31]


def test_a_layout_resolved_meanwhile_ends_the_wait(tmp_path: Path, attachers, lib_copy):
    fake = sleeper(tmp_path, pid=32)
    lib = lib_copy("libj.so")
    fake.map(lib)
    resolver, gate = blocked_resolver()
    cache = cache_knowing((SLEEP, NotJemalloc()), (LIBC, NotJemalloc()), (LD_SO, NotJemalloc()))
    attacher = attachers(cache, background=resolver)
    try:
        with pytest.raises(Pending):
            attacher.attach(fake.process, identity_of(SLEEP))
        cache.put(key_of(lib), SHARED)  # still queued, but a layout is known now
        assert isinstance(attacher.attach(fake.process, identity_of(SLEEP)), Attachment)
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_at_most_unresolved_max_objects_are_looked_at_per_attach(
        tmp_path: Path, attachers, lib_copy, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "UNRESOLVED_MAX", 2)
    fake = sleeper(tmp_path, pid=33)
    for name in ("liba.so", "libb.so"):
        fake.map(lib_copy(name))
    resolver, gate = blocked_resolver()
    attacher = attachers(cache_knowing((SLEEP, NotJemalloc())), background=resolver)
    try:
        with pytest.raises(Pending):
            attacher.attach(fake.process, identity_of(SLEEP))
        assert attacher.submitted == 2  # libc and ld.so; the two others next time
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_a_process_with_long_maps_left_pending_is_looked_at_less_and_less_often(
        tmp_path: Path, attachers, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "PENDING_MAPS_LINES", 3)  # its maps are 3 lines
    monkeypatch.setattr(attach, "PENDING_BACKOFF_MAX", 2)
    fake = sleeper(tmp_path, pid=34)
    resolver, gate = blocked_resolver(max_jobs=1)  # full: nothing is ever queued
    attacher = attachers(cache_knowing((SLEEP, NotJemalloc())), background=resolver)
    reads: list[int] = []
    real = attach.read_maps_bytes
    monkeypatch.setattr(attach, "read_maps_bytes", lambda p: reads.append(1) or real(p))
    looked: list[bool] = []
    try:
        for _ in range(12):
            before = len(reads)
            with pytest.raises(Pending):
                attacher.attach(fake.process, identity_of(SLEEP))
            looked.append(len(reads) > before)
    finally:
        gate.set()
        resolver.wait_idle(WAIT)
    # 3 lines, not over the bound: looked at again; 6: put off 1 snapshot, then 2, 2 ...
    assert looked == [True, True, False, True, False, False, True, False, False, True, False,
                      False]


def test_attaching_forgets_the_looks_of_a_pending_process(tmp_path: Path, attachers,
                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "PENDING_MAPS_LINES", 2)
    fake = sleeper(tmp_path, pid=35)
    resolver, gate = blocked_resolver(max_jobs=1)
    cache = cache_knowing((SLEEP, NotJemalloc()))
    attacher = attachers(cache, background=resolver)
    try:
        with pytest.raises(Pending):
            attacher.attach(fake.process, identity_of(SLEEP))  # 3 lines: put off once
        with pytest.raises(Pending):
            attacher.attach(fake.process, identity_of(SLEEP))
        cache_knowing((LIBC, NotJemalloc()), (LD_SO, NotJemalloc()), cache=cache)
        assert attacher.attach(fake.process, identity_of(SLEEP)) == NotJemalloc()
        cache.put(key_of(LIBC), SHARED)
        attacher.begin()
        assert isinstance(attacher.attach(fake.process, identity_of(SLEEP)), Attachment)
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_pending_processes_are_counted_for_a_bounded_number(tmp_path: Path, attachers,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "PENDING_MAPS_LINES", 2)
    monkeypatch.setattr(attach, "PENDING_PROCESSES", 1)
    first, second = sleeper(tmp_path / "a", pid=36), sleeper(tmp_path / "b", pid=37)
    resolver, gate = blocked_resolver(max_jobs=1)
    attacher = attachers(cache_knowing((SLEEP, NotJemalloc())), background=resolver)
    reads: list[int] = []
    real = attach.read_maps_bytes
    monkeypatch.setattr(attach, "read_maps_bytes", lambda p: reads.append(p.pid) or real(p))
    try:
        for process in (first, first, second, first):
            with pytest.raises(Pending):
                attacher.attach(process.process, identity_of(SLEEP))
        assert reads == [36, 37, 36]  # put off once; then forgotten for the second
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_the_processes_waiting_are_remembered_for_a_bounded_number(
        tmp_path: Path, attachers, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "MAPS_MEMO_PROCESSES", 1)
    first, second = sleeper(tmp_path / "a", pid=38), sleeper(tmp_path / "b", pid=39)
    resolver, gate = blocked_resolver()
    attacher = attachers(cache_knowing((SLEEP, NotJemalloc())), background=resolver)
    reads: list[int] = []
    real = attach.read_maps_bytes
    monkeypatch.setattr(attach, "read_maps_bytes", lambda p: reads.append(p.pid) or real(p))
    try:
        for process in (first, first, second, first, second):
            with pytest.raises(Pending):
                attacher.attach(process.process, identity_of(SLEEP))
        assert reads == [38, 39, 38, 39]  # its own wait kept; each forgot the other's
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_each_code_object_is_statted_once_while_it_stays_mapped(
        tmp_path: Path, attachers, lib_copy, monkeypatch: pytest.MonkeyPatch):
    fake = sleeper(tmp_path, pid=40)
    resolver, gate = blocked_resolver(max_jobs=1)  # nothing queued: looked at every time
    attacher = attachers(cache_knowing((SLEEP, NotJemalloc())), background=resolver)
    statted: list[str] = []
    real = attach.identity_of
    monkeypatch.setattr(attach, "identity_of", lambda path: statted.append(path) or real(path))
    try:
        for _ in range(2):
            with pytest.raises(Pending):
                attacher.attach(fake.process, identity_of(SLEEP))
        assert len(statted) == 2  # libc and ld.so, once each
        lib = lib_copy("libnew.so")
        fake.map(lib)
        with pytest.raises(Pending):
            attacher.attach(fake.process, identity_of(SLEEP))
        assert len(statted) == 3 and statted[-1].endswith(fake.lines[-1].split()[0])
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_the_stats_remembered_per_process_are_bounded(tmp_path: Path, attachers,
                                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "MAPS_MEMO_OBJECTS", 1)
    monkeypatch.setattr(attach, "MAPS_MEMO_PROCESSES", 1)
    first, second = sleeper(tmp_path / "a", pid=41), sleeper(tmp_path / "b", pid=42)
    resolver, gate = blocked_resolver(max_jobs=1)
    attacher = attachers(cache_knowing((SLEEP, NotJemalloc())), background=resolver)
    statted: list[str] = []
    real = attach.identity_of
    monkeypatch.setattr(attach, "identity_of", lambda path: statted.append(path) or real(path))
    try:
        for process in (first, first, second, first):
            with pytest.raises(Pending):
                attacher.attach(process.process, identity_of(SLEEP))
        # first: 2 statted, 1 kept; again: 1; second: 2; first again, forgotten: 2
        assert len(statted) == 7
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_close_leaves_the_worker_to_a_background_parse_still_running(tmp_path: Path,
                                                                    attachers):
    resolver = BackgroundResolver()
    attacher = attachers(cache_knowing((LIBC, NotJemalloc()), (LD_SO, NotJemalloc())),
                         background=resolver)
    with pytest.raises(Pending):
        attacher.attach(sleeper(tmp_path).process, identity_of(SLEEP))
    assert resolver.wait_idle(WAIT)  # parsed in the background: the worker started
    worker = attacher.worker.pid
    running, gate = threading.Event(), threading.Event()
    assert resolver.submit("parse", 1, lambda: (running.set(), gate.wait(WAIT)))
    assert running.wait(WAIT)
    attacher.close()
    assert worker is not None and attacher.worker.pid == worker  # a parse may still need it
    assert not resolver.submit("after", 1, lambda: None)  # the resolver is closed
    gate.set()
    assert resolver.wait_idle(WAIT)
    attacher.close()
    assert attacher.worker.pid is None


def test_close_stops_the_worker(tmp_path: Path, attachers):
    attacher = attachers(LayoutCache(None))
    assert attacher.resolve_file(SLEEP) == NotJemalloc()
    assert attacher.worker.pid is not None
    attacher.close()
    assert attacher.worker.pid is None
    resolver = BackgroundResolver()
    idle = attachers(cache_knowing((LIBC, NotJemalloc()), (LD_SO, NotJemalloc())),
                     background=resolver)
    with pytest.raises(Pending):
        idle.attach(sleeper(tmp_path).process, identity_of(SLEEP))
    assert resolver.wait_idle(WAIT) and idle.worker.pid is not None
    idle.close()
    assert idle.worker.pid is None and not resolver.submit("after", 1, lambda: None)


# --- map_files refused: the path inside the target's root ----------------------------------

FALLBACK = r"""
import json, os, sys
from ctprofd.procfs.processes import Mapping, ProcessInfo, StatLine
from ctprofd.resolve.attach import _mapped_file
proc, pid, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
process = ProcessInfo(proc, pid, StatLine("x", "S", 1))
out = []
for path, inode, replace_with in cases:
    found = _mapped_file(process, Mapping(0x1000, 0x2000, "r-xp", 0, inode, path), 1 << 30)
    if found is None:
        out.append(None)
        continue
    identity, opener = found
    if replace_with:
        os.rename(replace_with, os.path.join(proc, str(pid), "root", path.lstrip("/")))
    try:
        fd, st = opener()
        os.close(fd)
        out.append([identity.ino, st.st_ino])
    except OSError as exc:
        out.append([identity.ino, str(exc)])
print(json.dumps(out))
"""


def test_without_map_files_the_same_inode_is_opened_inside_the_targets_root(tmp_path: Path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "Xlib").mkdir(parents=True)
    for name in ("a.so", "b.so", "c.so", "new.so"):
        shutil.copy(LIBC, rootfs / "Xlib" / name)
    fake = FakeProc(tmp_path / "proc", pid=50, fs_root=str(rootfs))
    os.chmod(fake.dir / "map_files", 0)  # refused to us, as without CAP_SYS_ADMIN
    ino = {name: os.stat(rootfs / "Xlib" / name).st_ino for name in ("a.so", "b.so", "c.so")}
    cases = [["/Xlib/a.so", ino["a.so"], None],
             ["/Xlib/b.so", ino["a.so"], None],  # another file there now
             ["/Xlib/missing.so", ino["a.so"], None],
             ["/Xlib/c.so", ino["c.so"], str(rootfs / "Xlib" / "new.so")]]  # replaced after
    # as root, map_files is not refused: an entry missing there is a file unmapped
    assert attach._mapped_file(fake.process, Mapping(0x1000, 0x2000, "r-xp", 0, ino["a.so"],
                                                     "/Xlib/a.so"), 1 << 30) is None
    package = str(Path(ctprofd.__file__).resolve().parents[1])
    run = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--",
         sys.executable, "-c", FALLBACK, str(tmp_path / "proc"), "50", json.dumps(cases)],
        capture_output=True, text=True, timeout=WAIT,
        env={**os.environ, "PYTHONPATH": package})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [
        [ino["a.so"], ino["a.so"]], None, None,
        [ino["c.so"], "/Xlib/c.so: replaced on disk"]]


def test_a_real_process_with_jemalloc_preloaded_is_attached_through_its_got_slot(attachers):
    proc = subprocess.Popen(["sleep", "1000"], env={**os.environ, "LD_PRELOAD": STOCK})
    try:
        process = wait_mapped(proc.pid, STOCK)
        [mapped] = [m for m in code_objects(read_maps(process)) if m.path == STOCK]
        others = [(m.path, NotJemalloc()) for m in code_objects(read_maps(process))
                  if m.path != STOCK]
        attacher = attachers(cache_knowing(*others))
        found = attacher.attach(process, exe_identity(process))
        assert isinstance(found, Attachment) and found.base == mapped.start
        assert found.layout.tpoff_got is not None and found.tsd_delta is None
        assert found.got_slot == mapped.start + found.layout.tpoff_got
        assert attacher.elf_opens == 1  # only libjemalloc.so.2 was parsed
    finally:
        proc.kill()
        proc.wait()


def test_in_the_background_the_loaders_files_are_parsed_while_the_process_is_pending(
        tmp_path: Path, attachers, lib_copy):
    fake = FakeProc(tmp_path, pid=60)
    fake.map(SLEEP)
    fake.map(LIBC)
    ld = fake.map(LD_SO)
    lib = lib_copy("libj.so")
    base = fake.map(lib)
    resolver, gate = blocked_resolver()
    attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()),
                         background=resolver)
    try:
        for _ in range(2):  # queued: not submitted again
            with pytest.raises(Pending) as pending:
                attacher.attach(fake.process, identity_of(SLEEP))
            assert str(pending.value) == f"{LD_SO}: being resolved"
            assert attacher.submitted == 2 and attacher.elf_opens == 0
    finally:
        gate.set()
    assert resolver.wait_idle(WAIT)
    with open(LIBC, "rb") as f, open(LD_SO, "rb") as g:
        assert attacher.attach(fake.process, identity_of(SLEEP)) == Attachment(
            DYNAMIC, base=base, loader=place(loader_facts(f), loader_facts(g), ld))
    assert attacher.elf_opens == 2


def test_a_loader_job_the_resolver_refuses_is_offered_again_and_its_file_closed(
        tmp_path: Path, attachers, lib_copy):
    fake = FakeProc(tmp_path, pid=61)
    fake.map(SLEEP)
    fake.map(LIBC)
    lib = lib_copy("libj.so")
    fake.map(lib)
    resolver, gate = blocked_resolver(max_per_owner=1)
    assert resolver.submit("root's", os.stat(LIBC).st_uid, lambda: None)  # its owner: full
    attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()),
                         background=resolver)
    fds = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(2):
            with pytest.raises(Pending) as pending:
                attacher.attach(fake.process, identity_of(SLEEP))
            assert str(pending.value) == f"{LIBC}: being resolved"
        assert attacher.submitted == 0 and len(os.listdir("/proc/self/fd")) == fds
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_a_loader_object_gone_does_not_end_the_search_for_the_other(tmp_path: Path,
                                                                    attachers, lib_copy):
    fake = FakeProc(tmp_path, pid=62)
    fake.map(SLEEP)
    fake.map(LD_SO, link=False)  # gone: looked past
    fake.map(LIBC)
    lib = lib_copy("libj.so")
    fake.map(lib)
    attacher = attachers(cache_knowing((lib, DYNAMIC), cache=no_jemalloc()))
    with pytest.raises(ProbeError):
        attacher.attach(fake.process, identity_of(SLEEP))
    assert list(attacher.loaders) == [f"loader:{key_of(LIBC)}"] and attacher.elf_opens == 1


def learned_for(path: str, note: str) -> TsdLayout:
    """A layout that applies to the file at `path` (by what it says of itself), marked."""
    from ctprofd.resolve.layout import inspect_object
    with open(path, "rb") as stream:
        facts = inspect_object(stream, path, True)
    symbol = facts.symbol
    return TsdLayout(facts.build_id, symbol.name if symbol else "(stripped)",
                     symbol.value if symbol else 0, 824, 840, **facts.placement(),
                     code_source=note)


def test_a_layout_learned_from_a_file_of_the_same_build_and_owner_is_taken(attachers):
    owner = os.stat(STOCK).st_uid
    known = learned_for(STOCK, "learned from another copy")
    cache = LayoutCache(None)
    cache.put(learned_key(known.build_id, owner), known, owner)
    attacher = attachers(cache)
    assert attacher.resolve_file(STOCK) == known  # its code not read


def test_a_layout_learned_in_a_view_is_taken_in_that_view(tmp_path: Path, attachers):
    owner = os.stat(STOCK).st_uid
    known = learned_for(STOCK, "learned in that view")
    fake = FakeProc(tmp_path, ns=4026532000)
    fake.map(SLEEP)
    start = fake.map(STOCK)
    view = view_of(fake.process, attach._own_view())
    cache = cache_knowing((SLEEP, NotJemalloc()))
    cache.put(view_key(learned_key(known.build_id, owner), view), known, owner)
    found = attachers(cache).attach(fake.process, identity_of(SLEEP))
    assert found == Attachment(known, got_slot=start + known.tpoff_got, base=start)


def test_resolve_file_in_the_background_is_pending_under_the_files_own_key(attachers):
    resolver, gate = blocked_resolver()
    attacher = attachers(LayoutCache(None), background=resolver)
    try:
        with pytest.raises(Pending) as pending:
            attacher.resolve_file(SLEEP)
        assert pending.value.keys == (key_of(SLEEP),)
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_a_jemalloc_object_parsed_in_the_background_is_cached(tmp_path: Path, attachers):
    fake = sleeper(tmp_path)
    start = fake.map(STOCK)
    resolver = BackgroundResolver()
    cache = no_jemalloc()
    attacher = attachers(cache, background=resolver)
    with pytest.raises(Pending) as pending:
        attacher.attach(fake.process, identity_of(SLEEP))
    assert str(pending.value) == f"{STOCK}: being resolved"
    assert resolver.wait_idle(WAIT)
    layout = cache.get(key_of(STOCK))
    assert isinstance(layout, TsdLayout) and layout.tpoff_got is not None
    assert attacher.attach(fake.process, identity_of(SLEEP)) == Attachment(
        layout, got_slot=start + layout.tpoff_got, base=start)


def owned_copy(tmp_path: Path, source: str, name: str, uid: int = 1000) -> str:
    """A copy of `source` owned by `uid`."""
    path = tmp_path / "owned" / name
    path.parent.mkdir(exist_ok=True)
    shutil.copy(source, path)
    os.chown(path, uid, uid)
    return str(path)


def test_what_a_parse_gives_is_cached_as_its_files_owners(tmp_path: Path, attachers):
    lib = owned_copy(tmp_path, STOCK, "libjemalloc.so.2")
    known = learned_for(lib, "learned from another copy")
    cache = LayoutCache(str(tmp_path / "cache"))
    cache.put(learned_key(known.build_id, 1000), known, 1000)
    attacher = attachers(cache)
    assert attacher.resolve_file(lib) == known
    ident = BinaryIdentity.of(os.stat(lib))
    assert cache_key_files(tmp_path / "cache") == {
        f"build-id:{known.build_id}:uid:1000": 1000, ident.key: 1000}
    other = owned_copy(tmp_path, LIBC, "libc.so.6")
    assert attacher.resolve_file(other) == NotJemalloc()
    assert cache_key_files(tmp_path / "cache")[key_of(other)] == 1000


def cache_key_files(directory: Path) -> dict[str, int]:
    """The keys of the cache's files on disk, and the owner each is filed under."""
    found = {}
    for path in directory.rglob("*.json"):
        if path.name == "imported.json":
            continue
        data = json.loads(path.read_text())
        found[data["key"]] = int(path.name.rsplit(".u", 1)[1].removesuffix(".json"))
    return found


def test_a_file_that_is_no_elf_is_a_failure_named_as_each_process_has_it(tmp_path: Path,
                                                                        attachers):
    text = tmp_path / "lib" / "libj.so"
    text.parent.mkdir()
    text.write_text("not an object\n" * 10)
    other = tmp_path / "lib" / "libk.so"
    os.link(text, other)  # the same file under another name
    cache = no_jemalloc()
    attacher = attachers(cache)
    for pid, path in ((71, text), (72, other)):
        fake = sleeper(tmp_path / str(pid), pid=pid)
        fake.map(str(path))
        with pytest.raises(ProbeError) as raised:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert raised.value.tag == tags.DWARF_PARSE_FAILURE
        assert raised.value.message.startswith(f"{path}: ")
    assert attacher.elf_opens == 1  # parsed once, for the first


def test_a_successful_parse_forgets_the_lost_ones(tmp_path: Path, attachers):
    from ctprofd.resolve.parse_worker import ParseWorker
    from ctprofd.resolve.retry import RetrySchedule
    clock = [1000.0]
    attacher = attachers(cache_knowing((LIBC, NotJemalloc()), (LD_SO, NotJemalloc())),
                         limits=WorkerLimits(uid=1 << 40, gid=1 << 40))
    attacher.retries = RetrySchedule(lambda: clock[0])
    fake = sleeper(tmp_path)
    with pytest.raises(ProbeError):
        attacher.attach(fake.process, identity_of(SLEEP))  # lost once
    clock[0] += 1.5  # its parse is due again
    attacher.worker.close()
    attacher.worker = ParseWorker(WorkerLimits())
    assert attacher.attach(fake.process, identity_of(SLEEP)) == NotJemalloc()
    assert attacher.retries.failed(key_of(SLEEP)) == 1.0  # a first loss again, not a second


@pytest.fixture
def linked_lib(tmp_path: Path) -> str:
    """A small jemalloc look-alike library gcc builds, stripped of its DWARF, with its
    debug file beside it under the name its debuglink gives."""
    from test_layout_phases import library, split_debug
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir(exist_ok=True)
    stripped = split_debug(library(tmp_path, "libj.so", "-g"), lib_dir / "libj.debug")
    os.rename(stripped, lib_dir / "libj.so")
    return str(lib_dir / "libj.so")


def test_a_debug_file_beside_the_object_is_found_in_the_operators_view(attachers,
                                                                      linked_lib: str):
    layout = attachers(LayoutCache(None)).resolve_file(linked_lib)
    assert isinstance(layout, TsdLayout) and layout.code_source is None
    assert layout.dwarf_source == f"debuglink {os.path.dirname(linked_lib)}/libj.debug"


def test_a_debug_file_beside_the_object_is_found_in_the_targets_root(tmp_path: Path,
                                                                    attachers,
                                                                    linked_lib: str):
    fake = sleeper(tmp_path)
    start = fake.map(linked_lib)
    found = attachers(no_jemalloc()).attach(fake.process, identity_of(SLEEP))
    assert isinstance(found, Attachment) and found.base == start
    assert found.layout.dwarf_source == f"debuglink {os.path.dirname(linked_lib)}/libj.debug"


def test_a_wait_ends_once_the_maps_are_read_again(tmp_path: Path, attachers, lib_copy,
                                                  monkeypatch: pytest.MonkeyPatch):
    lib = lib_copy("libj.so")
    first, second = sleeper(tmp_path / "a", pid=81), sleeper(tmp_path / "b", pid=82)
    for fake in (first, second):
        fake.map(lib)
    resolver, gate = blocked_resolver()
    attacher = attachers(no_jemalloc(), background=resolver)
    try:
        with pytest.raises(Pending):
            attacher.attach(first.process, identity_of(SLEEP))  # waits for lib
    finally:
        gate.set()
    assert resolver.wait_idle(WAIT)
    assert attacher.attach(first.process, identity_of(SLEEP)) == NotJemalloc()
    attacher.cache = no_jemalloc()  # lib forgotten since (the cache's bounds)
    attacher.begin()  # a later snapshot
    resolver2, gate2 = blocked_resolver()
    attacher.background = resolver2
    try:
        with pytest.raises(Pending):
            attacher.attach(second.process, identity_of(SLEEP))  # lib queued again
        with pytest.raises(Pending) as pending:
            attacher.attach(first.process, identity_of(SLEEP))
        assert str(pending.value) == f"{lib}: being resolved"  # its maps read: no old wait
    finally:
        gate2.set()
        resolver2.wait_idle(WAIT)
        resolver2.close()


def test_maps_naming_a_file_in_bytes_not_utf_8_are_read(tmp_path: Path, attachers, lib_copy):
    fake = sleeper(tmp_path, pid=91)
    lib = lib_copy("libx.so")
    start = fake.map(lib)
    maps = (fake.dir / "maps").read_bytes().replace(b"libx.so", b"lib\xffx.so")
    (fake.dir / "maps").write_bytes(maps)  # its map_files link is what is statted
    attacher = attachers(cache_knowing((lib, SHARED), cache=no_jemalloc()))
    assert attacher.attach(fake.process, identity_of(SLEEP)).got_slot == start + 0x2000


def test_the_shapes_bound_is_for_all_the_shapes_of_a_snapshot(
        tmp_path: Path, attachers, lib_copy, monkeypatch: pytest.MonkeyPatch):
    lib = lib_copy("libx.so")
    pairs = []
    for shape in range(3):  # three shapes, two processes each
        pair = [FakeProc(tmp_path / f"{shape}{i}", pid=10 * shape + i) for i in (1, 2)]
        for fake in pair:
            fake.map(SLEEP, 0x555500000000 + shape * 0x100000)
            fake.map(lib, 0x7F0000000000)
        pairs.append(pair)
    size = [len((pair[0].dir / "maps").read_bytes()) for pair in pairs]
    monkeypatch.setattr(attach, "SHAPES_MAX_BYTES", sum(size) - 1)  # room for two
    cache = cache_knowing((SLEEP, NotJemalloc()), (lib, NotJemalloc()))
    attacher = attachers(cache)
    for pair in pairs:
        assert attacher.attach(pair[0].process, identity_of(SLEEP)) == NotJemalloc()
    cache.put(key_of(lib), SHARED)
    kept = [attacher.attach(pair[1].process, identity_of(SLEEP)) == NotJemalloc()
            for pair in pairs]
    assert kept == [True, True, False]


def test_a_process_looked_at_again_after_an_answer_stats_its_objects_again(
        tmp_path: Path, attachers, lib_copy):
    fake = sleeper(tmp_path, pid=92)
    lib = lib_copy("libx.so")
    fake.map(lib)
    resolver, gate = blocked_resolver()
    attacher = attachers(cache_knowing((lib, NotJemalloc()), cache=no_jemalloc()),
                         background=resolver)
    try:
        assert attacher.attach(fake.process, identity_of(SLEEP)) == NotJemalloc()
        with open(lib, "ab") as f:
            f.write(b"changed in place")  # the same inode, another identity
        attacher.begin()
        with pytest.raises(Pending) as pending:
            attacher.attach(fake.process, identity_of(SLEEP))
        assert pending.value.keys == (key_of(lib),)
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_an_answer_forgets_the_looks_put_off_before_it(tmp_path: Path, attachers, lib_copy,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(attach, "PENDING_MAPS_LINES", 2)
    fake = sleeper(tmp_path, pid=93)
    resolver, gate = blocked_resolver(max_jobs=1)  # full: nothing is queued
    cache = cache_knowing((SLEEP, NotJemalloc()))
    attacher = attachers(cache, background=resolver)
    reads: list[int] = []
    real = attach.read_maps_bytes
    monkeypatch.setattr(attach, "read_maps_bytes", lambda p: reads.append(1) or real(p))

    def look() -> bool:
        before = len(reads)
        try:
            attacher.attach(fake.process, identity_of(SLEEP))
        except Pending:
            pass
        return len(reads) > before
    try:
        assert [look(), look()] == [True, False]  # 3 lines: put off once
        cache_knowing((LIBC, NotJemalloc()), (LD_SO, NotJemalloc()), cache=cache)
        assert look()  # answered: NotJemalloc
        fake.map(lib_copy("libnew.so"))  # a module loaded since: pending again
        attacher.begin()
        assert [look(), look(), look()] == [True, False, True]  # as the first time
    finally:
        gate.set()
        resolver.wait_idle(WAIT)


def test_a_failure_parsed_in_the_background_is_cached_and_named(tmp_path: Path, attachers):
    text = tmp_path / "lib" / "libj.so"
    text.parent.mkdir()
    text.write_text("not an object\n" * 10)
    fake = sleeper(tmp_path, pid=94)
    fake.map(str(text))
    resolver = BackgroundResolver()
    attacher = attachers(no_jemalloc(), background=resolver)
    with pytest.raises(Pending):
        attacher.attach(fake.process, identity_of(SLEEP))
    assert resolver.wait_idle(WAIT)
    with pytest.raises(ProbeError) as raised:
        attacher.attach(fake.process, identity_of(SLEEP))
    assert raised.value.message.startswith(f"{text}: ") and attacher.submitted == 1


def test_an_executables_debug_file_beside_it_in_the_targets_root_is_found(tmp_path: Path,
                                                                         attachers):
    from test_layout_phases import executable, split_debug
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stripped = split_debug(executable(tmp_path, "prog"), bin_dir / "prog.debug")
    os.rename(stripped, bin_dir / "prog")
    fake = FakeProc(tmp_path / "proc", exe=str(bin_dir / "prog"))
    fake.map(str(bin_dir / "prog"))
    found = attachers(LayoutCache(None)).attach(fake.process, identity_of(str(bin_dir / "prog")))
    assert isinstance(found, Attachment) and found.tsd_delta == found.layout.static_tsd_delta()
    assert found.layout.dwarf_source == f"debuglink {bin_dir}/prog.debug"
