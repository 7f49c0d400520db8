"""Combined attack: do issue 22's hostile targets, alone and all together, leave a root
`ctprofd run --interval 1` on schedule, within its memory, answering scrapes and reading
other processes exactly?

One daemon (fresh cache, default selection: it reads every process on the host), run in a
memory cgroup limited to 640 MiB (the DaemonSet's limit), beside two alloc_threads
fixtures that must be read to the byte: one of root, one of uid 65534 (another user's
service). Then phases of DURATION s each, every attacker running as uid 65534 (setpriv):

  baseline  nothing else runs.
  arena     two `poker` jemalloc programs rewrite their own arena statistics
            (tests/support/poker.py): a ring of 65,535 thread caches, and 64-way sharded
            bins in 1,024 overlapping arenas.
  vfork     a hostile_threads program with VFORKS workers each waiting on a vfork child that
            never execs: no PTRACE_INTERRUPT can stop them.
  mappings  MAPPERS processes, each mapping the same MAPPINGS distinct tiny ELF files
            executable (more than the layout cache holds).
  unread    64 loopback addresses x 64 connections, each sending a whole request and never
            reading the answer (tests/support/request_flood.py, issue 22's first HTTP
            attack).
  accept    a client asking /metrics as fast as it can, with an unparseable `Accept` header
            (not one of issue 22's attacks: a client that saturates a CPU of its own).
  all       issue 22's attacks above at once: arena, vfork, mappings, unread.
  all+accept  those and the `Accept` flood.

Per phase, from scrapes every 0.2 s: snapshots completed against DURATION / interval (the
schedule kept, a fraction), scrapes answered within 1 s (a fraction), scrapes in which both
fixtures' series equal their own mallctl counts (a fraction), and the daemon's largest RSS.
At the end: the cgroup's peak memory and its OOM kills (the daemon must have none). The
ratios to the baseline phase are the headline.

Run: .venv/bin/python -m benchmarks.combined_attack [--quick] [--duration S]
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from support.mapper import mapper_argv, write_tiny_elf_files
from support.poker import Poker, long_cache_ring, sharded_bins_in_1024_arenas
from support.procs import Fixture, Spawned

from . import REPO
from .daemon import Daemon, parse_metrics
from .scrape_cost import FLOOD
from .processes import Processes, status_kib, wait_until
from .report import log, machine, parser, write_result
from .simulated_host import fixtures_dir

NOBODY = 65534
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
MEMORY_LIMIT = 640 << 20  # the DaemonSet's limit (packaging/kubernetes)
SCRAPE_ON_TIME = 1.0  # seconds: a scrape answered later than this is counted late
BAD_ACCEPT = "application/openmetrics-text; version=abc"

class MemoryCgroup:
    """A memory cgroup (v2 if mounted, else v1) limited to `limit` bytes, for the daemon."""

    def __init__(self, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        root = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory")
        self.path = root / f"ctprofd-combined-attack-{os.getpid()}"
        self.v2 = v2
        self.path.mkdir()
        (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))

    def wrap(self) -> list[str]:
        """A command prefix that enters the cgroup, then execs the command (same pid)."""
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path)]

    def peak_mib(self) -> float:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return round(int((self.path / name).read_text()) / (1 << 20), 1)

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines()
                     if line.startswith("oom_kill ")), 0)

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            log(f"cgroup {self.path} left behind: {exc.strerror}")


def truth(fixture: Fixture) -> tuple[float, float]:
    return (float(sum(t["allocated"] for t in fixture.threads)),
            float(sum(t["deallocated"] for t in fixture.threads)))


def series(fixture: Fixture) -> tuple[str, str]:
    return (f'ctprofd_allocated_bytes_total{{pid="{fixture.pid}"}}',
            f'ctprofd_deallocated_bytes_total{{pid="{fixture.pid}"}}')


def as_nobody(path: Path) -> Path:
    os.chown(path, NOBODY, NOBODY)
    return path


class Attacks:
    """Starts attacks as uid 65534; `stop()` ends them all."""

    def __init__(self, procs: Processes, fixtures: Path, directory: Path, args) -> None:
        self.procs, self.fixtures, self.directory, self.args = procs, fixtures, directory, args
        self._owned: list = []
        self._flooding = threading.Event()
        self._flood: threading.Thread | None = None
        self.accept_requests = 0

    def _own(self, thing):
        self._owned.append(self.procs.own(thing))
        return thing

    def arena(self, daemon: Daemon) -> None:
        poker_bin = self.fixtures / "poker"
        exported = subprocess.run([sys.executable, "-m", "ctprofd", "offsets", "--json",
                                   str(poker_bin), "--cache-dir", ""], cwd=REPO,
                                  capture_output=True, text=True, timeout=300, check=True)
        layout = json.loads(exported.stdout)
        for attack in (long_cache_ring, sharded_bins_in_1024_arenas):
            process = self._own(Spawned([poker_bin], prefix=AS_NOBODY))
            process.wait_for("READY")
            attack(Poker(process, layout))

    def vfork(self, daemon: Daemon) -> None:
        fixture = self._own(Fixture(self.fixtures / "hostile_threads", self.args.vforks,
                                         prefix=AS_NOBODY))
        for worker in range(self.args.vforks):
            fixture.send(f"vfork {worker} 3600000")
            assert fixture.readline().split()[0] == "VFORKING"

    def mappings(self, daemon: Daemon) -> None:
        folder = self.directory / "mappings"
        if not folder.exists():
            folder.mkdir()
            write_tiny_elf_files(folder, self.args.mappings, owner=NOBODY)
            as_nobody(folder)
        for _ in range(self.args.mappers):
            mapper = self._own(Spawned(mapper_argv(folder, self.args.mappings),
                                       prefix=AS_NOBODY))
            mapper.wait_for("READY", timeout=300)

    def unread(self, daemon: Daemon) -> None:
        flood = self._own(Spawned([sys.executable, FLOOD, daemon.port, "unread", 64, 64],
                                  prefix=AS_NOBODY))
        flood.wait_for("READY", timeout=120)

    def accept(self, daemon: Daemon) -> None:
        self.accept_requests = 0
        self._flood = threading.Thread(target=self._ask_with_bad_accept, args=(daemon.port,),
                                       name="accept-flood", daemon=True)
        self._flood.start()

    def _ask_with_bad_accept(self, port: int) -> None:
        while not self._flooding.is_set():
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/metrics", headers={"Accept": BAD_ACCEPT})
                connection.getresponse().read()
                connection.close()
                self.accept_requests += 1
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        """End every attack started."""
        if self._flood is not None:
            self._flooding.set()
            self._flood.join()
            self._flood, self._flooding = None, threading.Event()
        for thing in self._owned:
            self.procs.release(thing)
        self._owned.clear()


def observe(daemon: Daemon, fixtures: list[Fixture], seconds: float) -> dict[str, float]:
    """Scrape every 0.2 s for `seconds`: the phase's figures."""
    first = parse_metrics(daemon.scrape())
    started = time.monotonic()
    scrapes = on_time = exact = 0
    rss_max = 0.0
    while time.monotonic() - started < seconds:
        asked = time.monotonic()
        samples = parse_metrics(daemon.scrape())
        on_time += time.monotonic() - asked <= SCRAPE_ON_TIME
        scrapes += 1
        exact += all(tuple(samples.get(name) for name in series(f)) == truth(f)
                     for f in fixtures)
        rss_max = max(rss_max, status_kib(daemon.pid) / 1024)
        time.sleep(0.2)
    last = parse_metrics(daemon.scrape())
    elapsed = time.monotonic() - started
    snapshots = last["ctprofd_snapshots_total"] - first["ctprofd_snapshots_total"]
    took = (last["ctprofd_snapshot_duration_seconds_sum"]
            - first["ctprofd_snapshot_duration_seconds_sum"])
    return {"seconds": round(elapsed, 2), "snapshots": snapshots,
            "schedule_kept": round(snapshots / (elapsed / last["ctprofd_snapshot_interval_seconds"]), 3),
            "snapshot_seconds_mean": round(took / snapshots, 3) if snapshots else None,
            "scrapes": scrapes, "scrapes_on_time": round(on_time / scrapes, 3),
            "scrapes_exact": round(exact / scrapes, 3), "rss_mib_max": round(rss_max, 1),
            "failed": last.get("ctprofd_probe_failed", 0)}


