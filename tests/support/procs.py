"""Handles on spawned fixture processes, and /proc checks on them."""
from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

READY = "READY"
DEFAULT_TIMEOUT = 60.0  # a hang guard for a reply or READY, never a timing claim

# Command prefix that runs the target without CAP_SYS_PTRACE: dropped from the
# bounding and inheritable sets before exec, so a root target has it in
# neither its permitted nor its effective set. setpriv execs: the pid stays.
DROP_PTRACE_PREFIX: tuple[str, ...] = ("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--")


def expected_worker_counters(i: int) -> tuple[int, int]:
    """(allocated, deallocated) that alloc_threads' worker i reports (see alloc_threads.c)."""
    per_round = 48 + 256 + 1536 + 4096 + 10240
    rounds = 4 * (i + 1)
    return rounds * per_round + 16384 * (1 + i % 4), (rounds - 1) * per_round


class FixtureError(RuntimeError):
    """A fixture process misbehaved (exited early, timed out, said something unexpected)."""


class Spawned:
    """A child process with piped stdin/stdout, in its own session.

    `pid` is the Popen's pid unless a subclass learns the real target's pid
    (a prefix such as strace forks instead of exec'ing). kill() SIGKILLs the
    whole process group and the target, and is idempotent.
    """

    def __init__(self, argv: Sequence[str | os.PathLike[str]], *, prefix: Sequence[str] = (),
                 **popen_kw: object) -> None:
        self.argv = [*map(str, prefix), *map(str, argv)]
        popen_kw.setdefault("start_new_session", True)
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **popen_kw)  # type: ignore[call-overload]
        self.pid = self.proc.pid
        self._buf = b""
        self.output: list[str] = []  # every line read so far

    def send(self, line: str) -> None:
        """Write one command line to the process's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def readline(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The next stdout line (without newline); FixtureError on timeout or EOF."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise FixtureError(f"{self.argv}: no output line within {timeout}s; got {self.output}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise FixtureError(
                    f"{self.argv}: stdout closed (exit status {self.proc.poll()}); got {self.output}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode()
        self.output.append(text)
        return text

    def wait_for(self, expected: str, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Read lines until one equals `expected`; return the lines before it."""
        deadline = time.monotonic() + timeout
        lines = []
        while (line := self.readline(max(deadline - time.monotonic(), 0.001))) != expected:
            lines.append(line)
        return lines

    def kill(self) -> None:
        """SIGKILL the process group (and the target, if it left the group), reap, close pipes."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.pid != self.proc.pid:
            try:
                if os.getsid(self.pid) == self.proc.pid:  # still ours, not a reused pid
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()  # no-op once reaped
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5  # a forked target is reaped by its new parent
        while not is_dead(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass


class Fixture(Spawned):
    """A running alloc_threads process, after READY.

    threads: the ground truth of the live threads, main first then the
        workers not yet exited, each {"tid", "allocated", "deallocated"}.
    pid: the target's pid (its main thread's tid, as reported by the program).
    worker_tids: tid of worker n at index n, exited ones included.
    """

    def __init__(self, binary: str | os.PathLike[str], nthreads: int, *, prefix: Sequence[str] = (),
                 timeout: float = DEFAULT_TIMEOUT, **popen_kw: object) -> None:
        super().__init__([binary, str(nthreads)], prefix=prefix, **popen_kw)
        self.threads: list[dict[str, int]] = []
        self.worker_tids: list[int] = []
        self.exited: list[int] = []
        try:
            lines = self.wait_for(READY, timeout)
            self.threads = [json.loads(line) for line in lines]
        except (FixtureError, ValueError):
            self.kill()
            raise
        if len(self.threads) != nthreads + 1:
            self.kill()
            raise FixtureError(f"{self.argv}: expected {nthreads + 1} thread lines, got {lines}")
        self.pid = self.threads[0]["tid"]
        self.worker_tids = [t["tid"] for t in self.threads[1:]]

    @property
    def main(self) -> dict[str, int]:
        return self.threads[0]

    @property
    def tids(self) -> list[int]:
        return [t["tid"] for t in self.threads]

    def exit_thread(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Make worker n exit and be joined; return its tid.

        Drops it from `threads` and updates main's entry with the counters
        main measured after the join (unchanged for the first ~150 joins; past
        that glibc's stack cache is full and the join frees in main).
        """
        self.send(f"exit {n}")
        line = self.readline(timeout)
        word, tid, main_json = (line.split(" ", 2) + ["", ""])[:3]
        if word != "EXITED":
            raise FixtureError(f"{self.argv}: 'exit {n}' answered {line!r}")
        tid_n = int(tid)
        self.threads = [t for t in self.threads if t["tid"] != tid_n]
        self.threads[0] = json.loads(main_json)
        self.exited.append(tid_n)
        return tid_n

    def quit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Ask the process to exit; return its exit status."""
        self.send("quit")
        return self.proc.wait(timeout=timeout)


def is_dead(pid: int) -> bool:
    """Whether `pid` is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(check, what: str, hang_guard: float = 120.0, poll: float = 0.01):
    """Poll `check` until it returns something true, and return that; AssertionError naming
    `what` if it has not after `hang_guard` seconds, a guard against hanging the suite and
    never a timing claim. `poll` spaces out checks that cost a process or a request."""
    deadline = time.monotonic() + hang_guard
    while not (result := check()):
        assert time.monotonic() < deadline, f"never happened within {hang_guard} s: {what}"
        time.sleep(poll)
    return result


