"""Hostile schedule: does a root `ctprofd run --interval 1` keep its schedule, and read a
root process exactly, while an unprivileged user (uid 65534) keeps handing it binaries
that take as long as the parser allows?

One daemon (fresh cache, `interval` 1 s, `parser.timeout` 5 s and a file cap large enough
to let the attack through), one root alloc_threads fixture, two phases of DURATION s each:

  baseline  nothing else runs.
  attack    every PERIOD s the user copies a stripped jemalloc program to a new name (a new
            file identity) beside a 1 TiB sparse debug file its debuglink names, and starts
            it as uid 65534: each is a parse whose debuglink CRC cannot end before the
            parser's timeout, so the resolver always has work, queued per owner.

Per phase, from scrapes every 0.2 s: snapshots completed against DURATION / interval (the
schedule kept, as a fraction), overruns, the root fixture's series equal to its own mallctl
reports in every scrape, the most processes pending at once, the daemon's RSS (max) and
the cache entries. The headline is the attack phase's schedule fraction, and its ratio to
the baseline's.

Run: .venv/bin/python -m benchmarks.hostile_schedule [--quick] [--duration S] [--period S]
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from support.procs import Fixture  # the package puts tests/ on the path

from .daemon import Daemon, parse_metrics
from .processes import Processes, status_kib, wait_until
from .report import log, machine, parser, write_result
from .simulated_host import fixtures_dir


NOBODY = 65534
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


def truth(fixture: Fixture) -> tuple[float, float]:
    return (float(sum(t["allocated"] for t in fixture.threads)),
            float(sum(t["deallocated"] for t in fixture.threads)))


def observe(daemon: Daemon, fixture: Fixture, seconds: float,
            attack=None) -> dict[str, float]:
    """Scrape every 0.2 s for `seconds` (calling `attack()` when it is due); the phase's
    figures."""
    first = parse_metrics(daemon.scrape())
    started = time.monotonic()
    scrapes = exact = 0
    pending_max = rss_max = 0.0
    series = (f'ctprofd_allocated_bytes_total{{pid="{fixture.pid}"}}',
              f'ctprofd_deallocated_bytes_total{{pid="{fixture.pid}"}}')
    while (elapsed := time.monotonic() - started) < seconds:
        if attack is not None:
            attack(elapsed)
        samples = parse_metrics(daemon.scrape())
        scrapes += 1
        exact += tuple(samples.get(name) for name in series) == truth(fixture)
        pending_max = max(pending_max, samples.get("ctprofd_probe_pending", 0))
        rss_max = max(rss_max, status_kib(daemon.pid) / 1024)
        time.sleep(0.2)
    last = parse_metrics(daemon.scrape())
    elapsed = time.monotonic() - started
    snapshots = last["ctprofd_snapshots_total"] - first["ctprofd_snapshots_total"]
    interval = last["ctprofd_snapshot_interval_seconds"]
    return {"seconds": round(elapsed, 2), "snapshots": snapshots,
            "schedule_kept": round(snapshots / (elapsed / interval), 3),
            "overruns": (last["ctprofd_snapshot_overruns_total"]
                         - first["ctprofd_snapshot_overruns_total"]),
            "scrapes": scrapes, "scrapes_root_exact": exact,
            "pending_max": pending_max, "rss_mib_max": round(rss_max, 1),
            "cache_entries": last.get("ctprofd_offset_cache_entries", 0)}


class Attacker:
    """New binaries as uid 65534, each beside a debug file the parser cannot finish."""

    def __init__(self, procs: Processes, fixtures: Path, directory: Path,
                 period: float) -> None:
        self.procs = procs
        self.variant = fixtures / "static-stripped-debuglink" / "alloc_threads"
        self.debug_name = self.variant.name + ".debug"
        self.directory = directory
        self.period = period
        self.started = 0
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        os.chmod(directory.parent, 0o755)
        os.chmod(directory, 0o755)

    def __call__(self, elapsed: float) -> None:
        while self.started * self.period <= elapsed:
            folder = self.directory / f"b{self.started}"
            folder.mkdir()
            binary = folder / self.variant.name
            shutil.copy2(self.variant, binary)
            with open(folder / self.debug_name, "wb") as f:
                f.truncate(1 << 40)
            for path in (folder, binary, folder / self.debug_name):
                os.chown(path, NOBODY, NOBODY)
            self.procs.own(Fixture(binary, 1, prefix=AS_NOBODY))
            self.started += 1


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, help="seconds per phase (default 60; --quick 4)")
    p.add_argument("--period", type=float, default=0.5,
                   help="seconds between two new hostile binaries (default 0.5)")
    p.add_argument("--interval", type=float, default=1.0, help="the daemon's (default 1)")
    args = p.parse_args()
    duration = args.duration or (4.0 if args.quick else 60.0)
    started, host = time.time(), machine()
    fixtures = fixtures_dir(args)
    work = args.work_dir / "hostile_schedule"
    attack_dir = work / "user"
    results = {}
    with Processes() as procs:
        root = procs.own(Fixture(fixtures / "static" / "alloc_threads", 4))
        extra = ("labels: [pid]\nparser: {timeout: 5, max_file_mib: 1048576}\n"
                 f"selection:\n  include:\n    exe: ['{fixtures}/*', '{attack_dir}/*']\n")
        daemon = procs.own(Daemon(procs, work / "daemon", args.interval, extra))
        daemon.wait_for_snapshots(2)
        wait_until(lambda: f'pid="{root.pid}"' in daemon.scrape().decode(), 60,
                          "the root fixture to be read")
        log(f"baseline: {duration:g} s")
        results["baseline"] = observe(daemon, root, duration)
        log(f"attack: {duration:g} s, a new hostile binary every {args.period:g} s")
        attacker = Attacker(procs, fixtures, attack_dir, args.period)
        results["attack"] = observe(daemon, root, duration, attacker)
        results["attack"]["hostile_binaries"] = attacker.started
        daemon.stop()
    results["schedule_ratio_attack_to_baseline"] = round(
        results["attack"]["schedule_kept"] / results["baseline"]["schedule_kept"], 3)
    results["config"] = {"interval": args.interval, "duration": duration,
                         "period": args.period, "parser_timeout": 5}
    write_result("hostile_schedule", args, started, host, results)


if __name__ == "__main__":
    main()
