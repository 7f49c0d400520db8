"""One probe pass over the host: walk /proc, attach to jemalloc processes, read their
threads, tally every outcome, and return a Snapshot. State (thread pointers, per-process
totals, the layout cache) lives in the Capturer across passes."""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection

from .backoff import Skips
from ..procfs.processes import (ProcessInfo, code_objects_digest, list_pids, list_threads,
                                numbered_entries, parse_maps, read_maps_text, read_process)
from ..report import tags
from ..report.snapshot import ARENA, THREADS, ProcessSample, Snapshot, ThreadSample
from ..procfs.capabilities import has_ptrace_capability
from ..procfs.containers import Container
from ..procfs.events import Changes, ProcessEvents
from ..report.summary import Tally, denied_hint
from ..report.tags import ProbeError
from ..resolve import offsets_file
from ..resolve.attach import Attacher, Attachment, BinaryIdentity, Pending, exe_identity
from ..resolve.cache import LayoutCache
from ..resolve.debuginfo import DebugSearch
from ..resolve.debuginfod import DebuginfodClient, urls_from_environment
from ..resolve.layout import NotJemalloc
from ..resolve.parse_worker import WorkerLimits
from ..resolve.resolver import BackgroundResolver
from .arena_stats import (ArenaReadError, ArenaTotals, OverBudget, process_totals, read_totals,
                          unchanged)
from .forks import ForkOrigin, inherit_arena, inherit_thread, is_fork_child, without_inherited
from .ptrace import Tracer
from .quiet import KERNEL_THREAD, NOT_JEMALLOC, REFUSED, UNSELECTED, QuietProcesses
from .retained import RetainedStore, Saved
from .threads import (ImageChanged, ProcessState, ThreadProber, ThreadState, image_mark,
                      memory_pid, same_image)

log = logging.getLogger(__name__)
DENIED = frozenset({errno.EACCES, errno.EPERM})  # not ENOENT: kernel threads, exit races
LOGGED_FAILURES_MAX = 4096  # (binary, tag) pairs remembered as already logged at info
# A process known to have nothing to read (no jemalloc, a kernel thread, its exe refused, not
# selected) is counted from the /proc listing alone, and read again (its stat file, and the
# identity of its exe) once in this many snapshots, spread by pid (see quiet.py): an exec
# into a jemalloc binary is picked up late, never lost (the counters are cumulative), and
# reading every stat file and exe is most of a steady-state snapshot.
NOT_JEMALLOC_RECHECK = 4
# While the kernel's process events are heard (`CaptureSettings.process_events`), those are
# what tell an exec, a new owner or a rename: the others are read again only once in this
# many snapshots, against an event the kernel could not deliver.
NOT_JEMALLOC_RECHECK_HEARD = 32
# ... and the code objects it maps looked at again every this many seconds (reading its
# maps): a module that brings jemalloc in later (pyarrow imported after start, a plugin
# dlopen'ed) is found within that long, and nothing is lost (the counters are cumulative).
NOT_JEMALLOC_OBJECTS_RECHECK = 60.0
# A thread seen before is known by the inode number of its /proc/PID/task/TID (a reused tid
# gets another), and its stat read again once in this many snapshots, spread by tid: for
# its name, and a state that number cannot show (a thread on its way out).
THREAD_RECHECK = 4
# While the kernel's process events are heard, the threads of a process they name no thread
# event of are not listed again, but once in this many snapshots, spread by pid.
THREAD_RECHECK_HEARD = 32
# A process whose arena statistics failed (refused, unreadable, over budget) is not read
# again for 1, 2, 4 ... snapshots, at most this many: a failure it makes on purpose at the
# end of each read cannot make ctprofd redo the whole read every snapshot.
ARENA_BACKOFF_MAX = 64
# A wait for the background resolver that ended with it still busy is not made again for 1,
# 2, 4 ... snapshots, at most this many (the processes stay pending and are read once what
# they need is resolved): a user handing it new files every snapshot cannot make every
# snapshot wait.
GRACE_BACKOFF_MAX = 64


@dataclass
class CaptureSettings:
    """What a Capturer reads and where it looks."""

    proc_root: str = "/proc"
    cache_dir: str | None = None
    cache_max_entries: int = 4096
    cache_max_bytes: int = 16 << 20
    cache_writable: bool = True  # False: read cache_dir, write nothing (a daemon owns it)
    state_dir: str | None = None  # where exited threads' totals survive a restart
    debug_dirs: tuple[str, ...] = ("/usr/lib/debug",)
    debuginfod_urls: tuple[str, ...] = ()
    offsets_files: tuple[str, ...] = ()
    select: Callable[[ProcessInfo], bool] | None = None
    on_thread_stop: Callable[[float], None] | None = None
    parser: WorkerLimits = field(default_factory=WorkerLimits)  # the sandboxed ELF/DWARF parser
    background: bool = False  # resolve new binaries beside the snapshots (the daemon)
    resolve_grace: float = 0.0  # how long into a snapshot pending binaries may be waited for
    # listen to the kernel's process events (a long-running daemon): an unchanged process
    # with nothing to read is then read again less often (see quiet.py)
    process_events: bool = False


