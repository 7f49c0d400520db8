"""ThreadProber (probe/threads.py) on the real threads of a python3 process, with real ptrace
and real process_vm_readv: each thread stopped once per life, then read from memory only;
counters that never go backwards (a torn read read again); threads that exit, are reused,
miss their stop or are held by another tracer (backed off 1, 2, 4 ... snapshots); the
image's AT_RANDOM read along; the GOT slot of jemalloc in a shared object.

The made-up layout puts the "counters" in the thread's own TCB (glibc's tcbhead_t):
addr(tsd) = fs_base + 8, thread_allocated 8 bytes into it (the TCB's `self`, which holds
fs_base), thread_deallocated 24 bytes in (`sysinfo`, 0 on x86_64). Values other than
those are served for chosen addresses, the rest is the target's real memory."""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from ctprofd.probe import memory
from ctprofd.probe.ptrace import SeizeRefused, Tracer
from ctprofd.probe.threads import (ImageChanged, ProcessState, ThreadProber, ThreadState,
                                   counter_pair, image_mark, same_image)
from ctprofd.procfs.processes import ProcessInfo, ThreadInfo, read_process, read_stat
from ctprofd.report import tags
from ctprofd.report.summary import Tally
from ctprofd.resolve.attach import Attachment
from ctprofd.resolve.layout import TsdLayout
from support.holders import holders, let_go  # noqa: F401 - holders is a fixture
from support.i386 import build_pause
from support.procs import assert_no_thread_stopped_or_traced, wait_until
from support.pythreads import PyThreads, hang_guard

DELTA = 8  # addr(tsd) - fs_base
LAYOUT = TsdLayout(None, "je_tsd_tls", 0, 8, 24)  # thread_allocated at +8, deallocated +24
SPAN = 24
HANG_GUARD = 60.0
_WORDS = struct.Struct("<QQQ")


class Reader:
    """process_vm_readv, except for the addresses given values in `serve` (bytes or an
    OSError; a list is served one per read, then the last kept); records every call."""

    def __init__(self) -> None:
        self.serve: dict[int, bytes | OSError | list[bytes | OSError]] = {}
        self.calls: list[tuple[int, list[tuple[int, int]]]] = []

    def __call__(self, pid: int, ranges: list[tuple[int, int]]) -> list[bytes | OSError]:
        self.calls.append((pid, list(ranges)))
        out = memory.read_ranges(pid, ranges)
        for i, (address, _) in enumerate(ranges):
            served = self.serve.get(address)
            if isinstance(served, list):
                out[i] = served.pop(0) if len(served) > 1 else served[0]
            elif served is not None:
                out[i] = served
        return out


def counters(allocated: int, deallocated: int) -> bytes:
    return _WORDS.pack(allocated, 0, deallocated)


def listing(pid: int) -> list[ThreadInfo]:
    """The threads of `pid` as /proc lists them now, the leader first."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    tids.remove(pid)
    threads = []
    for tid in [pid, *tids]:
        stat = read_stat(f"/proc/{pid}/task/{tid}/stat")
        threads.append(ThreadInfo(tid, stat.start_time, stat.comm, stat.state))
    return threads


def by_tid(samples) -> dict[int, tuple[int, int]]:
    return {s.tid: (s.allocated_bytes, s.deallocated_bytes) for s in samples}


@pytest.fixture(autouse=True)
def _hang_guard(hang_guard):
    """Every test here stops threads through a Tracer's own thread."""


@pytest.fixture
def target():
    process = PyThreads(3)
    yield process
    process.kill()


@pytest.fixture
def tracer():
    made = Tracer(stop_timeout=HANG_GUARD, wait_budget=HANG_GUARD)  # a thread that can
    # stop is never given up on, however busy the host; tests waiting for one that cannot
    # make its wait short
    yield made
    made.end()


