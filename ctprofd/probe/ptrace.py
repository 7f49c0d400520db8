"""Reading a thread's thread pointer (fs_base) with ptrace, stopping it as briefly as possible.

Seize, interrupt, a bounded wait for the stop, one register read, detach: the detach
happens on every path. errno is turned into the contract's tags right here; a thread that
exits before or while it is stopped (ESRCH, an exit status instead of a stop) is an exit
race, `ThreadGone`, never a failure.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass

from .backoff import backoff
from ..procfs.processes import gone, read_file
from ..report import tags
from ..report.tags import ProbeError

PTRACE_DETACH = 17
PTRACE_GETREGSET = 0x4204
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
NT_PRSTATUS = 1
WALL = 0x40000000  # __WALL: wait for threads, not only for children
USER_REGS_WORDS = 27  # sizeof(struct user_regs_struct) / 8 on x86_64
FS_BASE_WORD = 21
STOP_TIMEOUT = 0.25
SPIN_SECONDS = 0.001  # poll without sleeping this long before backing off
# Pauses (first, longest) between polls for: a stop, a thread another ctprofd holds, the
# kernel's end of the ptrace thread.
STOP_POLL_PAUSES = (0.0001, 0.002)
HELD_RETRY_PAUSES = (0.0005, 0.01)
THREAD_EXIT_PAUSES = (0.0002, 0.002)
# Another ctprofd (a second daemon, a `ctprofd snapshot` beside the service) holds a thread
# for the microseconds of one register read: its seize is retried this long, not failed.
HELD_BY_CTPROFD_RETRY = 0.25
# Per snapshot, waiting on stops that did not come (a thread in a vfork wait or an
# uninterruptible sleep) and on threads another ctprofd holds ends after this long in all:
# threads not reached then are left out of that snapshot and tried at a later one.
STOP_WAIT_BUDGET = 0.5
MIN_STOP_WAIT = 0.01  # the last wait a nearly spent budget allows
THREAD_EXIT_WAIT = 1.0  # for the kernel to end a ptrace thread Python has joined
CMDLINE_READ_MAX = 4096

log = logging.getLogger(__name__)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _ptrace(request: int, tid: int, addr: int = 0, data: int | ctypes.c_void_p = 0) -> int:
    """Raw ptrace; raises OSError with the call's errno."""
    ctypes.set_errno(0)
    result = _libc.ptrace(request, tid, addr, data)
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


class ThreadGone(Exception):
    """The thread exited before or while being stopped: an exit race, not a failure."""


def failure(exc: OSError, tid: int, request: str, tag: str) -> ThreadGone | ProbeError:
    """What a ptrace `request` that failed with `exc` means: ESRCH is the thread gone (or
    no longer stopped for us), an exit race; any other errno is the step's failure `tag`."""
    if exc.errno == errno.ESRCH:
        return ThreadGone(f"tid {tid}: gone at {request}")
    return ProbeError(tag, f"tid {tid}: {request}: {errno.errorcode.get(exc.errno, '?')} "
                           f"({exc.strerror})")


class SeizeRefused(ProbeError):
    """PTRACE_SEIZE refused with EPERM; `tracer` is the thread already tracing it, named
    `tracer_comm` (`ptrace-traced`: another tracer holds it), or 0 when none (`ptrace-seize`:
    a privilege problem)."""

    def __init__(self, tid: int, tracer: int, tracer_comm: str = "") -> None:
        if tracer:
            super().__init__(tags.PTRACE_TRACED, f"tid {tid}: PTRACE_SEIZE: EPERM: held by "
                             f"another tracer, pid {tracer} ({tracer_comm or '?'})")
        else:
            super().__init__(tags.PTRACE_SEIZE, f"tid {tid}: PTRACE_SEIZE: EPERM (not permitted)")
        self.tracer = tracer
        self.tracer_comm = tracer_comm


def _comm(tid: int, proc_root: str) -> str:
    """A thread's name, '' when it cannot be read (the kernel caps it at 16 bytes)."""
    try:
        return read_file(f"{proc_root}/{tid}/comm").strip().decode("utf-8", "replace")
    except OSError:
        return ""


def refusal(tid: int, proc_root: str = "/proc") -> ProbeError | ThreadGone:
    """Why PTRACE_SEIZE said EPERM: the kernel also says so for a thread that has exited
    but is not reaped yet (a zombie) or is exiting, which is an exit race (procfs `gone`,
    the rule every step follows); otherwise another tracer (named by the thread's
    TracerPid) or a lack of privilege."""
    if gone(f"{proc_root}/{tid}", None):
        return ThreadGone(f"tid {tid}: exited (or exiting) at PTRACE_SEIZE")
    try:
        status = read_file(f"{proc_root}/{tid}/status")
    except (FileNotFoundError, ProcessLookupError):
        return ThreadGone(f"tid {tid}: gone at PTRACE_SEIZE")
    except OSError:  # hidden from us (hidepid): say nothing more than the refusal
        return SeizeRefused(tid, 0)
    found = re.search(rb"^TracerPid:\s*(\d+)", status, re.M)
    tracer_pid = int(found.group(1)) if found else 0
    return SeizeRefused(tid, tracer_pid, _comm(tracer_pid, proc_root) if tracer_pid else "")