@dataclass(frozen=True)
class CaptureStats:
    """Cumulative counters about the capture itself."""

    ptrace_stops: int
    elf_opens: int
    torn_reads: int
    exit_races: int  # threads gone before or while stopped, plus tgids that exited while read
    cache_hits: int
    cache_misses: int
    cache_entries: int
    stop_timeouts: int = 0  # threads that did not stop in time (each left out that snapshot)
    state_write_failures: int = 0  # writes of the retained totals' file that failed


@dataclass
class _Tracked:
    """A process seen before: the binary it ran and what attaching to it gave."""

    identity: BinaryIdentity
    result: ProcessState | NotJemalloc
    exe: str = ""
    build_id: str | None = None
    retained: tuple[int, int] = field(default=(0, 0))  # of images before an exec
    # of images before an execve seen by this run: the arena statistics start from zero
    # again (totals restored from disk may include exited threads: they only set floors)
    earlier_images: tuple[int, int] = (0, 0)
    reported: tuple[int, int] = (0, 0)  # the last totals reported: they never go back
    # the last arena statistics read, and the threads' counters they were read with
    arena: tuple[tuple[tuple[int, int, int], ...], ArenaTotals] | None = None
    arena_refused: str = ""  # why the last read of its arena statistics was not used
    # after failed reads of its arena statistics in a row, the snapshots that do not read them
    arena_skips: Skips = field(default_factory=lambda: Skips(ARENA_BACKOFF_MAX))
    over_budget: bool = False  # the last read would have passed the budget (warned once)
    image_mark: tuple[int, bytes] | None = None  # AT_RANDOM of the image attached to
    comm: str = ""  # the name it had when attached (for the log)
    fork: ForkOrigin | None = None  # a fork() child: what it inherited is not its own
    # when the code objects of a process with no jemalloc are next looked at (the one timer
    # of that look: quiet.py lets the process through for it); never for any other
    objects_due: float = float("inf")
    maps_seen: int = 0  # hash of its maps' text at the last look (unchanged: not parsed)
    labels: tuple[int, str, Container] | None = None  # uid, unit, container: as last read
    labels_at: int = -1  # the snapshot that last read them (or knew them unchanged)

    def retained_totals(self) -> tuple[int, int]:
        """What threads no longer running (exited, or of an earlier image) counted."""
        if not isinstance(self.result, ProcessState):
            return self.retained
        return (self.retained[0] + self.result.retained_allocated,
                self.retained[1] + self.result.retained_deallocated)

    def all_totals(self) -> tuple[int, int]:
        """Retained totals plus the last-read values of the threads running now."""
        allocated, deallocated = self.retained_totals()
        if isinstance(self.result, ProcessState):
            for state in self.result.threads.values():
                counted = state.counted()
                allocated += counted[0]
                deallocated += counted[1]
        return allocated, deallocated

    def carries_totals(self) -> bool:
        """Whether a restart would lose anything of this process (zero entries are not saved)."""
        return (isinstance(self.result, ProcessState) or self.retained != (0, 0)
                or self.reported != (0, 0))

    def saved(self) -> Saved:
        """What a restarted ctprofd needs to continue this process's totals."""
        threads = {}
        if isinstance(self.result, ProcessState):
            threads = {(tid, s.start_time): (s.allocated, s.deallocated)
                       for tid, s in self.result.threads.items()}
        return Saved(self.retained_totals(), threads, self.reported)


def _why_threads(tracked: _Tracked, arena: ArenaTotals | None) -> str:
    """Why a process's totals are per-thread sums (totals_source "threads")."""
    if arena is not None:
        return "arena statistics all zero: jemalloc built without statistics"
    if tracked.arena_refused:
        return tracked.arena_refused
    assert isinstance(tracked.result, ProcessState)
    layout = tracked.result.attachment.layout
    if layout.arena is not None:
        return "the jemalloc object's load address is not known"
    return (f"no arena layout: {layout.arena_missing}" if layout.arena_missing
            else f"no arena layout (offsets from {layout.source})")


def next_look(due: float, now: float, period: float) -> float:
    """When a look due at `due` and made at `now` is next due: the first time after `now`
    on its own grid (due + k * period), so that each process keeps the phase its first look
    was spread to. `now + period` would move each look by how late its snapshot started, and
    with an interval that divides the period the looks of many processes then pile up in
    one snapshot (at 20,000 processes and 15 s: 0.2 to 3.8 s per snapshot). A period of 0:
    every snapshot."""
    if period <= 0:
        return now
    return due + period * (math.floor((now - due) / period) + 1)


def _parents_first(deferred: list[tuple[ProcessInfo, int]]) -> list[tuple[ProcessInfo, int]]:
    """The processes held back for their parent, each after its parent when that was held
    back too: after a pid wrap a whole subtree can have lower pids than the ancestor it
    started under (a fork child read before its parent takes all it had for inherited)."""
    by_pid = {process.pid: (process, inode) for process, inode in deferred}
    ordered: list[tuple[ProcessInfo, int]] = []
    placed: set[int] = set()
    for process, _ in deferred:
        chain = []  # this process and its held-back ancestors not placed yet
        while process.pid not in placed:
            placed.add(process.pid)
            chain.append(by_pid[process.pid])
            if process.ppid not in by_pid:
                break
            process = by_pid[process.ppid][0]
        ordered += reversed(chain)
    return ordered


