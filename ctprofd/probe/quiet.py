"""Processes with nothing for ctprofd to read (no jemalloc, kernel threads, /proc/PID/exe
refused, left out by the selection), remembered across snapshots: a snapshot counts an
unchanged one from the /proc listing alone, opening no file of it.

The listing gives each pid with the inode number of its /proc/PID directory, which the
kernel flushes when a process is reaped: another process with the same pid has another
number and is read at once (`procfs.processes.numbered_entries`). What the number cannot
show (an exec, a rename, a new owner or unit the selection looks at) is caught by reading
the process again once in `recheck` snapshots, spread by pid; a process with no jemalloc is
also read when its code objects are due for another look (a module that brings jemalloc in
later). While the kernel's process events are heard (`procfs.events`), a process they name
(an exec, a new uid or gid, a rename) is read at the next snapshot, and the others only once
in `recheck_heard` snapshots, except those the selection left out (a unit it looks at can
change with no event). After a snapshot that could not hear them, every process is read
again within `recheck` snapshots before the events are trusted alone again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Protocol

# What a process's read gave, and so what counting it without a read adds to the tally.
KERNEL_THREAD, NOT_JEMALLOC, REFUSED, UNSELECTED = range(4)


class Timed(Protocol):
    """What the Capturer tracks of a process with no jemalloc (capture._Tracked)."""

    objects_due: float  # the monotonic time its code objects are next looked at


@dataclass(slots=True)
class Quiet:
    """One remembered process."""

    inode: int  # of /proc/PID when it was read
    outcome: int  # KERNEL_THREAD, NOT_JEMALLOC, REFUSED or UNSELECTED
    key: tuple[int, int] | None  # (pid, start time) of a process the Capturer tracks
    tracked: Timed | None  # what it tracks of it: read again once its objects_due is past
    listed: int = 0  # the last snapshot whose listing had it


class QuietProcesses:
    """The remembered processes, and what the snapshot under way counted of them."""

    def __init__(self, recheck: int, recheck_heard: int | None = None) -> None:
        self.recheck = recheck
        self.recheck_heard = recheck_heard or recheck
        self._entries: dict[int, Quiet] = {}
        self._pass = 0
        self._now = 0.0
        self._seen: set[tuple[int, int]] = set()
        self._changed: Collection[int] = ()
        self._cycle = recheck  # this snapshot's recheck for processes the selection took
        self._unheard_until = 0  # snapshots before this one read everything within `recheck`
        self.counts = [0, 0, 0, 0]  # processes counted unread this snapshot, per outcome

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, snapshot: int, now: float, seen: set[tuple[int, int]],
              changed: Collection[int] | None = None) -> None:
        """A new snapshot (its number and monotonic start); the keys of tracked processes
        counted unread go to `seen`. `changed`: the tgids the process events named since the
        last snapshot, or None when they could not be heard."""
        self._pass, self._now, self._seen = snapshot, now, seen
        self.counts = [0, 0, 0, 0]
        if changed is None:
            self._unheard_until = snapshot + self.recheck
        self._changed = changed or ()
        self._cycle = self.recheck if snapshot < self._unheard_until else self.recheck_heard

    def skip(self, pid: int, inode: int) -> bool:
        """Whether `pid`, listed with `inode`, is a remembered process not due for a read:
        then it is counted, and needs nothing more. No object is made for it."""
        entry = self._entries.get(pid)
        if (entry is None or entry.inode != inode or pid in self._changed
                or not (pid + self._pass) % (self.recheck if entry.outcome == UNSELECTED
                                             else self._cycle)
                or (entry.tracked is not None and self._now >= entry.tracked.objects_due)):
            return False
        entry.listed = self._pass
        self.counts[entry.outcome] += 1
        if entry.key is not None:
            self._seen.add(entry.key)
        return True

    def remember(self, pid: int, inode: int, outcome: int,
                 key: tuple[int, int] | None = None, tracked: Timed | None = None) -> None:
        """What reading `pid` gave: it is counted unread until it is due again."""
        self._entries[pid] = Quiet(inode, outcome, key, tracked, self._pass)

    def forget(self, pid: int) -> None:
        """`pid` was read and has something to read (or was read outside a full walk)."""
        self._entries.pop(pid, None)

    def sweep(self) -> None:
        """After a complete walk: forget the pids it did not list (those processes ended)."""
        for pid in [pid for pid, e in self._entries.items() if e.listed != self._pass]:
            del self._entries[pid]

    def clear(self) -> None:
        """Forget everything (the selection changed): every process is read again."""
        self._entries.clear()
