"""The probe of one process in a pass (ctprofd/probe/capture.py: `_probe_into`,
`_probe_process`, `_read_process`): what its sample names, how each way a read can go wrong
is tallied and said, a cancel that comes while it is read, processes pending on the same
binary. Real processes with Debian's jemalloc preloaded, real ptrace; a /proc/PID made of
links to the real one with one entry changed where a test needs /proc to misbehave."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

import pytest

from ctprofd.probe import arena_stats, capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer
from ctprofd.report import tags
from ctprofd.report.snapshot import ARENA
from ctprofd.resolve import elf
from ctprofd.resolve.parse_worker import WorkerLimits
from support.cgroups import in_cgroup
from support.capture_host import (JEMALLOC, PYTHON, Host, host, layouts,  # noqa: F401
                                  sample)
from support.procs import is_dead, wait_until

LOGGER = "ctprofd.probe.capture"


def _crafted(host: Host, pid: int, drop: str = "", regular: str = "") -> Path:
    """Make the test's /proc/PID a directory of links to each entry of the real one, but
    without `drop`, and with `regular` a regular file (a copy of what it names)."""
    directory = host.root / str(pid)
    if directory.is_symlink():
        host.remove(pid)
    directory.mkdir()
    for name in os.listdir(f"/proc/{pid}"):
        if name == drop:
            continue
        if name == regular:
            shutil.copy(f"/proc/{pid}/{name}", directory / name)
        else:
            (directory / name).symlink_to(f"/proc/{pid}/{name}")
    return directory


def _cancel_on_attach(engine: Capturer, cancel: threading.Event,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel that comes while the engine attaches to a process (the real attach made)."""
    real = engine.attacher.attach

    def attach(process, identity):  # type: ignore[no-untyped-def]
        cancel.set()
        return real(process, identity)

    monkeypatch.setattr(engine.attacher, "attach", attach)