def _larger(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], b[0]), max(a[1], b[1])


class Capturer:
    """Takes snapshots. Not thread-safe: one `capture` at a time (its ptrace calls run in
    a thread of the Tracer's own that ends with the snapshot)."""

    def __init__(self, settings: CaptureSettings | None = None) -> None:
        self.settings = settings or CaptureSettings()
        self.cache = LayoutCache(self.settings.cache_dir,
                                 max_entries=self.settings.cache_max_entries,
                                 max_bytes=self.settings.cache_max_bytes,
                                 writable=self.settings.cache_writable)
        for path in self.settings.offsets_files:  # raises OffsetsFileError
            self.cache.pin([replace(layout, dwarf_source=f"imported from {path}")
                            for layout in offsets_file.load(path)])
        urls = self.settings.debuginfod_urls or urls_from_environment()
        downloads = self.settings.cache_dir if self.settings.cache_writable else None
        self._debuginfod = DebuginfodClient(urls, downloads) if urls else None
        self.attacher = Attacher(self.cache,
                                 DebugSearch(self.settings.debug_dirs, self._debuginfod,
                                             self.settings.parser.max_file_bytes),
                                 self.settings.parser,
                                 BackgroundResolver() if self.settings.background else None)
        self.tracer = Tracer()
        self.prober = ThreadProber(self.tracer, self.settings.on_thread_stop)
        self._tracked: dict[tuple[int, int], _Tracked] = {}
        self._retained_store = RetainedStore(self.settings.state_dir, self.settings.proc_root)
        self._restored = self._retained_store.load()
        self._logged_failures: set[tuple[str, str]] = set()
        self._last_line: str | None = None  # the summary line last logged
        self._denied_cause: str | None = None  # the hint last warned with, while any denied
        self._ptrace_capable = has_ptrace_capability()  # which hint that is
        self._passes = 0  # snapshots begun: spreads the re-checks of quiet processes, threads
        self._quiet = QuietProcesses(NOT_JEMALLOC_RECHECK, NOT_JEMALLOC_RECHECK_HEARD)
        self._reselecting = False  # the selection changed: name what it leaves out
        self._events = self._listen() if self.settings.process_events else None
        self._heard: Changes | None = None  # what the events said since the last snapshot
        self.exit_races = 0  # processes that exited while read (threads: prober.exit_races)
        self._now = time.monotonic()  # when the snapshot under way began
        # after resolver waits in a row that ended with it still busy, the snapshots that
        # do not wait
        self._grace_skips = Skips(GRACE_BACKOFF_MAX)

    def _listen(self) -> ProcessEvents | None:
        """The kernel's process events, when this /proc is the kernel's own namespace's."""
        if os.path.realpath(self.settings.proc_root) != "/proc":
            log.info("no process events: %s is not /proc", self.settings.proc_root)
            return None
        events = ProcessEvents()
        if events.error is not None:
            log.info("%s: unchanged processes are read again once in %d snapshots",
                     events.error, NOT_JEMALLOC_RECHECK)
            return None
        log.info("listening to the kernel's process events: unchanged processes are read "
                 "again once in %d snapshots", NOT_JEMALLOC_RECHECK_HEARD)
        return events

    def close(self) -> None:
        """Stop the parser worker process; remove debug files downloaded to a temporary
        directory."""
        self.attacher.close()
        if self._events is not None:
            self._events.close()
        if self._debuginfod is not None:
            self._debuginfod.close()

    @property
    def stats(self) -> CaptureStats:
        return CaptureStats(self.tracer.stops, self.attacher.elf_opens, self.prober.torn_reads,
                            self.prober.exit_races + self.exit_races,
                            self.cache.hits, self.cache.misses, len(self.cache),
                            self.tracer.stop_timeouts, self._retained_store.write_failures)

    def capture(self, pids: Collection[int] | None = None,
                cancel: threading.Event | None = None) -> Snapshot:
        """Probe every tgid (or just `pids`); returns early, partial, when `cancel` is set."""
        try:
            return self._capture(pids, cancel)
        finally:
            self.tracer.end()  # no thread stays seized (or stopped) past the snapshot

    def _capture(self, pids: Collection[int] | None,
                 cancel: threading.Event | None) -> Snapshot:
        started, clock = time.time(), time.monotonic()
        self._now = clock
        self._passes += 1
        self.cache.refresh()  # `offsets import` or `remove` since the last snapshot
        self.attacher.begin()
        tally = Tally()
        samples: list[ProcessSample] = []
        seen: set[tuple[int, int]] = set()
        waiting: list[ProcessInfo] = []  # pending: their binaries are being resolved
        unselected: list[tuple[int, int]] = []  # after a selection change only
        reselecting, self._reselecting = self._reselecting, False
        # new processes listed before their parent (pid wrap): read once the parent was, so
        # that a fork() child can be told by its parent's memory and state
        deferred: list[tuple[ProcessInfo, int]] = []  # with their /proc/PID's inode
        held: set[int] = set()  # their pids: a new child of one of them waits with it
        submitted = self.attacher.submitted
        complete = True
        root, own, quiet = self.settings.proc_root, os.getpid(), self._quiet
        self._heard = (self._events.changed() if self._events is not None and pids is None
                       else None)
        quiet.begin(self._passes, clock, seen,
                    self._heard.processes if self._heard is not None else None)
        # a pid asked for by name is read whatever it was (inode -1 matches nothing)
        listing = numbered_entries(root) if pids is None else [(pid, -1) for pid in sorted(pids)]
        for pid, inode in listing:
            if cancel is not None and cancel.is_set():
                complete = False
                break
            if quiet.skip(pid, inode) or pid == own:
                continue
            process = read_process(root, pid)
            if process is None:
                # gone between readdir and reading its stat: an exit race, counted nowhere
                # (only a pid asked for by name is missing)
                quiet.forget(pid)
                if pids is not None:
                    tally.tgids_walked += 1
                    tally.begin(pid, "")
                    tally.fail(tags.PID_MISSING, reason="no such process")
                else:
                    tally.exit_races += 1
                continue
            if self.settings.select is not None and not self.settings.select(process):
                self._remember(process, inode, UNSELECTED)
                if reselecting and process.state not in ("Z", "X"):  # an exit: no exe to match
                    unselected.append(process.key)
                continue
            tally.tgids_walked += 1
            seen.add(process.key)
            if ((process.ppid > process.pid or process.ppid in held)
                    and process.key not in self._tracked):
                deferred.append((process, inode))
                held.add(process.pid)
                continue
            self._probe_into(process, inode, tally, cancel, samples, waiting)
        for process, inode in _parents_first(deferred):
            if cancel is not None and cancel.is_set():
                complete = False
                break
            self._probe_into(process, inode, tally, cancel, samples, waiting)
        self._count_quiet(tally)
        if (waiting and complete and self.attacher.submitted > submitted
                and self._wait_for_resolution(clock)):
            # what the background resolved in time is read in this snapshot after all
            for process in waiting:
                tally.pending -= 1
                tally.begin(process.pid, process.comm)
                sample = self._probe_process(process, tally, cancel)
                if sample is not None:
                    samples.append(sample)
        if complete and pids is None:
            self._forget_all_but(seen)
            quiet.sweep()
            saved = {key: t.saved() for key, t in self._tracked.items()
                     if t.carries_totals()}  # most processes are not jemalloc's
            for key in list(self._restored):  # saved by an earlier run, not attached yet
                if key in seen:
                    saved.setdefault(key, self._restored[key])
                else:
                    del self._restored[key]  # that process is gone
            self._retained_store.save(saved)
        snapshot = Snapshot(timestamp=started, duration_seconds=time.monotonic() - clock,
                            summary=tally.summary(), failures=dict(tally.failures),
                            processes=tuple(samples), traced_by=dict(tally.traced_by),
                            tracer_names=dict(tally.tracer_names),
                            failed_pids=tuple(sorted(tally.failed_pids.values(),
                                                     key=lambda f: f.pid)),
                            denied_tgids=tally.denied_tgids, pending=tally.pending,
                            left_out_threads=tally.left_out, unselected=tuple(unselected))
        self.exit_races += tally.exit_races
        self._log_snapshot(snapshot)
        return snapshot

    def _probe_into(self, process: ProcessInfo, inode: int, tally: Tally,
                    cancel: threading.Event | None, samples: list[ProcessSample],
                    waiting: list[ProcessInfo]) -> None:
        """Probe one process: its sample to `samples`, or itself to `waiting` when pending;
        remembered as quiet when it has nothing to read."""
        tally.begin(process.pid, process.comm)
        before = (tally.pending, tally.denied_tgids, tally.jemalloc_detected)
        sample = self._probe_process(process, tally, cancel)
        if sample is not None:
            samples.append(sample)
        elif tally.pending > before[0]:
            waiting.append(process)
        self._remember(process, inode, self._quiet_outcome(process, tally, before))

    def _quiet_outcome(self, process: ProcessInfo, tally: Tally,
                       before: tuple[int, int, int]) -> int | None:
        """What the probe of `process` just gave when it has nothing to read (see
        quiet.py), None otherwise; `before` is the tally's (pending, denied_tgids,
        jemalloc_detected) before it."""
        if process.kernel_thread:
            return KERNEL_THREAD
        pending, denied, detected = before
        if tally.denied_tgids > denied:
            return REFUSED
        tracked = self._tracked.get(process.key)
        if (tracked is None or not isinstance(tracked.result, NotJemalloc)
                or tally.pending > pending or tally.jemalloc_detected > detected
                or tally.failed_now()):
            return None
        return NOT_JEMALLOC

    def _remember(self, process: ProcessInfo, inode: int, outcome: int | None) -> None:
        """Count `process` unread in the next snapshots while its /proc/PID stays the same,
        or not when `outcome` is None or `inode` is -1 (not listed: a capture of named pids)."""
        if outcome is None or inode < 0:
            self._quiet.forget(process.pid)
            return
        if outcome == NOT_JEMALLOC:
            self._quiet.remember(process.pid, inode, outcome, process.key,
                                 self._tracked[process.key])
        else:
            self._quiet.remember(process.pid, inode, outcome)

    def _count_quiet(self, tally: Tally) -> None:
        """Tally the processes counted unread as reading them would have."""
        counts = self._quiet.counts
        tally.tgids_walked += sum(counts) - counts[UNSELECTED]
        unreadable = counts[KERNEL_THREAD] + counts[REFUSED]
        if counts[NOT_JEMALLOC]:
            tally.failures[tags.JEMALLOC_NOT_FOUND] += counts[NOT_JEMALLOC]
        if unreadable:
            tally.failures[tags.READLINK_FAILURE] += unreadable
        tally.denied_tgids += counts[REFUSED]

    def selection_changed(self) -> None:
        """The selection's rules changed: every process is read (and selected) again, and
        the next snapshot names the live ones it leaves out (`Snapshot.unselected`)."""
        self._quiet.clear()
        self._reselecting = True

    def _log_snapshot(self, snapshot: Snapshot) -> None:
        """The summary line at info when it differs from the last one logged, else at debug
        (an unchanged host would repeat it every interval). Processes that cannot be seen
        are warned about once for their cause (what to do), not again while it holds
        however many come and go: again only after none was denied, or for another cause."""
        line = snapshot.summary.log_line()
        log.log(logging.INFO if line != self._last_line else logging.DEBUG, "%s", line)
        self._last_line = line
        cause = denied_hint(self._ptrace_capable) if snapshot.denied_tgids else None
        if cause is not None and cause != self._denied_cause:
            log.warning("%d processes cannot be seen: reading their /proc/PID/exe was refused "
                        "(EACCES/EPERM); %s", snapshot.denied_tgids, cause)
        self._denied_cause = cause

    def _log_failure(self, process: ProcessInfo, error: ProbeError) -> None:
        """Why a binary failed, at info the first time for each binary and tag, then at
        debug: a steady failure is not news every interval."""
        if error.tag not in tags.ACTIONABLE and not log.isEnabledFor(logging.DEBUG):
            return  # nothing to say: spare the readlink
        try:
            binary = process.exe
        except OSError:
            binary = f"pid {process.pid}"
        key = (binary, error.tag)
        first = error.tag in tags.ACTIONABLE and key not in self._logged_failures
        if first:
            if len(self._logged_failures) >= LOGGED_FAILURES_MAX:
                self._logged_failures.clear()
            self._logged_failures.add(key)
        log.log(logging.INFO if first else logging.DEBUG, "pid %d (%s) %s: %s", process.pid,
                process.comm, binary, error)

    def _wait_for_resolution(self, clock: float) -> bool:
        """Whether the background resolver finished what it was given, waiting for it
        until `resolve_grace` seconds after the snapshot began (`clock`: missed thread
        stops and the wait share that time). Only a snapshot that gave it new binaries asks
        (one under way for long does not hold up the next snapshots), and after a wait that
        ended with the resolver still busy the next 1, 2, 4 ... GRACE_BACKOFF_MAX snapshots
        ask without waiting."""
        background = self.attacher.background
        if background is None:
            return False
        if self._grace_skips.skip():
            done = background.wait_idle(0)
        else:
            left = clock + self.settings.resolve_grace - time.monotonic()
            if left <= 0:
                return background.wait_idle(0)
            done = background.wait_idle(left)
            if not done:
                self._grace_skips.failed()
        if done:
            self._grace_skips.succeeded()
        return done

    def _probe_process(self, process: ProcessInfo, tally: Tally,
                       cancel: threading.Event | None) -> ProcessSample | None:
        """Attach to and read one process: whatever it does meanwhile (exit, exec, odd
        /proc state) costs its own outcome only, never the snapshot. A process that failed
        in any step and has exited by then (`ProcessInfo.exited`) is an exit race: its
        failures are taken back and said at debug only."""
        try:
            sample = self._read_process(process, tally, cancel)
        except Exception as error:  # tallied; one odd process must never cost the snapshot
            sample, failure = None, error
        else:
            failure = None
        if not process.kernel_thread and tally.failed_now() and process.exited():
            tally.forgive()
            log.debug("pid %d (%s): exited while read%s", process.pid, process.comm,
                      f": {failure}" if failure is not None else "")
            return sample
        if isinstance(failure, ProbeError):
            if failure.tag == tags.READLINK_FAILURE and failure.errno in DENIED:
                tally.denied_tgids += 1
            self._log_failure(process, failure)
        elif isinstance(failure, (OSError, ImageChanged)):
            log.debug("pid %d: gone while probed: %s", process.pid, failure)
        elif failure is not None:
            if not tally.failed_now():  # raised after the read (its sample): a bug all the same
                tally.fail(tags.WORKER_PANIC,
                           reason=f"unexpected {type(failure).__name__}: {failure}")
            log.warning("pid %d: unexpected %s while attaching: %s", process.pid,
                        type(failure).__name__, failure,
                        exc_info=failure if log.isEnabledFor(logging.DEBUG) else None)
        return sample

    def _read_process(self, process: ProcessInfo, tally: Tally,
                      cancel: threading.Event | None) -> ProcessSample | None:
        """`_probe_process` but for exit races: failures tallied, then raised (ProbeError,
        OSError / ImageChanged when its /proc entries went away or it exec'ed again, or
        anything unexpected, as `worker-panic`)."""
        attached = False
        try:
            tracked = self._track(process)
            if isinstance(tracked.result, NotJemalloc):
                tally.fail(tags.JEMALLOC_NOT_FOUND)
                return None
            tally.jemalloc_detected += 1
            attached = True
            try:
                threads, listed = self._read_threads(process, tracked, tally, cancel)
            except ImageChanged as change:  # exec'ed since attached: attach to the new image
                log.debug("%s", change)
                tracked = self._attach(process, tracked)
                if isinstance(tracked.result, NotJemalloc):
                    return None
                threads, listed = self._read_threads(process, tracked, tally, cancel)
            if tracked.fork is not None and tracked.fork.threads_pending:
                threads = self._inherit_thread(process, tracked, threads)
            assert isinstance(tracked.result, ProcessState)  # read: attached
            arena = self._arena_totals(memory_pid(process.pid, tracked.result.listed_threads),
                                       tracked, listed, threads, tally)
        except Pending:  # its binary is being resolved in the background
            tally.pending += 1
            return None
        except ProbeError as error:
            tally.fail(error.tag, reason=error.message)
            raise
        except (OSError, ImageChanged) as exc:  # it exited (or exec'ed again) meanwhile
            tally.fail(tags.PID_MISSING if attached else tags.READLINK_FAILURE,
                       reason=f"gone while probed: {exc}")
            raise
        except Exception as exc:  # warned about by _probe_process unless it exited
            tally.fail(tags.WORKER_PANIC, reason=f"unexpected {type(exc).__name__}: {exc}")
            raise
        if arena is None and not threads and tracked.retained_totals() == (0, 0):
            return None  # nothing read yet: exporting zeros would fake a counter reset
        allocated, deallocated, source = process_totals(tracked.all_totals(), arena,
                                                        tracked.reported)
        tracked.reported = (allocated, deallocated)
        uid, unit, container = self._labels(process, tracked)
        return ProcessSample(
            pid=process.pid, start_time=process.start_time, comm=process.comm,
            exe=tracked.exe, build_id=tracked.build_id, uid=uid, unit=unit,
            threads=tuple(threads),
            retained_allocated_bytes=allocated - sum(t.allocated_bytes for t in threads),
            retained_deallocated_bytes=deallocated - sum(t.deallocated_bytes for t in threads),
            totals_source=source, totals_reason=_why_threads(tracked, arena) if source == THREADS
            else "", container_id=container.container_id, pod_uid=container.pod_uid,
            allocator=arena.health if arena is not None and source == ARENA else None)

    def _labels(self, process: ProcessInfo, tracked: _Tracked) -> tuple[int, str, Container]:
        """The uid, unit and container of a process read: from its /proc files, or, while
        the kernel's process events are heard and name no new owner or image of it since
        the last snapshot read them, as they were then; its cgroup (which no event tells
        a move of) is read again once in THREAD_RECHECK snapshots anyway, spread by pid."""
        if (self._heard is None or tracked.labels is None
                or tracked.labels_at != self._passes - 1
                or process.pid in self._heard.processes
                or not (process.pid + self._passes) % THREAD_RECHECK):
            tracked.labels = (process.uid, process.unit, process.container)
        tracked.labels_at = self._passes
        return tracked.labels

    def _arena_totals(self, pid: int, tracked: _Tracked, listed: int,
                      threads: list[ThreadSample], tally: Tally) -> ArenaTotals | None:
        """The arena statistics' view of a process (what images before an execve counted
        added), or None when its layout has none or they cannot be read now. Not read
        again while every thread was read, none has allocated or freed since, and no
        thread cache came or went; nor for a while after a failure. A process over its
        budget is `arena-budget` in every snapshot until a read fits."""
        assert isinstance(tracked.result, ProcessState)
        attachment = tracked.result.attachment
        layout = attachment.layout.arena
        if layout is None or attachment.base is None:
            return None
        basis = tuple(sorted((t.tid, t.allocated_bytes, t.deallocated_bytes) for t in threads))
        if (tracked.arena is not None and tracked.arena[0] == basis and len(threads) == listed
                and unchanged(pid, layout, attachment.base, tracked.arena[1],
                              self.prober.read_ranges)):
            return tracked.arena[1]
        if tracked.arena_skips.skip():
            if tracked.over_budget:
                tally.fail(tags.ARENA_BUDGET, reason=tracked.arena_refused)
            return None
        tsds = [s.counters_at - attachment.layout.allocated_offset
                for s in tracked.result.threads.values() if s.counters_at]
        try:
            totals = read_totals(pid, layout, attachment.base, self.prober.read_ranges, tsds)
        except ArenaReadError as exc:
            self._arena_failed(pid, tracked, exc, tally)
            return None
        tracked.arena_refused, tracked.over_budget = "", False
        tracked.arena_skips.succeeded()
        if tracked.fork is not None:
            if tracked.fork.arena_pending:
                inherit_arena(tracked.fork, totals, tracked.all_totals())
            totals = without_inherited(totals, tracked.fork.arena_inherited)
        earlier = tracked.earlier_images
        totals = replace(totals, requested=totals.requested + earlier[0],
                         in_use=totals.in_use + earlier[0] - earlier[1])
        tracked.arena = (basis, totals)
        return totals

    def _arena_failed(self, pid: int, tracked: _Tracked, error: ArenaReadError,
                      tally: Tally) -> None:
        """Fall back to per-thread sums and back off; over the budget, also tally and (the
        first time in a row) warn."""
        tracked.arena = None
        tracked.arena_skips.failed()
        if not isinstance(error, OverBudget):
            log.debug("pid %d: arena statistics: %s", pid, error)
            tracked.arena_refused = f"arena statistics refused: {error}"
            tracked.over_budget = False
            return
        tracked.arena_refused = (f"pid {pid}: arena statistics over budget: {error}; "
                                 "per-thread sums instead")
        tally.fail(tags.ARENA_BUDGET, reason=tracked.arena_refused)
        if not tracked.over_budget:
            log.warning("%s (%s, %s): a process that declares more arenas, bins or thread "
                        "caches than a real jemalloc has, or rewrote its allocator's memory",
                        tracked.arena_refused, tracked.comm, tracked.exe)
        tracked.over_budget = True

    def _inherit_thread(self, process: ProcessInfo, tracked: _Tracked,
                        threads: list[ThreadSample]) -> list[ThreadSample]:
        """Once the thread fork() copied (the child's first, tid = pid) is read: settle what
        it inherited and report it without."""
        assert isinstance(tracked.result, ProcessState) and tracked.fork is not None
        copy = tracked.result.threads.get(process.pid)
        if copy is None or not copy.counters_at or process.pid not in {t.tid for t in threads}:
            return threads  # not read yet: when it is
        layout = tracked.result.attachment.layout
        inherit_thread(tracked.fork, copy, layout.deallocated_offset - layout.allocated_offset + 8,
                       process.start_time, self.prober.read_ranges)
        return [replace(t, allocated_bytes=copy.counted()[0],
                        deallocated_bytes=copy.counted()[1]) if t.tid == process.pid else t
                for t in threads]

    def _read_threads(self, process: ProcessInfo, tracked: _Tracked, tally: Tally,
                      cancel: threading.Event | None) -> tuple[list[ThreadSample], int]:
        """The threads of an attached process, read, and how many were listed; raises
        OSError when it exited."""
        state, passes = tracked.result, self._passes
        assert isinstance(state, ProcessState)
        if not self._same_threads(process, state):
            state.listed_threads = list_threads(process, state.listed,
                                                lambda tid: not (tid + passes) % THREAD_RECHECK)
        state.listed_at = passes
        listed = state.listed_threads
        return self.prober.probe(process.pid, state, listed, tally, cancel,
                                 alive=lambda: self._alive_threads(process)), len(listed)

    def _alive_threads(self, process: ProcessInfo) -> list[int] | None:
        """The threads of `process` alive now, after its counters were read; None when the
        kernel's events tell that none started or ended since the snapshot began (a thread
        that starts is heard before it runs, so before it could reuse the memory of one
        that ended). Raises OSError when it is gone."""
        if (self._heard is not None and self._events is not None
                and not self._events.threads_changed(process.pid)):
            return None
        return list_pids(process.path("task"))

    def _same_threads(self, process: ProcessInfo, state: ProcessState) -> bool:
        """Whether the threads listed at the last snapshot are still the threads of
        `process`, as the kernel's events tell: heard since, and none of its threads started,
        ended or was renamed, nor did it exec; its leader is not a zombie (the end of a
        leader, a whole process's as often as not, is not heard). Once in
        THREAD_RECHECK_HEARD snapshots, spread by pid, they are listed anyway."""
        return (self._heard is not None and state.listed_at == self._passes - 1
                and process.pid not in self._heard.threads
                and process.state not in ("Z", "X")
                and bool((process.pid + self._passes) % THREAD_RECHECK_HEARD))

    def _track(self, process: ProcessInfo) -> _Tracked:
        """The tracked state of a process, attaching when it is new or runs another file."""
        if process.kernel_thread:  # known from its stat line, without a syscall
            raise ProbeError(tags.READLINK_FAILURE, f"pid {process.pid}: a kernel thread",
                             errno.ENOENT)
        tracked = self._tracked.get(process.key)
        if tracked is None:
            return self._attach(process, None)
        if isinstance(tracked.result, NotJemalloc) and self._loaded_since(process, tracked):
            return self._attach(process, tracked)
        if self._unchanged_image(process, tracked):
            return tracked
        # a process with no jemalloc gets here once in NOT_JEMALLOC_RECHECK snapshots of a
        # walk (quiet.py counts it unread in the others), at every capture of named pids
        identity = exe_identity(process)
        if tracked.identity != identity:
            if not same_image(process.pid, tracked.image_mark):
                return self._attach(process, tracked)
            tracked.identity = identity  # the file was touched or renamed, not exec'ed
        return tracked  # an exec of the same file shows when its AT_RANDOM is read

    def _unchanged_image(self, process: ProcessInfo, tracked: _Tracked) -> bool:
        """Whether a jemalloc process read at the last snapshot still runs the image it was
        attached to, as the kernel's events tell (heard since, and no exec of it), with no
        `stat` of its exe: its AT_RANDOM bytes, read along with its counters, would tell an
        exec the events missed."""
        state = tracked.result
        return (self._heard is not None and isinstance(state, ProcessState)
                and state.image_mark is not None and state.listed_at == self._passes - 1
                and process.pid not in self._heard.processes)

    def _loaded_since(self, process: ProcessInfo, tracked: _Tracked) -> bool:
        """Whether a process with no jemalloc mapped other code objects since it was looked
        at, checked once in NOT_JEMALLOC_OBJECTS_RECHECK seconds."""
        assert isinstance(tracked.result, NotJemalloc)
        if self._now < tracked.objects_due:
            return False
        assert tracked.result.mapped is not None
        tracked.objects_due = next_look(tracked.objects_due, self._now,
                                        NOT_JEMALLOC_OBJECTS_RECHECK)
        try:
            text = read_maps_text(process)
        except OSError:
            return False  # it exited: the walk's next pass forgets it
        seen = hash(text)
        if seen == tracked.maps_seen:
            return False  # the very maps of the last look: the same code objects
        tracked.maps_seen = seen
        return code_objects_digest(parse_maps(text)) != tracked.result.mapped

    def _attach(self, process: ProcessInfo, previous: _Tracked | None) -> _Tracked:
        """Attach to the image a process runs now. What an earlier image counted stays in
        its totals (`previous` is tracked until an attach succeeds); a process first seen
        now may have totals saved by an earlier run of ctprofd, kept likewise."""
        mark = image_mark(process)  # first: an exec after it shows in the next read
        identity = exe_identity(process)
        saved = (Saved(_larger(previous.reported, previous.all_totals()), {})
                 if previous is not None
                 else self._restored.get(process.key, Saved((0, 0), {})))
        result = self.attacher.attach(process, identity)
        self._restored.pop(process.key, None)
        retained = saved.retained
        if isinstance(result, Attachment):
            state = ProcessState(result, image_mark=mark)
            for (tid, start), (allocated, deallocated) in saved.threads.items():
                # last read before the restart; located anew if still alive, else retired
                state.threads[tid] = ThreadState(start, 0, allocated, deallocated)
            tracked = _Tracked(identity, state, process.exe, result.layout.build_id, retained,
                               image_mark=mark)
        else:
            retained = (retained[0] + sum(a for a, _ in saved.threads.values()),
                        retained[1] + sum(d for _, d in saved.threads.values()))
            tracked = _Tracked(identity, result, process.exe, None, retained, image_mark=mark)
        if previous is not None:
            tracked.earlier_images = saved.retained
        elif isinstance(result, Attachment):
            tracked.fork = self._fork_origin(process, mark)
        tracked.reported = previous.reported if previous is not None else saved.reported
        tracked.comm = process.comm
        if isinstance(result, NotJemalloc) and result.mapped is not None:
            # the first look at its code objects spread over the period by pid
            tracked.objects_due = self._now + NOT_JEMALLOC_OBJECTS_RECHECK * (
                1 + process.pid % 64 / 64)
        self._tracked[process.key] = tracked
        return tracked

    def _fork_origin(self, process: ProcessInfo,
                     mark: tuple[int, bytes] | None) -> ForkOrigin | None:
        """Where a process first seen came from when it is a fork() child: its parent's
        image, or (its parent gone, it was reparented) an image ctprofd reads in another
        process. None for a process that exec'ed its image."""
        if mark is None:
            return None
        if is_fork_child(process, mark):
            parent = None
            for (pid, _), tracked in self._tracked.items():
                if (pid == process.ppid and tracked.image_mark == mark
                        and isinstance(tracked.result, ProcessState)):
                    parent = tracked.result
            return ForkOrigin(process.ppid if parent is not None else None, parent)
        # only an older process can be where it came from: a process seen after its own
        # fork child (pid wrap put the child first) is no child of that child
        if any(t.image_mark == mark and started < process.start_time
               for (_, started), t in self._tracked.items()):
            return ForkOrigin(None, None)
        return None

    def not_jemalloc_reason(self, pid: int) -> str | None:
        """Why the last snapshot found no jemalloc in `pid`, or None when it did, or did
        not look at it."""
        for (tracked_pid, _), tracked in self._tracked.items():
            if tracked_pid == pid and isinstance(tracked.result, NotJemalloc):
                return tracked.result.reason
        return None

    def _forget_all_but(self, alive: set[tuple[int, int]]) -> None:
        for key in [k for k in self._tracked if k not in alive]:
            del self._tracked[key]
