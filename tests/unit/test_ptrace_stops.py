"""The Tracer (probe/ptrace.py) on the real threads of a python3 process, with real ptrace:
each thread's own fs_base read and the thread let go; a thread in a vfork wait, which no
stop ends, timed out, left attached until the snapshot ends and then released; the
snapshot's stop-wait budget; refusals (a gone tid, this process's own thread, another
tracer, a ctprofd holding a thread, retried for a while) and a thread killed while its stop
is awaited. Each test ends with no thread of its targets stopped or traced."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ctprofd.probe import ptrace
from ctprofd.probe.ptrace import (SeizeRefused, StopTimeout, ThreadGone, Tracer,
                                  WaitBudgetSpent)
from ctprofd.report import tags
from ctprofd.report.tags import ProbeError
from support.holders import holders, let_go  # noqa: F401 - holders is a fixture
from support.i386 import build_pause
from support.procs import Spawned, assert_no_thread_stopped_or_traced, wait_until
from support.pythreads import PyThreads, hang_guard, thread_state

HANG_GUARD = 60.0  # seconds: a bound that ends a hang, never a timing claim


@pytest.fixture(autouse=True)
def _hang_guard(hang_guard):
    """Every test here stops threads through a Tracer's own thread."""


@pytest.fixture
def target():
    process = PyThreads(3)
    yield process
    process.kill()


@pytest.fixture
def new_tracer():
    """Tracer(...), ended at teardown too (a failed test leaves no thread attached)."""
    made: list[Tracer] = []

    def make(**kw: float) -> Tracer:
        """A Tracer with these bounds, HANG_GUARD for the others: a thread that can stop is
        never given up on, however busy the host."""
        made.append(Tracer(**{"stop_timeout": HANG_GUARD, "wait_budget": HANG_GUARD,
                              "held_retry": HANG_GUARD, **kw}))
        return made[-1]
    yield make
    for tracer in made:
        tracer.end()


def own_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_each_threads_own_fs_base_is_read_and_the_thread_let_go(target, new_tracer):
    """Every thread's fs_base is the one it reads itself; it was stopped for part of the
    call only; once the tracer ends, its ptrace thread is gone from the kernel too, and a
    later snapshot starts another."""
    before = own_threads()
    tracer = new_tracer()
    for tid, fs_base in target.fs_base.items():
        started = time.monotonic()
        pointer = tracer.thread_pointer(tid)
        took = time.monotonic() - started
        assert pointer.fs_base == fs_base
        assert 0 < pointer.stopped_seconds <= took
    assert (tracer.stops, tracer.stop_timeouts) == (4, 0)
    tracer.end()
    assert own_threads() <= before
    worker = target.workers[1]
    assert tracer.thread_pointer(worker).fs_base == target.fs_base[worker]
    assert tracer.stops == 5
    tracer.end()
    assert own_threads() <= before
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_tid_that_names_no_thread_is_gone_before_the_seize(target, new_tracer):
    """ESRCH at PTRACE_SEIZE is an exit race, not a failure (no tid reaches pid_max)."""
    tid = int(Path("/proc/sys/kernel/pid_max").read_text())
    tracer = new_tracer()
    with pytest.raises(ThreadGone) as gone:
        tracer.thread_pointer(tid)
    assert str(gone.value) == f"tid {tid}: gone at PTRACE_SEIZE"
    assert tracer.thread_pointer(target.pid).fs_base == target.fs_base[target.pid]
    tracer.end()
    assert tracer.stops == 1
    assert_no_thread_stopped_or_traced(target.pid)


