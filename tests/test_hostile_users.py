"""Attacks by an unprivileged user (uid 65534, through setpriv) on a root ctprofd, using
only files and processes that user owns. Each test runs the daemon as root beside a root
jemalloc process and asserts that the schedule keeps going, the root process is read
exactly, scrapes are answered and the daemon's memory (and cache) stay bounded."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.procfs.processes import read_process
from ctprofd.report.snapshot import ARENA
from ctprofd.resolve.attach import Pending, exe_identity
from ctprofd.resolve.parse_worker import WorkerLimits
from daemon_process import DaemonProcess, write_config
from support import elf

NOBODY = 65534
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
MAX_RSS_KIB = 300 << 10
CACHE_ENTRIES = 8


class Host:
    """A root daemon reading a root fixture and whatever runs from the user's directory."""

    def __init__(self, daemon: DaemonProcess, root_fixture, user_dir: Path) -> None:
        self.daemon = daemon
        self.root_fixture = root_fixture
        self.user_dir = user_dir

    def reads(self, fixture, timeout: float = 60) -> str:
        """Wait until a scrape has the fixture's series (its binary resolved beside the
        snapshots); that scrape."""
        deadline = time.monotonic() + timeout
        while f'pid="{fixture.pid}"' not in (text := self.daemon.get()):
            assert time.monotonic() < deadline, f"pid {fixture.pid} never read"
            time.sleep(0.05)
        return text

    def snapshots(self) -> float:
        return self.daemon.sample("ctprofd_snapshots_total") or 0

    def keeps_going(self, snapshots: int = 3) -> str:
        """Wait for `snapshots` more snapshots; check the root fixture, RSS and the scrape."""
        text = self.daemon.wait_for_sample("ctprofd_snapshots_total",
                                           self.snapshots() + snapshots, timeout=60)
        assert_exact(text, self.root_fixture)
        assert rss_kib(self.daemon.proc.pid) < MAX_RSS_KIB
        return text

    def failures(self, text: str) -> dict[str, float]:
        return {m[0]: float(m[1]) for m in
                re.findall(r'^ctprofd_probe_failures{tag="([^"]+)"} (\S+)$', text, re.M)}

    def user_file(self, source: Path, name: str | None = None) -> Path:
        """A copy of `source` in the user's directory, owned by the user."""
        target = self.user_dir / (name or source.name)
        shutil.copy2(source, target)
        os.chown(target, NOBODY, NOBODY)
        return target

    def user_sparse_file(self, name: str, size: int) -> Path:
        """A sparse file of `size` bytes in the user's directory, owned by the user."""
        target = self.user_dir / name
        with open(target, "wb") as f:
            f.truncate(size)
        os.chown(target, NOBODY, NOBODY)
        return target


def assert_exact(text: str, fixture) -> None:
    """The scrape has the fixture's series (labels [pid]) equal to its own mallctl reports."""
    truth = (sum(t["allocated"] for t in fixture.threads),
             sum(t["deallocated"] for t in fixture.threads))
    read = tuple(re.search(rf'^ctprofd_{name}_bytes_total{{pid="{fixture.pid}"}} (\S+)$',
                           text, re.M) for name in ("allocated", "deallocated"))
    assert None not in read, f"no series for pid {fixture.pid}"
    assert tuple(float(m.group(1)) for m in read) == truth


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


@pytest.fixture
def host(request, tmp_path, fixture_bins, spawn_fixture) -> Iterator[Host]:
    """The daemon's cache holds at most CACHE_ENTRIES entries; an indirect parameter adds
    configuration."""
    user_dir = Path(tempfile.mkdtemp(prefix="ctprofd-user-"))
    os.chmod(user_dir, 0o755)
    os.chown(user_dir, NOBODY, NOBODY)
    root_fixture = spawn_fixture(fixture_bins["dynamic"], 2)  # its own build-id
    extra = (f"labels: [pid]\nlog_level: debug\ncache_max_entries: {CACHE_ENTRIES}\n"
             f"debug_dirs: ['{fixture_bins.debug_root}']\n"
             f"selection:\n  include:\n"
             f"    exe: ['{fixture_bins.root}/*', '{user_dir}/*']\n"
             + getattr(request, "param", ""))
    daemon = DaemonProcess("--config", str(write_config(tmp_path, extra, interval=0.5)))
    try:
        daemon.started()
        host = Host(daemon, root_fixture, user_dir)
        host.reads(root_fixture)
        yield host
    finally:
        daemon.stop()
        shutil.rmtree(user_dir, ignore_errors=True)


