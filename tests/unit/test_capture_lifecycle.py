"""The life of a process across probe passes (ctprofd/probe/capture.py): which passes read
it again and which count it unread, what the kernel's process events spare, what a
cancelled pass leaves, what a fork child listed before its parent, a touched executable or
a restart with a state file give. Real processes (a small C program, the agent, `sleep`)
over a /proc of the test's own processes (support/capture_host.py), real ptrace, real
state files; collaborators are only wrapped to count what a pass read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from ctprofd.probe import arena_stats, capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer
from ctprofd.procfs.processes import ProcessInfo
from ctprofd.report import tags
from ctprofd.report.snapshot import ProcessSample
from support.capture_host import (FORK_BELOW, JEMALLOC, PYTHON, Agent, Host,  # noqa: F401
                                  between, heard, host, layouts, sample, totals, within)
from support.procs import Spawned, assert_no_thread_stopped_or_traced, wait_until

# --- a small C program -------------------------------------------------------------------

PROGRAM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int ready[2], up[2];
__attribute__((used)) static const char salt[] = SALT;  /* another build id for each */

static void *worker(void *arg) {
    volatile char *kept = malloc(64 << 10);
    kept[0] = 1;
    char x = 'x';
    if (write(ready[1], &x, 1) != 1) _exit(1);
    for (;;) pause();
    return arg;
}

/* A second thread that allocated 64 KiB and waits. */
static void two_threads(void) {
    pthread_t thread;
    char x;
    if (pthread_create(&thread, NULL, worker, NULL) || read(ready[0], &x, 1) != 1) _exit(1);
}

""" + FORK_BELOW + r"""
static void say(long pid) {  /* no stdio buffer: nothing allocated */
    char line[32];
    int n = snprintf(line, sizeof line, "%ld\n", pid);
    if (write(1, line, n) != n) _exit(1);
}

static void *vforker(void *arg) {  /* a vfork wait (uninterruptible) until a line comes */
    char x;
    if (vfork() == 0) _exit(read(0, &x, 1) == 1 ? 0 : 1);
    for (;;) pause();
    return arg;
}

static void signal_up(void) {
    char x = 'x';
    if (write(up[1], &x, 1) != 1) _exit(1);
}

/* argv[1]: "threads": two threads, prints its pid; "vfork": a second thread in a vfork
   wait until a line comes on stdin, prints its pid; "free": a fork child that allocates and
   frees 1 MiB, prints the child's pid; "below": a fork child under a lower pid with two
   threads, prints the child's pid. Before anything, 64 KiB allocated and freed; then
   nothing allocates or frees but what is said. */
int main(int argc, char **argv) {
    if (argc < 2 || pipe(ready) || pipe(up)) return 1;
    void *volatile freed = malloc(64 << 10);
    free(freed);
    long child;
    if (!strcmp(argv[1], "threads") || !strcmp(argv[1], "vfork")) {
        pthread_t thread;
        if (!strcmp(argv[1], "threads")) two_threads();
        else if (pthread_create(&thread, NULL, vforker, NULL)) return 1;
        child = getpid();
    } else {
        child = strcmp(argv[1], "free") ? fork_below() : fork();
        if (child == 0) {
            if (strcmp(argv[1], "free")) {
                two_threads();
            } else {
                void *volatile mine = malloc(1 << 20);
                free(mine);
            }
            signal_up();
            for (;;) pause();
        }
        char x;
        if (child < 0 || read(up[0], &x, 1) != 1) return 1;
    }
    say(child);
    for (;;) pause();
}
"""


def compile_program(directory: Path) -> Path:
    """The program built in `directory`, with a build id of its own (a binary no layout
    cache knows)."""
    source = directory / "lifecycle.c"
    source.write_text(PROGRAM)
    binary = source.with_suffix("")
    subprocess.run(["cc", "-O1", "-pthread", f'-DSALT="{uuid.uuid4()}"', "-o", str(binary),
                    str(source)], check=True)
    return binary


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_program(tmp_path_factory.mktemp("program"))


