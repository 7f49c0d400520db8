"""Process control for the benchmarks: `Processes` owns everything a benchmark starts
and SIGKILLs it on the way out (normal end, exception, Ctrl-C, SIGTERM, SIGHUP);
`die_with_parent` gives each child PR_SET_PDEATHSIG(SIGKILL) (hostsim passes it on to its
own children), so even a SIGKILLed benchmark leaves nothing behind. Also what /proc says
about a process (CPU time, RSS, children, how many processes) and `wait_until`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from typing import Any, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Processes:
    """Owns every process a benchmark starts; `with Processes() as procs:` kills them all
    on the way out, whatever the way. SIGINT, SIGTERM and SIGHUP become KeyboardInterrupt
    so that `finally` blocks run (SIGINT too: a shell starts background jobs with it
    ignored)."""

    def __init__(self) -> None:
        self._owned: list[Any] = []

    def __enter__(self) -> Processes:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def own(self, thing: Any) -> Any:
        """Track something with kill() (a Popen, a Fixture, a Daemon ...)."""
        self._owned.append(thing)
        return thing

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)
        kw.setdefault("preexec_fn", die_with_parent)
        return self.own(subprocess.Popen([str(a) for a in argv], **kw))

    def release(self, thing: Any) -> None:
        kill(thing)
        if thing in self._owned:
            self._owned.remove(thing)

    def kill_all(self) -> None:
        while self._owned:
            kill(self._owned.pop())


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def kill(thing: Any) -> None:
    """SIGKILL a Popen's whole process group (or call a handle's kill()) and reap it."""
    if isinstance(thing, subprocess.Popen):
        try:
            os.killpg(thing.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        thing.kill()
        try:
            thing.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (thing.stdin, thing.stdout, thing.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
    else:
        thing.kill()


# --- /proc accounting -----------------------------------------------------------------

def count_processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (all its threads), in seconds (clock-tick resolution);
    with `children`, plus cutime + cstime: its children it has waited for."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def tasks_cpu_ns(pid: int) -> int:
    """Time on CPU of all current threads of a process, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def status_kib(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return found


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step)
