"""What every benchmark shares: arguments, result files, building the programs, the
simulated host (idle processes, jemalloc fixtures, CPU spinners), `ctprofd run` as a
subprocess, /proc accounting and statistics.

Cleanup: everything a benchmark starts goes through `Processes`, which SIGKILLs it on
the way out (normal end, exception, Ctrl-C, SIGTERM, SIGHUP). Every child also gets
PR_SET_PDEATHSIG(SIGKILL), and hostsim passes it on to its own children, so even a
SIGKILLed benchmark leaves nothing behind.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK_DIR = Path(os.environ.get("CTPROFD_BENCH_DIR", "/var/tmp/ctprofd-bench"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

if str(REPO / "tests") not in sys.path:  # tests/support: fixture builds and handles
    sys.path.insert(0, str(REPO / "tests"))

from support.build import build_all, default_jemalloc_dir, jemalloc_dir_problem  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# --- arguments and results ------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny scale and short runs: a smoke test, not a measurement")
    p.add_argument("--out", metavar="PATH", type=Path,
                   help="result JSON (default benchmarks/results/NAME.json, or "
                        "NAME-quick.json with --quick)")
    p.add_argument("--work-dir", metavar="DIR", type=Path, default=DEFAULT_WORK_DIR,
                   help=f"built programs and scratch files (default {DEFAULT_WORK_DIR}, "
                        "or $CTPROFD_BENCH_DIR)")
    p.add_argument("--fixtures", metavar="DIR", type=Path,
                   help="an existing `tests/support/build.py` output dir to use instead "
                        "of building one")
    return p


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


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        os_name = ""
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "os": os_name, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(), "processes_at_start": count_processes()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "ctprofd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (ctprofd/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def write_result(name: str, args: argparse.Namespace, started: float,
                 host: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write the result JSON (`host`: machine() taken at the start); returns its path."""
    path = args.out or RESULTS / (f"{name}-quick.json" if args.quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "commit": git_commit(),
        "machine": host,
        "results": results,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    print(f"results written to {path}", file=sys.stderr)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON: {value!r}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics -------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float], digits: int = 6) -> dict[str, float]:
    """n, min, p10, p50, p90, p99, max, mean of the values."""
    if not values:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {"n": len(values), "min": r(min(values)), "p10": r(percentile(values, 10)),
            "p50": r(percentile(values, 50)), "p90": r(percentile(values, 90)),
            "p99": r(percentile(values, 99)), "max": r(max(values)),
            "mean": r(statistics.fmean(values))}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares y = intercept + slope * x, its R², and the largest relative residual."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else math.nan
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    r2 = 1 - sum(e * e for e in residuals) / ss_tot if ss_tot else math.nan
    worst = max((abs(e) / y for e, y in zip(residuals, ys) if y), default=math.nan)
    return {"points": n, "slope": slope, "intercept": intercept, "r2": round(r2, 5),
            "max_relative_residual": round(worst, 4)}


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


# --- processes --------------------------------------------------------------------------

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
        kw.setdefault("preexec_fn", _die_with_parent)
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


# --- programs -----------------------------------------------------------------------------

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
                    start_new_session=True, preexec_fn=_die_with_parent))
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


# --- ctprofd run ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`python -m ctprofd run` on a loopback port with its own config, cache and state
    (emptied first unless `fresh` is false)."""

    def __init__(self, procs: Processes, directory: Path, interval: float,
                 extra_config: str = "", log_level: str = "warning", fresh: bool = True) -> None:
        if fresh:  # no layout cache, no saved state: a first start
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        config = directory / "ctprofd.yaml"
        config.write_text(f'listen: "127.0.0.1:{self.port}"\ninterval: {interval}\n'
                          f"cache_dir: {directory / 'cache'}\nstate_dir: {directory / 'state'}\n"
                          f"log_level: {log_level}\n{extra_config}")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                            "JOURNAL_STREAM")}
        self.log_path = directory / "ctprofd.log"
        self._log = open(self.log_path, "ab")
        self.proc = procs.popen([sys.executable, "-m", "ctprofd", "run", "--config", config],
                                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                cwd=REPO, env=env)
        self.pid = self.proc.pid

    def scrape(self, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url, timeout=timeout) as response:
            return response.read()

    def wait_for_snapshots(self, count: int = 1, timeout: float = 300) -> dict[str, float]:
        """Poll /metrics until `ctprofd_snapshots_total` >= count; the parsed samples."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctprofd run exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                samples = parse_metrics(self.scrape())
                if samples.get("ctprofd_snapshots_total", 0) >= count:
                    return samples
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ctprofd made no {count} snapshots in {timeout} s")
            time.sleep(0.1)

    def worker_pid(self) -> int | None:
        """The sandboxed parser's zygote, if it runs."""
        for child in children_of(self.pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if b"parse_worker" in f.read():
                        return child
            except OSError:
                pass
        return None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill(self.proc)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        kill(self.proc)
        self._log.close()


_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)", re.M)


def parse_metrics(body: bytes) -> dict[str, float]:
    """Prometheus text format: {'name{labels}': value} for every sample line."""
    return {m.group(1).decode(): float(m.group(2)) for m in _SAMPLE.finditer(body)}


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(step)


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