@pytest.mark.parametrize("whose", ["this process's", "a kernel thread's"])
def test_a_thread_no_tracer_holds_but_the_kernel_refuses_is_a_privilege_refusal(
        target, whose, new_tracer):
    """EPERM with no tracer (a thread of our own process, kthreadd) is ptrace-seize, asked
    again once in case a tracer let go in between; the other threads are still read."""
    tid = os.getpid() if whose == "this process's" else 2
    tracer = new_tracer()
    with pytest.raises(SeizeRefused) as refused:
        tracer.thread_pointer(tid)
    assert (refused.value.tag, refused.value.tracer) == (tags.PTRACE_SEIZE, 0)
    assert refused.value.message == f"tid {tid}: PTRACE_SEIZE: EPERM (not permitted)"
    assert tracer.thread_pointer(target.pid).fs_base == target.fs_base[target.pid]
    tracer.end()
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_another_tracer_holds_is_refused_at_once_naming_it(target, holders,
                                                                    new_tracer):
    """A tracer that is not a ctprofd is not waited for: ptrace-traced, naming it and its
    comm, nothing charged to the snapshot's stop wait (a thread in an uninterruptible sleep,
    which needs a whole wait, is still stopped after it)."""
    held, other = target.workers[:2]
    holder = holders("gdb", held)
    tracer = new_tracer()
    with pytest.raises(SeizeRefused) as refused:
        tracer.thread_pointer(held)
    comm = Path(f"/proc/{holder.pid}/comm").read_text().strip()
    assert comm
    assert (refused.value.tag, refused.value.tracer, refused.value.tracer_comm) == (
        tags.PTRACE_TRACED, holder.pid, comm)
    assert refused.value.message == (f"tid {held}: PTRACE_SEIZE: EPERM: held by another "
                                     f"tracer, pid {holder.pid} ({comm})")
    assert tracer.thread_pointer(other, uninterruptible=True).fs_base == target.fs_base[other]
    let_go(holder)
    assert tracer.thread_pointer(held).fs_base == target.fs_base[held]
    tracer.end()
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_a_ctprofd_holds_is_retried_until_it_lets_go(target, holders, caplog,
                                                             new_tracer):
    """Another ctprofd holds a thread for a moment: the seize is retried (here until the
    retry was seen and the holder told to let go) and the thread read; the while is charged
    to the snapshot's stop wait, so a thread in an uninterruptible sleep is no longer given
    a whole wait in it, until the next snapshot."""
    held, other = target.workers[:2]
    holder = holders("ctprofd", held)
    tracer = new_tracer()
    taken: dict[str, object] = {}

    def read() -> None:
        try:
            taken["pointer"] = tracer.thread_pointer(held)
        except Exception as exc:  # handed to the test
            taken["error"] = exc
    reader = threading.Thread(target=read)
    retried = f"tid {held}: held by ctprofd (tid {holder.pid}): seize retried"
    with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.ptrace"):
        reader.start()
        wait_until(lambda: retried in caplog.text or not reader.is_alive(), "the retry")
        holder.send("go")
        reader.join(HANG_GUARD)
    assert "error" not in taken, taken
    assert taken["pointer"].fs_base == target.fs_base[held]
    assert caplog.messages.count(retried) == 1  # said once, in these words
    with pytest.raises(WaitBudgetSpent) as spent:
        tracer.thread_pointer(other, uninterruptible=True)
    assert spent.value.reached is False
    assert str(spent.value) == (f"tid {other}: not stopped: this snapshot's stop wait is "
                                "spent (less than a whole wait is left for a thread in an "
                                "uninterruptible sleep)")
    assert tracer.stops == 1
    tracer.end()
    assert tracer.thread_pointer(other, uninterruptible=True).fs_base == target.fs_base[other]
    tracer.end()
    assert_no_thread_stopped_or_traced(target.pid)


