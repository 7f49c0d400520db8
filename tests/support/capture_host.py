"""A /proc of a test's own processes for one probe pass (ctprofd/probe/capture.py): a
directory of links to /proc/PID of only what the test started, so that no other process of
the host (another ctprofd, other tests) changes what a pass counts; the agent, a small
Python program allocating on command with Debian's jemalloc preloaded; the layout of that
jemalloc resolved once per module into shared cache directories. Tests import the
`layouts`, `host` and `heard` fixtures from here."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report import tags
from ctprofd.report.snapshot import ProcessSample, Snapshot
from ctprofd.resolve import offsets_file
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import TsdLayout, resolve_path
from support.procs import Spawned, assert_no_thread_stopped_or_traced, is_dead, wait_until

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's, stripped
PYTHON = "/usr/bin/python3"

# A program that allocates on command, each command answered by one line.
AGENT = r"""
import os, sys, threading, queue
kept, parked, gate = [], [], threading.Event()

def reply(*words):
    print(*words, flush=True)

def parked_thread(size, ready):
    kept.append(bytearray(size))
    ready.put(threading.get_native_id())
    gate.wait()

reply("READY")
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "ping":  # answered once the reading of commands allocated what it needs
        reply("OK")
    elif cmd == "alloc":  # the main thread allocates and keeps
        kept.append(bytearray(int(args[0])))
        reply("OK")
    elif cmd == "park":  # a thread allocates and waits
        ready = queue.Queue()
        thread = threading.Thread(target=parked_thread, args=(int(args[0]), ready))
        thread.start()
        parked.append(thread)
        reply("TID", ready.get())
    elif cmd == "release":  # the parked threads exit
        gate.set()
        for thread in parked:
            thread.join()
        parked.clear()
        gate.clear()
        reply("OK")
    elif cmd == "burst":  # a thread allocates and exits before anything reads it
        thread = threading.Thread(target=lambda: kept.append(bytearray(int(args[0]))))
        thread.start()
        thread.join()
        reply("OK")
    elif cmd == "fork":  # a child that allocates, starts a thread that allocates, and sleeps
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            kept.append(bytearray(int(args[0])))
            ready = queue.Queue()
            threading.Thread(target=parked_thread, args=(int(args[1]), ready)).start()
            ready.get()
            os.write(w, b"x")
            threading.Event().wait()
        os.read(r, 1)
        reply("PID", pid)
    elif cmd == "zombie":  # a child that exits, never reaped
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        reply("PID", pid)
    elif cmd == "uid":  # another owner
        os.setresuid(int(args[0]), int(args[0]), int(args[0]))
        reply("OK")
    elif cmd == "dlopen":  # jemalloc brought in later, and allocating
        import ctypes
        lib = ctypes.CDLL(args[0])
        lib.malloc.restype = ctypes.c_void_p
        kept.append(lib.malloc(int(args[1])))
        reply("OK")
    elif cmd == "exec":
        env = dict(os.environ)
        if args[0] == "-":
            env.pop("LD_PRELOAD", None)
            args = args[1:]
        elif args[0] == "+":
            env["LD_PRELOAD"] = args[1]
            args = args[2:]
        os.execve(args[0], args, env)
"""


# C: a fork under a lower pid (needs <errno.h>, <linux/sched.h>, <signal.h>, <stdint.h>,
# <string.h>, <sys/syscall.h>, <unistd.h>)
FORK_BELOW = r"""
/* A fork (clone3 with set_tid) under the highest free pid below this process's own, as
   after a pid wrap; -1 when none is free. */
