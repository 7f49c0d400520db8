"""The capture engine against odd and hostile targets, with real processes and real ptrace:
stopped processes stay stopped, signals racing a stop are not lost, other PID namespaces,
zombies and kernel threads, 10,000 threads, thread churn, exec, pid reuse, a ctprofd killed
mid-snapshot, totals that survive thread exits and restarts, and unusable cache/state
directories.

Most targets are tests/fixtures/hostile_threads.c (alloc_threads' output, plus commands to
exec, churn threads, storm itself with signals and vfork)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ctprofd.probe import capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer, CaptureSettings
from ctprofd.probe.ptrace import WaitBudgetSpent
from ctprofd.procfs.processes import parse_maps, read_process
from ctprofd.resolve import attach
from ctprofd.resolve.attach import PENDING_MAPS_LINES, UNRESOLVED_MAX
from ctprofd.report import tags
from support import elf
from support.mapper import mapper_argv, write_tiny_elf_files
from support.procs import (READY, assert_no_thread_stopped_or_traced, end_vfork, in_group_stop,
                           task_states, wait_until)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHURNERS = 10_000
CHURN_BATCH = 250  # churners started at a time (test_churning_threads_never_report_...)
HANG_GUARD_ROUNDS = 5_000  # snapshots: a guard against a hang, never a timing claim


# -- helpers ---------------------------------------------------------------------------------

def capturer(fixture_bins, **kw) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),), **kw))


def process_of(snapshot, pid: int):
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return process


def by_tid(snapshot, pid: int) -> dict[int, tuple[int, int]]:
    return {t.tid: (t.allocated_bytes, t.deallocated_bytes)
            for t in process_of(snapshot, pid).threads}


def by_tid_of(process) -> dict[int, tuple[int, int]]:
    return {t.tid: (t.allocated_bytes, t.deallocated_bytes) for t in process.threads}


def truth(threads) -> dict[int, tuple[int, int]]:
    return {t["tid"]: (t["allocated"], t["deallocated"]) for t in threads}


def totals(threads) -> tuple[int, int]:
    return sum(t["allocated"] for t in threads), sum(t["deallocated"] for t in threads)


def proc_field(pid: int, tid: int, name: str) -> str | None:
    """A field of /proc/PID/task/TID/status; None when the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def voluntary_switches(pid: int) -> dict[int, int]:
    """{tid: voluntary context switches}: a thread blocked for good only switches when
    something (a ptrace stop) wakes it."""
    counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        value = proc_field(pid, int(tid), "voluntary_ctxt_switches")
        if value is not None:
            counts[int(tid)] = int(value)
    return counts


def voluntary_switches_of(pid: int, tid: int) -> int | None:
    value = proc_field(pid, tid, "voluntary_ctxt_switches")
    return int(value) if value is not None else None


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ctprofd", *args]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def thread_state(pid: int, tid: int) -> str:
    """The State letter of a thread, '' when it is gone."""
    return (proc_field(pid, tid, "State") or " ")[0].strip()


def warnings_from(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == logger and r.levelno == logging.WARNING]


@contextmanager
def mounted(*argv: str):
    """Run `mount ARGV...` (the last argument is the mount point); always unmount."""
    target = argv[-1]
    subprocess.run(["mount", *argv], check=True, capture_output=True)
    try:
        yield Path(target)
    finally:
        if subprocess.run(["umount", target], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True)


def host_child(pid: int) -> int:
    """The only child of `pid` (e.g. what `unshare --fork` started)."""
    def child():
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(text[0]) if text else None
    return wait_until(child, f"a child of {pid}")


def back_in_group_stop(pid: int) -> None:
    """Every thread of a job-control-stopped `pid` is in group stop again, untraced. A
    detach wakes a thread that was in group stop and the kernel traps it back into it: it
    is R for the moment that takes (longer on a busy host), so the check waits. A thread
    the detach resumed for good never comes back to T; the guard catches that."""
    wait_until(lambda: not in_group_stop(pid), "every thread back in group stop", 30)


# -- a stopped process stays stopped; signals are not lost ----------------------------------

def test_sigstopped_process_stays_stopped_and_reads_exactly(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins.hostile_threads, 8)
    os.kill(fixture.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not in_group_stop(fixture.pid),
                   "group stop")
        snapshot = capturer(fixture_bins).capture(pids=[fixture.pid])
        assert snapshot.summary.failed == 0, snapshot.failures
        assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)
        # Still in group stop, untraced: neither the seize nor the detach resumed it.
        assert set(task_states(fixture.pid)) == set(fixture.tids)
        back_in_group_stop(fixture.pid)
        # Another ctprofd process (not the target's parent) sees the same.
        result = run_cli("snapshot", "--json", "--cache-dir", "", "--pid", str(fixture.pid))
        assert result.returncode == 0, result.stderr
        [process] = json.loads(result.stdout)["processes"]
        assert {t["tid"]: (t["allocated_bytes"], t["deallocated_bytes"])
                for t in process["threads"]} == truth(fixture.threads)
        assert set(task_states(fixture.pid)) == set(fixture.tids)
        back_in_group_stop(fixture.pid)
    finally:
        os.kill(fixture.pid, signal.SIGCONT)
    fixture.send("ping")
    assert fixture.readline() == "PONG"
    wait_until(lambda: all(s[0] == "S" for s in task_states(fixture.pid).values()),
               "threads blocked again after SIGCONT")
    assert by_tid(capturer(fixture_bins).capture(pids=[fixture.pid]),
                  fixture.pid) == truth(fixture.threads)
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_job_control_racing_the_snapshots_is_kept(fixture_bins, spawn_fixture, tmp_path):
    """SIGSTOP and SIGCONT sent to the target all through snapshots that stop its threads:
    whatever came last wins, for every thread, once the snapshots are over."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 8)
    cache = str(tmp_path / "cache")
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            for sig in (signal.SIGSTOP, signal.SIGCONT):
                os.kill(fixture.pid, sig)
                time.sleep(0.0005)
    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        for _ in range(10):  # while the toggler runs
            engine = capturer(fixture_bins, cache_dir=cache)  # every thread stopped again
            try:
                snapshot = engine.capture(pids=[fixture.pid])
            finally:
                engine.close()
            read = by_tid(snapshot, fixture.pid)
            assert all(read[tid] == counters for tid, counters in truth(fixture.threads).items()
                       if tid in read)
    finally:
        stop.set()
        toggler.join()
    os.kill(fixture.pid, signal.SIGCONT)  # last: running
    wait_until(lambda: all(s == ("S", 0) for s in task_states(fixture.pid).values()),
               what=f"every thread running, not {task_states(fixture.pid)}")
    fixture.send("ping")
    assert fixture.readline() == "PONG"
    os.kill(fixture.pid, signal.SIGSTOP)  # last: stopped
    wait_until(lambda: not in_group_stop(fixture.pid),
               "group stop")
    assert by_tid(capturer(fixture_bins, cache_dir=cache).capture(pids=[fixture.pid]),
                  fixture.pid) == truth(fixture.threads)
    back_in_group_stop(fixture.pid)
    os.kill(fixture.pid, signal.SIGCONT)


def test_signals_racing_the_stop_are_handed_back(fixture_bins, spawn_fixture, tmp_path):
    """A thread busy taking signals often reports a signal-delivery-stop instead of our
    PTRACE_EVENT_STOP; that signal must be delivered on detach. The fixture storms its
    workers with SIGRTMIN (queued) and SIGUSR1 (one in flight per worker), so neither kind
    merges and the handlers' counts must equal what was sent."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 8)
    workers = truth(fixture.threads[1:])
    cache = str(tmp_path / "cache")
    capturer(fixture_bins, cache_dir=cache).capture(pids=[fixture.pid])  # parse it once
    fixture.send("storm")
    assert fixture.readline().startswith("STORMING ")

    def signals() -> tuple[int, int]:
        fixture.send("signals")
        word, usr1, rt = fixture.readline().split()
        return int(usr1), int(rt)
    wait_until(lambda: all(signals()), "the storm to reach the workers")
    for _ in range(10):  # the storm goes on until told to calm down
        # A new Capturer each round: every thread is stopped again.
        engine = capturer(fixture_bins, cache_dir=cache)
        try:
            snapshot = engine.capture(pids=[fixture.pid])
        finally:
            engine.close()
        read = by_tid(snapshot, fixture.pid)
        # handlers never allocate; on a starved host a worker may miss its stop: it is left
        # out (and said so), never read wrong; and another session's ctprofd walking the
        # host may hold one past what the storm left of the snapshot's wait budget
        # (ptrace-traced, not left out)
        assert {tid: read[tid] for tid in workers if tid in read} == {
            tid: counters for tid, counters in workers.items() if tid in read}
        assert len(workers) - len(set(workers) & set(read)) <= (
            snapshot.left_out_threads + snapshot.failures.get(tags.PTRACE_TRACED, 0))
        assert set(snapshot.failures) <= {tags.WAITPID, tags.PTRACE_TRACED}, snapshot.failures
    fixture.send("calm")
    word, usr1_sent, rt_sent = fixture.readline().split()
    assert word == "STORMED"
    try:
        wait_until(lambda: signals() == (int(usr1_sent), int(rt_sent)),
                   "every signal sent to be handled")
    except AssertionError:
        fixture.send("signals")
        pytest.fail(f"signals lost: sent SIGUSR1/SIGRTMIN {usr1_sent}/{rt_sent}, "
                    f"handled {fixture.readline()}")
    assert_no_thread_stopped_or_traced(fixture.pid)