def snapshot(prober: ThreadProber, pid: int, state: ProcessState,
             threads: list[ThreadInfo], **kw) -> tuple[dict[int, tuple[int, int]], Tally]:
    """One snapshot of one process: probe, then end the tracer as a capture does."""
    tally = Tally()
    tally.begin(pid, "python3")  # failures are listed with their reasons
    try:
        samples = prober.probe(pid, state, threads, tally, **kw)
    finally:
        prober.tracer.end()
    comms = {t.tid: t.comm for t in threads}
    assert all(s.comm == comms[s.tid] for s in samples)  # each named as listed
    return by_tid(samples), tally


def test_threads_are_stopped_once_then_read_from_memory_only(target, tracer):
    """The first snapshot stops each thread once (on_stop told how long) and reads its
    counters where fs_base + the TSD's offset puts them; later ones stop none, and the
    counters follow what memory holds."""
    stops: list[float] = []
    reader = Reader()
    prober = ThreadProber(tracer, on_stop=stops.append, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    read, tally = snapshot(prober, target.pid, state, threads)
    assert read == {tid: (base, 0) for tid, base in target.fs_base.items()}
    assert (tally.probed_ok, tally.failures, tally.left_out) == (4, {}, 0)
    assert len(stops) == tracer.stops == 4 and all(0 < s < HANG_GUARD for s in stops)
    assert {t: s.counters_at for t, s in state.threads.items()} == {
        tid: base + DELTA + 8 for tid, base in target.fs_base.items()}
    assert reader.calls[-1] == (target.pid, [(b + DELTA + 8, SPAN)
                                             for b in target.fs_base.values()])
    worker = target.workers[0]
    moved = (target.fs_base[worker] + 5000, 3000)
    reader.serve[target.fs_base[worker] + 16] = counters(*moved)
    read, tally = snapshot(prober, target.pid, state, threads)
    assert read == {**{tid: (base, 0) for tid, base in target.fs_base.items()}, worker: moved}
    assert (tracer.stops, len(reader.calls), tally.probed_ok) == (4, 2, 4)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_counter_read_lower_is_read_again_and_never_goes_backwards(target, tracer):
    """A read lower than the last (the target was writing the word as it was copied) is
    read once more, that thread only, and counted; neither counter ever goes backwards,
    whichever the second read gives, even a failure."""
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    worker = target.workers[1]
    at = target.fs_base[worker] + 16
    reader.serve[at] = counters(5000, 3000)
    assert snapshot(prober, target.pid, state, threads)[0][worker] == (5000, 3000)
    plan = [  # (first read, second read, reported)
        (counters(4000, 3000), counters(6000, 3500), (6000, 3500)),  # allocated torn
        (counters(6000, 3400), counters(6100, 3300), (6100, 3500)),  # deallocated torn
        (counters(6100, 100), OSError(errno.EFAULT, "Bad address"), (6100, 3500)),
        (counters(1, 3500), counters(2, 3), (6100, 3500)),  # lower again: kept
    ]
    for torn, (first, again, reported) in enumerate(plan, 1):
        reader.serve[at] = [first, again]
        reader.calls.clear()
        read, tally = snapshot(prober, target.pid, state, threads)
        assert read[worker] == reported and prober.torn_reads == torn
        assert reader.calls[1] == (target.pid, [(at, SPAN)])
        assert tally.probed_ok == 4 and not tally.failures
    reader.serve[at] = counters(7000, 3600)  # not torn: read once
    reader.calls.clear()
    assert snapshot(prober, target.pid, state, threads)[0][worker] == (7000, 3600)
    assert len(reader.calls) == 1 and prober.torn_reads == len(plan)
    assert_no_thread_stopped_or_traced(target.pid)


def test_an_unreadable_thread_fails_alone_and_keeps_its_counters(target, tracer):
    """A thread whose counters cannot be read is a process_vm_readv failure, the others
    are read; it keeps what it was read at before."""
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    worker = target.workers[0]  # the threads after it are read all the same
    snapshot(prober, target.pid, state, threads)
    reader.serve[target.fs_base[worker] + 16] = OSError(errno.EFAULT, "Bad address")
    read, tally = snapshot(prober, target.pid, state, threads)
    assert worker not in read and len(read) == 3
    assert tally.failures == {tags.PROCESS_VM_READV: 1} and tally.probed_ok == 3
    assert tally.failed_pids[target.pid].reason == f"tid {worker}: process_vm_readv: Bad address"
    assert (state.threads[worker].allocated, state.threads[worker].deallocated) == (
        target.fs_base[worker], 0)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_that_exits_is_retired_into_the_process_total(target, tracer):
    """A thread no longer listed, or listed with another start time (its tid reused), has
    what it did itself (less what it inherited) folded into the retained totals; a new
    life of a tid is stopped and located again."""
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    first, second = target.workers[:2]
    reader.serve[target.fs_base[first] + 16] = counters(5000, 3000)
    reader.serve[target.fs_base[second] + 16] = counters(7000, 4000)
    snapshot(prober, target.pid, state, listing(target.pid))
    state.threads[second].inherited = (1000, 500)  # a fork child's thread, say
    gone = target.end(0)
    assert gone == first
    threads = listing(target.pid)
    read, _ = snapshot(prober, target.pid, state, threads)
    assert first not in read and first not in state.threads
    assert read[second] == (6000, 3500)
    assert (state.retained_allocated, state.retained_deallocated) == (5000, 3000)
    # the same tid in a new life: retired, then stopped and located again
    reborn = [ThreadInfo(t.tid, t.start_time + (t.tid == second), t.comm, t.state)
              for t in threads]
    read, _ = snapshot(prober, target.pid, state, reborn)
    assert (state.retained_allocated, state.retained_deallocated) == (11000, 6500)
    assert read[second] == (7000, 4000) and tracer.stops == 5
    assert state.threads[second].start_time == reborn[1].start_time == threads[1].start_time + 1
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_restored_thread_keeps_its_floor_when_located(target, tracer):
    """A thread restored from disk (its counters not located yet) is stopped once and
    read, and never reported below what it had been reported at."""
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    worker = target.workers[0]
    state.threads[worker] = ThreadState(threads[1].start_time, 0, 9000, 8000)
    reader.serve[target.fs_base[worker] + 16] = counters(5000, 9500)
    fresh = target.workers[1]  # not restored: no floor at all
    reader.serve[target.fs_base[fresh] + 16] = counters(0, 0)
    read, tally = snapshot(prober, target.pid, state, threads)
    assert read[worker] == (9000, 9500) and tracer.stops == 4
    assert read[fresh] == (0, 0)
    assert state.threads[worker].counters_at == target.fs_base[worker] + 16
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_that_misses_its_stop_is_backed_off_then_read(target, tracer, tmp_path,
                                                              caplog):
    """A thread in a vfork wait misses its stop: `waitpid` and left out (said at debug
    level); it is not tried for 1 snapshot, tried and missed, then not for 2, ... and read
    once it can stop."""
    caplog.set_level(logging.DEBUG, logger="ctprofd.probe.threads")
    fifo = tmp_path / "fifo"
    stuck = target.vfork(fifo)
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    assert [t.state for t in threads if t.tid == stuck] == ["D"]
    snapshot(prober, target.pid, state, [t for t in threads if t.tid != stuck])
    tracer.stop_timeout = 0.05  # the others are located: only the stuck one is stopped
    for step, missed in enumerate([1, 0, 1, 0, 0, 1]):
        timeouts = tracer.stop_timeouts
        read, tally = snapshot(prober, target.pid, state, threads)
        assert read == {tid: (base, 0) for tid, base in target.fs_base.items()}
        assert tally.failures == ({tags.WAITPID: 1} if missed else {}), step
        assert (tally.left_out, tracer.stop_timeouts - timeouts) == (1, missed)
    start = [t.start_time for t in threads if t.tid == stuck][0]
    assert state.backoff[stuck][:3] == (start, 3, 4)
    assert tally.failed_pids[target.pid].reason == f"tid {stuck}: no stop within 50 ms"
    assert caplog.messages == 3 * [f"pid {target.pid}: waitpid: tid {stuck}: no stop within "
                                   "50 ms"]
    target.release(fifo, stuck)
    tracer.stop_timeout = HANG_GUARD
    stat = read_stat(f"/proc/{target.pid}/task/{stuck}/stat")
    threads = [t if t.tid != stuck else ThreadInfo(stuck, start, stat.comm, stat.state)
               for t in threads]
    for _ in range(4):  # its back-off
        read, tally = snapshot(prober, target.pid, state, threads)
        assert tally.left_out == 1 and stuck not in read
    read, tally = snapshot(prober, target.pid, state, threads)
    assert (tally.left_out, tally.failures) == (0, {}) and stuck in read
    assert stuck not in state.backoff
    assert_no_thread_stopped_or_traced(target.pid)


def test_threads_in_uninterruptible_sleep_left_unreached_are_put_off(target, tracer,
                                                                    tmp_path, caplog):
    """Two threads in vfork waits: the first spends the stop wait, the second is not even
    seized (less than a whole wait left) and is put off as the first is; a thread not in
    such a sleep that the spent wait leaves out is tried again at the next snapshot."""
    first, second = target.vfork(tmp_path / "first"), target.vfork(tmp_path / "second")
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    snapshot(prober, target.pid, state, [t for t in threads if t.tid not in (first, second)])
    tracer.stop_timeout = tracer.wait_budget = 0.05
    caplog.set_level(logging.DEBUG, logger="ctprofd.probe.threads")
    read, tally = snapshot(prober, target.pid, state, threads)
    assert caplog.messages[1] == (f"pid {target.pid}: tid {second}: not stopped: this "
                                  "snapshot's stop wait is spent")
    assert read == {tid: (base, 0) for tid, base in target.fs_base.items()}
    assert (tally.failures, tally.left_out) == ({tags.WAITPID: 1}, 2)
    assert sorted(b[1:] for b in state.backoff.values()) == [(1, 1, None), (1, 1, None)]
    assert tracer.stop_timeouts == 1
    read, tally = snapshot(prober, target.pid, state, threads)  # both skipped
    assert (tally.failures, tally.left_out, tracer.stop_timeouts) == ({}, 2, 1)
    # a thread left out by a spent wait, listed as running: tried at the next snapshot
    state.backoff.clear()
    worker = target.workers[0]
    del state.threads[worker]
    running = [ThreadInfo(t.tid, t.start_time, t.comm, "R") for t in threads
               if t.tid in (first, worker)]
    running.sort(key=lambda t: t.tid != first)  # the one that will not stop first
    read, tally = snapshot(prober, target.pid, state, running)
    assert (read, tally.left_out, tally.failures) == ({}, 2, {tags.WAITPID: 1})
    assert list(state.backoff) == [first]
    tracer.stop_timeout = tracer.wait_budget = HANG_GUARD
    read, tally = snapshot(prober, target.pid, state, running)
    assert (read, tally.left_out, tally.failures) == ({worker: (target.fs_base[worker], 0)},
                                                      1, {})
    target.release(tmp_path / "first", first)
    target.release(tmp_path / "second", second)
    assert_no_thread_stopped_or_traced(target.pid)


def test_threads_that_may_not_stop_are_tried_last(target, tracer, tmp_path):
    """A thread in an uninterruptible sleep, or one that missed its stop before, is tried
    after the others (here the snapshot is cancelled at its first stop: the others had
    their turn first)."""
    stuck = target.vfork(tmp_path / "fifo")
    cancel = threading.Event()
    prober = ThreadProber(tracer, on_stop=lambda seconds: cancel.set())
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    threads.sort(key=lambda t: t.tid != stuck)  # listed first
    tracer.stop_timeout = 1.0  # what a wrong order would cost
    read, tally = snapshot(prober, target.pid, state, threads, cancel=cancel)
    assert len(read) == 1 and stuck not in read
    assert (tracer.stops, tracer.stop_timeouts) == (1, 0)
    missed_before, other = [t for t in threads if t.tid in target.workers[1:]]
    state.backoff[missed_before.tid] = (missed_before.start_time, 1, 0, None)  # tried again
    cancel.clear()
    read, tally = snapshot(prober, target.pid, state, [missed_before, other], cancel=cancel)
    assert set(read) == {other.tid} and tracer.stops == 2
    target.release(tmp_path / "fifo", stuck)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_another_tracer_holds_is_backed_off_and_still_said(target, tracer, holders):
    """ptrace-traced, naming the tracer; not seized again for 1, then 2 snapshots, and said
    again meanwhile; read once it lets go and its back-off is over."""
    held = target.workers[1]
    holder = holders("gdb", held)
    comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    start = [t.start_time for t in threads if t.tid == held][0]
    for step, (misses, skip) in enumerate([(1, 1), (1, 0), (2, 2), (2, 1), (2, 0)]):
        read, tally = snapshot(prober, target.pid, state, threads)
        assert set(read) == set(target.fs_base) - {held}
        assert (tally.failures, tally.traced_by, tally.tracer_names) == (
            {tags.PTRACE_TRACED: 1}, {target.pid: holder.pid}, {holder.pid: comm}), step
        assert tally.failed_pids[target.pid].reason == (
            f"tid {held}: PTRACE_SEIZE: EPERM: held by another tracer, pid {holder.pid} "
            f"({comm})")
        assert state.backoff[held][:3] == (start, misses, skip), step
        assert isinstance(state.backoff[held][3], SeizeRefused) and tally.left_out == 0
    assert tracer.stops == 3
    let_go(holder)
    read, tally = snapshot(prober, target.pid, state, threads)  # its back-off is over
    assert read[held] == (target.fs_base[held], 0) and tally.failures == {}
    assert held not in state.backoff
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_privilege_refusal_is_not_backed_off_and_a_gone_thread_is_an_exit_race(tracer,
                                                                                  caplog):
    """A thread of this very process cannot be seized (ptrace-seize, tried again at every
    snapshot); a tid that names no thread is an exit race, in no tag. Both are said at
    debug level."""
    caplog.set_level(logging.DEBUG, logger="ctprofd.probe.threads")
    own = listing(os.getpid())[0]
    nothing = ThreadInfo(int(Path("/proc/sys/kernel/pid_max").read_text()), 1, "gone", "S")
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    for _ in range(2):
        read, tally = snapshot(prober, os.getpid(), state, [own, nothing])
        assert (read, tally.failures, tally.traced_by, tally.left_out) == (
            {}, {tags.PTRACE_SEIZE: 1}, {}, 0)
        assert tally.failed_pids[os.getpid()].reason == (
            f"tid {own.tid}: PTRACE_SEIZE: EPERM (not permitted)")
        assert state.backoff == {} and state.threads == {}
    assert prober.exit_races == 2
    assert caplog.messages == 2 * [
        f"pid {os.getpid()}: ptrace-seize: tid {own.tid}: PTRACE_SEIZE: EPERM (not permitted)",
        f"pid {os.getpid()}: tid {nothing.tid}: gone at PTRACE_SEIZE"]


@pytest.mark.parametrize("end, ok", [(1 << 64, True), ((1 << 64) + 1, False)])
def test_counters_must_end_within_the_address_space(target, tracer, end, ok):
    """fs_base + the TSD's offset may put the counters' last byte at the top of the
    address space, not past it (there the read itself fails)."""
    worker = target.workers[0]
    prober = ThreadProber(tracer)
    delta = end - 32 - target.fs_base[worker]  # the range read ends 32 bytes past fs_base
    state = ProcessState(Attachment(LAYOUT, tsd_delta=delta))
    threads = [t for t in listing(target.pid) if t.tid == worker]
    read, tally = snapshot(prober, target.pid, state, threads)
    assert read == {}
    if ok:
        assert tally.failures == {tags.PROCESS_VM_READV: 1}
    else:
        assert tally.failures == {tags.TLS_ARITHMETIC: 1}
        assert tally.failed_pids[target.pid].reason == (
            f"tid {worker}: fs_base {target.fs_base[worker]:#x} gives counters outside the "
            "address space")
    assert_no_thread_stopped_or_traced(target.pid)


@pytest.mark.parametrize("at", [0, 1])
def test_counters_must_start_above_address_zero(target, tracer, at):
    worker = target.workers[0]
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=at - 8 - target.fs_base[worker]))
    threads = [t for t in listing(target.pid) if t.tid == worker]
    read, tally = snapshot(prober, target.pid, state, threads)
    assert read == {}
    assert tally.failures == {tags.PROCESS_VM_READV if at else tags.TLS_ARITHMETIC: 1}
    assert_no_thread_stopped_or_traced(target.pid)