def open_fifo_writer(fifo: str | os.PathLike[str], what: str) -> TextIO:
    """`fifo` opened for writing, line-buffered, once a reader has it open (a plain open
    would block for ever if the reader never comes: a preload that failed, a crash)."""
    def attempt() -> tuple[int] | None:
        try:
            return (os.open(fifo, os.O_WRONLY | os.O_NONBLOCK),)  # a tuple: fd 0 is true too
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO:
                raise
            return None
    [fd] = wait_until(attempt, what, poll=0.05)
    os.set_blocking(fd, True)
    return open(fd, "w", buffering=1)


def mapped_at(pid: int, name: str) -> int:
    """Where the first page of the object called `name` is mapped in `pid`."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "00000000" and fields[-1].endswith(name):
                return int(fields[0].split("-")[0], 16)
    raise AssertionError(f"{name} not mapped in {pid}")


def end_vfork(pid: int, tid: int) -> None:
    """Kill the vfork child worker `tid` of fixture `pid` waits for: its vfork ends."""
    [child] = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
    os.kill(int(child), signal.SIGKILL)


def wait_for_exit(pid: int, hang_guard: float) -> bool:
    """Wait for any process (not only a child) to exit, through its pidfd: an event, not
    polling. False only if it still runs after `hang_guard` seconds, a guard against
    hanging the suite and never a timing claim."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], hang_guard)[0])
    finally:
        os.close(fd)


def task_states(pid: int) -> dict[int, tuple[str, int]]:
    """{tid: (State letter, TracerPid)} from /proc/PID/task/*/status."""
    states = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread exited meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        states[int(task.name)] = (fields["State"].split()[0], int(fields["TracerPid"]))
    return states


def _started_by_this_test(tracer: int) -> bool:
    """Whether a tracing thread belongs to this process or to one it started (a ctprofd,
    strace, ...): not to another test session's ctprofd walking the whole host."""
    pid = tracer
    try:
        while pid > 1:
            fields = dict(line.split(":\t", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
            if int(fields["Tgid"]) == os.getpid():
                return True
            pid = int(fields["PPid"])
    except (FileNotFoundError, ProcessLookupError):
        pass  # gone: and with it, its trace
    return False


def in_group_stop(pid: int) -> dict[int, tuple[str, int]]:
    """The threads of `pid` that are not in job-control stop (State T, untraced), {} when all
    are. A thread another test session's ctprofd holds for a moment (T or t, traced by it)
    is not counted: it goes back to T, untraced, when let go."""
    return {tid: s for tid, s in task_states(pid).items()
            if s != ("T", 0) and not (s[0] in ("T", "t") and s[1] != 0
                                      and not _started_by_this_test(s[1]))}


def assert_no_thread_stopped_or_traced(pid: int) -> None:
    """Assert every thread of `pid` runs untraced: TracerPid 0, State not t/T. Other test
    sessions run ctprofd over the whole host at the same time: a thread they hold for a
    moment is not a failure of this test's ctprofd, and is not counted."""
    states = task_states(pid)
    assert states, f"process {pid} has no threads"
    bad = {tid: s for tid, s in states.items()
           if (s[0] in ("t", "T") or s[1] != 0)
           and not (s[1] != 0 and not _started_by_this_test(s[1]))}
    assert not bad, f"threads of {pid} stopped or traced, {{tid: (State, TracerPid)}}: {bad}"