def _messages(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


# --- what a sample names ------------------------------------------------------------------

def test_a_sample_names_its_process_binary_container_and_allocator(host: Host):
    """A process read from its arena statistics: its sample names its command, executable,
    the build id of its jemalloc, the container and pod its cgroup names, and the
    allocator's health; every jemalloc process walked is counted as detected."""
    pid = host.sleeper()
    other = host.sleeper()
    container, pod = os.urandom(32).hex(), str(uuid.uuid4())
    with open(JEMALLOC, "rb") as stream:
        jemalloc_build = elf.build_id(elf.open_elf(stream))
    assert jemalloc_build
    engine = host.capturer()
    with in_cgroup(pid, f"kubepods-ctprofd-test-{uuid.uuid4().hex[:12]}/pod{pod}/{container}"):
        snapshot = engine.capture()
    assert snapshot.summary.jemalloc_detected == 2 and snapshot.summary.probed_ok == 2
    process = sample(snapshot, pid)
    assert process.comm == "sleep"
    assert process.exe == os.path.realpath("/usr/bin/sleep")
    assert process.build_id == jemalloc_build
    assert (process.container_id, process.pod_uid) == (container, pod)
    assert process.totals_source == ARENA and process.allocator is not None
    outside = sample(snapshot, other)
    assert (outside.container_id, outside.pod_uid) == ("", "")


# --- arena statistics unchanged --------------------------------------------------------

def test_arena_statistics_unchanged_since_the_last_read_are_not_read_again(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """An idle process (every thread read, none moved, no thread cache came or went): the
    arena statistics last read stand, not read again; here a read again would be refused
    (no arena allowed) and give per-thread sums instead."""
    pid = host.sleeper()
    engine = host.capturer()
    first = sample(engine.capture(), pid)
    assert first.totals_source == ARENA
    monkeypatch.setattr(arena_stats, "MAX_ARENAS", 0)
    for _ in range(2):
        again = sample(engine.capture(), pid)
        assert again.totals_source == ARENA and again.totals_reason == ""
        assert again.allocator == first.allocator
        assert (again.allocated_bytes, again.deallocated_bytes) == (
            first.allocated_bytes, first.deallocated_bytes)


# --- pending in the background ----------------------------------------------------------

def test_two_processes_pending_on_one_binary_are_both_read_after_the_grace(
        host: Host, tmp_path: Path):
    """Two processes that wait for the same binary to be resolved are both pending, both
    waited for and read in the same pass, each counted once."""
    pids = sorted([host.sleeper(), host.sleeper()])
    cache = tmp_path / "cache"  # every object known but jemalloc: one to resolve
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    engine = host.capturer(cache_dir=str(cache), background=True, resolve_grace=120.0)
    snapshot = engine.capture()
    assert [p.pid for p in snapshot.processes] == pids
    assert snapshot.pending == 0 and snapshot.failures == {}
    assert snapshot.summary.jemalloc_detected == 2 and snapshot.summary.probed_ok == 2


# --- failures -----------------------------------------------------------------------------

def test_a_failure_to_attach_is_listed_with_its_process_and_its_reason(host: Host):
    """A binary that cannot be read (over the file size bound): the failed pid names the
    process's command and the failure's own message, not just its tag."""
    pid = host.sleeper()
    engine = host.capturer(cache_dir=None, parser=WorkerLimits(max_file_bytes=1))
    snapshot = engine.capture()
    [failed] = snapshot.failed_pids
    assert (failed.pid, failed.comm) == (pid, "sleep")
    assert failed.tag in tags.ACTIONABLE and snapshot.failures == {failed.tag: 1}
    assert failed.reason != failed.tag and failed.reason.startswith("/"), failed.reason


def test_proc_entries_that_fail_while_the_process_lives_are_tallied_by_step(
        host: Host, caplog: pytest.LogCaptureFixture):
    """A /proc entry that fails while the process is alive (not an exit race): before the
    attach (its exe stats but does not read as a link) a `readlink-failure`, not failed;
    once attached (its task directory missing) `pid-missing`, listed with why. Each is
    said at debug, with the error."""
    before = host.sleeper()
    after = host.sleeper()
    _crafted(host, before, regular="exe")
    crafted = _crafted(host, after, drop="task")
    engine = host.capturer()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        snapshot = engine.capture()
    assert snapshot.processes == ()
    assert snapshot.failures == {tags.READLINK_FAILURE: 1, tags.PID_MISSING: 1}
    assert snapshot.summary.failed == 1 and snapshot.summary.jemalloc_detected == 1
    [failed] = snapshot.failed_pids
    missing = f"[Errno 2] No such file or directory: '{crafted}/task'"
    assert (failed.pid, failed.comm, failed.tag, failed.reason) == (
        after, "sleep", tags.PID_MISSING, f"gone while probed: {missing}")
    assert _messages(caplog, f"pid {after}: ") == [f"pid {after}: gone while probed: {missing}"]
    [said] = _messages(caplog, f"pid {before}: ")
    assert said.startswith(f"pid {before}: gone while probed: [Errno 22] Invalid argument: ")
    assert engine.stats.exit_races == 0


def test_a_failure_raised_after_a_process_was_read_is_a_worker_panic(
        host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Something that raises once the process was read (here the totals' arithmetic, the
    real one made first) is that process's `worker-panic` with the error, warned about;
    the other process is read."""
    first = host.sleeper()
    second = host.sleeper()
    real = capture.process_totals
    calls = []

    def broken(*args):  # type: ignore[no-untyped-def]
        totals = real(*args)
        calls.append(totals)
        if len(calls) == 1:
            raise ArithmeticError("totals broke")
        return totals

    monkeypatch.setattr(capture, "process_totals", broken)
    engine = host.capturer()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snapshot = engine.capture()
    assert snapshot.failures == {tags.WORKER_PANIC: 1}
    [failed] = snapshot.failed_pids
    assert (failed.pid, failed.tag, failed.reason) == (
        first, tags.WORKER_PANIC, "unexpected ArithmeticError: totals broke")
    assert [p.pid for p in snapshot.processes] == [second]
    assert [r.getMessage() for r in caplog.records] == [
        f"pid {first}: unexpected ArithmeticError while attaching: totals broke"]


# --- exit races ------------------------------------------------------------------------

def test_a_zombie_named_is_said_at_debug_with_what_failed(host: Host,
                                                          caplog: pytest.LogCaptureFixture):
    """A zombie's failure (its exe gone) is taken back and said at debug, with the error."""
    agent = host.agent()
    zombie = int(agent.ask("zombie")[1])
    wait_until(lambda: is_dead(zombie), "the child a zombie")
    host.add(zombie)
    engine = host.capturer()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        snapshot = engine.capture(pids=[zombie])
    assert snapshot.failures == {} and engine.stats.exit_races == 1
    [said] = _messages(caplog, f"pid {zombie} ")
    assert said == (f"pid {zombie} (python3): exited while read: readlink-failure: "
                    f"pid {zombie}: /proc/{zombie}/exe: No such file or directory")


def test_a_process_that_exits_while_its_arena_statistics_fail_is_an_exit_race(
        host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """The process is killed as its arena statistics are read, and that read fails (over a
    small budget): no exception, but a failure of a process gone by then, taken back; the
    exit race is said at debug with nothing more to add."""
    pid = host.sleeper()
    real = arena_stats.Budget

    def killing(reader):  # type: ignore[no-untyped-def]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: is_dead(pid), "the process killed")
        return real(reader, max_bytes=64)

    monkeypatch.setattr(arena_stats, "Budget", killing)
    engine = host.capturer()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        snapshot = engine.capture()
    assert snapshot.failures == {} and snapshot.failed_pids == ()
    assert engine.stats.exit_races == 1
    assert _messages(caplog, f"pid {pid} ") == [f"pid {pid} (sleep): exited while read"]


# --- a cancel while a process is read ------------------------------------------------------

def test_a_cancel_while_a_process_is_attached_stops_none_of_its_threads(
        host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A cancel that comes as a process is attached, at its first attach and at one after
    an exec: no thread of it is stopped, its totals come from its arena statistics alone;
    the next pass reads its threads. The exec is said at debug."""
    agent = host.agent()
    engine = host.capturer()
    cancel = threading.Event()
    with monkeypatch.context() as patch:
        _cancel_on_attach(engine, cancel, patch)
        cancelled = sample(engine.capture(cancel=cancel), agent.pid)
    assert cancelled.threads == () and cancelled.totals_source == ARENA
    assert cancelled.allocated_bytes > 0 and engine.stats.ptrace_stops == 0
    read = sample(engine.capture(), agent.pid)
    assert [t.tid for t in read.threads] == [agent.pid]
    agent.process.send(f"exec {PYTHON} {host.script}")
    agent.ready()
    cancel.clear()
    stops = engine.stats.ptrace_stops
    with monkeypatch.context() as patch:
        _cancel_on_attach(engine, cancel, patch)
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            changed = sample(engine.capture(cancel=cancel), agent.pid)
    assert cancel.is_set()  # attached again: the exec was told
    assert changed.threads == () and changed.totals_source == ARENA
    assert engine.stats.ptrace_stops == stops
    assert f"pid {agent.pid}: AT_RANDOM changed: a new image" in caplog.messages
    assert [t.tid for t in sample(engine.capture(), agent.pid).threads] == [agent.pid]


# --- quiet processes -------------------------------------------------------------------

def test_a_process_without_jemalloc_is_not_read_again_in_every_pass(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """A process with nothing to read is remembered as such: in the passes that follow
    its /proc entry is not read again but once in NOT_JEMALLOC_RECHECK passes."""
    plain = host.sleeper(jemalloc=False)
    real = capture.read_process
    reads = []

    def counted(root: str, pid: int):  # type: ignore[no-untyped-def]
        reads.append(pid)
        return real(root, pid)

    monkeypatch.setattr(capture, "read_process", counted)
    engine = host.capturer()
    passes = 2 * NOT_JEMALLOC_RECHECK
    for _ in range(passes):
        snapshot = engine.capture()
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}
    assert 1 <= reads.count(plain) <= 1 + passes // NOT_JEMALLOC_RECHECK, reads
