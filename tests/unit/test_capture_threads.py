"""The threads of a process in one probe pass (ctprofd/probe/capture.py): a thread that ends
between its listing and the read of its counters, a thread renamed, a pass cancelled while
threads are being stopped, a leader that exited before its other threads; the labels a
pass takes from the last one while the kernel's process events are heard; where a process
first seen came from (a fork() child, its parent gone or never read with jemalloc, or
none); and when the arena statistics are read again rather than taken as unchanged. Real
processes with Debian's jemalloc preloaded, real ptrace, real process events (a /proc of
the test's own processes, support/capture_host.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from ctprofd.probe import capture
from ctprofd.probe.capture import Capturer
from ctprofd.procfs.events import ProcessEvents
from ctprofd.report import tags
from ctprofd.report.snapshot import ARENA, ProcessSample
from support.capture_host import (AGENT, JEMALLOC, PYTHON, Agent, Host, heard, host,  # noqa: F401
                                  layouts, sample, totals)
from support.cgroups import in_unit, unique_unit
from support.procs import Spawned, assert_no_thread_stopped_or_traced, wait_until

# The agent, and two commands: one renames a thread (as pthread_setname_np does: a
# thread's comm can only be written from within its own process); one starts a thread that
# allocates 2000 bytes (kept) for each byte written to a pipe, then prints FED, with
# nothing done by the main thread (the pipe's write end is opened through /proc/PID/fd).
MORE_AGENT = AGENT + r"""
    elif cmd == "rename":
        with open(f"/proc/self/task/{args[0]}/comm", "w") as comm:
            comm.write(args[1])
        reply("OK")
    elif cmd == "feeder":
        r, w = os.pipe()
        ready = queue.Queue()

        def feeder():
            del bytearray(2000)[:]  # its cache filled for that size class
            ready.put(threading.get_native_id())
            while os.read(r, 1):
                kept.append(bytearray(2000))
                reply("FED")

        threading.Thread(target=feeder, daemon=True).start()
        reply("TID", ready.get(), w)
"""

# A leader that exits (pthread_exit) on a line of input, leaving a thread that allocated
# running on: the process's pid names a zombie, its tid another thread. Prints that tid.
LEADER_EXITS = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *worker(void *arg) {
    (void)arg;
    volatile char *own = malloc(2 << 20);
    own[0] = 1;
    printf("%ld\n", (long)syscall(SYS_gettid));
    fflush(stdout);
    for (;;) pause();
}

int main(void) {
    volatile char *mine = malloc(1 << 20);
    mine[0] = 1;
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, NULL)) return 1;
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
    pthread_exit(NULL);
}
"""


def more_agent(host: Host) -> Agent:
    """An agent (host.agent()) that also knows MORE_AGENT's commands."""
    script = host.root.parent / "more_agent.py"
    script.write_text(MORE_AGENT)
    agent = Agent(host.spawn([PYTHON, str(script)]))
    agent.ready()
    host.traced.append(agent.pid)
    return agent


def tids(process: ProcessSample) -> list[int]:
    """The tids of the threads a sample reports, sorted."""
    return sorted(t.tid for t in process.threads)


def end_before_first_read(engine: Capturer, agent: Agent, tid: int,
                          events: ProcessEvents | None) -> list[int]:
    """Make the parked thread `tid` end between the pass's listing of the agent's threads and
    the read of their counters: the first memory read of the prober asks the agent to
    release it and waits for /proc/PID/task/TID to go and, given `events` (a listener of
    the test's own), for the kernel's event of its end (sent after the entry goes, to every
    listener at once), then reads. Returns a list that holds `tid` once that happened."""
    real = engine.prober.read_ranges
    ended: list[int] = []

    def read_ranges(pid: int, ranges: list[tuple[int, int]]) -> list[bytes | OSError]:
        if not ended:
            ended.append(tid)
            if events is not None:
                events.changed()  # what came before
            assert agent.ask("release") == ["OK"]
            wait_until(lambda: not os.path.exists(f"/proc/{agent.pid}/task/{tid}"),
                       "the released thread gone")
            if events is not None:
                wait_until(lambda: events.threads_changed(agent.pid), "the thread's end heard")
        return real(pid, ranges)

    engine.prober.read_ranges = read_ranges  # type: ignore[method-assign]
    return ended


