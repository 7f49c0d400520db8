"""The simulated host a benchmark measures against: its size options (`--idle`,
`--jemalloc`, `--threads`), the programs (benchmarks/helpers/*.c compiled on demand, the
jemalloc fixture programs of tests/support built once per source version), idle
bystanders (`IdleHost`, hostsim) and jemalloc-linked processes under distinct names
(`JemallocGroup`). Everything it starts is owned by a `Processes`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

from support.build import build_all, default_jemalloc_dir, jemalloc_dir_problem

from . import REPO
from .processes import Processes, die_with_parent, kill
from .report import log

HELPERS = Path(__file__).resolve().parent / "helpers"


def add_host_options(p: argparse.ArgumentParser, idle: int = 1000) -> None:
    """--idle, --jemalloc, --threads: the simulated host (defaults shrink with --quick)."""
    quick_idle = 20 if idle else 0
    p.add_argument("--idle", type=int,
                   help=f"idle processes (default {idle}; --quick {quick_idle})")
    p.add_argument("--jemalloc", type=int, help="jemalloc fixtures (default 10; --quick 1)")
    p.add_argument("--threads", type=int, help="threads per fixture (default 32; --quick 2)")
    p.set_defaults(host_idle_default=idle)


def host_size(args: argparse.Namespace) -> tuple[int, int, int]:
    """(idle processes, jemalloc fixtures, threads per fixture) from add_host_options."""
    q = args.quick
    default_idle = args.host_idle_default
    idle = args.idle if args.idle is not None else (min(default_idle, 20) if q else default_idle)
    jemalloc = args.jemalloc if args.jemalloc is not None else (1 if q else 10)
    return idle, jemalloc, args.threads or (2 if q else 32)


def helper(name: str, work_dir: Path) -> Path:
    """benchmarks/helpers/NAME.c compiled into the work dir (again when the source changed)."""
    source = HELPERS / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = work_dir / "helpers" / f"{name}-{digest}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        subprocess.run(["gcc", "-O1", "-Wall", "-o", str(tmp), str(source)], check=True)
        tmp.replace(binary)
    return binary


def fixtures_dir(args: argparse.Namespace) -> Path:
    """The fixture programs: --fixtures, else built once per fixture-source version."""
    if args.fixtures is not None:
        return args.fixtures
    jemalloc = default_jemalloc_dir()
    problem = jemalloc_dir_problem(jemalloc)
    if problem:
        raise SystemExit(problem)
    sources = REPO / "tests" / "fixtures"
    digest = hashlib.sha256(b"".join(
        p.read_bytes() for p in sorted(sources.glob("*.c"))) + str(jemalloc).encode()
        + (REPO / "tests" / "support" / "build.py").read_bytes()).hexdigest()[:12]
    root = args.work_dir / f"fixtures-{digest}"
    if not (root / ".complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        log(f"building the fixture programs into {root}")
        build_all(root, jemalloc)
        (root / ".complete").write_text("")
    return root


class IdleHost:
    """N idle processes with distinct names (hostsim idle): a host's bystanders."""

    def __init__(self, procs: Processes, work_dir: Path, count: int, kind: str = "idle",
                 prefix: str | None = None) -> None:
        argv = [helper("hostsim", work_dir), kind, str(count)]
        if prefix:
            argv.append(prefix)
        self.count = count
        self.proc = procs.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if line.strip() != b"READY":
            raise RuntimeError(f"hostsim {kind} {count} failed to start: {line!r}")

    def kill(self) -> None:
        """End of file on its stdin: hostsim kills and reaps its children, then exits, so
        no zombie is left for init to reap while the next measurement walks /proc."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        kill(self.proc)


class JemallocGroup:
    """`count` alloc_threads processes of `threads` threads each in all (main included),
    each under its own name (a symlink: comm comes from the name exec'ed, while
    /proc/PID/exe and so the binary's identity stay the same). They share one stdin pipe
    (its end of file makes every one exit) and one stdout pipe (READY lines are counted
    with poll(), which unlike select() has no limit on fd numbers)."""

    def __init__(self, procs: Processes, fixtures: Path, count: int, threads: int,
                 work_dir: Path, name: str = "jm", timeout: float = 120) -> None:
        links = work_dir / "links"
        links.mkdir(parents=True, exist_ok=True)
        target = fixtures / "static" / "alloc_threads"
        stdin_read, self._stdin = os.pipe()
        stdout_read, stdout_write = os.pipe()
        self.popens: list[subprocess.Popen] = []
        procs.own(self)
        try:
            for i in range(count):
                link = links / f"{name}-{i:04d}"
                if not link.is_symlink() or os.readlink(link) != str(target):
                    link.unlink(missing_ok=True)
                    link.symlink_to(target)
                self.popens.append(subprocess.Popen(
                    [str(link), str(threads - 1)], stdin=stdin_read, stdout=stdout_write,
                    start_new_session=True, preexec_fn=die_with_parent))
        finally:
            os.close(stdin_read)
            os.close(stdout_write)
        try:
            self._wait_ready(stdout_read, count, timeout)
        finally:
            os.close(stdout_read)

    def _wait_ready(self, fd: int, count: int, timeout: float) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline, ready, buffer = time.monotonic() + timeout, 0, b""
        while ready < count:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise RuntimeError(f"only {ready} of {count} alloc_threads said READY")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"alloc_threads exited: {ready} of {count} READY")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            ready += sum(1 for line in lines if line == b"READY")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.popens]

    def tids(self) -> set[int]:
        found = set()
        for pid in self.pids:
            try:
                found.update(int(t) for t in os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
        return found

    def kill(self) -> None:
        for popen in self.popens:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._stdin is not None:
            os.close(self._stdin)
            self._stdin = None
        for popen in self.popens:
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def spawn_jemalloc(procs: Processes, fixtures: Path, count: int, threads: int,
                   work_dir: Path, name: str = "jm") -> JemallocGroup:
    """See JemallocGroup; owned by `procs`."""
    return JemallocGroup(procs, fixtures, count, threads, work_dir, name)