# Run as the user: once the file named by argv[1] was opened and closed (the daemon's first
# look at it), rename a FIFO over it, so that anything opening the path again blocks.
SWAP_FOR_FIFO = r"""
import ctypes, os, struct, sys
path = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
IN_CLOSE_NOWRITE = 0x10
fd = libc.inotify_init()
assert fd >= 0 and libc.inotify_add_watch(fd, path.encode(), IN_CLOSE_NOWRITE) >= 0
print("READY", flush=True)
os.read(fd, 4096)
os.mkfifo(path + ".fifo")
os.rename(path + ".fifo", path)
print("SWAPPED", flush=True)
sys.stdin.read()
"""


def test_a_debug_file_swapped_for_a_fifo_never_blocks(host, fixture_bins, spawn_fixture,
                                                      spawn_process):
    """The debug file turns into a FIFO right after its first open: opened once, it is
    parsed from that descriptor, so the user's process is read and nothing blocks."""
    variant = fixture_bins["static-stripped-debuglink"]
    binary = host.user_file(variant.binary)
    debug = host.user_file(variant.debug_file)
    swapper = spawn_process([sys.executable, "-c", SWAP_FOR_FIFO, str(debug)],
                            prefix=AS_NOBODY)
    user = spawn_fixture(binary, 1, prefix=AS_NOBODY)
    assert swapper.readline(timeout=60) == "SWAPPED"
    assert stat.S_ISFIFO(os.lstat(debug).st_mode)
    host.reads(user)
    text = host.keeps_going()
    assert host.failures(text).get("dwarf-parse-failure") is None
    assert f'ctprofd_threads{{pid="{user.pid}"}} 2' in text


def test_a_fifo_for_a_debug_file_is_refused(host, fixture_bins, spawn_fixture):
    variant = fixture_bins["static-stripped-debuglink"]
    binary = host.user_file(variant.binary)
    os.mkfifo(host.user_dir / variant.debug_file.name)
    os.chown(host.user_dir / variant.debug_file.name, NOBODY, NOBODY)
    spawn_fixture(binary, 1, prefix=AS_NOBODY)
    host.keeps_going()
    host.daemon.wait_for(rf"{re.escape(str(binary))}: no DWARF.*not a regular file", timeout=30)


def test_a_huge_sparse_debug_file_is_not_read(host, fixture_bins, spawn_fixture):
    variant = fixture_bins["static-stripped-debuglink"]
    binary = host.user_file(variant.binary)
    host.user_sparse_file(variant.debug_file.name, 64 << 30)
    spawn_fixture(binary, 1, prefix=AS_NOBODY)
    host.keeps_going()
    host.daemon.wait_for(rf"{re.escape(str(binary))}: no DWARF.*too large", timeout=30)


def test_a_symlinked_debug_dir_lends_no_root_eyes(host, fixture_bins, spawn_fixture):
    """`.debug/` beside the user's binary points at a directory only root may read, which
    holds the right debug file: it is not opened (a symlink), and no CRC of a root-only
    file shows in the log (the offsets come from machine code instead)."""
    variant = fixture_bins["static-stripped-debuglink-subdir"]
    binary = host.user_file(variant.binary)
    secret = Path(tempfile.mkdtemp(prefix="ctprofd-root-only-"))  # mode 0700, root's
    try:
        shutil.copy2(variant.debug_file, secret / variant.debug_file.name)
        (host.user_dir / ".debug").symlink_to(secret)
        os.lchown(host.user_dir / ".debug", NOBODY, NOBODY)
        spawn_fixture(binary, 1, prefix=AS_NOBODY)
        host.keeps_going()
        line = host.daemon.wait_for(rf"{re.escape(str(binary))}: no DWARF", timeout=30).string
        assert "symbolic links" in line and "CRC" not in line
    finally:
        shutil.rmtree(secret)


