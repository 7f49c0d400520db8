"""The capture engine against real jemalloc processes and real ptrace: exact counters,
debug info from everywhere, failure tags, and targets never left stopped or traced."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest

from ctprofd.probe import capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer, CaptureSettings
from ctprofd.procfs import processes
from ctprofd.report import tags
from ctprofd.report.summary import REMEDIATION_HINT
from ctprofd.resolve import attach
from ctprofd.resolve.cache import LayoutCache
from support import elf
from support.cgroups import in_cgroup, in_unit, unique_unit
from support.holders import hold_script
from support.procs import DROP_PTRACE_PREFIX, assert_no_thread_stopped_or_traced
from support.stats_shim import STOCK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def capturer(fixture_bins, **kw) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),), **kw))


def by_tid(snapshot, pid: int) -> dict[int, tuple[int, int]]:
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return {t.tid: (t.allocated_bytes, t.deallocated_bytes) for t in process.threads}


def truth(fixture) -> dict[int, tuple[int, int]]:
    return {t["tid"]: (t["allocated"], t["deallocated"]) for t in fixture.threads}


def run_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The CLI without an on-disk cache (by default it shares the daemon's, which would
    answer from what earlier runs resolved)."""
    return subprocess.run([*prefix, sys.executable, "-m", "ctprofd", *args, "--cache-dir", ""],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("variant", ["static", "dynamic"])
@pytest.mark.parametrize("nthreads", [1, 8, 64])
def test_counters_match_mallctl_thread_by_thread(fixture_bins, spawn_fixture, variant, nthreads):
    fixture = spawn_fixture(fixture_bins[variant], nthreads)
    snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    [process] = snapshot.processes
    assert process.allocated_bytes == sum(t["allocated"] for t in fixture.threads)
    assert process.deallocated_bytes == sum(t["deallocated"] for t in fixture.threads)
    assert snapshot.summary.jemalloc_detected == 1
    assert snapshot.summary.probed_ok == nthreads + 1
    assert snapshot.summary.failed == 0
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("variant", ["static-oddtls", "dynamic-oddtls"])
def test_counters_exact_when_the_tls_segment_is_not_aligned(fixture_bins, spawn_fixture,
                                                            variant):
    """The program's own thread-locals make PT_TLS 2755 bytes with a 64-byte alignment and
    put tsd_tls 16 bytes into it: the round-up and the symbol's offset both matter."""
    fixture = spawn_fixture(fixture_bins[variant], 3)
    snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
@pytest.mark.parametrize("mode", ["buildid", "debuglink", "debuglink-subdir",
                                  "debuglink-debugroot"])
def test_stripped_binaries_use_external_debug_info(fixture_bins, spawn_fixture, linkage, mode):
    variant = fixture_bins[f"{linkage}-stripped-{mode}"]
    fixture = spawn_fixture(variant, 4)
    snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    [process] = snapshot.processes
    assert process.build_id  # from the stripped object itself


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
@pytest.mark.parametrize("mode", ["badcrc", "nodebug"])
def test_without_usable_debug_info_offsets_come_from_code(fixture_bins, spawn_fixture, linkage,
                                                          mode):
    fixture = spawn_fixture(fixture_bins[f"{linkage}-stripped-{mode}"], 4)
    engine = capturer(fixture_bins)
    snapshot = engine.capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    [layout] = engine.cache.layouts()
    assert layout.source == "code: malloc/free fast paths"
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_crc_mismatch_is_named_when_code_gives_the_offsets(fixture_bins):
    result = run_cli("--log-level", "info", "offsets",
                     str(fixture_bins["static-stripped-badcrc"].binary),
                     "--debug-dir", str(fixture_bins.debug_root))
    assert result.returncode == 0, result.stderr
    assert "offsets from:        code: malloc/free fast paths" in result.stdout
    assert "CRC mismatch" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_jemalloc_process_is_walked_not_failed(spawn_process):
    sleeper = spawn_process(["sleep", "60"], ready=None)
    snapshot = Capturer().capture(pids=[sleeper.pid])
    assert snapshot.summary.tgids_walked == 1
    assert snapshot.summary.failed == 0
    assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}