@pytest.mark.parametrize("bound", ["held_retry", "wait_budget"])
def test_a_ctprofd_that_keeps_holding_is_given_up_on(target, holders, bound, new_tracer):
    """A ctprofd holding a thread for longer than the retry (`held_retry`), or than what is
    left of the snapshot's stop wait, is ptrace-traced, naming it; the while is charged to
    the stop wait: all of it when the stop wait was the bound, and then no other thread is
    stopped in that snapshot."""
    held, other = target.workers[:2]
    holder = holders("ctprofd", held)
    tracer = new_tracer()
    setattr(tracer, bound, 0.05)
    with pytest.raises(SeizeRefused) as refused:
        tracer.thread_pointer(held)
    assert (refused.value.tag, refused.value.tracer) == (tags.PTRACE_TRACED, holder.pid)
    if bound == "held_retry":
        with pytest.raises(WaitBudgetSpent) as spent:  # less than a whole wait is left
            tracer.thread_pointer(other, uninterruptible=True)
        assert spent.value.reached is False
        assert tracer.thread_pointer(other).fs_base == target.fs_base[other]
    else:
        with pytest.raises(WaitBudgetSpent) as spent:
            tracer.thread_pointer(other)
        assert spent.value.reached is False
        assert str(spent.value) == f"tid {other}: not stopped: this snapshot's stop wait is spent"
        assert tracer.stops == 0
    tracer.end()
    let_go(holder)
    tracer.wait_budget = tracer.held_retry = HANG_GUARD
    assert tracer.thread_pointer(held).fs_base == target.fs_base[held]
    tracer.end()
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_in_a_vfork_wait_times_out_and_is_released_at_the_end(target, tmp_path,
                                                                        new_tracer):
    """A thread in a vfork wait does not stop: `waitpid` after the stop timeout, counted;
    it stays attached to the tracer's own thread (its stop may still come) while the others
    are read, and is released when the snapshot ends, before its vfork does."""
    fifo = tmp_path / "fifo"
    stuck = target.vfork(fifo)
    tracer = new_tracer(stop_timeout=0.05)
    with pytest.raises(StopTimeout) as missed:
        tracer.thread_pointer(stuck, uninterruptible=True)
    assert (missed.value.tag, missed.value.message) == (
        tags.WAITPID, f"tid {stuck}: no stop within 50 ms")
    assert (tracer.stops, tracer.stop_timeouts) == (0, 1)
    state, tracing = thread_state(target.pid, stuck)
    assert str(tracing) in own_threads() and tracing != threading.get_native_id()
    assert [t.name for t in threading.enumerate() if t.native_id == tracing] == [
        "ctprofd-ptrace"]  # the name logs give it
    tracer.stop_timeout = HANG_GUARD
    for tid, fs_base in target.fs_base.items():
        assert tracer.thread_pointer(tid).fs_base == fs_base
    assert (tracer.stops, tracer.stop_timeouts) == (4, 1)
    tracer.end()
    assert thread_state(target.pid, stuck) == ("D", 0)
    target.release(fifo, stuck)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_stop_that_comes_after_its_timeout_is_let_go_at_the_end(target, tmp_path,
                                                                   new_tracer):
    """The vfork ends after the timeout: the thread stops for the tracer that gave up on
    it, and is let go when the snapshot ends."""
    fifo = tmp_path / "fifo"
    stuck = target.vfork(fifo)
    tracer = new_tracer(stop_timeout=0.05)
    with pytest.raises(StopTimeout):
        tracer.thread_pointer(stuck)
    tracing = thread_state(target.pid, stuck)[1]
    os.close(os.open(fifo, os.O_WRONLY))  # the vfork child opens it and execs
    wait_until(lambda: thread_state(target.pid, stuck) == ("t", tracing), "the late stop")
    tracer.end()
    assert target.readline().split() == ["SPAWNED", str(stuck)]
    assert_no_thread_stopped_or_traced(target.pid)