def test_a_borrowed_build_id_never_lends_its_layout_to_root(host, fixture_bins, spawn_fixture,
                                                            tmp_path):
    """The user runs a binary claiming the build-id of a root program but placing jemalloc's
    TSD elsewhere (hostile_threads' larger TLS block); the root program started later, by
    a daemon restarted on the same on-disk cache, must still be read exactly."""
    root_binary = fixture_bins["static"].binary
    wanted = bytes.fromhex(elf.build_id(root_binary))
    forged = host.user_file(fixture_bins.hostile_threads, "forged")
    data = forged.read_bytes()
    forged.write_bytes(data.replace(bytes.fromhex(elf.build_id(forged)), wanted))
    assert elf.build_id(forged) == wanted.hex()
    user = spawn_fixture(forged, 2, prefix=AS_NOBODY)
    host.reads(user)
    assert_exact(host.keeps_going(), user)
    host.daemon.stop()
    host.daemon = DaemonProcess("--config", str(tmp_path / "ctprofd.yaml"))
    try:
        host.daemon.started()
        root = spawn_fixture(root_binary, 2)
        host.reads(root)
        host.reads(host.root_fixture)
        assert_exact(host.keeps_going(), root)
    finally:
        host.daemon.stop()


def test_a_binary_touched_again_and_again_keeps_the_cache_bounded(host, fixture_bins,
                                                                  spawn_fixture, tmp_path):
    """Every touch makes a new file identity, so a process started from it is a new parse
    and a new cache entry: the cache keeps its bound, forgetting the user's own oldest
    entries, never root's. A process
    already running from the file is not attached again (its image did not change), and
    its counters are not counted twice."""
    binary = host.user_file(fixture_bins["static"].binary, "touched")
    running = spawn_fixture(binary, 1, prefix=AS_NOBODY)
    host.reads(running)
    for second in range(2 * CACHE_ENTRIES):
        subprocess.run([*AS_NOBODY, "touch", "-m", "-d", f"@{1_000_000 + second}", str(binary)],
                       check=True)
        new = spawn_fixture(binary, 1, prefix=AS_NOBODY)
        host.reads(new)
        text = host.keeps_going(2)
        assert_exact(text, running)
        assert_exact(text, new)
        new.kill()
        assert host.daemon.sample("ctprofd_offset_cache_entries", text) <= CACHE_ENTRIES
        assert len(os.listdir(tmp_path / "cache" / "layouts")) <= CACHE_ENTRIES
    assert host.daemon.sample("ctprofd_offset_cache_misses_total", text) >= 2 * CACHE_ENTRIES
    # the user evicted its own layouts, never root's (within its share): the root fixture's
    # libjemalloc.so.2 is still cached, on disk too
    st = fixture_bins["dynamic"].jemalloc_object.stat()
    root_key = f"file_{st.st_dev}_{st.st_ino}_{st.st_size}_{st.st_mtime_ns}."
    assert any(name.startswith(root_key) for name in os.listdir(tmp_path / "cache" / "layouts"))


SLOW_PARSES = "parser: {timeout: 15, max_file_mib: 1048576}\n"


@pytest.mark.parametrize("host", [SLOW_PARSES], indirect=True)
def test_a_binary_slow_to_resolve_never_delays_the_others(host, fixture_bins, spawn_fixture):
    """The user's debug file is a 1 TiB sparse file (allowed here): its CRC cannot end
    before the parser's 15 s timeout. Meanwhile the user's process is pending, never
    failed, and snapshots go on reading the root process exactly."""
    variant = fixture_bins["static-stripped-debuglink"]
    binary = host.user_file(variant.binary)
    host.user_sparse_file(variant.debug_file.name, 1 << 40)
    user = spawn_fixture(binary, 1, prefix=AS_NOBODY)
    host.daemon.wait_for_sample("ctprofd_probe_pending", 1)
    for _ in range(3):  # each of these snapshots ran while the parse was under way
        text = host.keeps_going(1)
        assert host.daemon.sample("ctprofd_probe_pending", text) == 1
        assert host.failures(text).get("dwarf-parse-failure") is None
    host.daemon.wait_for(rf"{re.escape(str(binary))}.*(timed out|time limit)", timeout=60)
    text = host.keeps_going(2)
    assert host.daemon.sample("ctprofd_probe_pending", text) == 0
    assert f'pid="{user.pid}"' not in text