@pytest.mark.parametrize("heard", [False, True], ids=["no-events", "heard"])
def test_an_unchanged_non_jemalloc_process_is_counted_from_the_listing(fixture_bins,
                                                                       spawn_process,
                                                                       spawn_fixture,
                                                                       monkeypatch, heard):
    """A steady-state snapshot opens no file of a process known to run no jemalloc: its
    /proc/PID/stat is read and its exe stat()ed once in NOT_JEMALLOC_RECHECK snapshots (the
    look that catches an exec), its maps not read (their look is due in a minute), and it is
    still walked and tallied as if read; while the kernel's process events are heard, which
    name no event of it, not even that (their own look, once in
    NOT_JEMALLOC_RECHECK_HEARD snapshots, made rarer here). A jemalloc process beside it is
    read in every snapshot."""
    monkeypatch.setattr(capture, "NOT_JEMALLOC_RECHECK_HEARD", 10 ** 9)
    sleeper = spawn_process(["sleep", "600"], ready=None)
    fixture = spawn_fixture(fixture_bins["static"], 2)
    watched = {sleeper.pid, fixture.pid}
    opened: list[str] = []
    looked: list[str] = []  # /proc paths stat()ed (attach.identity_of), maps read
    real_read_file, real_identity_of = processes.read_file, attach.identity_of
    real_read_maps_bytes = processes.read_maps_bytes

    def reading(path: str, limit: int | None = None) -> bytes:
        opened.append(path)
        return real_read_file(path, limit)

    def stating(path: str) -> attach.BinaryIdentity:
        looked.append(path)
        return real_identity_of(path)

    def reading_maps(process: processes.ProcessInfo) -> bytes:
        looked.append(process.path("maps"))
        return real_read_maps_bytes(process)
    monkeypatch.setattr(processes, "read_file", reading)
    monkeypatch.setattr(attach, "identity_of", stating)
    monkeypatch.setattr(processes, "read_maps_bytes", reading_maps)  # the periodic look's
    monkeypatch.setattr(attach, "read_maps_bytes", reading_maps)  # attach's
    engine = capturer(fixture_bins, select=lambda p: p.pid in watched, process_events=heard)
    looks = 0 if heard else 2
    try:
        engine.capture()  # first sight: both read
        assert f"/proc/{sleeper.pid}/stat" in opened
        assert f"/proc/{sleeper.pid}/maps" in looked
        opened.clear()
        looked.clear()
        snapshots = [engine.capture() for _ in range(2 * NOT_JEMALLOC_RECHECK)]
    finally:
        engine.close()
    assert opened.count(f"/proc/{sleeper.pid}/stat") == looks
    assert not [path for path in opened if path.startswith(f"/proc/{sleeper.pid}/")
                and path != f"/proc/{sleeper.pid}/stat"]
    assert [path for path in looked if path.startswith(f"/proc/{sleeper.pid}/")] == [
        f"/proc/{sleeper.pid}/exe"] * looks
    assert opened.count(f"/proc/{fixture.pid}/stat") == 2 * NOT_JEMALLOC_RECHECK
    for snapshot in snapshots:
        assert snapshot.summary.tgids_walked == 2
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}
        assert by_tid(snapshot, fixture.pid) == truth(fixture)


def test_while_heard_the_threads_of_an_unchanged_process_are_not_listed(fixture_bins,
                                                                         spawn_fixture,
                                                                         monkeypatch):
    """While the kernel's process events are heard and name none of its threads, a jemalloc
    process's /proc/PID/task is not listed again (its threads read as listed last), nor
    after the read to see which ended meanwhile, and its exe not stat()ed (the AT_RANDOM
    bytes read with the counters tell an exec); a thread that ends is heard, and the next
    snapshot lists them again: exact before and after, the ended thread's counts kept in
    the process's totals."""
    monkeypatch.setattr(capture, "THREAD_RECHECK_HEARD", 10 ** 9)
    fixture = spawn_fixture(fixture_bins["static"], 3)
    task_dir = f"/proc/{fixture.pid}/task"
    listings: list[str] = []
    real_numbered_entries = processes.numbered_entries

    def listing(directory: str) -> list[tuple[int, int]]:
        listings.append(directory)
        return real_numbered_entries(directory)
    monkeypatch.setattr(processes, "numbered_entries", listing)
    real_list_pids = capture.list_pids

    def alive_check(directory: str) -> list[int]:  # after the read: no thread ended meanwhile
        listings.append(directory)
        return real_list_pids(directory)
    monkeypatch.setattr(capture, "list_pids", alive_check)
    real_identity_of = attach.identity_of

    def stating(path: str) -> attach.BinaryIdentity:  # the exe's identity: AT_RANDOM tells
        listings.append(path)
        return real_identity_of(path)
    monkeypatch.setattr(attach, "identity_of", stating)
    engine = capturer(fixture_bins, select=lambda p: p.pid == fixture.pid, process_events=True)
    try:
        engine.capture()
        engine.capture()
        listings.clear()
        steady = [engine.capture() for _ in range(3)]
        assert not [path for path in listings if path.startswith(f"/proc/{fixture.pid}/")]
        for snapshot in steady:
            assert by_tid(snapshot, fixture.pid) == truth(fixture)
        before = process_totals(steady[-1], fixture.pid)
        ended = fixture.exit_thread(1)
        # the kernel says a thread ended only after its joiner woke: until the snapshot that
        # heard it, the ended thread may still be read as listed (its last counters)
        last = by_tid(steady[-1], fixture.pid)[ended]
        for _ in range(HANG_GUARD_SNAPSHOTS):
            after = engine.capture()
            if task_dir in listings:
                break
            threads = by_tid(after, fixture.pid)
            read = threads.pop(ended, last)
            assert threads == truth(fixture)
            assert read[0] >= last[0] and read[1] >= last[1]
        assert listings.count(task_dir) == 1
        assert by_tid(after, fixture.pid) == truth(fixture)
        assert process_totals(after, fixture.pid) >= before
    finally:
        engine.close()
    assert_no_thread_stopped_or_traced(fixture.pid)


