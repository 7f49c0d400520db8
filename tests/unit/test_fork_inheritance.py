"""probe.forks: what a fork() child inherited, bounded by its own counters and its parent's
forking thread's, read from real memory (this process's, with process_vm_readv, standing for
the parent's), and what its arena statistics held at the fork."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from types import SimpleNamespace

from ctprofd.probe.arena_stats import ArenaTotals
from ctprofd.probe.forks import (ForkOrigin, inherit_arena, inherit_thread, is_fork_child,
                                without_inherited)
from ctprofd.probe.memory import read_ranges
from ctprofd.procfs.processes import read_process
from ctprofd.probe.threads import ProcessState, ThreadState, image_mark

SPAN = 24  # thread_allocated, a word between, thread_deallocated


def parent_counters(allocated: int, deallocated: int) -> ctypes.Array:
    buffer = ctypes.create_string_buffer(SPAN)
    struct.pack_into("<QQQ", buffer, 0, allocated, 0xDEAD, deallocated)
    return buffer


def parent_state(address: int, start_time: int) -> ProcessState:
    # the attachment is not looked at here: only the parent's threads are
    state = ProcessState(attachment=SimpleNamespace(tsd_delta=None))
    state.threads[101] = ThreadState(start_time=start_time + 1000, counters_at=address + 64)
    state.threads[100] = ThreadState(start_time=start_time, counters_at=address)
    return state


def settle(origin: ForkOrigin, address: int, own: tuple[int, int],
           child_start: int = 500) -> ThreadState:
    copy = ThreadState(start_time=child_start, counters_at=address, allocated=own[0],
                       deallocated=own[1])
    inherit_thread(origin, copy, SPAN, child_start, read_ranges)
    assert origin.threads_pending is False and origin.parent is None
    return copy


def test_the_smaller_of_the_childs_and_the_parents_counters_each():
    buffer = parent_counters(9000, 2000)
    address = ctypes.addressof(buffer)
    origin = ForkOrigin(os.getpid(), parent_state(address, 400))
    assert settle(origin, address, (8000, 3000)).inherited == (8000, 2000)
    origin = ForkOrigin(os.getpid(), parent_state(address, 400))
    assert settle(origin, address, (9500, 1500)).inherited == (9000, 1500)


def test_a_parent_thread_started_at_the_childs_start_is_trusted_and_later_not():
    buffer = parent_counters(100, 10)
    address = ctypes.addressof(buffer)
    origin = ForkOrigin(os.getpid(), parent_state(address, 500))
    assert settle(origin, address, (8000, 3000), child_start=500).inherited == (100, 10)
    origin = ForkOrigin(os.getpid(), parent_state(address, 501))
    assert settle(origin, address, (8000, 3000), child_start=500).inherited == (8000, 3000)


def test_without_a_parent_thread_at_that_address_the_childs_own_counters_are_inherited():
    buffer = parent_counters(100, 10)
    address = ctypes.addressof(buffer)
    origin = ForkOrigin(os.getpid(), parent_state(address + 8, 400))
    assert settle(origin, address, (8000, 3000)).inherited == (8000, 3000)


def test_a_parent_gone_or_unknown_or_unreadable_leaves_the_childs_own_counters():
    buffer = parent_counters(100, 10)
    address = ctypes.addressof(buffer)
    for origin in (ForkOrigin(None, parent_state(address, 400)),
                   ForkOrigin(os.getpid(), None)):
        assert settle(origin, address, (8000, 3000)).inherited == (8000, 3000)
    unmapped = 8  # the first page is never mapped: the parent's read fails
    origin = ForkOrigin(os.getpid(), parent_state(unmapped, 400))
    assert settle(origin, unmapped, (8000, 3000)).inherited == (8000, 3000)


def totals(requested: int, in_use: int, cached: int, internal: int) -> ArenaTotals:
    return ArenaTotals(requested=requested, in_use=in_use, cached=cached, internal=internal,
                       cache_locks=0, caches=0, cache_stacks=0)


def test_the_arena_statistics_at_the_fork_are_the_first_read_less_the_childs_own():
    origin = ForkOrigin(1, None)
    child = totals(requested=10_000, in_use=7_000, cached=500, internal=300)
    # allocated 9 700, live 6 200: deallocated 3 500
    inherit_arena(origin, child, (1_200, 400))
    assert origin.arena_inherited == (8_500, 3_100)
    assert origin.arena_pending is False
    inherit_arena(origin, child, (20_000, 9_000))  # the child did more: never negative
    assert origin.arena_inherited == (0, 0)


def test_without_inherited_takes_off_the_inherited_allocated_and_live():
    before = totals(requested=10_000, in_use=7_000, cached=500, internal=300)
    after = without_inherited(before, (4_000, 1_500))
    assert (after.requested, after.in_use) == (6_000, 4_500)
    assert (after.cached, after.internal) == (500, 300)


FORKER = """
import os, sys
child = os.fork()
if child == 0:
    sys.stdin.read()
    os._exit(0)
print(child, flush=True)
sys.stdin.read()
os.waitpid(child, 0)
"""


def test_a_fork_child_holds_its_parents_at_random_bytes_and_an_execd_child_does_not():
    """Real processes: a Python that forks a child which never execs, and `cat`, exec'd by
    this process. Both wait on their stdin, closed at the end."""
    forker = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    execd = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        forked = int(forker.stdout.readline())
        execd.stdin.write(b"ready\n")
        execd.stdin.flush()
        assert execd.stdout.readline() == b"ready\n"
        for pid, parent, fork_child in ((forked, forker.pid, True),
                                        (execd.pid, os.getpid(), False)):
            info = read_process("/proc", pid)
            assert info is not None and info.ppid == parent
            mark = image_mark(info)
            assert mark is not None
            assert is_fork_child(info, mark) is fork_child
            assert not is_fork_child(info, None)  # unknown: not taken for a fork child
    finally:
        for child in (forker, execd):
            child.stdin.close()
            child.wait(timeout=60)
            child.stdout.close()