def test_a_resolver_kept_busy_is_not_waited_for_in_every_snapshot(fixture_bins, spawn_fixture,
                                                                   tmp_path):
    """A snapshot that handed the background resolver new files waits for it (its grace),
    but after a wait that ended with the resolver still busy, the next snapshot does not
    wait, whatever its grace: a user whose file takes the parser its whole timeout (a
    sparse debug file whose CRC cannot end), and new binaries every snapshot, cannot make
    every snapshot wait. The one after waits again, and reads what was resolved."""
    variant = fixture_bins["static-stripped-debuglink"]
    slow = tmp_path / "slow" / variant.binary.name
    slow.parent.mkdir()
    shutil.copy2(variant.binary, slow)
    with open(slow.parent / variant.debug_file.name, "wb") as f:
        f.truncate(1 << 40)  # its debuglink CRC is read to the end: the parse times out
    copies = [tmp_path / f"new{i}" for i in range(2)]  # a new identity in each snapshot
    for copy in copies:
        shutil.copy2(fixture_bins["static"].binary, copy)
    wanted: set[int] = set()  # read by pid: no walk of a busy host before the wait
    engine = Capturer(CaptureSettings(
        debug_dirs=(), background=True,
        parser=WorkerLimits(timeout=10, max_file_bytes=1 << 41), resolve_grace=1.0))
    background = engine.attacher.background
    try:
        wanted.add(spawn_fixture(slow, 1).pid)
        first = engine.capture(pids=wanted)  # waits its 1 s grace: the slow parse goes on
        assert first.pending == 1 and not background.wait_idle(0)
        engine.settings.resolve_grace = 600.0  # a wait now would last until the resolver idles
        new = spawn_fixture(copies[0], 1)
        wanted.add(new.pid)
        second = engine.capture(pids=wanted)
        assert not background.wait_idle(0), "the snapshot after a missed wait waited"
        assert second.pending == 2
        newer = spawn_fixture(copies[1], 1)
        wanted.add(newer.pid)
        third = engine.capture(pids=wanted)  # the back-off is over: it waits, and reads what resolved
        assert background.wait_idle(0)
        read = {sample.pid for sample in third.processes}
        assert {new.pid, newer.pid} <= read, third.failed_pids
        assert third.pending == 0
    finally:
        engine.close()


def refused_line(host: Host, binary: Path, why: str) -> str:
    """The daemon's line saying the binary's debug file was refused for `why` (a regex)."""
    return host.daemon.wait_for(rf"{re.escape(str(binary))}: no DWARF: .*refused: {why}",
                                timeout=30).string


@pytest.mark.parametrize("owner, mode, why", [
    (12345, 0o644, r"owned by uid 12345, neither the object's owner \(uid 65534\) nor root"),
    (NOBODY, 0o664, r"writable by group"),
    (NOBODY, 0o646, r"writable by others"),
])
def test_a_debug_file_beside_the_object_must_be_its_owners(host, fixture_bins, spawn_fixture,
                                                           owner, mode, why):
    """The user's binary has the right debug file beside it, but owned by another user, or
    writable by others: not taken (the offsets come from machine code instead)."""
    variant = fixture_bins["static-stripped-debuglink"]
    binary = host.user_file(variant.binary)
    debug = host.user_file(variant.debug_file)
    os.chown(debug, owner, owner)
    os.chmod(debug, mode)
    user = spawn_fixture(binary, 1, prefix=AS_NOBODY)
    host.reads(user)
    assert_exact(host.keeps_going(), user)
    line = refused_line(host, binary, why)
    assert str(debug) in line


def test_a_debug_file_of_another_build_cannot_vouch_with_a_matching_crc(
        host, fixture_bins, spawn_fixture):
    """The user's debug file carries another build-id, and the binary's debuglink names its
    CRC: the CRC matches, the build-id does not, so it is refused, naming both files."""
    variant = fixture_bins["static-stripped-debuglink"]
    binary = host.user_file(variant.binary)
    debug = host.user_file(variant.debug_file)
    real = elf.build_id(binary)
    fake = bytes(0xFF - b for b in bytes.fromhex(real))
    elf.set_build_id(debug, fake)
    elf.set_debuglink_crc(binary, elf.file_crc32(debug))
    user = spawn_fixture(binary, 1, prefix=AS_NOBODY)
    host.reads(user)
    assert_exact(host.keeps_going(), user)
    line = refused_line(host, binary, rf"its build-id {fake.hex()} is not "
                                      rf"{re.escape(str(binary))}'s {real}")
    assert f"debuglink {debug}" in line