def is_ctprofd(tracer: int, proc_root: str = "/proc") -> bool:
    """Whether the tracing thread `tracer` is one of a ctprofd (`ctprofd ...` or
    `python -m ctprofd ...`): its first words name ctprofd. A process that only calls itself
    ctprofd gains no more than the bounded retry every snapshot grants."""
    try:
        with open(f"{proc_root}/{tracer}/cmdline", "rb") as f:
            words = f.read(CMDLINE_READ_MAX).split(b"\0")[:3]
    except OSError:
        return False
    return any(word.rsplit(b"/", 1)[-1] == b"ctprofd" for word in words)


class StopTimeout(ProbeError):
    """The thread did not stop in time (`waitpid`): not read this snapshot."""

    def __init__(self, tid: int, seconds: float) -> None:
        super().__init__(tags.WAITPID, f"tid {tid}: no stop within {seconds * 1000:.0f} ms")


class WaitBudgetSpent(Exception):
    """This snapshot's stop-wait budget is spent: the thread was not seized (`reached`
    False), or its stop was not waited for as long as a thread's due (no fault of the
    thread's)."""

    def __init__(self, message: str, reached: bool) -> None:
        super().__init__(message)
        self.reached = reached


@dataclass(frozen=True)
class ThreadPointer:
    """fs_base of a thread, and how long reading it kept the thread stopped."""

    fs_base: int
    stopped_seconds: float


def _wait_for_stop(tid: int, started: float, timeout: float) -> int:
    """Wait, polling without blocking, until `tid` reports a stop; returns the status.

    The stop usually arrives within microseconds, far below the timer slack of a sleep
    (50 us), so the first millisecond yields the CPU between polls instead of sleeping:
    the target stays stopped for as short a time as possible."""
    deadline = started + timeout
    spin_until = time.monotonic() + SPIN_SECONDS
    pauses = backoff(*STOP_POLL_PAUSES)
    while True:
        try:
            waited, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:  # no longer our tracee: it exited and was reaped
            raise ThreadGone(f"tid {tid}: exited while being stopped") from None
        if waited == tid:
            if not os.WIFSTOPPED(status):
                raise ThreadGone(f"tid {tid}: exited while being stopped")
            return status
        now = time.monotonic()
        if now >= deadline:
            raise StopTimeout(tid, timeout)
        if now < spin_until:
            os.sched_yield()
            continue
        time.sleep(next(pauses))


def _detach(tid: int, signal: int) -> None:
    """PTRACE_DETACH, handing `signal` back; a thread that has not stopped yet (ESRCH: its
    stop did not come in time) stays attached until the ptrace thread ends."""
    try:
        _ptrace(PTRACE_DETACH, tid, 0, signal)
    except OSError:
        pass


def _read_fs_base(tid: int) -> int:
    regs = (ctypes.c_uint64 * USER_REGS_WORDS)()
    iov = _IoVec(ctypes.cast(regs, ctypes.c_void_p), ctypes.sizeof(regs))
    try:
        _ptrace(PTRACE_GETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov))
    except OSError as exc:  # ESRCH: killed (SIGKILL) while stopped
        raise failure(exc, tid, "PTRACE_GETREGSET", tags.GET_REGSET) from None
    if iov.len < (FS_BASE_WORD + 1) * 8:
        raise ProbeError(tags.GET_REGSET, f"tid {tid}: short register set ({iov.len} bytes)")
    return regs[FS_BASE_WORD]