# -- namespaces, zombies, kernel threads -----------------------------------------------------

def test_process_in_another_pid_namespace_is_probed_by_its_host_pid(fixture_bins,
                                                                   spawn_fixture):
    fixture = spawn_fixture(fixture_bins.hostile_threads, 4,
                            prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    assert fixture.pid == 1  # what the target calls itself
    host_pid = host_child(fixture.proc.pid)
    fixture.pid = host_pid  # so that teardown kills the right process
    ns_to_host = {}
    for tid in os.listdir(f"/proc/{host_pid}/task"):
        host_tid, ns_tid = map(int, proc_field(host_pid, int(tid), "NSpid").split())
        ns_to_host[ns_tid] = host_tid
    expected = {ns_to_host[tid]: counters for tid, counters in truth(fixture.threads).items()}
    assert set(expected) != set(truth(fixture.threads))

    snapshot = capturer(fixture_bins).capture(pids=[host_pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert snapshot.summary.jemalloc_detected == 1
    assert by_tid(snapshot, host_pid) == expected
    assert process_of(snapshot, host_pid).exe == str(fixture_bins.hostile_threads)
    assert_no_thread_stopped_or_traced(host_pid)


def test_zombies_and_kernel_threads_are_walked_without_failures(fixture_bins, spawn_fixture,
                                                                spawn_process):
    live = spawn_fixture(fixture_bins.hostile_threads, 2)
    # zombies: jemalloc and non-jemalloc children that exited and were not reaped
    zombie_jemalloc = spawn_fixture(fixture_bins.hostile_threads, 2)
    zombie_sleep = spawn_process(["sh", "-c", "read line"], ready=None)
    zombie_jemalloc.send("quit")
    zombie_sleep.send("")
    zombies = [zombie_jemalloc.proc.pid, zombie_sleep.proc.pid]
    wait_until(lambda: all(Path(f"/proc/{z}/stat").read_text().rsplit(")", 1)[1].split()[0]
                           == "Z" for z in zombies), "zombies")
    kthreads = [2, *(pid for pid in map(int, Path("/proc/2/task/2/children").read_text().split())
                     if not Path(f"/proc/{pid}/comm").read_text().startswith("kworker"))]
    assert len(kthreads) > 3  # kworkers come and go: the others stay
    # told apart by their stat line, so a snapshot spends no syscall on them
    read = [read_process("/proc", pid) for pid in [*kthreads, live.pid, *zombies]]
    assert {p.pid for p in read if p is not None and p.kernel_thread} == set(kthreads)
    wanted = {live.pid, *zombies, *kthreads}

    # the full walk (the daemon's), narrowed to these processes
    engine = capturer(fixture_bins, select=lambda p: p.pid in wanted)
    snapshot = engine.capture()
    assert snapshot.summary.tgids_walked == len(wanted)
    assert snapshot.summary.failed == 0, snapshot.failures
    assert snapshot.summary.dominant_failure is None
    assert snapshot.summary.jemalloc_detected == 1
    assert {p.pid for p in snapshot.processes} == {live.pid}
    assert by_tid(snapshot, live.pid) == truth(live.threads)
    assert set(snapshot.failures) <= tags.NOT_ACTIONABLE
    # and named one by one
    snapshot = engine.capture(pids=sorted(wanted))
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot, live.pid) == truth(live.threads)
    for pid in zombies:
        assert Path(f"/proc/{pid}/stat").exists()  # still zombies: nothing reaped them


def test_process_whose_main_thread_exited_is_still_read(fixture_bins, spawn_fixture):
    """The thread group leader called pthread_exit and is a zombie while the other threads
    run on: /proc/PID/exe and maps are empty, process_vm_readv on the pid finds no memory
    and the zombie cannot be seized. The live threads still count, nothing is a failure,
    and what the leader was last read at stays in the total."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 3)
    engine = capturer(fixture_bins)
    before = process_of(engine.capture(pids=[fixture.pid]), fixture.pid)
    assert by_tid_of(before) == truth(fixture.threads)
    fixture.send("leader-exit")
    word, commander = fixture.readline().split(" ", 1)
    assert word == "COMMANDER"
    workers = [*fixture.threads[1:], json.loads(commander)]
    wait_until(lambda: Path(f"/proc/{fixture.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
               == "Z", "the leader to be a zombie")
    assert len(os.listdir(f"/proc/{fixture.pid}/task")) == len(workers) + 1

    main_before = (before.threads[0].allocated_bytes, before.threads[0].deallocated_bytes)
    assert before.threads[0].tid == fixture.pid
    restarted = capturer(fixture_bins)
    for engine, retained in ((engine, main_before), (restarted, (0, 0))):
        snapshot = engine.capture(pids=[fixture.pid])
        assert snapshot.summary.failed == 0, snapshot.failures
        assert snapshot.summary.jemalloc_detected == 1
        process = process_of(snapshot, fixture.pid)
        assert by_tid_of(process) == truth(workers)
        assert process.exe == str(fixture_bins.hostile_threads)
        # seen before: the leader's last read stays in the total
        assert (process.allocated_bytes - totals(workers)[0],
                process.deallocated_bytes - totals(workers)[1]) == retained
    assert_no_thread_stopped_or_traced(fixture.pid)
    fixture.send("ping")
    assert fixture.readline() == "PONG"


# -- many threads, churn ---------------------------------------------------------------------

def test_ten_thousand_threads_are_read_exactly(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins.hostile_threads, 10_000, timeout=60)
    engine = capturer(fixture_bins)
    snapshot = engine.capture(pids=[fixture.pid])
    # On a starved host a stop may miss its 250 ms: that thread is left out (and said so),
    # and read at a later snapshot; and another session's ctprofd walking the host may hold
    # one when it is seized (ptrace-traced, backed off, read later). Nothing else may fail.
    for _ in range(HANG_GUARD_ROUNDS):
        assert set(snapshot.failures) <= {tags.WAITPID, tags.PTRACE_TRACED}, snapshot.failures
        assert snapshot.left_out_threads >= snapshot.failures.get(tags.WAITPID, 0)
        if not snapshot.left_out_threads and not snapshot.failures:
            break
        snapshot = engine.capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert snapshot.summary.probed_ok == 10_001
    assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)
    assert engine.stats.ptrace_stops == 10_001
    again = engine.capture(pids=[fixture.pid])  # memory reads only, IOV_MAX per call
    assert engine.stats.ptrace_stops == 10_001
    assert by_tid(again, fixture.pid) == truth(fixture.threads)
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("heard", [False, True], ids=["by-pid", "walk-heard"])
def test_churning_threads_never_report_another_threads_counters(fixture_bins,
                                                                spawn_fixture, heard):
    """Threads born and dying as fast as they can, their stacks (and so their TLS) reused
    at once by the next thread. A churner's counters are only ever 0 or churn_size(tid);
    a read taken from a dead thread's reused TLS shows another tid's size. The process
    total must never be less than what its threads were last read at, and never go
    backwards. Asked for by pid, or in a walk that hears the kernel's process events (which
    then tell which threads may have ended during a read)."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 2)
    engine = capturer(fixture_bins, process_events=heard,
                      select=(lambda p: p.pid == fixture.pid) if heard else None)
    pids = None if heard else [fixture.pid]
    engine.capture(pids=pids)  # parse it before the churn starts
    # at most CHURNERS new tids, far below pid_max: no tid is used twice
    assert int(Path("/proc/sys/kernel/pid_max").read_text()) >= 3 * CHURNERS
    steady = set(fixture.tids)
    managers: list[int] = []
    batches = seen_before = 0
    lifetime_us = 300  # each churner sleeps this long before it exits
    last: dict[int, int] = {}  # tid -> allocated as last read
    previous_total = 0
    churners_seen = 0
    foreign = []
    try:
        for _ in range(HANG_GUARD_ROUNDS):  # until enough churners were read
            if churners_seen > 20:
                break
            # a batch at a time, the next once the last ran out: the snapshots pace the
            # churn, so a slow reader on a busy host is not left with every tid spent; a
            # batch that ran out unseen makes the next one's churners live twice as long
            if not any(Path(f"/proc/{fixture.pid}/task/{m}").exists() for m in managers):
                if managers:
                    fixture.send("stop")
                    assert fixture.readline().startswith("STOPPED ")
                    if churners_seen == seen_before:
                        lifetime_us = min(2 * lifetime_us, 20_000)
                assert batches < CHURNERS // CHURN_BATCH, \
                    f"only {churners_seen} churners read in {batches} batches"
                batches, seen_before = batches + 1, churners_seen
                fixture.send(f"churn 2 {lifetime_us} {batches * CHURN_BATCH}")  # MAX: in all
                word, *tids = fixture.readline().split()
                assert word == "CHURNING"
                managers = [int(tid) for tid in tids]
                steady.update(managers)
            snapshot = engine.capture(pids=pids)
            assert snapshot.summary.jemalloc_detected == 1
            assert set(snapshot.failures) <= {tags.PTRACE_SEIZE, tags.PTRACE_TRACED, tags.WAITPID,
                                              tags.PROCESS_VM_READV}, snapshot.failures
            process = process_of(snapshot, fixture.pid)
            for thread in process.threads:
                if thread.tid not in steady:
                    size = 64 << (thread.tid % 8)
                    if thread.tid not in last:
                        churners_seen += 1
                    if (thread.allocated_bytes not in (0, size)
                            or thread.deallocated_bytes not in (0, size)):
                        foreign.append((thread.tid, size, thread.allocated_bytes,
                                        thread.deallocated_bytes))
                last[thread.tid] = thread.allocated_bytes
            assert process.allocated_bytes >= previous_total
            # the arena statistics count churners never read too: never less than the reads
            assert process.allocated_bytes >= sum(last.values()), "lost"
            previous_total = process.allocated_bytes
    finally:
        fixture.send("stop")
    word, run, bad = fixture.readline().split()
    assert word == "STOPPED" and int(bad) == 0 and churners_seen < int(run) <= CHURNERS
    assert churners_seen > 20, f"only {churners_seen} churners read in {HANG_GUARD_ROUNDS} snapshots"
    assert not foreign, f"(tid, its size, allocated, deallocated) read from other threads: " \
                        f"{foreign[:10]} ({len(foreign)} of {churners_seen})"
    assert_no_thread_stopped_or_traced(fixture.pid)


# -- exec and pid reuse ----------------------------------------------------------------------

def read_image(fixture, nthreads: int) -> list[dict[str, int]]:
    lines = fixture.wait_for("READY")
    threads = [json.loads(line) for line in lines]
    assert len(threads) == nthreads + 1, lines
    return threads


def test_exec_of_another_binary_uses_its_layout_and_keeps_the_total(fixture_bins,
                                                                    spawn_fixture):
    fixture = spawn_fixture(fixture_bins.hostile_threads, 4)
    engine = capturer(fixture_bins)
    before = process_of(engine.capture(pids=[fixture.pid]), fixture.pid)
    assert (before.allocated_bytes, before.deallocated_bytes) == totals(fixture.threads)
    new_binary = fixture_bins["static"].binary
    fixture.send(f"exec {new_binary} 3")
    image = read_image(fixture, 3)
    assert image[0]["tid"] == fixture.pid

    after = engine.capture(pids=[fixture.pid])
    process = process_of(after, fixture.pid)
    assert after.summary.failed == 0, after.failures
    assert (process.start_time, process.exe) == (before.start_time, str(new_binary))
    assert process.build_id == elf.build_id(new_binary) != before.build_id
    assert by_tid(after, fixture.pid) == truth(image)
    # the old image's counts stay in the total: it never goes backwards
    assert (process.allocated_bytes, process.deallocated_bytes) == (
        before.allocated_bytes + totals(image)[0], before.deallocated_bytes + totals(image)[1])
    # the two executables place jemalloc's TSD differently: stale offsets would misread
    deltas = {layout.build_id: layout.static_tsd_delta() for layout in engine.cache.layouts()}
    assert len(set(deltas.values())) == 2, deltas
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("prefix, heard", [((), False), (("setarch", "-R"), False),
                                           (("setarch", "-R"), True)],
                         ids=["aslr", "no-aslr", "no-aslr-heard"])
def test_exec_of_the_same_binary_drops_the_old_thread_pointers(fixture_bins, spawn_fixture,
                                                               prefix, heard):
    """Same pid, same start time, same file: only the image is new. Its main thread keeps
    its tid and start time but gets a new thread pointer. Under `setarch -R` even the stack
    address stays: only the auxv's AT_RANDOM bytes tell the new image apart (or the
    kernel's exec event, in a walk that hears them)."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 4, prefix=prefix)
    engine = capturer(fixture_bins, process_events=heard,
                      select=(lambda p: p.pid == fixture.pid) if heard else None)
    pids = None if heard else [fixture.pid]
    before = process_of(engine.capture(pids=pids), fixture.pid)
    assert by_tid(engine.capture(pids=pids), fixture.pid) == truth(fixture.threads)
    fixture.send(f"exec {fixture_bins.hostile_threads} 2")
    image = read_image(fixture, 2)

    after = engine.capture(pids=pids)
    assert after.summary.failed == 0, after.failures
    assert by_tid(after, fixture.pid) == truth(image)
    process = process_of(after, fixture.pid)
    assert (process.allocated_bytes, process.deallocated_bytes) == (
        before.allocated_bytes + totals(image)[0], before.deallocated_bytes + totals(image)[1])
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("name, within, walk", [
    ("sh", 1, False), ("alloc_threads", 1, False),
    ("sh", NOT_JEMALLOC_RECHECK, True), ("alloc_threads", NOT_JEMALLOC_RECHECK, True),
    ("sh", 1, "heard"), ("alloc_threads", 1, "heard")])
def test_an_exec_into_jemalloc_is_picked_up(fixture_bins, spawn_process, tmp_path, monkeypatch,
                                            name, within, walk):
    """A process seen running no jemalloc (a shell script, whose name is the script's) that
    execs a jemalloc binary: asked for by pid, read at the next snapshot, whether the exec
    renamed it or the new file has the old name; in a walk of the host, where it is counted
    from the /proc listing alone while it seems unchanged, within NOT_JEMALLOC_RECHECK
    snapshots either way, and at the next snapshot when the kernel's process events are
    heard (the periodic looks switched off: only the exec event can tell); exact in every
    case."""
    script = tmp_path / name
    script.write_text(f"#!/bin/sh\necho WAITING\nread line\nexec {fixture_bins['static'].binary} 2\n")
    script.chmod(0o755)
    shell = spawn_process([script], ready="WAITING")
    if walk == "heard":
        monkeypatch.setattr(capture, "NOT_JEMALLOC_RECHECK", 10 ** 9)
        monkeypatch.setattr(capture, "NOT_JEMALLOC_RECHECK_HEARD", 10 ** 9)
    engine = capturer(fixture_bins, select=lambda p: p.pid == shell.pid,
                      process_events=walk == "heard")
    pids = [shell.pid] if walk is False else None
    try:
        for _ in range(2):  # /bin/sh: no jemalloc
            assert engine.capture(pids=pids).failures == {tags.JEMALLOC_NOT_FOUND: 1}
        shell.send("go")
        image = [json.loads(line) for line in shell.wait_for(READY)]
        for _ in range(within):
            found = engine.capture(pids=pids)
            if found.processes:
                break
        assert found.processes, f"not read in {within} snapshots"
        assert by_tid(found, shell.pid) == truth(image)
    finally:
        engine.close()

PID_REUSE_SCRIPT = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from ctprofd.probe.capture import Capturer, CaptureSettings
from support.procs import Fixture

binary, state_dir = sys.argv[2], sys.argv[3]
out = {}
def sample(snapshot, pid):
    [p] = [p for p in snapshot.processes if p.pid == pid]
    return {"start": p.start_time, "total": [p.allocated_bytes, p.deallocated_bytes],
            "threads": {str(t.tid): [t.allocated_bytes, t.deallocated_bytes] for t in p.threads}}
def start(pid):
    return Capturer(CaptureSettings(state_dir=state_dir, select=lambda p: p.pid == pid))
def state():
    return json.load(open(os.path.join(state_dir, "retained.json")))["processes"]
def spawn_at(pid, nthreads):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    return Fixture(binary, nthreads)

# A, then B with A's pid while ctprofd is down: B must not inherit A's saved totals
a = Fixture(binary, 4)
a_tids = a.tids
engine = start(a.pid)
engine.capture()
a.exit_thread(0)  # so that A has retained totals in the state file
out["a"] = {"pid": a.pid, "tids": a_tids, "threads": a.threads, "sample": sample(engine.capture(), a.pid),
            "state": state()}
engine.close()
a.kill()
b = spawn_at(a.pid, 2)
engine = start(b.pid)
out["b"] = {"pid": b.pid, "threads": b.threads, "sample": sample(engine.capture(), b.pid)}
out["state_after_b"] = state()
# C with B's pid while ctprofd runs: C must not inherit B's threads or totals
b.exit_thread(1)
out["b"]["sample_after_exit"] = sample(engine.capture(), b.pid)
b.kill()
c = spawn_at(b.pid, 1)
out["c"] = {"pid": c.pid, "threads": c.threads, "sample": sample(engine.capture(), c.pid)}
engine.close()
c.kill()
print(json.dumps(out))
"""


def test_reused_pid_is_a_new_process(fixture_bins, tmp_path):
    """pid reuse, forced: ctprofd runs in a fresh PID namespace with its targets (as in a
    container sharing its pid namespace) where nothing else forks, and ns_last_pid makes the
    second target get the first one's pid, and its threads the first one's tids. ctprofd
    keys processes on (pid, start time): nothing of the first may leak into the second,
    neither in memory nor through the state file of a restarted ctprofd."""
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID_REUSE_SCRIPT,
         os.path.join(REPO, "tests"), str(fixture_bins["static"].binary), str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    a, b, c = out["a"], out["b"], out["c"]
    assert a["pid"] == b["pid"] == c["pid"]
    assert [t["tid"] for t in b["threads"]] == a["tids"][:3]  # tids reused too
    assert len({a["sample"]["start"], b["sample"]["start"], c["sample"]["start"]}) == 3
    a_key = f"{a['pid']}:{a['sample']['start']}"
    assert a_key in a["state"]
    for process in (b, c):
        sample = process["sample"]
        assert sample["threads"] == {str(t["tid"]): [t["allocated"], t["deallocated"]]
                                     for t in process["threads"]}
        assert sample["total"] == list(totals(process["threads"]))
    assert b["sample_after_exit"]["total"] == b["sample"]["total"]
    assert a_key not in out["state_after_b"]  # pruned: that process is gone


QUIET_PID_REUSE_SCRIPT = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from ctprofd.probe import capture
from support.procs import Fixture

capture.NOT_JEMALLOC_RECHECK = 10 ** 9  # no periodic look: only the /proc listing can tell
sleeper = subprocess.Popen(["sleep", "600"])
pid = sleeper.pid
engine = capture.Capturer(capture.CaptureSettings(select=lambda p: p.pid == pid))
out = {"before": [engine.capture().failures for _ in range(3)]}
sleeper.kill()
sleeper.wait()
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
fixture = Fixture(sys.argv[2], 2)
snapshot = engine.capture()
out["pid"], out["reused"] = pid, fixture.pid
out["threads"] = fixture.threads
out["read"] = [{str(t.tid): [t.allocated_bytes, t.deallocated_bytes] for t in p.threads}
               for p in snapshot.processes if p.pid == pid]
engine.close()
fixture.kill()
print(json.dumps(out))
"""


def test_a_pid_reused_after_a_process_with_no_jemalloc_is_read_at_once(fixture_bins):
    """A process with no jemalloc is counted from the /proc listing alone while it stays
    the same; a jemalloc process that gets its pid (forced in a fresh PID namespace) is
    read in the very next snapshot, by the listing alone: the periodic look that would also
    find it is switched off here."""
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
         QUIET_PID_REUSE_SCRIPT, os.path.join(REPO, "tests"),
         str(fixture_bins["static"].binary)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["before"] == [{tags.JEMALLOC_NOT_FOUND: 1}] * 3
    assert out["reused"] == out["pid"]
    assert out["read"] == [{str(t["tid"]): [t["allocated"], t["deallocated"]]
                            for t in out["threads"]}]


def spawn_mapper(spawn_process, directory: Path, count: int):
    """A process mapping `count` distinct tiny ELF files (written in `directory`)
    executable, as issue 22's attacker does."""
    write_tiny_elf_files(directory, count)
    return spawn_process(mapper_argv(directory, count), timeout=60)


def test_a_process_mapping_many_unknown_objects_costs_a_bounded_number_of_opens(
        spawn_process, tmp_path, monkeypatch):
    """A process mapping 1,000 distinct tiny ELF files executable (issue 22's attack, scaled
    down): each snapshot opens at most UNRESOLVED_MAX of them for the background resolver,
    not all of them again; it is pending meanwhile, never failed, and the snapshots go on."""
    mapper = spawn_mapper(spawn_process, tmp_path, 1000)
    opened: list[str] = []
    real_open = attach.open_followed

    def opening(path: str, *args):
        opened.append(path)
        return real_open(path, *args)
    monkeypatch.setattr(attach, "open_followed", opening)
    engine = Capturer(CaptureSettings(background=True, select=lambda p: p.pid == mapper.pid))
    mapped = f"/proc/{mapper.pid}/map_files/"
    try:
        per_snapshot: list[int] = []
        for _ in range(20):  # its python binary is resolved first, in the background
            opened.clear()
            snapshot = engine.capture()
            assert snapshot.summary.failed == 0, snapshot.failed_pids
            assert snapshot.summary.tgids_walked == 1
            if per_snapshot or any(mapped in path for path in opened):
                per_snapshot.append(sum(mapped in path for path in opened))
                if len(per_snapshot) == 4:
                    break
            assert engine.attacher.background.wait_idle(60)
    finally:
        engine.close()
    assert len(per_snapshot) == 4, "its objects were never looked at"
    assert max(per_snapshot) <= UNRESOLVED_MAX, per_snapshot
    assert snapshot.pending == 1  # 1,000 objects: not all resolved yet


@pytest.mark.parametrize("anonymous", [False, True], ids=["same maps", "anonymous memory"])
def test_a_pending_process_has_each_code_object_statted_once_while_it_stays_mapped(
        spawn_process, tmp_path, monkeypatch, anonymous):
    """A process looked at again while its objects are not all resolved (pending) has each
    mapped object statted once while it stays mapped, not at every snapshot: also when the
    process maps anonymous memory between the looks (its heap growing, or on purpose)."""
    mapper = spawn_mapper(spawn_process, tmp_path, 200)
    mapped = f"/proc/{mapper.pid}/map_files/"
    statted: list[str] = []
    real_identity = attach.identity_of

    def identity(path: str):
        statted.append(path)
        return real_identity(path)
    monkeypatch.setattr(attach, "identity_of", identity)
    engine = Capturer(CaptureSettings(background=True, select=lambda p: p.pid == mapper.pid))
    try:
        for _ in range(20):  # its python binary is resolved first, in the background
            engine.capture()
            assert engine.attacher.background.wait_idle(60)
            if any(mapped in path for path in statted):
                break
        assert any(mapped in path for path in statted), "its objects were never looked at"
        # the resolver takes nothing more: its objects stay unresolved, it stays pending
        monkeypatch.setattr(engine.attacher.background, "submit", lambda *args: False)
        per_snapshot = []
        for _ in range(3):
            if anonymous:
                mapper.send("map")
                assert mapper.readline() == "MAPPED"
            statted.clear()
            snapshot = engine.capture()
            assert snapshot.pending == 1 and snapshot.summary.failed == 0
            per_snapshot.append(sum(mapped in path for path in statted))
    finally:
        engine.close()
    assert per_snapshot[1:] == [0, 0], per_snapshot


def until_first_look(engine: Capturer, looked) -> None:
    """Snapshots, the resolver idle after each, until `looked()` says the mapper's objects
    were looked at (its python binary is resolved first, in the background)."""
    for _ in range(20):
        engine.capture()
        assert engine.attacher.background.wait_idle(60)
        if looked():
            return
    raise AssertionError("its objects were never looked at")


def test_a_process_pending_look_after_look_is_looked_at_less_and_less_often(
        spawn_process, tmp_path, monkeypatch):
    """A process that stays pending look after look (issue 22's mapper: more objects than
    the resolver is handed in many looks) has its maps read at every snapshot until its
    looks have read more than PENDING_MAPS_LINES lines of them, then only after 1, 2, 4 ...
    snapshots, however soon the resolver is done."""
    objects = PENDING_MAPS_LINES * 3 // 8  # lines of maps per look: a little more
    mapper = spawn_mapper(spawn_process, tmp_path, objects)
    lines: list[int] = []
    real_read = attach.read_maps_bytes

    def read_maps(process):
        data = real_read(process)
        lines.append(len(parse_maps(data.decode("utf-8", "replace"))))
        return data
    monkeypatch.setattr(attach, "read_maps_bytes", read_maps)
    engine = Capturer(CaptureSettings(background=True, select=lambda p: p.pid == mapper.pid))
    background = engine.attacher.background
    looked: list[bool] = []  # per snapshot from the first look: were its maps read
    # the third look reads more than PENDING_MAPS_LINES in all; then 1, 2, 4 skipped
    expected = [True] * 3 + [False, True, False, False, True, False, False, False, False,
                             True]
    try:
        until_first_look(engine, lambda: bool(lines))
        looked.append(True)
        while len(looked) < len(expected):
            before = len(lines)
            assert engine.capture().pending == 1
            assert background.wait_idle(60)  # nothing queued holds the next look back
            looked.append(len(lines) > before)
    finally:
        engine.close()
    assert objects * 3 > PENDING_MAPS_LINES >= sum(lines[:2]), lines
    assert len(expected) * UNRESOLVED_MAX < objects  # pending throughout
    assert looked == expected


def test_a_pending_process_is_not_read_again_while_its_objects_are_being_resolved(
        spawn_process, tmp_path, monkeypatch):
    """A pending process's maps (20,000 lines for issue 22's attacker: 170 ms to read and
    parse) are not read again while the objects its last look queued are still queued,
    and are once the resolver is done with them."""
    mapper = spawn_mapper(spawn_process, tmp_path, 200)
    reads: list[int] = []
    real_read = attach.read_maps_bytes

    def read_maps(process):
        reads.append(process.pid)
        return real_read(process)
    monkeypatch.setattr(attach, "read_maps_bytes", read_maps)
    engine = Capturer(CaptureSettings(background=True, select=lambda p: p.pid == mapper.pid))
    background = engine.attacher.background
    gate = threading.Event()
    try:
        until_first_look(engine, lambda: bool(reads))
        assert background.submit("a long parse", 0, lambda: gate.wait(120))  # holds the resolver
        reads.clear()
        assert engine.capture().pending == 1
        assert reads == [mapper.pid]  # looked at: the next objects queued behind the long parse
        for _ in range(3):
            assert engine.capture().pending == 1
        assert reads == [mapper.pid]  # not again while they are queued
        gate.set()
        assert background.wait_idle(60)
        engine.capture()
        assert reads == [mapper.pid, mapper.pid]  # resolved: looked at again
    finally:
        gate.set()
        engine.close()


# -- a ctprofd killed mid-snapshot -----------------------------------------------------------

def test_sigkill_mid_snapshot_leaves_no_thread_stopped(fixture_bins, spawn_fixture, tmp_path):
    """A worker in the middle of the thread list waits for its vfork child: ctprofd reads
    the other 2,000 first, then seizes it and waits (250 ms) for a stop that cannot come.
    Killed right then, with the others stopped once and detached, nothing may stay stopped
    or traced."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 2000, timeout=30)
    cache = str(tmp_path / "cache")
    argv = cli_argv("snapshot", "--json", "--cache-dir", cache, "--pid", str(fixture.pid))
    subprocess.run(argv, cwd=REPO, capture_output=True, timeout=120)  # caches the layout
    stuck = sorted(fixture.worker_tids)[len(fixture.worker_tids) // 2]
    fixture.send(f"vfork {fixture.worker_tids.index(stuck)} 600000")
    assert fixture.readline() == f"VFORKING {stuck}"
    wait_until(lambda: thread_state(fixture.pid, stuck) == "D", "the vfork")
    for _attempt in range(5):  # a poll on a loaded machine can miss the 250 ms window
        before = voluntary_switches(fixture.pid)
        cli = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)

        def seized_by_cli() -> bool:  # TracerPid names the tracing thread
            tracer = proc_field(fixture.pid, stuck, "TracerPid")
            return tracer not in (None, "0") and os.path.exists(f"/proc/{cli.pid}/task/{tracer}")
        try:
            if wait_until(lambda: seized_by_cli() or ("exited" if cli.poll() is not None else None),
                          "ctprofd to seize the stuck worker") is True:
                break
        finally:
            cli.kill()
            cli.wait()
    else:
        raise AssertionError("five snapshots went by without the stuck worker seen seized")
    assert_no_thread_stopped_or_traced(fixture.pid)
    after = voluntary_switches(fixture.pid)
    stopped = {tid for tid in before if after.get(tid) != before[tid]} - {stuck}
    # the threads that can stop are read before one in a vfork wait (D): all of them were
    # stopped once and let go before ctprofd waited for the stuck one and was killed
    assert len(stopped) == 2000, f"{len(stopped)} threads stopped, not all before the stuck one"
    fixture.send("ping")
    assert fixture.readline() == "PONG"
    assert len(os.listdir(f"/proc/{fixture.pid}/task")) == 2001
    engine = capturer(fixture_bins, cache_dir=cache)
    snapshot = engine.capture(pids=[fixture.pid])
    assert set(snapshot.failures) == {tags.WAITPID}  # the stuck one, still in vfork
    # (on a starved host another thread may miss its 250 ms too: read at a later snapshot)
    for _ in range(HANG_GUARD_ROUNDS):
        if snapshot.left_out_threads == 1:  # only the stuck one
            break
        snapshot = engine.capture(pids=[fixture.pid])
    engine.close()
    assert by_tid(snapshot, fixture.pid) == {
        tid: counters for tid, counters in truth(fixture.threads).items() if tid != stuck}


def test_sigkill_while_a_thread_is_mid_interrupt(fixture_bins, spawn_fixture, tmp_path):
    """A worker waiting for its vfork child cannot enter the interrupt stop: ctprofd has
    seized and interrupted it (in the same breath: the poll sees the seize later than
    that) and waits. Killed right then, the kernel must detach it so that, when the vfork
    ends (its child is killed), it does not stop."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 16)
    cache = str(tmp_path / "cache")
    run_cli("snapshot", "--cache-dir", cache, "--pid", str(fixture.pid))  # warm the cache
    cli = subprocess.Popen(cli_argv("snapshot", "--cache-dir", cache, "--pid", str(fixture.pid)),
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def traced_by_cli():  # TracerPid names the tracing thread
        tracer = proc_field(fixture.pid, stuck, "TracerPid")
        return tracer not in (None, "0") and os.path.exists(f"/proc/{cli.pid}/task/{tracer}")
    try:
        fixture.send("vfork 8 600000")  # while ctprofd starts; the child ends when killed
        word, tid = fixture.readline().split()
        assert word == "VFORKING"
        stuck = int(tid)
        wait_until(traced_by_cli, "ctprofd to seize the worker")
    finally:
        cli.kill()
        cli.wait()
    assert proc_field(fixture.pid, stuck, "TracerPid") == "0"
    end_vfork(fixture.pid, stuck)
    # A stop still due would come as the vfork returns, before the worker blocks again
    # (S): a worker seen blocking again has gone past it, and a stopped one stays t.
    wait_until(lambda: thread_state(fixture.pid, stuck) in ("S", "t"),
               "the vfork to end")
    assert_no_thread_stopped_or_traced(fixture.pid)
    fixture.send("ping")
    assert fixture.readline() == "PONG"


def test_thread_whose_stop_comes_too_late_is_not_left_stopped(fixture_bins, spawn_fixture):
    """The same worker, but ctprofd lives on: it gives up waiting (a `waitpid` failure)
    and the snapshot ends. When the worker's stop finally arrives it must not stay
    stopped until some later snapshot comes along to detach it."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 4)
    engine = capturer(fixture_bins)
    other = spawn_fixture(fixture_bins.hostile_threads, 0)
    engine.capture(pids=[other.pid])  # the binary is parsed: the next capture is quick
    fixture.send("vfork 2 600000")  # the child ends when killed
    word, tid = fixture.readline().split()
    stuck = int(tid)
    wait_until(lambda: thread_state(fixture.pid, stuck) == "D",
               "the worker waiting for its vfork child")
    threads = set(os.listdir("/proc/self/task"))
    snapshot = engine.capture(pids=[fixture.pid])
    assert snapshot.failures == {tags.WAITPID: 1}
    assert stuck not in by_tid(snapshot, fixture.pid)
    # the snapshot's ptrace thread has ended in the kernel too, which detached the worker:
    # a vfork ending now cannot stop it for a tracer still exiting
    assert set(os.listdir("/proc/self/task")) <= threads
    end_vfork(fixture.pid, stuck)
    # A stop still due would come as the vfork returns, before the worker blocks again
    # (S): a worker seen blocking again has gone past it, and a stopped one stays t.
    wait_until(lambda: thread_state(fixture.pid, stuck) in ("S", "t"),
               "the vfork to end")
    assert_no_thread_stopped_or_traced(fixture.pid)
    for _ in range(HANG_GUARD_ROUNDS):  # it is backed off for a snapshot after its miss
        snapshot = engine.capture(pids=[fixture.pid])
        if not snapshot.left_out_threads:
            break
    assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)


def stuck_in_vfork(fixture, workers) -> list[int]:
    """Send workers of `fixture` into vfork waits that end only when the test kills the
    child; their tids, once each waits (D)."""
    stuck = []
    for worker in workers:
        fixture.send(f"vfork {worker} 600000")
        word, tid = fixture.readline().split()
        assert word == "VFORKING"
        stuck.append(int(tid))
    for tid in stuck:
        wait_until(lambda: thread_state(fixture.pid, tid) == "D", "the vfork wait")
    return stuck


def release_stuck(fixture, engine: Capturer, stuck) -> None:
    """End the vforks of the `stuck` threads and the engine; check that none of the
    fixture's threads is left stopped or traced once they run again."""
    for tid in stuck:
        end_vfork(fixture.pid, tid)
    engine.close()
    for tid in stuck:
        wait_until(lambda: thread_state(fixture.pid, tid) == "S", "the vfork to end")
    assert_no_thread_stopped_or_traced(fixture.pid)


def first_snapshot_reading_the_others(fixture_bins, spawn_fixture, nthreads: int,
                                      workers: list[int]):
    """A fixture of `nthreads` workers, `workers` of them stuck in vfork waits; an engine;
    the stop timeouts it counted before its first snapshot of the fixture; that snapshot,
    in which every thread that can stop was read. A thread read once is read from memory
    only after that, so the later snapshots' counts are the stuck ones'. On a starved host
    a thread that can stop may miss its 250 ms too: the try is ended (nothing left stopped)
    and made again on a fresh fixture and engine."""
    parsed = spawn_fixture(fixture_bins.hostile_threads, 0)
    for _attempt in range(50):  # a guard against a hang, never a timing claim
        fixture = spawn_fixture(fixture_bins.hostile_threads, nthreads)
        engine = capturer(fixture_bins)
        engine.capture(pids=[parsed.pid])  # the binary is parsed: the next capture is quick
        stuck = stuck_in_vfork(fixture, workers)
        readable = {tid: c for tid, c in truth(fixture.threads).items() if tid not in stuck}
        timeouts = engine.stats.stop_timeouts
        first = engine.capture(pids=[fixture.pid])
        if readable.items() <= by_tid(first, fixture.pid).items():
            return fixture, engine, stuck, timeouts, first
        release_stuck(fixture, engine, stuck)
        fixture.kill()
    raise AssertionError(f"50 first snapshots left out a thread that can stop: "
                         f"{readable} read as {by_tid(first, fixture.pid)}")


def test_a_thread_that_missed_its_stop_is_backed_off_then_read(fixture_bins, spawn_fixture):
    """A worker that cannot stop (a vfork wait) is waited for once, left out (waitpid, and
    `left_out_threads`), then not waited on for 1, then 2 snapshots (no new timeout: the
    counter shows it), and read exactly once its vfork ended."""
    fixture, engine, [stuck], timeouts, snapshot = first_snapshot_reading_the_others(
        fixture_bins, spawn_fixture, 4, [2])
    plan = [1, 0, 1, 0, 0]  # 1: waited for and missed; 0: backed off, not waited for
    for step, missed in enumerate(plan):
        if step:
            timeouts = engine.stats.stop_timeouts
            snapshot = engine.capture(pids=[fixture.pid])
        assert snapshot.failures == ({tags.WAITPID: 1} if missed else {}), snapshot.failures
        assert snapshot.left_out_threads == 1
        assert snapshot.to_dict()["left_out_threads"] == 1
        assert engine.stats.stop_timeouts == timeouts + missed
        assert stuck not in by_tid(snapshot, fixture.pid)
    end_vfork(fixture.pid, stuck)
    wait_until(lambda: thread_state(fixture.pid, stuck) == "S", "the vfork to end")
    for _ in range(HANG_GUARD_ROUNDS):  # until its back-off (4 snapshots here) is over
        snapshot = engine.capture(pids=[fixture.pid])
        if not snapshot.left_out_threads:
            break
    assert snapshot.failures == {}
    assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)
    engine.close()
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_a_snapshot_waits_on_missed_stops_within_its_budget(fixture_bins, spawn_fixture):
    """Four workers that cannot stop: the snapshot reads the threads that can stop first,
    then waits for a stuck one (250 ms: less than another whole wait is then left of its
    0.5 s stop wait, and a thread seen in an uninterruptible sleep, D, is waited for only
    whole) and leaves the other three out without stopping them, put off as the one that
    missed its stop is: the next snapshot waits for none of them at all, the one after
    for one again (issue 22's forty vfork-stuck workers spent the whole wait on two of
    them at every snapshot)."""
    fixture, engine, stuck, timeouts, first = first_snapshot_reading_the_others(
        fixture_bins, spawn_fixture, 6, [0, 1, 2, 3])
    readable = {tid: c for tid, c in truth(fixture.threads).items() if tid not in stuck}
    # Another ctprofd on the host may be waiting on a stuck one itself: that one is then
    # ptrace-traced, and the wait for it came out of the same budget.
    assert set(first.failures) <= {tags.WAITPID, tags.PTRACE_TRACED}, first.failures
    assert first.left_out_threads + first.failures.get(tags.PTRACE_TRACED, 0) == 4
    assert first.failures.get(tags.WAITPID, 0) == engine.stats.stop_timeouts - timeouts <= 1
    assert by_tid(first, fixture.pid) == readable
    timeouts = engine.stats.stop_timeouts
    second = engine.capture(pids=[fixture.pid])  # all four backed off
    assert set(second.failures) <= {tags.PTRACE_TRACED}, second.failures
    assert second.left_out_threads + second.failures.get(tags.PTRACE_TRACED, 0) == 4
    assert engine.stats.stop_timeouts == timeouts
    assert by_tid(second, fixture.pid) == readable
    third = engine.capture(pids=[fixture.pid])  # tried again: one is waited for
    assert third.left_out_threads + third.failures.get(tags.PTRACE_TRACED, 0) == 4
    assert engine.stats.stop_timeouts - timeouts + len(third.traced_by) == 1
    assert by_tid(third, fixture.pid) == readable
    release_stuck(fixture, engine, stuck)


def test_a_stop_wait_the_budget_cut_short_is_left_out_not_backed_off(fixture_bins,
                                                                     spawn_fixture):
    """A wait cut short because the snapshot's stop wait is nearly spent says nothing
    against the thread: no stop timeout is counted and the snapshot's reader tries it
    again at the next snapshot (WaitBudgetSpent, reached). Such a wait is made only for a
    thread not seen in an uninterruptible sleep (it entered one after the listing): one
    seen in D is not waited for unless its whole wait is left, and is left out with no
    `waitpid` failure and no stop timeout, put off as unreached, then read once its vfork
    ended. (Here a thread's own wait is longer than the whole budget.)"""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 4)
    engine = capturer(fixture_bins)
    engine.capture(pids=[spawn_fixture(fixture_bins.hostile_threads, 0).pid])  # parsed
    engine.tracer.stop_timeout = 120  # a hang guard: the budget cuts every wait short
    engine.tracer.wait_budget = 1.0
    [stuck] = stuck_in_vfork(fixture, [2])
    with pytest.raises(WaitBudgetSpent) as cut:  # as if listed before its sleep began
        engine.tracer.thread_pointer(stuck)
    assert cut.value.reached and engine.stats.stop_timeouts == 0
    engine.tracer.end()
    snapshot = engine.capture(pids=[fixture.pid])  # seen in D: not stopped at all
    assert snapshot.failures == {}, snapshot.failures
    assert snapshot.left_out_threads == 1 and engine.stats.stop_timeouts == 0
    assert by_tid(snapshot, fixture.pid) == {tid: c for tid, c in truth(fixture.threads).items()
                                             if tid != stuck}
    end_vfork(fixture.pid, stuck)
    wait_until(lambda: thread_state(fixture.pid, stuck) == "S", what="the vfork to end")
    for _ in range(HANG_GUARD_ROUNDS):  # until its back-off is over
        snapshot = engine.capture(pids=[fixture.pid])
        if not snapshot.left_out_threads:
            break
    assert snapshot.failures == {} and engine.stats.stop_timeouts == 0
    assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)
    engine.close()
    assert_no_thread_stopped_or_traced(fixture.pid)