def test_the_stop_wait_is_cut_to_what_is_left_of_the_snapshots(target, tmp_path,
                                                                new_tracer):
    """Once a missed stop spent part of the snapshot's stop wait, the next wait is cut to
    what is left (not the thread's fault: no stop timeout counted), and then no thread is
    stopped at all until the next snapshot."""
    first, second = target.vfork(tmp_path / "first"), target.vfork(tmp_path / "second")
    tracer = new_tracer(stop_timeout=0.05)
    started = time.monotonic()
    with pytest.raises(StopTimeout):
        tracer.thread_pointer(first)
    spent_at_most = time.monotonic() - started
    tracer.stop_timeout = HANG_GUARD
    tracer.wait_budget = spent_at_most + 0.05  # 50 ms or more left, less than a whole wait
    with pytest.raises(WaitBudgetSpent) as cut:
        tracer.thread_pointer(second)
    assert cut.value.reached is True
    found = re.fullmatch(rf"tid {second}: no stop within the (\d+) ms left of this "
                         "snapshot's stop wait", str(cut.value))
    assert found and 50 <= int(found.group(1)) <= spent_at_most * 1000 + 1, str(cut.value)
    assert (tracer.stops, tracer.stop_timeouts) == (0, 1)
    for tid in target.fs_base:
        with pytest.raises(WaitBudgetSpent) as spent:
            tracer.thread_pointer(tid)
        assert spent.value.reached is False
        assert str(spent.value) == f"tid {tid}: not stopped: this snapshot's stop wait is spent"
    assert tracer.stops == 0
    tracer.end()
    tracer.wait_budget = HANG_GUARD
    for tid, fs_base in target.fs_base.items():
        assert tracer.thread_pointer(tid).fs_base == fs_base
    tracer.end()
    target.release(tmp_path / "first", first)
    target.release(tmp_path / "second", second)
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_thread_killed_while_its_stop_is_awaited_is_gone(tmp_path, new_tracer):
    """A thread whose process is killed while the tracer waits for its stop is an exit
    race: ThreadGone, nothing left attached, no stop timeout; the snapshot goes on."""
    victim, bystander = PyThreads(1), PyThreads(1)
    try:
        stuck = victim.vfork(tmp_path / "fifo")
        tracer = new_tracer()
        taken: dict[str, BaseException] = {}

        def read() -> None:
            try:
                tracer.thread_pointer(stuck)
            except BaseException as exc:  # handed to the test
                taken["error"] = exc
        reader = threading.Thread(target=read)
        reader.start()
        wait_until(lambda: (thread_state(victim.pid, stuck) or ("", 0))[1] != 0
                   or not reader.is_alive(), "the seize")
        os.killpg(victim.pid, signal.SIGKILL)
        reader.join(HANG_GUARD)
        assert isinstance(taken.get("error"), ThreadGone), taken
        assert str(taken["error"]) in (f"tid {stuck}: exited while being stopped",
                                       f"tid {stuck}: gone at PTRACE_INTERRUPT")
        assert (tracer.stops, tracer.stop_timeouts) == (0, 0)
        [(tid, fs_base)] = list(bystander.fs_base.items())[1:]
        assert tracer.thread_pointer(tid).fs_base == fs_base
        tracer.end()
        assert_no_thread_stopped_or_traced(bystander.pid)
    finally:
        victim.kill()
        bystander.kill()


def test_a_thread_not_stopped_by_us_has_no_register_set(target):
    """PTRACE_GETREGSET on a thread that is not our stopped tracee (as one killed while
    stopped no longer is) fails with ESRCH: an exit race."""
    tid = target.workers[0]
    with pytest.raises(ThreadGone) as gone:
        ptrace._read_fs_base(tid)
    assert str(gone.value) == f"tid {tid}: gone at PTRACE_GETREGSET"
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_request_refused_for_another_reason_than_an_exit_is_the_steps_failure(target):
    """Any errno but ESRCH is the step's failure tag, naming the request and the errno: here
    PTRACE_SEIZE with an option the kernel does not know (EIO); nothing is attached."""
    tid = target.workers[0]
    with pytest.raises(OSError) as refused:
        ptrace._ptrace(ptrace.PTRACE_SEIZE, tid, 0, 1 << 30)
    why = ptrace.failure(refused.value, tid, "PTRACE_SEIZE", tags.PTRACE_SEIZE)
    assert type(why) is ProbeError
    assert (why.tag, why.message) == (tags.PTRACE_SEIZE, f"tid {tid}: PTRACE_SEIZE: EIO "
                                                         "(Input/output error)")
    assert_no_thread_stopped_or_traced(target.pid)


def test_an_errno_without_a_name_is_still_the_steps_failure_with_its_text():
    """An errno Python has no name for is said as `?`, with the kernel's text."""
    why = ptrace.failure(OSError(4000, "Unknown error 4000"), 12, "PTRACE_INTERRUPT",
                         tags.PTRACE_INTERRUPT)
    assert type(why) is ProbeError
    assert (why.tag, why.message) == (tags.PTRACE_INTERRUPT, "tid 12: PTRACE_INTERRUPT: ? "
                                                             "(Unknown error 4000)")