@pytest.fixture(scope="module")
def leader_exits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LEADER_EXITS, built."""
    source = tmp_path_factory.mktemp("leader_exits") / "leader_exits.c"
    source.write_text(LEADER_EXITS)
    binary = source.with_suffix("")
    subprocess.run(["cc", "-O1", "-pthread", "-o", str(binary), str(source)], check=True)
    return binary


# --- a thread that ends between its listing and its read -----------------------------------

@pytest.mark.parametrize("events", [False, True], ids=["unheard", "heard"])
def test_a_thread_that_ends_between_its_listing_and_its_read_is_left_out_as_ended(
        host: Host, heard: Callable[..., Capturer], events: bool):
    """A thread listed by the pass ends before its counters are read (its memory may hold
    another thread's counters by then): it is left out of the sample as a thread that
    ended, keeping what it was last read at, with no failure; the next pass retires it.
    Told by listing the threads again, or by the kernel's event of a thread's end (an end
    not heard yet is read as alive: no thread started since, none reused its memory)."""
    agent = host.agent()
    tid = int(agent.ask("park 2000000")[1])
    engine = heard() if events else host.capturer()
    first = sample(engine.capture(), agent.pid)
    assert tids(first) == sorted([agent.pid, tid])
    listener = ProcessEvents() if events else None
    try:
        ended = end_before_first_read(engine, agent, tid, listener)
        snapshot = engine.capture()
    finally:
        if listener is not None:
            listener.close()
    assert ended == [tid]
    read = sample(snapshot, agent.pid)
    assert tids(read) == [agent.pid]
    assert snapshot.failures == {} and snapshot.summary.failed == 0
    assert read.allocated_bytes >= first.allocated_bytes
    after = sample(engine.capture(), agent.pid)
    assert tids(after) == [agent.pid] and after.allocated_bytes >= read.allocated_bytes


# --- a thread renamed ----------------------------------------------------------------------

@pytest.mark.parametrize("recheck", [1, capture.THREAD_RECHECK])
def test_a_renamed_thread_shows_its_new_name_within_the_recheck(
        host: Host, monkeypatch: pytest.MonkeyPatch, recheck: int):
    """A thread seen before is taken as it was listed, but its stat is read again once in
    THREAD_RECHECK passes (here also made every pass): a new name shows within that many
    passes, and stays."""
    monkeypatch.setattr(capture, "THREAD_RECHECK", recheck)
    agent = more_agent(host)
    tid = int(agent.ask("park 100000")[1])
    engine = host.capturer()
    [before] = [t.comm for t in sample(engine.capture(), agent.pid).threads if t.tid == tid]
    assert before != "renamed"
    assert agent.ask(f"rename {tid} renamed") == ["OK"]
    names = []
    for _ in range(recheck + 1):
        names += [t.comm for t in sample(engine.capture(), agent.pid).threads if t.tid == tid]
    assert "renamed" in names[:recheck] and names[-1] == "renamed", names


# --- a pass cancelled while threads are stopped -----------------------------------------------

def test_a_pass_cancelled_while_stopping_threads_stops_no_further_thread(host: Host):
    """Cancelled at the first thread's stop, the pass stops no other thread of that process
    (it reads the one located); the next pass locates and reads the others."""
    agent = host.agent()
    parked = [int(agent.ask("park 100000")[1]) for _ in range(2)]
    cancel = threading.Event()
    engine = host.capturer(on_thread_stop=lambda seconds: cancel.set())
    snapshot = engine.capture(cancel=cancel)
    assert engine.stats.ptrace_stops == 1
    assert len(sample(snapshot, agent.pid).threads) == 1
    wait_until(lambda: tids(sample(engine.capture(), agent.pid)) == sorted([agent.pid, *parked]),
               "every thread read")
    assert engine.stats.ptrace_stops >= 3


# --- a leader that exited before the other threads --------------------------------------------

def test_while_events_are_heard_a_leader_that_exited_is_listed_anew(
        host: Host, heard: Callable[..., Capturer], leader_exits: Path):
    """The end of a leader is not heard: while events are heard, a process whose leader is
    a zombie has its threads listed again all the same, and the live thread is read
    through its own tid, not failed through the leader's."""
    spawned = host.spawn([str(leader_exits)])
    pid = spawned.pid
    worker = int(spawned.readline())
    engine = heard()
    assert tids(sample(engine.capture(), pid)) == sorted([pid, worker])
    spawned.send("exit")
    wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
               == "Z", "the leader a zombie")
    for _ in range(2):
        snapshot = engine.capture()
        process = sample(snapshot, pid)
        assert tids(process) == [worker], snapshot
        assert snapshot.failures == {} and snapshot.summary.failed == 0
        [thread] = process.threads
        assert thread.allocated_bytes >= 2 << 20
        # the arena statistics too are read through the live thread: the leader's own
        # megabyte is in the totals, which its exit did not take away
        assert process.totals_source == ARENA, process.totals_reason
        assert process.allocated_bytes >= (1 << 20) + (2 << 20)
    assert_no_thread_stopped_or_traced(pid)