OWNER_CHANGE = """
import os, sys
print("READY", flush=True)
sys.stdin.readline()
os.setresuid(65534, 65534, 65534)
print("DONE", flush=True)
sys.stdin.readline()
"""


def test_while_heard_the_labels_are_read_again_when_the_owner_changes(spawn_process,
                                                                      monkeypatch,
                                                                      no_debuginfod):
    """While the kernel's process events are heard, a jemalloc process's status (its uid)
    is not read again while they name no change of it, and at the next snapshot once it
    changed its uid (here python3 on Debian's stock library, which gives up root)."""
    monkeypatch.setattr(capture, "THREAD_RECHECK", 10 ** 9)  # the cgroup's own look: none
    target = spawn_process([sys.executable, "-c", OWNER_CHANGE],
                           env={"LD_PRELOAD": STOCK, "PATH": "/usr/bin:/bin"})
    status = f"/proc/{target.pid}/status"
    opened: list[str] = []
    real_read_file = processes.read_file

    def reading(path: str, limit: int | None = None) -> bytes:
        opened.append(path)
        return real_read_file(path, limit)
    monkeypatch.setattr(processes, "read_file", reading)
    engine = Capturer(CaptureSettings(debug_dirs=(), process_events=True,
                                      select=lambda p: p.pid == target.pid))
    try:
        for _ in range(2):
            assert [p.uid for p in engine.capture().processes] == [0]
        opened.clear()
        for _ in range(3):
            assert [p.uid for p in engine.capture().processes] == [0]
        assert status not in opened
        target.send("go")
        target.wait_for("DONE")
        assert [p.uid for p in engine.capture().processes] == [65534]
        assert status in opened
    finally:
        engine.close()


HANG_GUARD_SNAPSHOTS = 1000  # far more than the few a thread's end takes to be heard


def process_totals(snapshot, pid: int) -> tuple[int, int]:
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return (process.allocated_bytes, process.deallocated_bytes)


def test_unchanged_maps_are_not_parsed_at_the_periodic_look(spawn_process, monkeypatch):
    """The look at the code objects of a process with no jemalloc (here every snapshot)
    parses its maps only when their text changed since the last look; a module loaded
    changes it (test_dynamic_tls: test_a_module_loaded_after_the_first_look_is_found)."""
    monkeypatch.setattr(capture, "NOT_JEMALLOC_OBJECTS_RECHECK", 0.0)
    sleeper = spawn_process(["sleep", "600"], ready=None)
    parsed: list[str] = []
    real_parse_maps = capture.parse_maps

    def parsing(text: str) -> list[processes.Mapping]:
        parsed.append(text)
        return real_parse_maps(text)
    monkeypatch.setattr(capture, "parse_maps", parsing)
    engine = Capturer()
    try:
        for _ in range(5):  # the first attaches (attach.py reads the maps itself)
            snapshot = engine.capture(pids=[sleeper.pid])
            assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}
    finally:
        engine.close()
    assert len(parsed) == 1  # the second snapshot's look; the next three saw the same text


def test_processes_with_the_same_maps_are_parsed_once_and_jemalloc_is_still_found(
        fixture_bins, spawn_process, monkeypatch):
    """Processes whose maps read the very same (address randomization off: three `sleep`
    processes) are found to have no jemalloc from the first one's maps alone, within one
    snapshot: their maps are read, not parsed again, their objects not statted again. A
    `sleep` of the same file with jemalloc preloaded maps one more object: it is parsed, and
    jemalloc found, in the same first snapshot."""
    same = ["setarch", "x86_64", "-R", "sleep", "600"]
    plain = [spawn_process(same, ready=None) for _ in range(3)]
    preloaded = spawn_process(same, ready=None, env={
        **os.environ, "LD_PRELOAD": str(fixture_bins.jemalloc_dir / "lib" / "libjemalloc.so.2")})
    watched = [p.pid for p in (*plain, preloaded)]
    parsed: list[str] = []
    stated: list[str] = []
    real_parse_maps, real_identity_of = attach.parse_maps, attach.identity_of

    def parsing(text: str) -> list[processes.Mapping]:
        parsed.append(text)
        return real_parse_maps(text)

    def stating(path: str) -> attach.BinaryIdentity:
        stated.append(path)
        return real_identity_of(path)
    monkeypatch.setattr(attach, "parse_maps", parsing)
    monkeypatch.setattr(attach, "identity_of", stating)
    engine = capturer(fixture_bins)
    try:
        sleep = os.path.realpath(shutil.which("sleep"))
        until = time.monotonic() + 10
        while not (all(os.readlink(f"/proc/{pid}/exe") == sleep for pid in watched)
                   and "libjemalloc" in open(f"/proc/{preloaded.pid}/maps").read()):
            assert time.monotonic() < until, "the sleep processes did not start"
            time.sleep(0.01)  # setarch has not exec'ed sleep yet
        texts = {open(f"/proc/{pid}/maps").read() for pid in watched[:3]}
        assert len(texts) == 1  # the premise: the very same maps
        snapshot = engine.capture(pids=watched)
    finally:
        engine.close()
    assert snapshot.summary.tgids_walked == 4
    assert snapshot.failures.get(tags.JEMALLOC_NOT_FOUND) == 3
    assert [s.pid for s in snapshot.processes] == [preloaded.pid]
    assert len(parsed) == 2  # the first plain sleep's maps and the preloaded one's
    first, *others = sorted(watched[:3])  # the order they are read in
    map_files = [path for path in stated if "/map_files/" in path]
    assert [path for path in map_files if path.startswith(f"/proc/{first}/")]
    assert not [path for path in map_files for pid in others
                if path.startswith(f"/proc/{pid}/")]