def test_a_tracer_that_lets_go_before_its_refusal_is_looked_at_is_seized_again(
        target, holders, new_tracer, monkeypatch):
    """The kernel refused the seize because another tracer held the thread, which let go
    before the refusal was looked at (the status says no tracer): the seize is tried once
    more, and the thread read, rather than failed as a privilege refusal."""
    held = target.workers[0]
    holder = holders("gdb", held)
    looked: list[int] = []
    real = ptrace.refusal

    def tracer_gone_first(tid: int, proc_root: str = "/proc") -> ProbeError | ThreadGone:
        if not looked:
            let_go(holder)  # exited: the kernel detached the thread as the holder ended
        looked.append(tid)
        return real(tid, proc_root)

    monkeypatch.setattr(ptrace, "refusal", tracer_gone_first)
    tracer = new_tracer()
    assert tracer.thread_pointer(held).fs_base == target.fs_base[held]
    assert looked == [held]
    tracer.end()
    assert_no_thread_stopped_or_traced(target.pid)


def test_raw_ptrace_errors_carry_their_errno():
    """The raw call raises OSError with the call's errno and its text."""
    with pytest.raises(OSError) as failed:
        ptrace._ptrace(ptrace.PTRACE_INTERRUPT, os.getpid())
    assert (failed.value.errno, failed.value.strerror) == (errno.ESRCH, os.strerror(errno.ESRCH))


STORM_STOPS = 1000  # stops of a storming thread: a fraction of them race a signal's
STORM = r"""
import os, signal, sys, threading
r, w = os.pipe()
os.set_blocking(r, False)
os.set_blocking(w, False)
signal.signal(signal.SIGRTMIN, lambda *args: None)
signal.set_wakeup_fd(w)  # the C handler writes a byte per signal delivered
stop = threading.Event()
counts = [0, 0]  # sent, handled

def drain():
    try:
        while data := os.read(r, 65536):
            counts[1] += len(data)
    except BlockingIOError:
        pass

def storm():  # signals to itself, each delivered as its tgkill returns
    print("STORMING", threading.get_native_id(), flush=True)
    me = threading.get_ident()
    while not stop.is_set():
        for _ in range(1000):  # fewer bytes than the pipe holds
            signal.pthread_kill(me, signal.SIGRTMIN)
            counts[0] += 1
        drain()
    drain()

stormer = threading.Thread(target=storm)
stormer.start()
sys.stdin.readline()
stop.set()
stormer.join()
print("SENT", *counts, flush=True)
"""


def test_a_signal_that_raced_the_stop_is_handed_back():
    """A thread busy taking signals (here queued real-time ones it sends itself) often
    reports their delivery stop before our PTRACE_EVENT_STOP: that signal is handed back on
    detach, so every signal sent is handled, however many stops raced one."""
    stormer = Spawned([sys.executable, "-c", STORM])
    tracer = Tracer(stop_timeout=HANG_GUARD, wait_budget=HANG_GUARD)
    try:
        word, tid = stormer.readline().split()
        assert word == "STORMING"
        for _ in range(STORM_STOPS):
            assert tracer.thread_pointer(int(tid)).fs_base
        tracer.end()
        assert_no_thread_stopped_or_traced(stormer.pid)
        stormer.send("calm")
        word, sent, handled = stormer.readline().split()
        assert word == "SENT" and int(sent) > 0
        assert handled == sent, f"signals lost: {sent} sent, {handled} handled"
    finally:
        tracer.end()
        stormer.kill()


def test_a_stop_timeout_says_its_wait_in_whole_milliseconds():
    assert StopTimeout(7, 0.6).message == "tid 7: no stop within 600 ms"
    assert StopTimeout(7, 0.0004).message == "tid 7: no stop within 0 ms"