ISSUE_ATTACKS = ("arena", "vfork", "mappings", "unread")  # issue 22's
ATTACKS = (*ISSUE_ATTACKS, "accept")
PHASES = (*ATTACKS, "all", "all+accept")


def run_phases(daemon: Daemon, fixtures: list[Fixture], attacks: Attacks,
               duration: float, phases: tuple[str, ...] = PHASES) -> dict[str, dict]:
    """The baseline, then each attack alone (its processes killed after its phase), then
    all together (of `phases`, in that order)."""
    results = {"baseline": observe(daemon, fixtures, duration)}
    for name in (phase for phase in PHASES if phase in phases):
        log(f"{name}: {duration:g} s")
        together = {"all": ISSUE_ATTACKS, "all+accept": ATTACKS}
        for attack in together.get(name, (name,)):
            getattr(attacks, attack)(daemon)
        results[name] = observe(daemon, fixtures, duration)
        results[name]["accept_requests"] = attacks.accept_requests
        attacks.stop()
    return results


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, help="seconds per phase (default 30; --quick 3)")
    p.add_argument("--vforks", type=int, help="workers stuck in vfork (default 40; --quick 4)")
    p.add_argument("--mappings", type=int,
                   help="tiny ELF files each mapper maps (default 20000; --quick 200)")
    p.add_argument("--mappers", type=int, help="mapping processes (default 8; --quick 2)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"phases after the baseline, comma-separated (default {','.join(PHASES)})")
    args = p.parse_args()
    phases = tuple(args.phases.split(","))
    if not set(phases) <= set(PHASES):
        p.error(f"--phases: unknown phase in {args.phases!r} (known: {', '.join(PHASES)})")
    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 30.0)
    args.vforks = args.vforks or (4 if quick else 40)
    args.mappings = args.mappings or (200 if quick else 20000)
    args.mappers = args.mappers or (2 if quick else 8)
    started, host = time.time(), machine()
    fixtures = fixtures_dir(args)
    work = args.work_dir / "combined_attack"
    cgroup = MemoryCgroup(MEMORY_LIMIT)
    scratch = tempfile.mkdtemp(prefix="ctprofd-combined-attack-")  # where nobody can reach
    os.chmod(scratch, 0o755)
    try:
        with Processes() as procs:
            targets = [procs.own(Fixture(fixtures / "static" / "alloc_threads", 4)),
                       procs.own(Fixture(fixtures / "static" / "alloc_threads", 4,
                                         prefix=AS_NOBODY))]
            daemon = procs.own(Daemon(procs, work / "daemon", 1.0, "labels: [pid]\n",
                                      wrap=cgroup.wrap()))
            daemon.wait_for_snapshots(2)
            wait_until(lambda: all(f'pid="{t.pid}"' in daemon.scrape().decode()
                                   for t in targets), 300, "both fixtures to be read")
            attacks = Attacks(procs, fixtures, Path(scratch), args)
            results = run_phases(daemon, targets, attacks, args.duration, phases)
            daemon.stop()
        results["cgroup"] = {"limit_mib": MEMORY_LIMIT >> 20, "peak_mib": cgroup.peak_mib(),
                             "oom_kills": cgroup.oom_kills()}
    finally:
        cgroup.remove()
        shutil.rmtree(scratch, ignore_errors=True)
    base = results["baseline"]
    results["ratios_to_baseline"] = {
        name: {key: round(results[name][key] / base[key], 3) if base[key] else None
               for key in ("schedule_kept", "scrapes_on_time", "scrapes_exact")}
        for name in PHASES if name in results}
    results["config"] = {"interval": 1.0, "duration": args.duration, "vforks": args.vforks,
                         "phases": list(phases),
                         "mappings": args.mappings, "mappers": args.mappers}
    write_result("combined_attack", args, started, host, results)


if __name__ == "__main__":
    main()