def test_a_debug_file_under_the_build_id_path_must_carry_that_build_id(fixture_bins,
                                                                        spawn_fixture, tmp_path,
                                                                        caplog):
    """A file at .build-id/xx/rest.debug whose own build-id is another is not the object's."""
    variant = fixture_bins["static-stripped-buildid"]
    real = elf.build_id(variant.binary)
    planted = elf.build_id_path(tmp_path / "debug", real)
    planted.parent.mkdir(parents=True)
    shutil.copy2(elf.build_id_path(fixture_bins.debug_root, real), planted)
    fake = bytes(0xFF - b for b in bytes.fromhex(real))
    elf.set_build_id(planted, fake)
    fixture = spawn_fixture(variant, 1)
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "debug"),)))
    try:
        with caplog.at_level(logging.INFO, logger="ctprofd"):
            snapshot = engine.capture(pids=[fixture.pid])
    finally:
        engine.close()
    assert snapshot.summary.failed == 0, snapshot.failures
    [layout] = engine.cache.layouts()
    assert layout.source.startswith("code: ")
    assert f"build-id {planted}: refused: its build-id {fake.hex()} is not " in caplog.text


def users_debug_file(variant, directory: Path) -> Path:
    """`variant`'s debug file, the user's, in `directory`."""
    debug = directory / variant.debug_file.name
    shutil.copy2(variant.debug_file, debug)
    os.chown(debug, NOBODY, NOBODY)
    return debug


@contextmanager
def a_users_view(variant):
    """A user's copy of `variant`'s binary in a directory of its own, and a second directory
    holding a hard link of it (the same file). Yields (binary, that second directory, a
    command prefix running a program as the user in a user and mount namespace of its own
    where the second directory is bind-mounted over the first)."""
    shown, hidden = (Path(tempfile.mkdtemp(prefix="ctprofd-view-")) for _ in range(2))
    try:
        for directory in (shown, hidden):
            os.chmod(directory, 0o755)
            os.chown(directory, NOBODY, NOBODY)
        binary = shown / variant.binary.name
        shutil.copy2(variant.binary, binary)
        os.chown(binary, NOBODY, NOBODY)
        os.link(binary, hidden / binary.name)  # the same file in both directories
        yield binary, hidden, (*AS_NOBODY, "unshare", "-Urm", "--", "sh", "-c",
                               f'mount --bind {hidden} {shown} && exec "$0" "$@"')
    finally:
        shutil.rmtree(shown)
        shutil.rmtree(hidden)


def test_a_layout_learned_in_a_users_mount_namespace_serves_only_that_view(
        fixture_bins, spawn_fixture, caplog):
    """In a user and mount namespace of its own, the user bind-mounts a directory holding a
    debug file (and a hard link of the binary: the same file) over the binary's directory.
    The layout found there is cached for that view only: the same file run in ctprofd's
    view, where no debug file lies beside it, is resolved on its own."""
    variant = fixture_bins["static-stripped-debuglink"]
    with a_users_view(variant) as (binary, hidden, in_its_view):
        users_debug_file(variant, hidden)
        in_view = spawn_fixture(binary, 1, prefix=in_its_view)
        engine = Capturer(CaptureSettings(debug_dirs=()))
        try:
            engine.capture(pids=[in_view.pid])
            [learned] = engine.cache.layouts()
            assert learned.source == f"dwarf: debuglink {binary}.debug"
            outside = spawn_fixture(binary, 1)
            with caplog.at_level(logging.INFO, logger="ctprofd"):
                snapshot = engine.capture(pids=[outside.pid, in_view.pid])
        finally:
            engine.close()
        assert snapshot.summary.failed == 0, snapshot.failures
        assert {p.pid for p in snapshot.processes} == {outside.pid, in_view.pid}
        sources = sorted(layout.source for layout in engine.cache.layouts())
        assert sources == ["code: malloc/free fast paths", learned.source], sources
        assert f"{binary}: no DWARF" in caplog.text  # parsed again, in ctprofd's view