def test_the_got_slot_gives_the_tsd_offset_once(target, tracer):
    """jemalloc in a shared object: the TSD's offset from fs_base is the signed value the
    loader put in the GOT slot, read once, after the first thread was seized."""
    slot = target.fs_base[target.pid]  # any readable address: its value is served
    reader = Reader()
    reader.serve[slot] = struct.pack("<q", -16)
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, got_slot=slot))
    worker = target.workers[0]
    reader.serve[target.fs_base[worker] - 8] = counters(5000, 3000)
    read, tally = snapshot(prober, target.pid, state, listing(target.pid))
    assert state.tsd_delta == -16
    assert read[worker] == (5000, 3000) and tally.failures == {}
    assert [call for call in reader.calls if call[1] == [(slot, 8)]] == [(target.pid,
                                                                           [(slot, 8)])]
    snapshot(prober, target.pid, state, listing(target.pid))
    assert len([call for call in reader.calls if call[1] == [(slot, 8)]]) == 1
    assert_no_thread_stopped_or_traced(target.pid)


def test_an_unreadable_got_slot_fails_each_thread_until_it_is_read(target, tracer):
    slot = target.fs_base[target.pid]
    reader = Reader()
    reader.serve[slot] = [OSError(errno.EFAULT, "Bad address"), struct.pack("<q", DELTA)]
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, got_slot=slot))
    threads = listing(target.pid)[:1]
    read, tally = snapshot(prober, target.pid, state, threads)
    assert (read, tally.failures, state.tsd_delta) == ({}, {tags.PROCESS_VM_READV: 1}, None)
    assert tally.failed_pids[target.pid].reason == "GOT slot: Bad address"
    read, tally = snapshot(prober, target.pid, state, threads)
    assert read == {target.pid: (target.fs_base[target.pid], 0)} and state.tsd_delta == DELTA
    assert_no_thread_stopped_or_traced(target.pid)