def start(host: Host, program: Path, mode: str, jemalloc: bool = True) -> tuple[Spawned, int]:
    """The program started in `mode`, linked with the pid it prints: it, and that pid."""
    started = host.spawn([str(program), mode], jemalloc)
    other = int(started.readline())
    if other != started.pid:
        host.add(other)
    if jemalloc:
        host.traced += sorted({started.pid, other})
    return started, other


def run(host: Host, program: Path, mode: str, jemalloc: bool = True) -> tuple[int, int]:
    """`start`: the program's pid and the pid it printed."""
    started, other = start(host, program, mode, jemalloc)
    return started.pid, other


def tids(pid: int) -> set[int]:
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


def start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


class Reads:
    """Counts, per pid, the calls of a function capture.py calls on a process (its stat
    read, its exe's identity, its threads listed, its memory or maps looked at): wraps the
    real function."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str,
                 pid_of: Callable[..., int]) -> None:
        self.counts: Counter[int] = Counter()
        real = getattr(capture, name)

        def counted(*args: object, **kwargs: object) -> object:
            self.counts[pid_of(*args)] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(capture, name, counted)


def stops_until_cancel(engine: Capturer, of: set[int], cancel: threading.Event) -> list[int]:
    """Wrap the engine's tracer: once a thread among `of` was stopped, `cancel` is set.
    Returns the list the stopped threads of `of` are added to."""
    stopped: list[int] = []
    real = engine.tracer.thread_pointer

    def wrapped(tid: int, *args: object, **kwargs: object):
        pointer = real(tid, *args, **kwargs)
        if tid in of:
            stopped.append(tid)
            cancel.set()
        return pointer

    engine.tracer.thread_pointer = wrapped  # type: ignore[method-assign]
    return stopped


# --- which passes read a process again ----------------------------------------------------

PASSES = 2 * NOT_JEMALLOC_RECHECK + 1


def test_while_events_are_heard_unchanged_processes_are_not_read_again(
        host: Host, heard: Callable[..., Capturer], monkeypatch: pytest.MonkeyPatch):
    """Listening to the kernel's events, a process with no jemalloc is read once and then
    counted unread (read again once in NOT_JEMALLOC_RECHECK_HEARD passes, spread by pid),
    and a jemalloc process's exe is not looked at again nor its threads listed again
    (again once in THREAD_RECHECK_HEARD passes): nothing the events name changed."""
    plain = host.sleeper(jemalloc=False)
    jemalloc = host.sleeper()
    stats = Reads(monkeypatch, "read_process", lambda root, pid: pid)
    exes = Reads(monkeypatch, "exe_identity", lambda process: process.pid)
    listings = Reads(monkeypatch, "list_threads", lambda process, *rest: process.pid)
    engine = heard()
    first = engine.capture()
    for _ in range(PASSES - 1):
        snapshot = engine.capture()
        assert [p.pid for p in snapshot.processes] == [jemalloc]
        assert totals(sample(snapshot, jemalloc)) == totals(sample(first, jemalloc))
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}

    def due(pid: int, every: int) -> int:  # passes 2 .. PASSES that look again
        return sum(1 for n in range(2, PASSES + 1) if not (pid + n) % every)

    assert stats.counts[plain] == 1 + due(plain, capture.NOT_JEMALLOC_RECHECK_HEARD)
    assert exes.counts[jemalloc] == 1  # at the attach only
    assert listings.counts[jemalloc] == 1 + due(jemalloc, capture.THREAD_RECHECK_HEARD)


def test_without_events_quiet_processes_are_read_once_in_the_recheck(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """Without events, a process with no jemalloc and one the selection leaves out are
    each read once, then again only once in NOT_JEMALLOC_RECHECK passes, spread by pid;
    the others count them unread the same."""
    plain = host.sleeper(jemalloc=False)
    left_out = host.sleeper(jemalloc=False)
    stats = Reads(monkeypatch, "read_process", lambda root, pid: pid)
    engine = host.capturer(select=lambda p: p.pid != left_out)
    for _ in range(PASSES):
        snapshot = engine.capture()
        assert snapshot.summary.tgids_walked == 1
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}
    for pid in (plain, left_out):
        due = sum(1 for n in range(2, PASSES + 1) if not (pid + n) % NOT_JEMALLOC_RECHECK)
        assert stats.counts[pid] == 1 + due, pid


def test_an_exec_into_jemalloc_is_found_within_the_recheck_whatever_the_pid(
        host: Host, tmp_path: Path):
    """Processes without jemalloc (shells, of odd and even pids) exec a program with
    jemalloc: with no event to tell, each is read again, and found, within
    NOT_JEMALLOC_RECHECK passes."""
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f"read go\nLD_PRELOAD={JEMALLOC} exec {PYTHON} {host.script}\n")
    shells: list[Agent] = []
    while len({a.pid % 2 for a in shells}) < 2:  # one of each parity
        shells.append(Agent(host.spawn(["/bin/sh", str(wrapper)], jemalloc=False)))
    engine = host.capturer()
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: len(shells)}
    for shell in shells:
        shell.process.send("go")
        shell.ready()
        host.traced.append(shell.pid)
    found: set[int] = set()
    for _ in range(NOT_JEMALLOC_RECHECK):
        found |= {p.pid for p in engine.capture().processes}
    assert found == {a.pid for a in shells}


def test_a_pid_named_and_found_with_jemalloc_is_read_by_the_next_walk(host: Host,
                                                                       tmp_path: Path):
    """A shell counted unread as without jemalloc execs a jemalloc program; a capture of
    named pids reads it (found): the next walk reads it too, whatever its recheck."""
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f"read go\nLD_PRELOAD={JEMALLOC} exec {PYTHON} {host.script}\n")
    shell = Agent(host.spawn(["/bin/sh", str(wrapper)], jemalloc=False))
    engine = host.capturer()
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}  # pass 1: remembered
    shell.process.send("go")
    shell.ready()
    host.traced.append(shell.pid)
    passes = 1
    while True:  # named until the next pass is not one that reads it again anyway
        assert [p.pid for p in engine.capture(pids=[shell.pid]).processes] == [shell.pid]
        passes += 1
        if (shell.pid + passes + 1) % NOT_JEMALLOC_RECHECK:
            break
    walked = engine.capture()
    assert [p.pid for p in walked.processes] == [shell.pid] and walked.failures == {}


# --- what a pass tallies --------------------------------------------------------------------

def test_pids_gone_are_each_an_exit_race_and_a_pid_named_missing_has_no_name(host: Host):
    """Two entries gone before their stat was read are two exit races in one pass; a pid
    named that does not exist is failed under its pid with no name; no thread was left
    out."""
    for _ in range(2):
        gone = host.spawn(["sleep", "600"], jemalloc=False)
        gone.kill()
    engine = host.capturer()
    walked = engine.capture()
    assert walked.summary.tgids_walked == 0 and engine.stats.exit_races == 2
    assert walked.left_out_threads == 0
    named = engine.capture(pids=[4194304 + 1])
    assert [(f.pid, f.comm, f.tag) for f in named.failed_pids] == [
        (4194304 + 1, "", tags.PID_MISSING)]


def test_a_thread_whose_stop_does_not_come_is_counted_left_out(host: Host, program: Path):
    """A thread in a vfork wait cannot be stopped: the snapshot counts it left out, and
    reads the other thread."""
    started, pid = start(host, program, "vfork")
    wait_until(lambda: [tid for tid in tids(pid)
                        if Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                        .rsplit(")", 1)[1].split()[0] == "D"], "a thread in its vfork wait")
    engine = host.capturer()
    # the snapshot's stop wait below one thread's: the thread in a vfork wait (which no
    # stop ends) is not even tried; the other has all of it to stop
    engine.tracer.wait_budget = engine.tracer.stop_timeout / 2
    try:
        snapshot = engine.capture()
        assert snapshot.left_out_threads == 1
        assert [t.tid for t in sample(snapshot, pid).threads] == [pid]
    finally:
        started.send("go")  # the vfork child exits: the thread leaves its wait
        wait_until(lambda: len(tids(pid)) == 2 and all(
            Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            != "D" for tid in tids(pid)), "the vfork wait over")


# --- cancelled passes and fork children listed before their parents -------------------------

def orphan_sleeper(host: Host) -> int:
    """A `sleep` with jemalloc whose parent exited at once: reparented, its parent's pid is
    below its own (unlike a child of the test process once pids wrapped), so the walk reads
    it in its turn, never held back for a parent. The caller kills it."""
    started = subprocess.run(["sh", "-c", f"LD_PRELOAD={JEMALLOC} sleep 600 "
                              ">/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    pid = host.add(int(started.stdout))
    host.traced.append(pid)
    wait_until(lambda: Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("230", "35"),
               "sleep asleep")
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid < pid, f"reparented to {ppid}, a subreaper above {pid}"
    return pid


def test_a_pass_cancelled_midway_keeps_what_it_read_before(host: Host):
    """A cancel that comes while the second of two processes is looked at in the walk: the
    first, read before it, is in the snapshot with its thread."""
    orphans: list[int] = []
    try:
        orphans = [orphan_sleeper(host), orphan_sleeper(host)]
        first, second = sorted(orphans)
        cancel = threading.Event()

        def select(process: ProcessInfo) -> bool:
            if process.pid == second:
                cancel.set()
            return True

        snapshot = host.capturer(select=select).capture(cancel=cancel)
        assert [t.tid for t in sample(snapshot, first).threads] == [first]
        for pid in orphans:
            assert_no_thread_stopped_or_traced(pid)
    finally:
        for pid in orphans:
            os.kill(pid, signal.SIGKILL)


def test_a_pass_cancelled_after_the_walk_reaches_no_held_back_child_and_writes_no_state(
        host: Host, program: Path, tmp_path: Path):
    """A fork child listed before its parent is held back until the walk is done; a cancel
    that comes meanwhile (here: while the parent, the last listed, is read) leaves the
    child unread and, the pass incomplete, the state file unwritten; the next pass reads
    both and writes it."""
    parent, child = run(host, program, "below")
    assert child < parent
    cancel = threading.Event()

    def select(process: ProcessInfo) -> bool:
        if process.pid == parent:
            cancel.set()
        return True

    state = tmp_path / "state"
    state.mkdir()
    engine = host.capturer(select=select, state_dir=str(state))
    snapshot = engine.capture(cancel=cancel)
    assert child not in {p.pid for p in snapshot.processes}
    assert not (state / "retained.json").exists()
    again = engine.capture()
    assert {p.pid for p in again.processes} == {parent, child}
    assert (state / "retained.json").exists()


@pytest.mark.parametrize("where", ["walk", "held-back", "after-the-wait"])
def test_a_cancel_stops_no_further_thread_and_failures_are_the_process_own(
        host: Host, program: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        where: str):
    """A process with two threads is read in the walk, held back (a fork child listed
    before its parent), or after the wait for the background resolver: a cancel set once
    its first thread was stopped stops no other thread of it, and the failure its read
    then has (arena statistics over a budget of 64 bytes) is listed under its own pid and
    name."""
    if where == "after-the-wait":  # a binary the cache does not know: resolved meanwhile
        program = compile_program(tmp_path)
    if where == "held-back":
        _, pid = run(host, program, "below")
    else:
        pid, _ = run(host, program, "threads")
    wait_until(lambda: len(tids(pid)) == 2, "two threads")
    settings: dict = {}
    if where == "after-the-wait":
        cache = tmp_path / "cache"
        shutil.copytree(host.layouts["cache"], cache)
        settings = {"cache_dir": str(cache), "background": True, "resolve_grace": 120.0}
    real = arena_stats.Budget
    monkeypatch.setattr(arena_stats, "Budget", lambda reader: real(reader, max_bytes=64))
    engine = host.capturer(**settings)
    cancel = threading.Event()
    stopped = stops_until_cancel(engine, tids(pid), cancel)
    snapshot = engine.capture(cancel=cancel)
    assert len(stopped) == 1, stopped
    assert snapshot.pending == 0
    [process] = [p for p in snapshot.processes if p.pid == pid]
    assert [t.tid for t in process.threads] == stopped
    [failed] = [f for f in snapshot.failed_pids if f.tag == tags.ARENA_BUDGET and f.pid == pid]
    assert failed.comm == "lifecycle"


def test_fork_children_listed_before_their_parents_are_pending_then_quiet(host: Host,
                                                                          tmp_path: Path):
    """A fork child listed before its parent, neither with jemalloc, their binary new to a
    background resolver: pending at first, then found without jemalloc once resolved
    (read after its parent), then counted unread as any such process."""
    cache = tmp_path / "cache"
    shutil.copytree(host.layouts["cache"], cache)
    parent, child = run(host, compile_program(tmp_path), "below", jemalloc=False)
    engine = host.capturer(cache_dir=str(cache), background=True)
    assert engine.capture().pending == 2
    wait_until(lambda: engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 2},
               "both found without jemalloc", poll=0.05)
    for _ in range(NOT_JEMALLOC_RECHECK):
        snapshot = engine.capture()
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 2} and snapshot.pending == 0
        assert snapshot.summary.tgids_walked == 2


def test_a_fork_child_reports_exactly_what_it_allocated_and_freed_after_the_fork(
        host: Host, program: Path):
    """A fork child that allocated and freed 1 MiB after the fork (its parent had freed 64
    KiB before it, and does nothing after): its first thread reports exactly that, what
    it had of its parent's counters left out, freed bytes included."""
    parent, child = run(host, program, "free")
    engine = host.capturer()
    snapshot = engine.capture()
    [copied] = sample(snapshot, child).threads
    assert (copied.allocated_bytes, copied.deallocated_bytes) == (1 << 20, 1 << 20)
    assert sample(snapshot, parent).threads[0].deallocated_bytes >= 64 << 10