def test_what_a_users_mount_namespace_hides_never_downgrades_ctprofds_view(fixture_bins,
                                                                           spawn_fixture):
    """The debug file lies beside the binary, but the user's mount namespace hides it (the
    directory bind-mounted over the binary's holds none): read there first, the binary's
    offsets come from machine code. That layout is the view's: the same file run in
    ctprofd's view gets its own layout from the debug file, and the arena's totals."""
    variant = fixture_bins["static-stripped-debuglink"]
    with a_users_view(variant) as (binary, hidden, in_its_view):
        debug = users_debug_file(variant, binary.parent)
        in_view = spawn_fixture(binary, 1, prefix=in_its_view)
        engine = Capturer(CaptureSettings(debug_dirs=()))
        try:
            engine.capture(pids=[in_view.pid])
            [learned] = engine.cache.layouts()
            assert learned.source.startswith("code: ")
            outside = spawn_fixture(binary, 1)
            snapshot = engine.capture(pids=[outside.pid])
        finally:
            engine.close()
        assert snapshot.summary.failed == 0, snapshot.failures
        [process] = snapshot.processes
        assert process.totals_source == ARENA, process.totals_reason
        assert f"dwarf: debuglink {debug}" in {layout.source for layout in engine.cache.layouts()}


def test_a_failure_met_in_a_users_mount_namespace_fails_only_that_view(fixture_bins,
                                                                       spawn_fixture):
    """In its own mount namespace the user puts a 1 TiB sparse file where the debuglink
    points: its CRC outlasts the parser's time limit, a failure that is not retried from
    machine code. That failure is the view's: the same file run in ctprofd's view is read."""
    variant = fixture_bins["static-stripped-debuglink"]
    with a_users_view(variant) as (binary, hidden, in_its_view):
        with open(hidden / variant.debug_file.name, "wb") as sparse:
            sparse.truncate(1 << 40)
        os.chown(hidden / variant.debug_file.name, NOBODY, NOBODY)
        in_view = spawn_fixture(binary, 1, prefix=in_its_view)
        engine = Capturer(CaptureSettings(debug_dirs=(), parser=WorkerLimits(
            timeout=2, max_file_bytes=1 << 41)))
        try:
            failed = engine.capture(pids=[in_view.pid])
            assert failed.failures == {"dwarf-parse-failure": 1}, failed.failures
            outside = spawn_fixture(binary, 1)
            snapshot = engine.capture(pids=[outside.pid])
        finally:
            engine.close()
        assert snapshot.summary.failed == 0, snapshot.failures
        assert [p.pid for p in snapshot.processes] == [outside.pid]


def test_a_process_in_a_users_view_counts_one_cache_lookup(fixture_bins, spawn_fixture):
    """The layout of a process in its own view is cached under its view's key: attaching
    to it again is one lookup (a hit), not a miss of the plain key before it."""
    variant = fixture_bins["static-stripped-debuglink"]
    with a_users_view(variant) as (binary, hidden, in_its_view):
        users_debug_file(variant, hidden)
        in_view = spawn_fixture(binary, 1, prefix=in_its_view)
        engine = Capturer(CaptureSettings(debug_dirs=()))
        try:
            engine.capture(pids=[in_view.pid])
            process = read_process("/proc", in_view.pid)
            assert process is not None
            lookups = (engine.cache.hits, engine.cache.misses)
            engine.attacher.attach(process, exe_identity(process))
        finally:
            engine.close()
        assert (engine.cache.hits, engine.cache.misses) == (lookups[0] + 1, lookups[1])


def test_a_layout_found_in_a_users_view_ends_the_wait_for_it(fixture_bins, spawn_fixture):
    """A process whose file is being resolved waits on its view's key too: the layout found
    in its view (from the debug file beside the file there), cached under that key, is seen
    to end the wait."""
    variant = fixture_bins["static-stripped-debuglink"]
    with a_users_view(variant) as (binary, hidden, in_its_view):
        users_debug_file(variant, hidden)
        in_view = spawn_fixture(binary, 1, prefix=in_its_view)
        engine = Capturer(CaptureSettings(debug_dirs=(), background=True))
        try:
            process = read_process("/proc", in_view.pid)
            assert process is not None
            with pytest.raises(Pending) as waiting:
                engine.attacher.attach(process, exe_identity(process))
            assert engine.attacher.background.wait_idle(60)
            assert any(engine.cache.holds_layout(key) for key in waiting.value.keys)
        finally:
            engine.close()