def test_the_images_at_random_bytes_are_read_along(target, tracer):
    """The AT_RANDOM bytes are read in the counters' call: the same bytes, or a read that
    fails otherwise than at that address (the process is going), let the counters stand;
    other bytes there, or nothing mapped there, is an exec: ImageChanged, nothing read."""
    process = read_process("/proc", target.pid)
    mark = image_mark(process)
    assert mark is not None and len(mark[1]) == 16 and same_image(target.pid, mark)
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA), image_mark=mark)
    threads = listing(target.pid)
    read, _ = snapshot(prober, target.pid, state, threads)
    assert len(read) == 4 and reader.calls[-1][1][-1] == (mark[0], 16)
    reader.serve[mark[0]] = OSError(errno.ESRCH, "No such process")
    assert len(snapshot(prober, target.pid, state, threads)[0]) == 4
    for changed in [bytes(16), OSError(errno.EFAULT, "Bad address")]:
        reader.serve[mark[0]] = changed
        with pytest.raises(ImageChanged, match=f"pid {target.pid}: AT_RANDOM changed"):
            snapshot(prober, target.pid, state, threads)
    assert not same_image(target.pid, (mark[0], bytes(16)))
    assert not same_image(target.pid, None)
    assert_no_thread_stopped_or_traced(target.pid)


