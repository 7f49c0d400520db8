"""Counting a fork() child once: what it inherited from its parent is not its own.

A child made by fork() starts as a copy of its parent: the thread that forked, with its
`thread_allocated`/`thread_deallocated`, and every arena statistic. Counted as they are, a
process holding 256 MiB that forks every 2 s adds 256 MiB to its series per child. A fork
child is told from an exec'd process by its AT_RANDOM bytes: execve writes fresh ones, a
fork copies them, so they equal its parent's (at the same address) until it execs.

What the child had at the fork (F) is not read at the fork, but bounded by two values read
now, both at least F because counters only grow: the child's own counters (F plus what the
child did) and its parent's forking thread's (F plus what the parent did). The smaller is
F exactly when either did nothing since the fork, and never below F: a child may be
under-counted by what both did before it was first read, never counted twice. What the
child's arena statistics held at the fork is what they hold at its first read less what its
threads counted since the fork.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..procfs.processes import ProcessInfo
from .arena_stats import ArenaTotals, Reader
from .threads import ProcessState, ThreadState, counter_pair, same_image


@dataclass
class ForkOrigin:
    """A process found to be a fork() child, until what it inherited is known."""

    parent_pid: int | None  # the parent still running its image; None when gone or unknown
    parent: ProcessState | None  # the parent's state when ctprofd attached to it, until
    # the copied thread's inheritance is settled
    threads_pending: bool = True  # the copied thread's inheritance not settled yet
    arena_pending: bool = True    # the arena statistics' inheritance not settled yet
    arena_inherited: tuple[int, int] = (0, 0)  # (allocated, deallocated) at the fork


def is_fork_child(process: ProcessInfo, mark: tuple[int, bytes] | None) -> bool:
    """Whether `process`'s parent holds the same AT_RANDOM bytes at the same address: the
    process was forked and has not exec'ed since."""
    return process.ppid > 1 and same_image(process.ppid, mark)


def inherit_thread(origin: ForkOrigin, copy: ThreadState, span: int, child_start: int,
                   read: Reader) -> None:
    """Settle what the child's copy of its parent's forking thread (at the same address:
    the address space is a copy) inherited. The parent's thread is trusted only when
    ctprofd located one there that started before the child (a thread started later
    may have been given the exited one's memory, and counters lower than F). The
    parent's state is let go then."""
    own = (copy.allocated, copy.deallocated)
    parent = _parent_counters(origin, copy.counters_at, span, child_start, read)
    copy.inherited = own if parent is None else (min(own[0], parent[0]),
                                                 min(own[1], parent[1]))
    origin.threads_pending = False
    origin.parent = None


def _parent_counters(origin: ForkOrigin, address: int, span: int, child_start: int,
                     read: Reader) -> tuple[int, int] | None:
    if origin.parent_pid is None or origin.parent is None:
        return None
    if not any(t.counters_at == address and t.start_time <= child_start
               for t in origin.parent.threads.values()):
        return None
    data = read(origin.parent_pid, [(address, span)])[0]
    return None if isinstance(data, OSError) else counter_pair(data)


def inherit_arena(origin: ForkOrigin, child: ArenaTotals, own: tuple[int, int]) -> None:
    """Settle what the child's arena statistics held at the fork, from their first read and
    what its threads counted since the fork (`own`, read with them): the rest is the
    parent's. (The parent's own arena statistics are no bound: its fork locked every
    thread-cache ring once, which reads as a cache gone.)"""
    origin.arena_inherited = (max(0, child.allocated - own[0]),
                              max(0, child.allocated - child.live - own[1]))
    origin.arena_pending = False


def without_inherited(totals: ArenaTotals, inherited: tuple[int, int]) -> ArenaTotals:
    """`totals` less what the process inherited: allocated less the inherited allocated,
    live less the inherited live (allocated − deallocated)."""
    allocated, deallocated = inherited
    return replace(totals, requested=totals.requested - allocated,
                   in_use=totals.in_use - allocated + deallocated)