def test_missing_pid_is_pid_missing():
    snapshot = Capturer().capture(pids=[2 ** 22 + 12345])
    assert snapshot.failures == {tags.PID_MISSING: 1}
    assert snapshot.summary.tgids_walked == 1


def test_second_snapshot_stops_no_thread_and_parses_nothing(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 8)
    engine = capturer(fixture_bins)
    engine.capture(pids=[fixture.pid])
    first = engine.stats
    assert first.ptrace_stops == 9
    again = engine.capture(pids=[fixture.pid])
    assert engine.stats.ptrace_stops == first.ptrace_stops
    assert engine.stats.elf_opens == first.elf_opens
    assert by_tid(again, fixture.pid) == truth(fixture)
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_exited_thread_keeps_its_counts_in_the_process_total(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 4)
    engine = capturer(fixture_bins)
    before = engine.capture(pids=[fixture.pid]).processes[0]
    gone = fixture.exit_thread(2)
    after = engine.capture(pids=[fixture.pid]).processes[0]
    assert gone not in {t.tid for t in after.threads}
    assert after.allocated_bytes == before.allocated_bytes
    assert after.deallocated_bytes == before.deallocated_bytes
    assert after.retained_allocated_bytes == next(
        t.allocated_bytes for t in before.threads if t.tid == gone)


def test_offsets_survive_on_disk(fixture_bins, spawn_fixture, tmp_path):
    fixture = spawn_fixture(fixture_bins["static-stripped-buildid"], 2)
    capturer(fixture_bins, cache_dir=str(tmp_path)).capture(pids=[fixture.pid])
    fresh = Capturer(CaptureSettings(cache_dir=str(tmp_path)))  # no debug dir this time
    snapshot = fresh.capture(pids=[fixture.pid])
    assert fresh.stats.elf_opens == 0
    assert by_tid(snapshot, fixture.pid) == truth(fixture)


def test_corrupt_cache_file_is_set_aside_and_rebuilt(fixture_bins, spawn_fixture, tmp_path,
                                                      caplog):
    fixture = spawn_fixture(fixture_bins["static"], 1)
    capturer(fixture_bins, cache_dir=str(tmp_path)).capture(pids=[fixture.pid])
    layouts = tmp_path / "layouts"
    for path in layouts.iterdir():
        path.write_text("{not json")
    engine = capturer(fixture_bins, cache_dir=str(tmp_path))
    snapshot = engine.capture(pids=[fixture.pid])
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    assert engine.stats.elf_opens == 1
    assert any(p.name.endswith(".corrupt") for p in layouts.iterdir())
    assert "setting aside unusable cache file" in caplog.text


def test_a_target_under_strace_is_ptrace_traced_not_a_privilege_failure(fixture_bins,
                                                                         spawn_fixture):
    """As root: a thread another tracer holds has its own tag, counted in `failed`, outside
    the privilege gate, and the reason and the table name the tracer (pid and comm)."""
    fixture = spawn_fixture(fixture_bins["static"], 3, prefix=["strace", "-f", "-o", "/dev/null"])
    snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])
    assert snapshot.failures == {tags.PTRACE_TRACED: 4}
    assert snapshot.summary.failed == 4
    assert snapshot.summary.dominant_failure == tags.PTRACE_TRACED
    assert not snapshot.summary.privilege_dominant
    assert snapshot.summary.remediation_hint() is None
    strace = fixture.proc.pid
    assert snapshot.traced_by == {fixture.pid: strace}
    [failed] = snapshot.failed_pids
    assert (failed.pid, failed.tag, failed.count) == (fixture.pid, tags.PTRACE_TRACED, 4)
    assert f"held by another tracer, pid {strace} (strace)" in failed.reason, failed.reason
    table = run_cli("snapshot", "--pid", str(fixture.pid)).stdout
    assert (f"pid {fixture.pid}: ptrace-traced: held by another tracer, pid {strace} (strace)"
            in table), table