def test_an_image_mark_that_cannot_be_read_is_none(target, tmp_path):
    """No mark when the auxv cannot be read, has no AT_RANDOM, or names an address that
    cannot be read (a /proc root of our own, the target's real memory)."""
    root = tmp_path / "proc"
    (root / str(target.pid)).mkdir(parents=True)
    auxv = root / str(target.pid) / "auxv"
    process = ProcessInfo(str(root), target.pid, read_stat(f"/proc/{target.pid}/stat"))
    assert image_mark(process) is None  # no auxv
    for entries in ([(6, 4096), (0, 0)], [(6, 4096), (25, 8), (0, 0)]):  # AT_PAGESZ, AT_RANDOM
        auxv.write_bytes(b"".join(struct.pack("<QQ", *e) for e in entries))
        assert image_mark(process) is None
    real = Path(f"/proc/{target.pid}/auxv").read_bytes()
    auxv.write_bytes(real)
    assert image_mark(process) == image_mark(read_process("/proc", target.pid)) is not None


def test_threads_gone_after_the_read_are_left_out(target, tracer):
    """Only a thread still alive after the read was alive during it: those `alive()` no
    longer lists are left out (and keep what they were read at before); a process gone
    (OSError) leaves all out, and None leaves all in."""
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    worker = target.workers[0]  # the threads after it are reported all the same
    snapshot(prober, target.pid, state, threads)
    reader.serve[target.fs_base[worker] + 16] = counters(1 << 62, 1 << 61)
    everyone = set(target.fs_base)
    read, tally = snapshot(prober, target.pid, state, threads, alive=lambda: everyone - {worker})
    assert set(read) == everyone - {worker} and tally.probed_ok == 3
    assert state.threads[worker].allocated == target.fs_base[worker]

    def process_gone():
        raise FileNotFoundError(errno.ENOENT, "gone")
    read, tally = snapshot(prober, target.pid, state, threads, alive=process_gone)
    assert (read, tally.probed_ok, tally.failures) == ({}, 0, {})
    read, _ = snapshot(prober, target.pid, state, threads, alive=lambda: None)
    assert read[worker] == (1 << 62, 1 << 61)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_process_whose_leader_exited_is_read_through_a_live_thread(target, tracer):
    """The leader, a zombie, is not listed: its pid no longer names the address space, so
    every read goes through the first listed thread's tid."""
    reader = Reader()
    prober = ThreadProber(tracer, read_ranges=reader)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    workers = listing(target.pid)[1:]
    read, _ = snapshot(prober, target.pid, state, workers)
    assert read == {tid: (target.fs_base[tid], 0) for tid in target.workers}
    assert {pid for pid, _ in reader.calls} == {workers[0].tid}
    assert snapshot(prober, target.pid, state, [])[0] == {}
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_cancelled_snapshot_stops_no_further_thread(target, tracer):
    """Once cancelled, no thread is stopped; those located before are still read."""
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = listing(target.pid)
    cancel = threading.Event()
    assert snapshot(prober, target.pid, state, threads[:2], cancel=cancel)[0] == {
        t.tid: (target.fs_base[t.tid], 0) for t in threads[:2]}
    cancel.set()
    read, tally = snapshot(prober, target.pid, state, threads, cancel=cancel)
    assert set(read) == {t.tid for t in threads[:2]} and tracer.stops == 2
    assert (tally.failures, tally.left_out) == ({}, 0)
    assert_no_thread_stopped_or_traced(target.pid)


