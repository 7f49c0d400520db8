"""A target process that needs no build: python3 with worker threads parked on an event,
each telling its tid and its own thread pointer (fs_base, from arch_prctl), and commands to
end a worker or send one into a vfork wait that no ptrace stop ends until the test lets it
go (posix_spawn's child blocks opening a FIFO before it execs, its parent thread waits in
vfork meanwhile, in state D)."""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import pytest

from support.procs import READY, Spawned, wait_until

TARGET = r"""
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
say_lock = threading.Lock()

def say(*words):
    with say_lock:
        print(*words, flush=True)

def fs_base():
    value = ctypes.c_uint64()
    if libc.syscall(158, 0x1003, ctypes.byref(value)) != 0:  # arch_prctl(ARCH_GET_FS)
        raise OSError(ctypes.get_errno(), "arch_prctl")
    return value.value

ends = []

def worker(end, told):
    say("THREAD", threading.get_native_id(), fs_base())
    told.release()
    end.wait()

def spawn_through(fifo):
    # libc's posix_spawn through ctypes, which lets go of the GIL (os.posix_spawn keeps it)
    actions = ctypes.create_string_buffer(256)  # a posix_spawn_file_actions_t: 80 bytes
    libc.posix_spawn_file_actions_init(actions)
    libc.posix_spawn_file_actions_addopen(actions, 3, fifo.encode(), os.O_RDONLY, 0)
    pid = ctypes.c_int()
    argv = (ctypes.c_char_p * 2)(b"/bin/true", None)
    envp = (ctypes.c_char_p * 1)(None)
    say("VFORKING", threading.get_native_id())
    err = libc.posix_spawn(ctypes.byref(pid), b"/bin/true", actions, None, argv, envp)
    if err:
        raise OSError(err, "posix_spawn")
    os.waitpid(pid.value, 0)
    say("SPAWNED", threading.get_native_id())
    threading.Event().wait()  # parked as the workers are

say("THREAD", threading.get_native_id(), fs_base())
told = threading.Semaphore(0)
workers = []
for _ in range(int(sys.argv[1])):
    end = threading.Event()
    thread = threading.Thread(target=worker, args=(end, told), daemon=True)
    thread.start()
    told.acquire()
    workers.append((thread, end))
say("READY")
for line in sys.stdin:
    word, _, arg = line.strip().partition(" ")
    if word == "vfork":
        threading.Thread(target=spawn_through, args=(arg,), daemon=True).start()
    elif word == "end":
        thread, end = workers[int(arg)]
        tid = thread.native_id
        end.set()
        thread.join()
        say("ENDED", tid)
"""


def thread_state(pid: int, tid: int) -> tuple[str, int] | None:
    """(State letter, TracerPid) of a thread; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return fields["State"].split()[0], int(fields["TracerPid"])


class PyThreads(Spawned):
    """The running target, after READY: `fs_base` maps each tid (the main thread's, then
    the workers' in order) to its thread pointer as the thread itself read it."""

    def __init__(self, nthreads: int) -> None:
        super().__init__([sys.executable, "-c", TARGET, str(nthreads)])
        self.fs_base: dict[int, int] = {}
        try:
            for line in self.wait_for(READY):
                word, tid, base = line.split()
                assert word == "THREAD", line
                self.fs_base[int(tid)] = int(base)
        except Exception:
            self.kill()
            raise

    @property
    def workers(self) -> list[int]:
        return list(self.fs_base)[1:]

    def end(self, n: int) -> int:
        """End worker n (it returns and is joined); its tid."""
        self.send(f"end {n}")
        word, tid = self.readline().split()
        assert word == "ENDED"
        self.fs_base.pop(int(tid))
        return int(tid)

    def vfork(self, fifo: Path) -> int:
        """A new thread of the target, waiting in vfork (D) until `release(fifo)`, then parked
    as the workers are; its tid."""
        os.mkfifo(fifo)
        self.send(f"vfork {fifo}")
        word, tid = self.readline().split()
        assert word == "VFORKING"
        wait_until(lambda: (thread_state(self.pid, int(tid)) or ("",))[0] == "D",
                   "the thread to wait in vfork")
        return int(tid)

    def release(self, fifo: Path, tid: int) -> None:
        """Let the vfork child of thread `tid` open `fifo`, exec and exit: the thread goes on."""
        fd = os.open(fifo, os.O_WRONLY)  # its reader, the vfork child, has it open already
        os.close(fd)
        assert self.readline().split() == ["SPAWNED", str(tid)]


TEST_HANG_GUARD = 30.0  # seconds a test of ptrace may take before the run is ended


@pytest.fixture
def hang_guard():
    """End the test process, with every thread's traceback, if the test hangs (a tracer
    whose thread never answers would otherwise hold the run for ever): a guard against a
    hang, never a timing claim."""
    faulthandler.dump_traceback_later(TEST_HANG_GUARD, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
