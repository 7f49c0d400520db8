"""Probing the threads of one attached process: thread pointers once per thread life,
then only memory reads; counters that never go backwards."""

from __future__ import annotations

import errno
import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Collection

from ..procfs.processes import ProcessInfo, ThreadInfo, at_random_address, gone
from ..report import tags
from ..report.snapshot import ThreadSample
from ..report.summary import Tally
from ..report.tags import ProbeError
from ..resolve.attach import Attachment
from . import dtv, memory
from .ptrace import SeizeRefused, StopTimeout, ThreadGone, Tracer, WaitBudgetSpent

log = logging.getLogger(__name__)
ADDRESS_LIMIT = 1 << 64
MAX_BACKOFF = 64  # snapshots a thread that keeps missing its stop is skipped, at most
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


def counter_pair(data: bytes) -> tuple[int, int]:
    """(thread_allocated, thread_deallocated) from a read spanning both counters."""
    return _U64.unpack_from(data, 0)[0], _U64.unpack_from(data, len(data) - 8)[0]


class ImageChanged(Exception):
    """The process exec'ed since it was attached: what was read belongs to another image."""


def image_mark(process: ProcessInfo) -> tuple[int, bytes] | None:
    """The address and value of the current image's AT_RANDOM bytes: fresh random bytes
    from the kernel at every execve, at whatever address (ASLR or not). None when they
    cannot be read (the process is then checked by its binary's identity only)."""
    try:
        address = at_random_address(process)
    except OSError:
        return None
    if address is None:
        return None
    data = memory.read_range(process.pid, address, 16)
    return None if isinstance(data, OSError) else (address, data)


def same_image(pid: int, mark: tuple[int, bytes] | None) -> bool:
    """Whether the process still runs the image whose AT_RANDOM bytes `mark` holds (False
    when unknown)."""
    return mark is not None and memory.read_range(pid, mark[0], len(mark[1])) == mark[1]


def memory_pid(pid: int, threads: list[ThreadInfo]) -> int:
    """The id that names a process's address space for process_vm_readv: its pid, or, once
    its leader has exited (a zombie, whose pid no longer does), a live listed thread's tid."""
    if threads and pid not in {t.tid for t in threads}:
        return threads[0].tid
    return pid


@dataclass
class ThreadState:
    """What is known about one thread (tid + start time) across snapshots."""

    start_time: int
    counters_at: int  # address of thread_allocated; 0 until located (restored from disk)
    allocated: int = 0
    deallocated: int = 0
    thread_pointer: int = 0  # general-dynamic TLS, no block yet: its DTV is read again
    unplaced: bool = False  # its block could not be placed at the last try: not a zero
    inherited: tuple[int, int] = (0, 0)  # what a fork() child's thread had at the fork

    def counted(self) -> tuple[int, int]:
        """The counters less what they were inherited at: what this thread did itself."""
        return (max(0, self.allocated - self.inherited[0]),
                max(0, self.deallocated - self.inherited[1]))


@dataclass
class ProcessState:
    """Per-process state: the attachment, its threads, and totals of threads gone."""

    attachment: Attachment
    threads: dict[int, ThreadState] = field(default_factory=dict)
    retained_allocated: int = 0
    retained_deallocated: int = 0
    tsd_delta: int | None = None  # addr(tsd) - fs_base, once known
    image_mark: tuple[int, bytes] | None = None  # AT_RANDOM (address, bytes) of the image
    module: dtv.Module | None = None  # general-dynamic TLS: the module's id, once read
    # the module not found: (why, misses in a row, snapshots before it is looked for again);
    # meanwhile its threads fail with that reason, without the link map being walked again
    module_failure: tuple[str, int, int] | None = None
    # threads that missed their stop or another tracer holds: tid -> (start time, misses,
    # snapshots still skipped, the tracer's refusal, said again while skipped)
    backoff: dict[int, tuple[int, int, int, SeizeRefused | None]] = field(
        default_factory=dict)
    # the threads listed last: tid -> (inode of /proc/PID/task/TID, what its stat said)
    listed: dict[int, tuple[int, ThreadInfo]] = field(default_factory=dict)
    listed_threads: list[ThreadInfo] = field(default_factory=list)  # ... as that listing gave
    listed_at: int = -1  # the snapshot that last read them (listed, or known unchanged)

    def __post_init__(self) -> None:
        self.tsd_delta = self.attachment.tsd_delta

    def retire(self, tid: int) -> None:
        """Fold a thread that exited into the retained totals."""
        allocated, deallocated = self.threads.pop(tid).counted()
        self.retained_allocated += allocated
        self.retained_deallocated += deallocated