def test_a_target_under_gdb_is_ptrace_traced(fixture_bins, spawn_fixture, spawn_process):
    fixture = spawn_fixture(fixture_bins["static"], 2)
    gdb = spawn_process(["gdb", "-q", "-nx", "-p", str(fixture.pid), "-ex", "echo ATTACHED\\n"],
                        ready="ATTACHED", timeout=120)
    snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])
    assert snapshot.failures == {tags.PTRACE_TRACED: 3}
    assert not snapshot.summary.privilege_dominant
    [failed] = snapshot.failed_pids
    assert f"held by another tracer, pid {gdb.pid} (gdb)" in failed.reason, failed.reason
    gdb.send("detach")
    gdb.send("quit")
    assert gdb.proc.wait(timeout=120) == 0
    snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])  # read once gdb let go
    assert snapshot.failures == {}
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_refused_ptrace_is_privilege_dominant_with_the_hint(fixture_bins, spawn_fixture):
    """The Yama ptrace_scope=1 situation: the binary is readable, the attach is refused."""
    fixture = spawn_fixture(fixture_bins["static"], 3, prefix=DROP_PTRACE_PREFIX)
    unprivileged = ("setpriv", "--ruid=65534", "--bounding-set=-sys_ptrace",
                    "--inh-caps=-sys_ptrace", "--")
    result = run_cli("snapshot", "--json", "--pid", str(fixture.pid), prefix=unprivileged)
    assert result.returncode == 1, result.stderr  # the process asked for was not read
    summary = json.loads(result.stdout)["probe_summary"]
    assert summary["jemalloc_detected"] == 1
    assert summary["failed"] == 4
    assert summary["dominant_failure"] == tags.PTRACE_SEIZE
    assert summary["privilege_dominant"] is True
    assert summary["remediation_hint"] == REMEDIATION_HINT
    assert "CAP_SYS_PTRACE" in result.stderr
    [failed] = json.loads(result.stdout)["failed_pids"]
    assert (failed["pid"], failed["tag"], failed["count"]) == (fixture.pid, "ptrace-seize", 4)
    assert failed["comm"] and failed["reason"]
    table = run_cli("snapshot", "--pid", str(fixture.pid), prefix=unprivileged).stdout
    row = next(line for line in table.splitlines() if "ptrace-seize" in line
               and line.split()[0] == str(fixture.pid))
    assert row.split()[2:4] == ["ptrace-seize", "4"], row
    as_root = json.loads(run_cli("snapshot", "--json", "--pid", str(fixture.pid)).stdout)
    assert as_root["probe_summary"]["failed"] == 0
    assert as_root["probe_summary"]["probed_ok"] == 4
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_fully_unprivileged_capture_sees_uncounted_readlink_failures(fixture_bins,
                                                                     spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 1)
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all", "--")
    result = run_cli("snapshot", "--json", "--pid", str(fixture.pid), prefix=nobody)
    assert result.returncode == 1, result.stderr  # the process asked for was not read
    assert f"pid {fixture.pid} not read: reading /proc/{fixture.pid}/exe was refused" \
        in result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["failures"] == {tags.READLINK_FAILURE: 1}
    assert snapshot["probe_summary"]["failed"] == 0
    assert snapshot["probe_summary"]["dominant_failure"] is None
    assert result.stderr.count("running without CAP_SYS_PTRACE") == 1
    assert result.stderr.count("1 processes cannot be seen") == 1, result.stderr
    # not failed, but not hidden either: the exe link was refused (EACCES)
    assert snapshot["denied_tgids"] == 1
    assert snapshot["failed_pids"] == []
    table = run_cli("snapshot", "--pid", str(fixture.pid), prefix=nobody).stdout
    assert "denied: 1 processes cannot be seen" in table, table


CAPTURES_DENIED = """
import sys
from ctprofd.probe.capture import Capturer
engine = Capturer()
for _ in range(3):
    assert engine.capture(pids=[int(sys.argv[1])]).denied_tgids == 1
engine.close()
"""


def test_a_capture_with_denied_processes_reads_its_capabilities_once(fixture_bins,
                                                                      spawn_fixture, tmp_path):
    """The hint for processes that cannot be seen depends on CAP_SYS_PTRACE: it is read
    from /proc/self/status once per Capturer, not in every snapshot that has any."""
    fixture = spawn_fixture(fixture_bins["static"], 1)
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all", "--")
    trace = tmp_path / "openat"
    result = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", trace, *nobody,
                             sys.executable, "-c", CAPTURES_DENIED, str(fixture.pid)],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "DEBUGINFOD_URLS": ""})
    assert result.returncode == 0, result.stderr
    assert trace.read_text().count('"/proc/self/status"') == 1, trace.read_text()