# -- totals across thread exits and restarts -------------------------------------------------

def test_totals_stay_monotonic_across_thread_exits_and_restarts(fixture_bins, spawn_fixture,
                                                                tmp_path):
    fixture = spawn_fixture(fixture_bins["static"], 6)
    state_dir = str(tmp_path)
    only = lambda p: p.pid == fixture.pid  # noqa: E731  (the daemon's full walk, narrowed)

    def start():
        return capturer(fixture_bins, state_dir=state_dir, select=only)

    def total(engine):
        process = process_of(engine.capture(), fixture.pid)
        return process.allocated_bytes, process.deallocated_bytes

    engine = start()
    first = total(engine)
    assert first == totals(fixture.threads)
    fixture.exit_thread(1)  # seen exiting
    assert total(engine) == first
    engine.close()

    engine = start()  # restart
    assert total(engine) == first
    engine.close()

    fixture.exit_thread(2)  # exits while no ctprofd runs
    fixture.exit_thread(3)
    engine = start()
    assert total(engine) == first
    assert total(engine) == first
    fixture.exit_thread(4)
    assert total(engine) == first
    engine.close()

    state = json.loads((Path(state_dir) / "retained.json").read_text())
    assert any(key.startswith(f"{fixture.pid}:") for key in state["processes"])
    fixture.kill()
    engine = start()
    assert engine.capture().processes == ()
    engine.close()
    state = json.loads((Path(state_dir) / "retained.json").read_text())
    assert not any(key.startswith(f"{fixture.pid}:") for key in state["processes"])