class ThreadProber:
    """Reads the counters of all threads of a process in as few syscalls as possible."""

    def __init__(self, tracer: Tracer, on_stop: Callable[[float], None] | None = None,
                 read_ranges: Callable[[int, list[tuple[int, int]]], list[bytes | OSError]]
                 = memory.read_ranges,
                 thread_gone: Callable[[int, ThreadInfo], bool] = lambda pid, thread: gone(
                     f"/proc/{pid}/task/{thread.tid}", thread.start_time)) -> None:
        self.tracer = tracer
        self.on_stop = on_stop
        self.read_ranges = read_ranges  # tests serve torn values through it
        self.thread_gone = thread_gone  # (pid, thread): whether it has exited by now
        self.torn_reads = 0
        self.exit_races = 0  # threads gone before or while being stopped

    def probe(self, pid: int, state: ProcessState, threads: list[ThreadInfo], tally: Tally,
              cancel: threading.Event | None = None,
              alive: Callable[[], Collection[int] | None] | None = None) -> list[ThreadSample]:
        """Read every listed thread; failures are tallied; returns the threads read.
        Raises ImageChanged, reading nothing, when the process exec'ed since it was
        attached. Once `cancel` is set, no further thread is stopped. `alive()` lists the tids
        alive now (raising OSError when the process is gone; None: every thread listed): a
        thread it no longer lists after the read is left out, as one that exited before
        being listed would be."""
        listed = {t.tid: t for t in threads}
        pid = memory_pid(pid, threads)
        for tid in [tid for tid, s in state.threads.items()
                    if tid not in listed or listed[tid].start_time != s.start_time]:
            state.retire(tid)
        for tid in [tid for tid, b in state.backoff.items()
                    if tid not in listed or listed[tid].start_time != b[0]]:
            del state.backoff[tid]
        if state.module_failure is not None and state.module_failure[2]:
            why, misses, skip = state.module_failure
            state.module_failure = (why, misses, skip - 1)
        unlocated = [t for t in threads if t.tid not in state.threads
                     or not state.threads[t.tid].counters_at]
        # Threads in an uninterruptible sleep (a vfork wait: no stop comes) or that missed
        # their stop before go last, so the snapshot's stop wait is not spent before the
        # threads that do stop are reached.
        unlocated.sort(key=lambda t: t.state == "D" or t.tid in state.backoff)
        for thread in unlocated:
            if cancel is not None and cancel.is_set():
                break
            known = state.threads.get(thread.tid)
            if known is not None and not known.counters_at and known.thread_pointer:
                self._place_block(pid, thread, state, known.thread_pointer, tally)
            elif self._backed_off(state, thread.tid):
                held = state.backoff[thread.tid][3]
                if held is None:
                    tally.left_out += 1
                else:  # not seized again: still held, as far as is known
                    self._failed(pid, held, tally)
            else:
                self._locate(pid, thread, state, tally)
        readable = [t for t in threads
                    if t.tid in state.threads and state.threads[t.tid].counters_at]
        samples = self._read(pid, state, readable, tally, alive)
        for thread in threads:  # no TLS block yet: it has not allocated, it counts zero
            known = state.threads.get(thread.tid)
            if (known is not None and not known.counters_at and known.thread_pointer
                    and not known.unplaced):
                tally.probed_ok += 1
                samples.append(ThreadSample(thread.tid, thread.comm, *known.counted()))
        return samples

    def _place_block(self, pid: int, thread: ThreadInfo, state: ProcessState,
                     thread_pointer: int, tally: Tally) -> None:
        """General-dynamic TLS: the thread's counters from its DTV, read from memory only
        (the thread pointer is known). A thread without a block yet, or whose block could
        not be placed, keeps its thread pointer, to be looked at again next time without
        being stopped again."""
        loader = state.attachment.loader
        assert loader is not None and state.attachment.base is not None
        known = state.threads.get(thread.tid)
        floor = (known.allocated, known.deallocated) if known is not None else (0, 0)
        state.threads[thread.tid] = ThreadState(thread.start_time, 0, *floor,
                                                thread_pointer=thread_pointer)
        try:
            block = dtv.block_address(self.read_ranges, pid, loader,
                                      self._module(pid, state), thread_pointer)
        except dtv.DtvError as exc:
            state.threads[thread.tid].unplaced = True  # not read: never reported as a zero
            if self.thread_gone(pid, thread):
                self.exit_races += 1  # its DTV went with it: nothing to place
                log.debug("pid %d: tid %d exited while its DTV was read: %s", pid, thread.tid, exc)
                return
            tally.fail(tags.JEMALLOC_IN_DSO, reason=f"tid {thread.tid}: general-dynamic "
                       f"TLS: {exc}")
            return
        if block is None:
            return
        layout = state.attachment.layout
        address = block + layout.symbol_offset + layout.allocated_offset
        end = address - layout.allocated_offset + layout.deallocated_offset + 8
        if not 0 < address < end <= ADDRESS_LIMIT:
            state.threads[thread.tid].unplaced = True
            tally.fail(tags.TLS_ARITHMETIC, reason=f"tid {thread.tid}: TLS block {block:#x} "
                       "gives counters outside the address space")
            return
        state.threads[thread.tid] = ThreadState(thread.start_time, address, *floor)

    def _module(self, pid: int, state: ProcessState) -> dtv.Module:
        """The module's TLS identity, found along the link map once; a failure is said
        again, not looked for again, for 1, 3, 7 ... 63 snapshots. Raises DtvError."""
        if state.module is not None:
            return state.module
        failure = state.module_failure
        if failure is not None and failure[2]:
            raise dtv.DtvError(failure[0])
        assert state.attachment.loader is not None and state.attachment.base is not None
        try:
            state.module = dtv.find_module(self.read_ranges, pid, state.attachment.loader,
                                           state.attachment.base)
        except dtv.DtvError as exc:
            misses = failure[1] + 1 if failure is not None else 1
            state.module_failure = (str(exc), misses, min(1 << misses, MAX_BACKOFF))
            raise
        state.module_failure = None
        return state.module

    @staticmethod
    def _back_off(state: ProcessState, thread: ThreadInfo, held: SeizeRefused | None) -> None:
        """Skip a thread that missed its stop, or that another tracer holds (`held`), for
        1, 2, 4 ... 64 snapshots, then try it again."""
        misses = state.backoff[thread.tid][1] + 1 if thread.tid in state.backoff else 1
        state.backoff[thread.tid] = (thread.start_time, misses,
                                     min(1 << (misses - 1), MAX_BACKOFF), held)

    @staticmethod
    def _backed_off(state: ProcessState, tid: int) -> bool:
        """Whether a backed-off thread is still skipped (one snapshot fewer now)."""
        entry = state.backoff.get(tid)
        if entry is None or entry[2] == 0:
            return False
        state.backoff[tid] = (entry[0], entry[1], entry[2] - 1, entry[3])
        return True

    @staticmethod
    def _failed(pid: int, error: ProbeError, tally: Tally) -> None:
        tally.fail(error.tag, reason=error.message)
        if isinstance(error, SeizeRefused) and error.tracer:
            tally.traced_by[pid] = error.tracer
            tally.tracer_names[error.tracer] = error.tracer_comm

    def _read_got_slot(self, pid: int, state: ProcessState, tally: Tally) -> bool:
        """Learn the TSD's TP offset from the GOT slot the dynamic loader filled."""
        assert state.attachment.got_slot is not None
        slot = self.read_ranges(pid, [(state.attachment.got_slot, 8)])[0]
        if isinstance(slot, OSError):
            tally.fail(tags.PROCESS_VM_READV, reason=f"GOT slot: {slot.strerror}")
            return False
        state.tsd_delta = state.attachment.layout.dso_tsd_delta(_I64.unpack(slot)[0])
        return True

    def _locate(self, pid: int, thread: ThreadInfo, state: ProcessState,
                tally: Tally) -> None:
        try:
            pointer = self.tracer.thread_pointer(thread.tid,
                                                 uninterruptible=thread.state == "D")
        except ThreadGone as gone:  # an exit race: not a failure, and nothing to read
            self.exit_races += 1
            log.debug("pid %d: %s", pid, gone)
            return
        except WaitBudgetSpent as spent:  # tried at the next snapshot ...
            if not spent.reached and thread.state == "D":
                # ... unless, not reached and in an uninterruptible sleep (as the threads
                # that missed their stops and spent the wait likely were: forty workers in
                # vfork waits), it is put off as they are: the wait is not spent anew on
                # such threads at every snapshot
                self._back_off(state, thread, None)
            tally.left_out += 1
            log.debug("pid %d: %s", pid, spent)
            return
        except StopTimeout as missed:
            self._back_off(state, thread, None)
            tally.fail(missed.tag, reason=missed.message)
            tally.left_out += 1
            log.debug("pid %d: %s", pid, missed)
            return
        except ProbeError as error:
            if isinstance(error, SeizeRefused) and error.tracer:
                self._back_off(state, thread, error)
            self._failed(pid, error, tally)
            log.debug("pid %d: %s", pid, error)
            return
        state.backoff.pop(thread.tid, None)
        if self.on_stop:
            self.on_stop(pointer.stopped_seconds)
        if state.attachment.loader is not None:
            self._place_block(pid, thread, state, pointer.fs_base, tally)
            return
        if state.tsd_delta is None and not self._read_got_slot(pid, state, tally):
            return
        layout = state.attachment.layout
        address = pointer.fs_base + state.tsd_delta + layout.allocated_offset
        end = address - layout.allocated_offset + layout.deallocated_offset + 8
        if pointer.fs_base == 0 or not 0 < address < end <= ADDRESS_LIMIT:
            tally.fail(tags.TLS_ARITHMETIC, reason=f"tid {thread.tid}: fs_base "
                       f"{pointer.fs_base:#x} gives counters outside the address space")
            return
        known = state.threads.get(thread.tid)  # restored, not located yet: keep its floor
        state.threads[thread.tid] = ThreadState(thread.start_time, address,
                                                *((known.allocated, known.deallocated)
                                                  if known is not None else (0, 0)))

    def _read(self, pid: int, state: ProcessState, threads: list[ThreadInfo], tally: Tally,
              alive: Callable[[], Collection[int] | None] | None) -> list[ThreadSample]:
        layout = state.attachment.layout
        span = layout.deallocated_offset - layout.allocated_offset + 8
        ranges = [(state.threads[t.tid].counters_at, span) for t in threads]
        mark = state.image_mark
        if mark is not None:  # read along: the counters are of this image only if it holds
            ranges.append((mark[0], len(mark[1])))
        results = self.read_ranges(pid, ranges)
        if mark is not None:
            seen = results.pop()
            if (seen != mark[1] if isinstance(seen, bytes) else seen.errno == errno.EFAULT):
                raise ImageChanged(f"pid {pid}: AT_RANDOM changed: a new image")
        values: list[tuple[int, int] | OSError] = []
        for thread, data in zip(threads, results):
            if isinstance(data, OSError):
                values.append(data)
                continue
            known = state.threads[thread.tid]
            allocated, deallocated = counter_pair(data)
            if allocated < known.allocated or deallocated < known.deallocated:
                # The target was writing the word as we copied it: read once more, and never
                # let a counter go backwards either way.
                self.torn_reads += 1
                again = self.read_ranges(pid, [(known.counters_at, span)])[0]
                if not isinstance(again, OSError):
                    allocated, deallocated = counter_pair(again)
            values.append((allocated, deallocated))
        # A thread that exited since it was listed left its TLS behind, and the next thread
        # created gets the same cached stack and so the same TLS address: what was read
        # there may be that thread's counters. Only a thread still alive after the read was
        # certainly alive during it; the others keep what they were last read at.
        gone: Collection[int] = ()
        if alive is not None:
            try:
                now = alive()
            except OSError:
                now = ()
            gone = {t.tid for t in threads}.difference(now) if now is not None else ()
        samples = []
        for thread, value in zip(threads, values):
            if thread.tid in gone:
                continue
            if isinstance(value, OSError):
                tally.fail(tags.PROCESS_VM_READV,
                           reason=f"tid {thread.tid}: process_vm_readv: {value.strerror}")
                continue
            known = state.threads[thread.tid]
            allocated, deallocated = value
            known.allocated = max(known.allocated, allocated)
            known.deallocated = max(known.deallocated, deallocated)
            tally.probed_ok += 1
            samples.append(ThreadSample(thread.tid, thread.comm, *known.counted()))
        return samples