# --- the labels while events are heard ----------------------------------------------------

def test_while_events_are_heard_a_new_owner_heard_by_a_pass_that_did_not_read_it_shows(
        host: Host, heard: Callable[..., Capturer], monkeypatch: pytest.MonkeyPatch):
    """The labels of the last pass are taken as they were only when that pass read them:
    a change of owner heard by a pass that was cancelled before it reached the process
    shows at the next pass (the cgroup's re-read, which would show it too, kept away)."""
    monkeypatch.setattr(capture, "THREAD_RECHECK", 1 << 30)
    agent = host.agent()
    engine = heard()
    assert [sample(engine.capture(), agent.pid).uid for _ in range(2)] == [0, 0]
    agent.ask("uid 65534")
    cancel = threading.Event()
    cancel.set()
    assert engine.capture(cancel=cancel).processes == ()
    assert sample(engine.capture(), agent.pid).uid == 65534


def test_while_events_are_heard_a_move_to_another_cgroup_shows_at_the_next_recheck(
        host: Host, heard: Callable[..., Capturer], monkeypatch: pytest.MonkeyPatch):
    """No event tells a move to another cgroup: with the re-read made every pass, a move
    shows at the next pass."""
    monkeypatch.setattr(capture, "THREAD_RECHECK", 1)
    agent = host.agent()
    engine = heard()
    before = [sample(engine.capture(), agent.pid).unit for _ in range(2)]
    unit = unique_unit()
    with in_unit(agent.pid, unit):
        assert sample(engine.capture(), agent.pid).unit == unit != before[-1]


# --- where a process first seen came from --------------------------------------------------

def test_a_fork_child_is_told_by_its_own_parent_not_by_a_process_read_after_it(host: Host):
    """Another jemalloc process tracked after the parent does not stand in for it: the
    child's copied thread is settled against its parent's forking thread and reports what
    the child allocated in it after the fork."""
    agent = host.agent()
    agent.ask("alloc 3000000")
    engine = host.capturer()
    engine.capture()
    host.sleeper()
    engine.capture()  # the sleeper tracked after the agent
    child = host.add(int(agent.ask("fork 1000000 500000")[1]))
    host.traced.append(child)
    forked = sample(engine.capture(), child)
    [copied] = [t for t in forked.threads if t.tid == child]
    assert 1000000 <= copied.allocated_bytes < 1100000, forked
    assert 1500000 <= forked.allocated_bytes < 1700000, forked


def test_a_process_started_after_others_were_read_is_no_fork_child(host: Host):
    """A process that exec'ed its image, first seen after other processes were read, counts
    everything it allocated: as a ctprofd that never saw the others reads it."""
    host.sleeper()
    engine = host.capturer()
    engine.capture()
    later = host.sleeper()
    read = sample(engine.capture(), later)
    alone = sample(host.capturer().capture(pids=[later]), later)
    assert read.threads[0].allocated_bytes > 0
    assert totals(read) == totals(alone)
    assert read.threads == alone.threads