def test_corrupt_state_file_is_set_aside_not_trusted(fixture_bins, spawn_fixture, tmp_path,
                                                     caplog):
    fixture = spawn_fixture(fixture_bins["static"], 2)
    state = tmp_path / "retained.json"
    state.write_text('{"boot_id": ')  # a torn write
    snapshot = capturer(fixture_bins, state_dir=str(tmp_path)).capture(pids=[fixture.pid])
    assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)
    assert process_of(snapshot, fixture.pid).allocated_bytes == totals(fixture.threads)[0]
    assert (tmp_path / "retained.json.corrupt").read_text() == '{"boot_id": '
    assert len(warnings_from(caplog, "ctprofd.probe.retained")) == 1


def _corrupt(kind: str, text: str) -> str:
    """A cache file (of a layout) damaged in one of the ways `kind` names."""
    if kind == "truncated":
        return text[:len(text) // 2]
    if kind == "not-an-object":
        return "[]"
    data = json.loads(text)
    layout = data["result"]
    assert layout["kind"] == "layout"
    if kind == "other-version":
        data["version"] = 99
    elif kind == "other-key":
        data["key"] = "build-id:" + "0" * 40
    elif kind == "field-missing":
        del layout["allocated_offset"]
    elif kind == "wrong-type":
        layout["allocated_offset"] = str(layout["allocated_offset"])
    elif kind == "impossible-layout":  # the counters swapped
        layout["allocated_offset"], layout["deallocated_offset"] = (
            layout["deallocated_offset"], layout["allocated_offset"])
    return json.dumps(data)


@pytest.mark.parametrize("kind", ["truncated", "not-an-object", "other-version", "other-key",
                                  "field-missing", "wrong-type", "impossible-layout"])
def test_corrupt_cache_files_are_set_aside_not_trusted(fixture_bins, spawn_fixture, tmp_path,
                                                       kind, caplog):
    fixture = spawn_fixture(fixture_bins["static"], 2)
    engine = capturer(fixture_bins, cache_dir=str(tmp_path))
    engine.capture(pids=[fixture.pid])
    engine.close()
    files = sorted((tmp_path / "layouts").glob("*.json"))
    assert files
    for path in files:
        path.write_text(_corrupt(kind, path.read_text()))
    engine = capturer(fixture_bins, cache_dir=str(tmp_path))
    snapshot = engine.capture(pids=[fixture.pid])
    engine.close()
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot, fixture.pid) == truth(fixture.threads)
    assert engine.stats.elf_opens == 1  # parsed again, not taken from the bad file
    # each bad file set aside, and written anew from the parse
    assert sorted(p.name for p in (tmp_path / "layouts").iterdir()) == sorted(
        [p.name for p in files] + [p.name + ".corrupt" for p in files])
    assert warnings_from(caplog, "ctprofd.resolve.cache")