def test_counter_pair_takes_the_first_and_last_words():
    assert counter_pair(counters(7, 9)) == (7, 9)
    assert counter_pair(struct.pack("<QQ", 1 << 63, 5)) == (1 << 63, 5)


def test_a_thread_counts_what_it_did_less_what_it_inherited():
    thread = ThreadState(1, 0x1000, allocated=500, deallocated=300, inherited=(200, 400))
    assert thread.counted() == (300, 0)
    thread = ThreadState(1, 0x1000, allocated=100, deallocated=300, inherited=(200, 100))
    assert thread.counted() == (0, 200)


def test_a_held_threads_back_off_doubles_up_to_64_snapshots(target, tracer, holders):
    """Each miss doubles the snapshots a thread is skipped for, 1, 2, 4 ... 64, and no more."""
    held = target.workers[0]
    holder = holders("gdb", held)
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = [t for t in listing(target.pid) if t.tid == held]
    skips = []
    for _ in range(1000):  # a guard against a back-off that never grows
        if len(skips) == 8:
            break
        snapshot(prober, target.pid, state, threads)
        start, misses, skip, refusal = state.backoff[held]
        if misses > len(skips):
            skips.append(skip)
    assert skips == [1, 2, 4, 8, 16, 32, 64, 64]
    let_go(holder)
    assert_no_thread_stopped_or_traced(target.pid)