def test_exited_and_kernel_processes_are_not_denied(fixture_bins, spawn_fixture):
    """ENOENT (a kernel thread's exe, a process gone) is no denial."""
    fixture = spawn_fixture(fixture_bins["static"], 1)
    kthreadd = 2  # pid 2 is the kernel's thread creator on every Linux
    snapshot = capturer(fixture_bins).capture(pids=[kthreadd, fixture.pid])
    assert snapshot.denied_tgids == 0
    assert snapshot.failures == {tags.READLINK_FAILURE: 1}, snapshot.failures
    assert snapshot.summary.probed_ok == 2


def readme_json_contract() -> dict:
    """The example the README gives as the `snapshot --json` contract."""
    text = open(os.path.join(REPO, "README.md")).read()
    return json.loads(text.split("`ctprofd snapshot --json` is a contract:", 1)[1]
                      .split("```json", 1)[1].split("```", 1)[0])


def test_json_form_is_the_contract(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["dynamic"], 2)
    unit = unique_unit()
    with in_unit(fixture.pid, unit):
        result = run_cli("snapshot", "--json", "--pid", str(fixture.pid))
    start_time = int(open(f"/proc/{fixture.pid}/stat").read().rsplit(")", 1)[1].split()[19])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    contract = readme_json_contract()
    assert set(data) == set(contract)
    assert set(data["probe_summary"]) == set(contract["probe_summary"])
    assert data["probe_summary"] == {
        "tgids_walked": 1, "jemalloc_detected": 1, "probed_ok": 3, "failed": 0,
        "dominant_failure": None, "privilege_dominant": False, "remediation_hint": None}
    assert (data["failures"], data["traced_by"]) == ({}, {})
    [process] = data["processes"]
    assert set(process) == set(contract["processes"][0])
    assert set(process["allocator"]) == set(contract["processes"][0]["allocator"])
    assert process["allocator"]["active_bytes"] >= process["allocator"]["allocated_bytes"] > 0
    assert (process["pid"], process["comm"], process["uid"], process["unit"]) == (
        fixture.pid, "alloc_threads", 0, unit)
    assert process["exe"] == str(fixture_bins["dynamic"].binary)
    assert process["build_id"] == elf.build_id(fixture_bins["dynamic"].jemalloc_object)
    assert process["start_time"] == start_time
    assert (process["allocated_bytes"], process["deallocated_bytes"]) == (
        sum(t["allocated"] for t in fixture.threads),
        sum(t["deallocated"] for t in fixture.threads))
    assert [(t["tid"], t["allocated_bytes"], t["deallocated_bytes"])
            for t in process["threads"]] == [(t["tid"], t["allocated"], t["deallocated"])
                                             for t in fixture.threads]
    for thread in process["threads"]:
        assert set(thread) == set(contract["processes"][0]["threads"][0])
    assert [t["comm"] for t in process["threads"]] == ["alloc_threads", "worker-0", "worker-1"]


def test_table_form_names_the_process_and_the_summary(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 1)
    result = run_cli("snapshot", "--pid", str(fixture.pid))
    assert result.returncode == 0
    assert str(fixture.pid) in result.stdout
    assert "probe: 1 tgids walked, 1 jemalloc detected, 2 probed OK, 0 failed" in result.stdout


def test_offsets_command_prints_the_layout(fixture_bins):
    result = run_cli("offsets", str(fixture_bins["static"].binary))
    assert result.returncode == 0, result.stderr
    assert "thread_allocated:    824" in result.stdout
    assert "thread_deallocated:  840" in result.stdout
    assert "arena statistics:    yes" in result.stdout
    assert "je_tsd_tls" in result.stdout


def test_target_exiting_during_snapshots_never_breaks_them(fixture_bins, spawn_fixture):
    engine = capturer(fixture_bins)
    for delay in (0.0, 0.001, 0.003, 0.01):
        fixture = spawn_fixture(fixture_bins["static"], 64)
        killer = threading.Timer(delay, fixture.kill)
        killer.start()
        snapshot = engine.capture(pids=[fixture.pid])
        killer.join()
        assert snapshot.summary.tgids_walked == 1
        assert snapshot.summary.probed_ok <= 65


def test_thread_churn_never_breaks_snapshots(fixture_bins, spawn_process):
    churn = spawn_process([fixture_bins.churn])
    engine = capturer(fixture_bins)
    totals = []
    for _ in range(20):
        snapshot = engine.capture(pids=[churn.pid])
        assert snapshot.summary.jemalloc_detected == 1
        totals.append(snapshot.processes[0].allocated_bytes)
        assert_no_thread_stopped_or_traced(churn.pid)
    assert totals == sorted(totals)  # never backwards though threads come and go