# -- unusable cache and state directories ----------------------------------------------------

@pytest.fixture
def unusable_dir(tmp_path):
    """Factory: a directory that cannot be written, by kind."""
    @contextmanager
    def make(kind: str):
        path = tmp_path / kind
        if kind == "read-only":
            path.mkdir()
            with mounted("-t", "tmpfs", "-o", "ro,size=64k", "ctprofd-test", str(path)) as p:
                yield p
        elif kind == "full":
            path.mkdir()
            with mounted("-t", "tmpfs", "-o", "size=16k", "ctprofd-test", str(path)) as p:
                fd = os.open(p / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    while os.write(fd, b"x" * 4096):
                        pass
                except OSError:  # ENOSPC: full
                    pass
                finally:
                    os.close(fd)
                yield p
        elif kind == "a-file":
            path.write_text("not a directory\n")
            yield path
        else:
            raise ValueError(kind)
    return make


@pytest.mark.parametrize("kind", ["read-only", "full", "a-file"])
def test_unusable_cache_dir_degrades_to_memory_with_one_warning(fixture_bins, spawn_fixture,
                                                                unusable_dir, kind, caplog):
    static = spawn_fixture(fixture_bins["static"], 2)
    dynamic = spawn_fixture(fixture_bins["dynamic"], 2)
    with unusable_dir(kind) as directory:
        engine = capturer(fixture_bins, cache_dir=str(directory))
        parsed = None
        for _ in range(3):
            snapshot = engine.capture(pids=[static.pid, dynamic.pid])
            assert snapshot.summary.failed == 0, snapshot.failures
            assert by_tid(snapshot, static.pid) == truth(static.threads)
            assert by_tid(snapshot, dynamic.pid) == truth(dynamic.threads)
            parsed = parsed or engine.stats.elf_opens
        engine.close()
        assert engine.stats.elf_opens == parsed  # each binary parsed once: memory works
    warned = warnings_from(caplog, "ctprofd.resolve.cache")
    assert len(warned) == 1, warned
    assert "memory only" in warned[0]


@pytest.mark.parametrize("kind", ["read-only", "full", "a-file"])
def test_unusable_state_dir_degrades_to_memory_with_one_warning(fixture_bins, spawn_fixture,
                                                                unusable_dir, kind, caplog):
    fixture = spawn_fixture(fixture_bins["static"], 4)
    with unusable_dir(kind) as directory:
        engine = capturer(fixture_bins, state_dir=str(directory),
                          select=lambda p: p.pid == fixture.pid)
        first = process_of(engine.capture(), fixture.pid)
        for n in range(3):
            fixture.exit_thread(n)
            process = process_of(engine.capture(), fixture.pid)
            assert (process.allocated_bytes, process.deallocated_bytes) == (
                first.allocated_bytes, first.deallocated_bytes)
        engine.close()
    # (a read refused is said by the store; a write refused by the writer of state files)
    warned = (warnings_from(caplog, "ctprofd.probe.retained")
              + warnings_from(caplog, "ctprofd.files.atomic"))
    assert len(warned) == 1, warned
    assert "retained.json" in warned[0]