def test_the_back_off_of_a_thread_that_exited_or_was_reborn_is_forgotten(target, tracer,
                                                                         holders):
    """A backed-off thread no longer listed, or listed in a new life (another start time),
    loses its back-off: a new life is tried at once."""
    held, other = target.workers[:2]
    holding = [holders("gdb", held), holders("gdb", other)]
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    threads = [t for t in listing(target.pid) if t.tid in (held, other)]
    snapshot(prober, target.pid, state, threads)
    assert set(state.backoff) == {held, other}
    reborn = [ThreadInfo(t.tid, t.start_time + 1, t.comm, t.state) for t in threads
              if t.tid == held]
    read, tally = snapshot(prober, target.pid, state, reborn)
    assert list(state.backoff) == [held] and state.backoff[held][:3] == (
        reborn[0].start_time, 1, 1)  # tried at once, held still: backed off anew
    assert tally.failures == {tags.PTRACE_TRACED: 1} and tracer.stops == 0
    for holder in holding:
        let_go(holder)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_whose_registers_cannot_be_read_fails_and_is_tried_again(tracer, tmp_path):
    """A 32-bit process has no fs_base in its register set: get-regset, said with its
    reason, and not put off (nothing says a later snapshot would fare differently, nor
    worse)."""
    process = subprocess.Popen([str(build_pause(tmp_path))])
    try:
        wait_until(lambda: read_stat(f"/proc/{process.pid}/stat").state == "S", "the pause")
        prober = ThreadProber(tracer)
        state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
        for stops in (1, 2):
            read, tally = snapshot(prober, process.pid, state, listing(process.pid))
            assert (read, tally.failures, tally.left_out) == ({}, {tags.GET_REGSET: 1}, 0)
            assert tally.failed_pids[process.pid].reason == (
                f"tid {process.pid}: short register set (68 bytes)")
            assert (state.backoff, state.threads, tracer.stops) == ({}, {}, stops)
        assert_no_thread_stopped_or_traced(process.pid)
    finally:
        process.kill()
        process.wait()