# --- what the attach keeps --------------------------------------------------------------------

def test_a_touched_executable_is_not_taken_for_an_exec(host: Host, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """The file a process runs is touched (another mtime: another identity) while its
    image stays: its memory is looked at once to tell (not while its file is unchanged,
    nor again after), it is not attached again, its totals do not move, and each sample
    names the jemalloc object's build id. A process without jemalloc whose file is
    unchanged is not looked at either."""
    copy = tmp_path / "sleep"
    shutil.copy("/usr/bin/sleep", copy)
    pid = host.spawn([str(copy), "600"]).pid
    host.traced.append(pid)
    plain = host.sleeper(jemalloc=False)
    wait_until(lambda: Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("230", "35"),
               "the copy asleep")
    looks = Reads(monkeypatch, "same_image", lambda pid, mark: pid)
    engine = host.capturer()
    first = sample(engine.capture(pids=[pid, plain]), pid)
    assert totals(sample(engine.capture(pids=[pid, plain]), pid)) == totals(first)
    assert looks.counts == {}
    notes = subprocess.run(["readelf", "-n", os.path.realpath(JEMALLOC)], check=True,
                           capture_output=True, text=True).stdout
    [build_id] = [line.split(":")[1].strip() for line in notes.splitlines()
                  if "Build ID:" in line]
    assert first.build_id == build_id
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for _ in range(2):
        again = sample(engine.capture(pids=[pid, plain]), pid)
        assert totals(again) == totals(first) and again.build_id == build_id
    assert engine.stats.ptrace_stops == 1
    assert looks.counts == {pid: 1}


def test_code_objects_found_unchanged_are_neither_parsed_nor_attached_again(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """A process without jemalloc whose code objects are looked at in every pass (a period
    of a microsecond): its maps are parsed at the first look only (later ones find the
    same text), and it is attached once."""
    monkeypatch.setattr(capture, "NOT_JEMALLOC_OBJECTS_RECHECK", 1e-6)
    plain = host.sleeper(jemalloc=False)
    parses = Reads(monkeypatch, "parse_maps", lambda text: 0)
    attaches = Reads(monkeypatch, "image_mark", lambda process: process.pid)
    engine = host.capturer()
    for _ in range(4):
        assert engine.capture(pids=[plain]).failures == {tags.JEMALLOC_NOT_FOUND: 1}
    assert (parses.counts[0], attaches.counts[plain]) == (1, 1)


def test_code_objects_are_not_looked_at_again_before_the_period(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """A process without jemalloc dlopen()s it: with a period longer than any test (here
    10^9 s), no capture looks at its code objects again, even one that names it."""
    monkeypatch.setattr(capture, "NOT_JEMALLOC_OBJECTS_RECHECK", 1e9)
    agent = host.agent(jemalloc=False, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=65536")
    engine = host.capturer()
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
    assert agent.ask(f"dlopen {JEMALLOC} 2000000") == ["OK"]
    named = engine.capture(pids=[agent.pid])
    assert named.failures == {tags.JEMALLOC_NOT_FOUND: 1} and named.processes == ()


# --- a restart: the state file ----------------------------------------------------------------

def _state_file(host: Host, state: Path, entries: dict[str, dict]) -> None:
    """A state file of this boot with `entries` (part -> {key: counters})."""
    data = {"boot_id": host.boot_id, "processes": {}, "threads": {}, "reported": {}}
    data.update(entries)
    (state / "retained.json").write_text(json.dumps(data))


@pytest.mark.parametrize("part,counters", [
    ("processes", [1, 0]), ("processes", [0, 1]), ("processes", [5000000, 1000]),
    ("reported", [1, 0]), ("reported", [0, 1])])
def test_a_restart_keeps_the_saved_totals_of_a_process_without_jemalloc(
        host: Host, tmp_path: Path, part: str, counters: list[int]):
    """What the state file holds of a process that now runs an image without jemalloc
    (retained totals, or the totals last reported), however small, is written again by
    the next pass: another restart would still have it."""
    pid = host.sleeper(jemalloc=False)
    key = f"{pid}:{start_time(pid)}"
    state = tmp_path / "state"
    state.mkdir()
    _state_file(host, state, {part: {key: counters}})
    engine = host.capturer(state_dir=str(state))
    for _ in range(2):
        assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
        saved = json.loads((state / "retained.json").read_text())
        assert saved[part].get(key) == counters, saved


def test_a_restart_counts_the_retained_totals_of_an_image_without_jemalloc_beneath_the_next(
        host: Host, tmp_path: Path):
    """Restarted, ctprofd finds a shell whose earlier image retained 5,000,000 bytes
    allocated and 1,000 freed (the state file), then the jemalloc program it execs: those
    count beneath the new image's, allocated and freed each in its place."""
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f"read go\nLD_PRELOAD={JEMALLOC} exec {PYTHON} {host.script}\n")
    shell = Agent(host.spawn(["/bin/sh", str(wrapper)], jemalloc=False))
    state = tmp_path / "state"
    state.mkdir()
    _state_file(host, state, {"processes": {
        f"{shell.pid}:{start_time(shell.pid)}": [5000000, 1000]}})
    engine = host.capturer(state_dir=str(state))
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
    shell.process.send("go")
    shell.ready()
    host.traced.append(shell.pid)

    def reported() -> ProcessSample:
        return wait_until(lambda: engine.capture().processes, "the program read")[0]

    low, after, high = between(host, shell.pid, reported)
    within(after, (5000000, 1000), low, high)


def test_an_exec_into_an_image_without_jemalloc_keeps_the_last_reported_totals_saved(
        host: Host, tmp_path: Path):
    """A jemalloc program read, then exec'ing a shell: the state file still holds the
    totals last reported for that process, as a floor for a restart."""
    agent = host.agent()
    state = tmp_path / "state"
    state.mkdir()
    engine = host.capturer(state_dir=str(state))
    read = sample(engine.capture(), agent.pid)
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text("read go\n")
    agent.process.send(f"exec - /bin/sh {wrapper}")
    shell = os.path.realpath("/bin/sh")
    wait_until(lambda: os.readlink(f"/proc/{agent.pid}/exe") == shell, "the shell running")
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
    saved = json.loads((state / "retained.json").read_text())
    assert saved["reported"][f"{agent.pid}:{read.start_time}"] == list(totals(read))


def test_a_fork_child_whose_parent_is_gone_does_not_count_what_jemalloc_loaded_later_had(
        host: Host):
    """A process without jemalloc at its first read dlopen()s it, allocates 2 MB with it,
    forks and exits: its child, first seen reparented, holds the image ctprofd saw in its
    parent, so what its thread had at its first read is not its own (a ctprofd that never
    saw that image counts it all)."""
    agent = host.agent(jemalloc=False, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=65536")
    engine = host.capturer()
    assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
    assert agent.ask(f"dlopen {JEMALLOC} 2000000") == ["OK"]
    child = host.add(int(agent.ask("fork 1000 1000")[1]))
    host.traced.append(child)
    agent.process.send("exec - /bin/true")
    wait_until(lambda: Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1]
               != str(agent.pid), "the child reparented")
    forked = sample(engine.capture(), child)
    assert forked.allocated_bytes < 2000000, forked
    # a ctprofd that never saw the parent's image cannot tell: all of it counts
    unknown = sample(host.capturer().capture(pids=[child]), child)
    assert unknown.allocated_bytes >= 2000000, unknown


def test_a_pass_that_gives_the_resolver_nothing_new_does_not_wait_for_it(host: Host,
                                                                         tmp_path: Path):
    """A process pending on a binary that an earlier pass handed to the background resolver
    (held busy here until someone waits for it): a later pass, with a grace now, gives it
    nothing new and so does not wait (the process stays pending); once the resolver is
    let go, a pass reads it."""
    pid = host.sleeper()
    cache = tmp_path / "cache"  # every object known but jemalloc: one to resolve
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    engine = host.capturer(cache_dir=str(cache), background=True)  # no grace at first
    background = engine.attacher.background
    assert background is not None
    gate = threading.Event()
    waits: list[float] = []
    real_submit, real_wait = background.submit, background.wait_idle

    def submit(key: str, owner: int, job: Callable[[], object]) -> bool:
        return real_submit(key, owner, lambda: (gate.wait(120), job()))

    def wait_idle(timeout: float) -> bool:
        waits.append(timeout)
        if timeout > 0:  # a wait of a grace lets the resolver go
            gate.set()
        return real_wait(timeout)

    background.submit = submit  # type: ignore[method-assign]
    background.wait_idle = wait_idle  # type: ignore[method-assign]
    try:
        assert engine.capture().pending == 1
        engine.settings.resolve_grace = 120.0
        again = engine.capture()
        assert again.pending == 1 and again.processes == ()
        assert waits == [0]  # the first pass's look, with no grace
    finally:
        gate.set()
    later = wait_until(lambda: [s for s in [engine.capture()] if s.processes],
                       "the process read once resolved", poll=0.05)[0]
    assert [p.pid for p in later.processes] == [pid]


def test_a_fork_child_whose_first_thread_another_tracer_holds_is_read_without_it(
        host: Host):
    """A fork() child whose first thread (the copy of its parent's) another tracer holds:
    that thread is not read (the tracer named), what the child inherited is settled later,
    and the rest of it is read, with no other failure."""
    agent = host.agent()
    child = host.add(int(agent.ask("fork 1000000 500000")[1]))
    host.traced.append(child)
    tracer = Spawned(["strace", "-qq", "-o", "/dev/null", "-p", str(child)])
    try:
        wait_until(lambda: Path(f"/proc/{child}/status").read_text().count(
            f"TracerPid:\t{tracer.pid}\n"), "strace attached")
        snapshot = host.capturer().capture()
        assert snapshot.failures == {tags.PTRACE_TRACED: 1}
        assert snapshot.traced_by == {child: tracer.pid}
        forked = sample(snapshot, child)
        assert child not in [t.tid for t in forked.threads] and len(forked.threads) == 1
    finally:
        tracer.kill()
    wait_until(lambda: "TracerPid:\t0\n" in Path(f"/proc/{child}/status").read_text(),
               "strace gone")