static long fork_below(void) {
    long child = -1;
    for (pid_t want = getpid() - 1; want > 300 && child < 0; want--) {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.exit_signal = SIGCHLD;
        args.set_tid = (uintptr_t)&want;
        args.set_tid_size = 1;
        child = syscall(SYS_clone3, &args, sizeof args);
        if (child < 0 && errno != EEXIST) return -1;
    }
    return child;
}
"""


@dataclasses.dataclass
class Agent:
    """One running agent (or whatever it exec'ed)."""

    process: Spawned

    @property
    def pid(self) -> int:
        return self.process.pid

    def ask(self, line: str) -> list[str]:
        self.process.send(line)
        return self.process.readline().split()

    def ready(self) -> None:
        """Wait for the program (after a start or an exec) to be idle: READY, and one
        command answered (reading the first allocates the input's buffers)."""
        self.process.wait_for("READY")
        assert self.ask("ping") == ["OK"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An offsets file of Debian's jemalloc without its arena statistics, and two cache
    directories that know every object the agent and `sleep` map (each filled by one
    capture): one with jemalloc's layout as resolved, one for engines given that file
    (a layout in the cache would be used before it)."""
    layout = resolve_path(JEMALLOC, DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.arena is not None
    no_arena = tmp_path_factory.mktemp("offsets") / "offsets.json"
    offsets_file.dump([dataclasses.replace(layout, arena=None, arena_missing="left out")],
                      str(no_arena))
    found = {"no_arena": str(no_arena)}
    sleeper = Spawned(["sleep", "600"], env={**os.environ, "LD_PRELOAD": JEMALLOC})
    agent = Spawned([PYTHON, "-c", AGENT], env={**os.environ, "LD_PRELOAD": JEMALLOC})
    try:
        agent.wait_for("READY")
        for name, offsets in (("cache", ()), ("no_arena_cache", (str(no_arena),))):
            cache = tmp_path_factory.mktemp(name)
            engine = Capturer(CaptureSettings(debug_dirs=(), cache_dir=str(cache),
                                              offsets_files=offsets))
            try:
                assert len(engine.capture(pids=[sleeper.pid, agent.pid]).processes) == 2
            finally:
                engine.close()
            found[name] = str(cache)
        # every object of a `sleep` with jemalloc but jemalloc itself (its dependencies
        # preloaded instead): a process that needs one binary resolved
        needs = Spawned(["sleep", "600"], env={**os.environ, "LD_PRELOAD": " ".join(
            ("libm.so.6", "libstdc++.so.6", "libgcc_s.so.1"))})
        try:
            cache = tmp_path_factory.mktemp("all_but_jemalloc")
            engine = Capturer(CaptureSettings(debug_dirs=(), cache_dir=str(cache)))
            try:
                wait_until(lambda: "libstdc++" in Path(f"/proc/{needs.pid}/maps").read_text(),
                           "sleep's libraries mapped")
                assert engine.capture(pids=[needs.pid]).failures == {
                    tags.JEMALLOC_NOT_FOUND: 1}
            finally:
                engine.close()
            found["all_but_jemalloc"] = str(cache)
        finally:
            needs.kill()
    finally:
        sleeper.kill()
        agent.kill()
    return found


def patient(engine: Capturer) -> Capturer:
    """A thread's stop is waited for up to a minute, not 250 ms: on a busy machine (and
    under mutmut, the test's processes at nice 15) a stop can take longer, and a thread
    left out would change what a test compares. A hang guard, never a timing claim."""
    engine.tracer.stop_timeout = engine.tracer.wait_budget = 60.0
    return engine


class Host:
    """The test's own /proc: links to the /proc/PID of the processes it starts."""

    def __init__(self, root: Path, layouts: dict[str, str]) -> None:
        self.root = root
        self.layouts = layouts
        root.mkdir()
        self.boot_id = str(uuid.uuid4())  # the state file's, read from this root
        (root / "sys" / "kernel" / "random").mkdir(parents=True)
        (root / "sys" / "kernel" / "random" / "boot_id").write_text(self.boot_id + "\n")
        self.spawned: list[Spawned] = []
        self.engines: list[Capturer] = []
        self.traced: list[int] = []
        self.script = root.parent / "agent.py"
        self.script.write_text(AGENT)

    def add(self, pid: int) -> int:
        (self.root / str(pid)).symlink_to(f"/proc/{pid}")
        return pid

    def remove(self, pid: int) -> None:
        (self.root / str(pid)).unlink()

    def spawn(self, argv: Sequence[str], jemalloc: bool = True, **env: str) -> Spawned:
        env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, **env}
        if jemalloc:
            env["LD_PRELOAD"] = JEMALLOC
        process = Spawned(argv, env=env)
        self.spawned.append(process)
        self.add(process.pid)
        return process

    def sleeper(self, jemalloc: bool = True) -> int:
        """A `sleep` (with jemalloc or not): one thread that allocated at start, then idle."""
        pid = self.spawn(["sleep", "600"], jemalloc).pid
        # asleep: in clock_nanosleep (230) or nanosleep (35), done allocating
        wait_until(lambda: Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("230", "35"),
                   "sleep asleep")
        if jemalloc:
            self.traced.append(pid)
        return pid

    def agent(self, jemalloc: bool = True, **env: str) -> Agent:
        agent = Agent(self.spawn([PYTHON, str(self.script)], jemalloc, **env))
        agent.ready()
        self.traced.append(agent.pid)
        return agent

    def capturer(self, **settings: object) -> Capturer:
        settings.setdefault("cache_dir", self.layouts[
            "no_arena_cache" if settings.get("offsets_files") else "cache"])
        engine = Capturer(CaptureSettings(proc_root=str(self.root), debug_dirs=(),
                                          **settings))  # type: ignore[arg-type]
        patient(engine)
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        for pid in self.traced:
            if not is_dead(pid):
                assert_no_thread_stopped_or_traced(pid)
        for process in self.spawned:
            process.kill()


@pytest.fixture
def host(tmp_path: Path, layouts: dict[str, str]) -> Iterator[Host]:
    host = Host(tmp_path / "proc", layouts)
    try:
        yield host
    finally:
        host.close()


@pytest.fixture
def heard(host: Host) -> Callable[..., Capturer]:
    """A Capturer of the real /proc that hears the kernel's process events, selecting only
    the test's own processes (those linked in `host`)."""
    def make(**settings: object) -> Capturer:
        ours = host.root
        engine = Capturer(CaptureSettings(
            debug_dirs=(), cache_dir=host.layouts["cache"], process_events=True,
            select=lambda p: (ours / str(p.pid)).is_symlink(),
            **settings))  # type: ignore[arg-type]
        host.engines.append(patient(engine))
        assert engine._events is not None, "no process events on this host"
        return engine
    return make


def written_in_a_child(work: Callable[[int], None]) -> bytes:
    """What `work(fd)`, run in a forked child of the test process, wrote to `fd` (for what
    must not change the test process itself: its uid, its namespaces); the child must end
    with status 0 (an exception in it is written to stderr)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read)
            work(write)
            status = 0
        except BaseException as exc:
            os.write(2, repr(exc).encode())
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return data


def sample(snapshot: Snapshot, pid: int) -> ProcessSample:
    [found] = [p for p in snapshot.processes if p.pid == pid]
    return found


def totals(process: ProcessSample) -> tuple[int, int]:
    return process.allocated_bytes, process.deallocated_bytes


def between(host: Host, pid: int, read: Callable[[], ProcessSample],
            **settings: object) -> tuple[ProcessSample, ProcessSample, ProcessSample]:
    """`read()`, between two reads of `pid` by ctprofds that never saw it before (made with
    `settings`): the program's own bytes since its last image began, before and after. An
    idle Python still allocates and frees a buffer around each read of its input: a read
    that comes at such a moment moves within these bounds."""
    low = sample(host.capturer(**settings).capture(), pid)
    value = read()
    high = sample(host.capturer(**settings).capture(), pid)
    return low, value, high


def within(value: ProcessSample, earlier: tuple[int, int], low: ProcessSample,
           high: ProcessSample) -> None:
    """`value`'s totals are `earlier` plus what the image counted between `low` and `high`."""
    assert (earlier[0] + low.allocated_bytes <= value.allocated_bytes
            <= earlier[0] + high.allocated_bytes), (earlier, low, value, high)
    assert (earlier[1] + low.deallocated_bytes <= value.deallocated_bytes
            <= earlier[1] + high.deallocated_bytes), (earlier, low, value, high)


def counts(snapshot: Snapshot) -> tuple:
    """What a snapshot tallied, without the samples' values."""
    return (snapshot.summary, dict(snapshot.failures), snapshot.denied_tgids,
            snapshot.pending, sorted(p.pid for p in snapshot.processes),
            [(f.pid, f.tag) for f in snapshot.failed_pids])