def test_a_thread_in_uninterruptible_sleep_is_not_seized_for_less_than_a_whole_wait(
        target, tracer, tmp_path, caplog):
    """Listed in D, a thread is left untouched (and put off) when less than a whole stop
    wait is left of the snapshot's, rather than seized for a wait cut short; with whole
    waits left, each thread that misses its stop is left out."""
    first, second = target.vfork(tmp_path / "first"), target.vfork(tmp_path / "second")
    prober = ThreadProber(tracer)
    state = ProcessState(Attachment(LAYOUT, tsd_delta=DELTA))
    stuck = [t for t in listing(target.pid) if t.tid in (first, second)]
    tracer.wait_budget = 0.05  # less than the stop timeout (the hang guard)
    caplog.set_level(logging.DEBUG, logger="ctprofd.probe.threads")
    read, tally = snapshot(prober, target.pid, state, stuck[:1])
    assert (read, tally.failures, tally.left_out, tracer.stops) == ({}, {}, 1, 0)
    assert caplog.messages == [
        f"pid {first}: tid {first}: not stopped: this snapshot's stop wait is spent "
        "(less than a whole wait is left for a thread in an uninterruptible sleep)"]
    assert state.backoff[first][1:] == (1, 1, None)
    assert_no_thread_stopped_or_traced(target.pid)  # untouched
    state.backoff.clear()
    tracer.stop_timeout, tracer.wait_budget = 0.05, HANG_GUARD  # two whole waits
    read, tally = snapshot(prober, target.pid, state, stuck)
    assert (read, tally.failures, tally.left_out) == ({}, {tags.WAITPID: 2}, 2)
    target.release(tmp_path / "first", first)
    target.release(tmp_path / "second", second)
    assert_no_thread_stopped_or_traced(target.pid)