def test_a_fork_child_whose_parent_exited_counts_nothing_it_had_at_its_first_read(
        host: Host):
    """A fork() child reparented after its parent (read before) was killed: its parent's
    image is known in no running process, yet it is a fork child (it shares the AT_RANDOM
    bytes of a process read earlier): the copied thread counts nothing of what it had at
    its first read, as for a child read with no parent known."""
    agent = host.agent()
    agent.ask("alloc 3000000")
    engine = host.capturer()
    assert sample(engine.capture(), agent.pid).allocated_bytes > 3000000
    child = int(agent.ask("fork 1000000 500000")[1])
    host.traced.append(child)
    os.kill(agent.pid, signal.SIGKILL)
    wait_until(lambda: int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
               != agent.pid, "the child reparented")
    host.add(child)
    snapshot = engine.capture()
    assert snapshot.failures == {} and snapshot.summary.failed == 0
    forked = sample(snapshot, child)
    [copied] = [t for t in forked.threads if t.tid == child]
    [started] = [t for t in forked.threads if t.tid != child]
    assert copied.allocated_bytes == 0 and 500000 <= started.allocated_bytes < 600000
    assert forked.allocated_bytes == started.allocated_bytes, forked


def test_a_fork_child_of_a_parent_read_before_it_loaded_jemalloc_is_read(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """The parent was read when it had no jemalloc (not looked at again since), then loaded
    it and forked: its state is no ProcessState to settle the child against, so the child
    is a fork child with no parent known, read without failing."""
    monkeypatch.setattr(capture, "NOT_JEMALLOC_OBJECTS_RECHECK", 3600.0)
    # room in the static TLS block for an initial-exec jemalloc loaded late
    agent = host.agent(jemalloc=False, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=65536")
    engine = host.capturer()
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
    assert agent.ask(f"dlopen {JEMALLOC} 2000000") == ["OK"]
    child = host.add(int(agent.ask("fork 1000000 500000")[1]))
    host.traced.append(child)
    snapshot = engine.capture()
    assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}, snapshot.failed_pids
    forked = sample(snapshot, child)
    [copied] = [t for t in forked.threads if t.tid == child]
    assert copied.allocated_bytes == 0  # the 2 MB the parent's thread had are not its own


# --- arena statistics taken as unchanged --------------------------------------------------

def test_arena_statistics_are_read_again_once_a_thread_allocated_from_its_cache(host: Host):
    """A small allocation served from a thread's cache moves no arena word that the check
    for "unchanged" reads, only that thread's counters: the arena statistics are read
    again, and the totals (beyond the threads' sums: a thread that exited unread) grow."""
    agent = host.agent()
    agent.ask("burst 3000000")  # the arena statistics alone know it
    engine = host.capturer()
    first = sample(engine.capture(), agent.pid)
    again = sample(engine.capture(), agent.pid)
    assert again.allocated_bytes > sum(t.allocated_bytes for t in again.threads) + 1000000
    agent.ask("alloc 1000")
    after = sample(engine.capture(), agent.pid)
    assert after.allocated_bytes >= again.allocated_bytes + 1000 >= first.allocated_bytes + 1000
    assert after.deallocated_bytes >= again.deallocated_bytes


def test_arena_statistics_are_read_again_while_a_thread_is_left_out(host: Host):
    """A thread another tracer holds is not read: its counters cannot tell that it
    allocated, so the arena statistics are read again at every pass and show what it
    allocated since (from its cache: no arena word the check for "unchanged" reads moves)."""
    agent = more_agent(host)
    agent.ask("burst 3000000")  # the arena statistics alone know it: they give the totals
    _, tid, pipe = agent.ask("feeder")
    tracer = Spawned(["strace", "-qq", "-o", "/dev/null", "-p", tid])
    try:
        wait_until(lambda: Path(f"/proc/{agent.pid}/task/{tid}/status").read_text().count(
            f"TracerPid:\t{tracer.pid}\n"), "strace attached")
        engine = host.capturer()
        held = [sample(engine.capture(), agent.pid) for _ in range(2)]
        assert [tids(p) for p in held] == [[agent.pid]] * 2
        assert held[1].allocated_bytes >= held[0].allocated_bytes
        with open(f"/proc/{agent.pid}/fd/{pipe}", "wb", buffering=0) as feed:
            feed.write(b"x")
            assert agent.process.readline() == "FED"
        snapshot = engine.capture()
        assert snapshot.traced_by == {agent.pid: tracer.pid}
        after = sample(snapshot, agent.pid)
        assert after.allocated_bytes >= held[1].allocated_bytes + 2000
    finally:
        tracer.kill()
    wait_until(lambda: "TracerPid:\t0\n" in Path(f"/proc/{agent.pid}/task/{tid}/status")
               .read_text(), "strace gone")