EXITING = """
import sys
from ctprofd.probe.ptrace import Tracer
tracer = Tracer(stop_timeout=60, wait_budget=60)
print(tracer.thread_pointer(int(sys.argv[1])).fs_base, flush=True)
"""  # and exits without tracer.end()


def test_a_process_that_exits_without_ending_its_tracer_still_exits(target, new_tracer):
    """The tracer's own thread does not keep a process (a `ctprofd snapshot` cut short)
    from exiting. (The same read here first: mutmut then knows this test reaches it.)"""
    worker = target.workers[0]
    assert new_tracer().thread_pointer(worker).fs_base == target.fs_base[worker]
    exiting = Spawned([sys.executable, "-c", EXITING, str(worker)],
                      cwd=str(Path(ptrace.__file__).parents[2]))
    try:
        assert int(exiting.readline()) == target.fs_base[worker]
        assert exiting.proc.wait(timeout=HANG_GUARD) == 0
    finally:
        exiting.kill()
    assert_no_thread_stopped_or_traced(target.pid)


def test_a_zombie_refused_by_the_kernel_is_an_exit_race(target, new_tracer):
    """PTRACE_SEIZE says EPERM for a process that has exited and is not reaped yet: that
    is an exit race (ThreadGone), not a privilege refusal."""
    zombie = subprocess.Popen(["true"])
    try:
        wait_until(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1]
                   .split()[0] == "Z", "the child to exit, unreaped")
        tracer = new_tracer()
        with pytest.raises(ThreadGone) as gone:
            tracer.thread_pointer(zombie.pid)
        assert str(gone.value) == f"tid {zombie.pid}: exited (or exiting) at PTRACE_SEIZE"
        assert tracer.thread_pointer(target.pid).fs_base == target.fs_base[target.pid]
    finally:
        zombie.wait()
    assert_no_thread_stopped_or_traced(target.pid)


@pytest.fixture(scope="module")
def i386_program(tmp_path_factory) -> Path:
    return build_pause(tmp_path_factory.mktemp("i386"))


def test_a_32_bit_process_has_no_fs_base_to_read(i386_program, new_tracer):
    """An ia32 process's register set (NT_PRSTATUS) is the 68-byte 32-bit one, without
    fs_base: get-regset, and the thread let go."""
    process = subprocess.Popen([str(i386_program)])
    try:
        wait_until(lambda: (thread_state(process.pid, process.pid) or ("",))[0] == "S",
                   "the program to pause")
        tracer = new_tracer()
        with pytest.raises(ProbeError) as refused:
            tracer.thread_pointer(process.pid)
        assert (refused.value.tag, refused.value.message) == (
            tags.GET_REGSET, f"tid {process.pid}: short register set (68 bytes)")
        assert tracer.stops == 1
        tracer.end()
        assert_no_thread_stopped_or_traced(process.pid)
    finally:
        process.kill()
        process.wait()


def test_a_retry_is_charged_on_top_of_the_waits_already_spent(target, holders, tmp_path,
                                                               new_tracer):
    """The stop wait spent on a missed stop and then on retrying a thread a ctprofd holds
    add up: a budget above the retry alone but not above both is spent."""
    stuck = target.vfork(tmp_path / "fifo")
    held, other = target.workers[:2]
    holder = holders("ctprofd", held)
    tracer = new_tracer(stop_timeout=0.2, held_retry=0.05)
    with pytest.raises(StopTimeout):  # at least 0.2 s of the stop wait spent
        tracer.thread_pointer(stuck)
    started = time.monotonic()
    with pytest.raises(SeizeRefused):  # retried for 0.05 s
        tracer.thread_pointer(held)
    retry_at_most = time.monotonic() - started
    tracer.stop_timeout = HANG_GUARD
    tracer.wait_budget = retry_at_most  # more than the retry alone, less than both
    with pytest.raises(WaitBudgetSpent) as spent:
        tracer.thread_pointer(other)
    assert spent.value.reached is False
    tracer.end()
    let_go(holder)
    target.release(tmp_path / "fifo", stuck)
    assert_no_thread_stopped_or_traced(target.pid)