SERVICE_PRIVILEGES = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                      "--inh-caps=-all,+sys_ptrace,+dac_read_search",
                      "--ambient-caps=+sys_ptrace,+dac_read_search",
                      "--bounding-set=-all,+sys_ptrace,+dac_read_search", "--")


@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_service_privileges_read_root_owned_fixtures_exactly(fixture_bins, spawn_fixture,
                                                             variant):
    """What the systemd unit grants: an unprivileged uid with CAP_SYS_PTRACE and
    CAP_DAC_READ_SEARCH only (no CAP_SYS_ADMIN: /proc/PID/map_files is closed to it)."""
    fixture = spawn_fixture(fixture_bins[variant], 4)
    result = run_cli("snapshot", "--json", "--pid", str(fixture.pid), prefix=SERVICE_PRIVILEGES)
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    assert snapshot["probe_summary"]["failed"] == 0, snapshot["failures"]
    [process] = snapshot["processes"]
    assert process["uid"] == 0
    assert {(t["tid"], t["allocated_bytes"], t["deallocated_bytes"])
            for t in process["threads"]} == {(t["tid"], t["allocated"], t["deallocated"])
                                             for t in fixture.threads}
    assert "CAP_SYS_PTRACE" not in result.stderr
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_process_exiting_at_any_step_of_its_probe_costs_only_itself(fixture_bins,
                                                                   spawn_fixture, monkeypatch):
    """Every /proc read, file open, ptrace stop and memory read that names the target is a
    step; the target is killed (and reaped) right before step 0, then 1, 2, … until a
    snapshot gets through all of them. Each snapshot completes and reads another process
    exactly, and the target is left out or was read exactly before it exited."""
    import builtins
    from ctprofd.probe import memory
    from ctprofd.probe.ptrace import Tracer

    bystander = spawn_fixture(fixture_bins["dynamic"], 2)
    steps = {"seen": 0, "kill_at": -1, "target": None}

    def step(name: object) -> None:
        target = steps["target"]
        if target is not None and target.pid in name:
            if steps["seen"] == steps["kill_at"]:
                steps["target"] = None
                target.kill()
            steps["seen"] += 1

    def watch(module, attribute, key):
        original = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            step(key(args))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, attribute, wrapper)

    def proc_path(args) -> set[int]:
        parts = str(args[0]).split("/") if isinstance(args[0], (str, bytes)) else []
        return {int(p) for p in parts[2:3] if p.isdigit()} if parts[1:2] == ["proc"] else set()

    for module, attribute in ((os, "open"), (os, "stat"), (os, "readlink"), (os, "listdir"),
                              (builtins, "open")):
        watch(module, attribute, proc_path)
    watch(memory, "read_ranges", lambda args: {args[0]})
    watch(Tracer, "thread_pointer", lambda args: {args[1]})

    kills = 0
    engine = capturer(fixture_bins)
    watch(engine.prober, "read_ranges", lambda args: {args[0]})
    while True:
        target = spawn_fixture(fixture_bins["dynamic"], 2)
        steps.update(seen=0, kill_at=kills, target=target)
        engine.attacher.cache = engine.cache = LayoutCache()  # so each probe parses too
        snapshot = engine.capture(pids=[target.pid, bystander.pid])
        assert by_tid(snapshot, bystander.pid) == truth(bystander)
        if steps["target"] is not None:  # every step done without a kill: all covered
            assert by_tid(snapshot, target.pid) == truth(target)
            break
        if target.pid in [p.pid for p in snapshot.processes]:  # read before it exited
            assert by_tid(snapshot, target.pid) == truth(target)
        kills += 1
    engine.close()
    assert kills >= 8, f"only {kills} steps seen: the probe was not watched"
    assert_no_thread_stopped_or_traced(bystander.pid)


def test_a_process_in_a_pod_shaped_cgroup_has_its_container_id_and_pod_uid(fixture_bins,
                                                                           spawn_fixture):
    """A real process moved into a cgroup named as the kubelet (systemd driver) and
    containerd name them: the snapshot gives its container id and pod UID
    (tests/unit/test_containers.py has every runtime's shape)."""
    fixture = spawn_fixture(fixture_bins["dynamic"], 1)
    container_id, pod_uid = uuid.uuid4().hex * 2, str(uuid.uuid4())
    top = f"kubepods-t{uuid.uuid4().hex[:12]}.slice"  # one no other test or kubelet uses
    path = (f"{top}/kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice/"
            f"cri-containerd-{container_id}.scope")
    with in_cgroup(fixture.pid, path):
        result = run_cli("snapshot", "--json", "--pid", str(fixture.pid))
    assert result.returncode == 0, result.stderr
    [process] = json.loads(result.stdout)["processes"]
    assert (process["container_id"], process["pod_uid"]) == (container_id, pod_uid)
    assert process["unit"] == f"cri-containerd-{container_id}.scope"