class _PtraceThread:
    """An OS thread making the calls handed to it, one at a time, for one caller."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ctprofd-ptrace", daemon=True)
        self._thread.start()

    def call(self, function, *args):  # type: ignore[no-untyped-def]
        self._calls.put((function, args))
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        """End the thread, and wait (THREAD_EXIT_WAIT at most) until the kernel has ended it
        too: join() returns before the OS thread's exit, which is when the kernel detaches
        its tracees, so a stop arriving in between would hold a thread until then."""
        tid = self._thread.native_id
        self._calls.put(None)
        self._thread.join()
        deadline = time.monotonic() + THREAD_EXIT_WAIT
        pauses = backoff(*THREAD_EXIT_PAUSES)
        while os.path.exists(f"/proc/self/task/{tid}") and time.monotonic() < deadline:
            time.sleep(next(pauses))

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            function, args = call
            try:
                self._results.put((True, function(*args)))
            except BaseException as exc:  # handed to the caller
                self._results.put((False, exc))


class Tracer:
    """Reads thread pointers; used by one caller thread at a time. ptrace ties a tracee to
    the thread that seized it, and the kernel detaches a thread's tracees when it exits,
    cancelling the stop they were still heading for. So every ptrace call runs in a thread
    of the Tracer's own, started on demand and ended by `end()` after each snapshot: a
    thread whose stop did not come in time (a vfork parent, an uninterruptible sleep) and
    so could not be detached is released then, instead of stopping later and staying
    stopped until a next snapshot detaches it. The kernel detaches every tracee of an
    exiting tracer and restarts the ones stopped for it (ptrace(2): "If the tracer dies, all
    tracees are automatically detached and restarted, unless they were in group-stop"),
    with the signal of a signal-delivery stop still to be delivered; `end()` waits until it
    has."""

    def __init__(self, stop_timeout: float = STOP_TIMEOUT,
                 held_retry: float = HELD_BY_CTPROFD_RETRY,
                 wait_budget: float = STOP_WAIT_BUDGET) -> None:
        self.stop_timeout = stop_timeout
        self.held_retry = held_retry  # how long a thread another ctprofd holds is retried
        self.wait_budget = wait_budget  # per snapshot: missed stops and holds, in all
        self.stops = 0
        self.stop_timeouts = 0  # threads that did not stop in time, ever
        self._waited = 0.0  # of the budget, spent in this snapshot
        self._thread: _PtraceThread | None = None

    def thread_pointer(self, tid: int, uninterruptible: bool = False) -> ThreadPointer:
        """Stop `tid` once, read its fs_base, let it go. Raises ProbeError with the tag, or
        ThreadGone when the thread exited first, WaitBudgetSpent once this snapshot waited
        `wait_budget` seconds for stops that did not come (the thread untouched, or its
        wait, cut short by what was left, missed). A thread seen in an `uninterruptible`
        sleep (a vfork wait, which no stop ends) is left untouched unless its whole wait
        is left: a wait cut short would be spent for nothing."""
        left = self.wait_budget - self._waited
        if left <= 0 or (uninterruptible and left < self.stop_timeout):
            raise WaitBudgetSpent(f"tid {tid}: not stopped: this snapshot's stop wait is spent"
                                  + (" (less than a whole wait is left for a thread in an "
                                     "uninterruptible sleep)" if left > 0 else ""),
                                  reached=False)
        if self._thread is None:
            self._thread = _PtraceThread()
        return self._thread.call(self._thread_pointer, tid)

    def end(self) -> None:
        """End the ptrace thread, so the kernel detaches the threads whose stop did not come
        in time, and start the next snapshot's stop wait."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        self._waited = 0.0

    def _seize(self, tid: int) -> None:
        """PTRACE_SEIZE, retried for a while when another ctprofd holds the thread (the
        while charged to this snapshot's wait budget)."""
        held_by = 0  # the ctprofd seen holding it
        retried_from = 0.0
        untraced_refusals = 0  # refused with no tracer left: it may have just let go
        pauses = backoff(*HELD_RETRY_PAUSES)
        try:
            while True:
                try:
                    _ptrace(PTRACE_SEIZE, tid)
                    return
                except OSError as exc:
                    if exc.errno != errno.EPERM:
                        raise failure(exc, tid, "PTRACE_SEIZE", tags.PTRACE_SEIZE) from None
                why = refusal(tid)
                if not isinstance(why, SeizeRefused):
                    raise why
                # The holder, once known as a ctprofd, stays so while it exits (its cmdline
                # is empty then), and a tracer gone by the time we looked (0) just let go.
                if not why.tracer and not held_by and untraced_refusals == 0:
                    untraced_refusals += 1  # once more: a tracer let go between the two
                    continue
                if why.tracer and why.tracer != held_by:
                    held_by = why.tracer if is_ctprofd(why.tracer) else 0
                    if held_by and not retried_from:
                        log.debug("tid %d: held by ctprofd (tid %d): seize retried", tid,
                                  held_by)
                        retried_from = time.monotonic()
                limit = min(self.held_retry, self.wait_budget - self._waited)
                if not held_by or time.monotonic() >= retried_from + limit:
                    raise why
                time.sleep(next(pauses))
        finally:
            if retried_from:
                self._waited += time.monotonic() - retried_from

    def _thread_pointer(self, tid: int) -> ThreadPointer:
        self._seize(tid)
        stopped_at = time.monotonic()
        signal_to_forward = 0
        try:
            try:
                _ptrace(PTRACE_INTERRUPT, tid)
            except OSError as exc:
                raise failure(exc, tid, "PTRACE_INTERRUPT", tags.PTRACE_INTERRUPT) from None
            # what is left of the budget, but never so little that a healthy thread misses
            timeout = min(self.stop_timeout,
                          max(self.wait_budget - self._waited, MIN_STOP_WAIT))
            try:
                status = _wait_for_stop(tid, stopped_at, timeout)
            except StopTimeout:
                self._waited += time.monotonic() - stopped_at
                if timeout < self.stop_timeout:  # the budget's miss, not the thread's
                    raise WaitBudgetSpent(f"tid {tid}: no stop within the "
                                          f"{timeout * 1000:.0f} ms left of this snapshot's "
                                          "stop wait", reached=True) from None
                self.stop_timeouts += 1
                raise
            self.stops += 1
            if status >> 16 != PTRACE_EVENT_STOP:
                # A signal-delivery stop raced our interrupt: hand the signal back on detach.
                signal_to_forward = os.WSTOPSIG(status)
            fs_base = _read_fs_base(tid)
        finally:
            _detach(tid, signal_to_forward)
        return ThreadPointer(fs_base, time.monotonic() - stopped_at)