def hold(spawn_process, tmp_path, name: str, tid: int):
    """A process called `name` that keeps `tid` seized until sent a line."""
    return spawn_process([hold_script(tmp_path, name), str(tid)], ready="HELD")


def test_a_thread_another_ctprofd_holds_is_read_once_it_lets_go(fixture_bins, spawn_fixture,
                                                                spawn_process, tmp_path, caplog):
    """Two ctprofd on one host (a second daemon, a `ctprofd snapshot` beside the service)
    each hold a thread for a moment: a seize refused because a ctprofd traces the thread is
    retried, not failed. Here the other one lets go only once the retry was seen."""
    fixture = spawn_fixture(fixture_bins["static"], 2)
    held = fixture.worker_tids[0]
    holder = hold(spawn_process, tmp_path, "ctprofd", held)
    engine = capturer(fixture_bins)
    engine.tracer.held_retry = 120  # a hang guard: the holder is released on an event below
    taken = {}
    reader = threading.Thread(target=lambda: taken.update(
        snapshot=engine.capture(pids=[fixture.pid])))
    try:
        with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.ptrace"):
            reader.start()
            retried = f"tid {held}: held by ctprofd (tid {holder.pid}): seize retried"
            deadline = time.monotonic() + 120  # a hang guard, never a timing claim
            while retried not in caplog.text:
                assert time.monotonic() < deadline and reader.is_alive(), caplog.text
                time.sleep(0.005)
            holder.send("go")
            reader.join()
    finally:
        engine.close()
    snapshot = taken["snapshot"]
    assert snapshot.failures == {}
    assert by_tid(snapshot, fixture.pid) == truth(fixture)
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_a_thread_another_tracer_keeps_is_backed_off_and_still_said(fixture_bins,
                                                                    spawn_fixture,
                                                                    spawn_process, tmp_path,
                                                                    caplog):
    """A thread a tracer (here one called ctprofd) keeps holding is seized again, and its
    ctprofd holder waited for, only after 1, then 2 snapshots, not in each; meanwhile it is
    still ptrace-traced, naming its tracer. It is read once the tracer let go."""
    fixture = spawn_fixture(fixture_bins["static"], 2)
    held = fixture.worker_tids[0]
    holder = hold(spawn_process, tmp_path, "ctprofd", held)
    engine = capturer(fixture_bins)
    readable = {tid: c for tid, c in truth(fixture).items() if tid != held}
    retried = f"tid {held}: held by ctprofd (tid {holder.pid}): seize retried"
    try:
        with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.ptrace"):
            for seized in [1, 0, 1, 0, 0, 1]:  # 1: seized and waited for; 0: backed off
                caplog.clear()
                snapshot = engine.capture(pids=[fixture.pid])
                assert caplog.text.count(retried) == seized, caplog.text
                assert snapshot.failures == {tags.PTRACE_TRACED: 1}
                assert snapshot.traced_by == {fixture.pid: holder.pid}
                assert snapshot.left_out_threads == 0
                assert by_tid(snapshot, fixture.pid) == readable
        holder.send("go")
        assert holder.proc.wait(timeout=120) == 0
        for _ in range(200):  # a hang guard: its back-off (4 snapshots here) ends first
            snapshot = engine.capture(pids=[fixture.pid])
            if not snapshot.failures:
                break
        assert snapshot.traced_by == {}
        assert by_tid(snapshot, fixture.pid) == truth(fixture)
    finally:
        engine.close()
    assert_no_thread_stopped_or_traced(fixture.pid)


CANCELLED_WITH_A_CHILD_LISTED_FIRST = """
import json, os, subprocess, sys, threading
from ctprofd.probe import capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer, CaptureSettings
from ctprofd.procfs import processes

def next_pid(pid):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))

next_pid(500)
parent = subprocess.Popen(["sh", "-c", "read go; sleep 600 & echo $!; read done"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
next_pid(10)
parent.stdin.write("go\\n")
parent.stdin.flush()
child = int(parent.stdout.readline())
assert (parent.pid, child) == (500, 10), (parent.pid, child)
cancel = threading.Event()

def select(process):
    if process.pid == parent.pid:  # the walk is cancelled as it reaches the parent
        cancel.set()
    return process.pid == child

engine = Capturer(CaptureSettings(select=select))
snapshot = engine.capture(cancel=cancel)
engine.close()
print(json.dumps({"walked": snapshot.summary.tgids_walked, "failures": snapshot.failures}))
"""


def test_a_cancelled_snapshot_does_not_read_the_processes_it_put_off(tmp_path):
    """A process listed before its parent (here forced: a fresh PID namespace, where
    ns_last_pid gives the child a lower pid) is read after the others; a snapshot cancelled
    meanwhile does not read it either."""
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                             "-c", CANCELLED_WITH_A_CHILD_LISTED_FIRST],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "DEBUGINFOD_URLS": ""})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"walked": 1, "failures": {}}
