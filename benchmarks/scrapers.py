"""Concurrent scrapers: SCRAPERS clients GET /metrics of `ctprofd run` in a loop over
loopback for DURATION seconds. Every response must be complete and consistent, the
snapshots must keep their schedule, and the daemon's RSS must stay flat.

Host: JEMALLOC alloc_threads fixtures of THREADS threads (and IDLE idle processes), and
`ctprofd run --interval INTERVAL` (own config, cache and state dirs, loopback port).

Checks of every response:
  complete    status 200, body length == Content-Length, ends with a newline, has the
              last family the collector writes (ctprofd_build_info); every 25th body of
              each client is also parsed in full by prometheus_client's text parser
  consistent  within one body, ctprofd_snapshot_duration_seconds_count equals
              ctprofd_snapshots_total (both are updated by the same published state); across
              bodies, a given ctprofd_snapshots_total always comes with the same
              ctprofd_last_snapshot_timestamp_seconds, tgids walked and threads probed (a
              body never mixes two snapshots)
Schedule: the timestamps of consecutive snapshots are INTERVAL apart (distribution of the
differences), ctprofd_snapshot_overruns_total does not grow during the run (the cold
first snapshot may overrun a short interval: counted separately), and the number of snapshots in the
run is the run's length over the interval. RSS: VmRSS of the daemon every second.

Run: .venv/bin/python -m benchmarks.scrapers [--quick]
"""

from __future__ import annotations

import http.client
import re
import sys
import threading
import time
from collections import Counter, defaultdict

from prometheus_client.parser import text_string_to_metric_families

from .daemon import Daemon, parse_metrics
from .processes import Processes, cpu_seconds, status_kib
from .report import log, machine, parser, write_result
from .simulated_host import IdleHost, add_host_options, fixtures_dir, host_size, spawn_jemalloc
from .stats import distribution, linear_fit

FIELDS = {
    "snapshots": "ctprofd_snapshots_total",
    "durations": "ctprofd_snapshot_duration_seconds_count",
    "timestamp": "ctprofd_last_snapshot_timestamp_seconds",
    "walked": "ctprofd_probe_tgids_walked",
    "probed": "ctprofd_probe_probed_ok",
    "overruns": "ctprofd_snapshot_overruns_total",
}
_LINE = {key: re.compile(rb"^" + name.encode() + rb" (\S+)$", re.M) for key, name in FIELDS.items()}
FULL_PARSE_EVERY = 25


class Scraper(threading.Thread):
    def __init__(self, port: int, stop: threading.Event, results: Results) -> None:
        super().__init__(daemon=True)
        self.port, self.stop, self.results = port, stop, results

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            started = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                body = response.read()
                length = response.getheader("Content-Length")
                status = response.status
                conn.close()
            except (OSError, http.client.HTTPException) as exc:
                self.results.error(f"{type(exc).__name__}: {exc}")
                continue
            latency = time.perf_counter() - started
            self.results.check(status, length, body, latency, n % FULL_PARSE_EVERY == 0)


class Results:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses = 0
        self.errors: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.latencies: list[float] = []
        self.snapshots: dict[int, set[tuple]] = defaultdict(set)
        self.full_parses = 0

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what[:120]] += 1

    def problem(self, what: str, detail: str) -> None:
        with self.lock:
            self.problems[what] += 1
            self.examples.setdefault(what, detail[:300])

    def check(self, status: int, length: str | None, body: bytes, latency: float,
              full: bool) -> None:
        if status != 200:
            self.problem("status", str(status))
        if length is None or int(length) != len(body):
            self.problem("content_length", f"{length} != {len(body)}")
        if not body.endswith(b"\n") or b"\nctprofd_build_info{" not in body:
            self.problem("incomplete", body[-200:].decode(errors="replace"))
        values = {}
        for key, pattern in _LINE.items():
            match = pattern.search(body)
            if match is None:
                self.problem(f"missing_{key}", body[:200].decode(errors="replace"))
                break
            values[key] = float(match.group(1))
        else:
            if values["durations"] != values["snapshots"]:
                self.problem("duration_count_ne_snapshots", str(values))
        if full:
            try:
                families = list(text_string_to_metric_families(body.decode()))
                if not families:
                    self.problem("unparseable", "no families")
            except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
                self.problem("unparseable", f"{type(exc).__name__}: {exc}")
        with self.lock:
            self.responses += 1
            self.latencies.append(latency)
            self.full_parses += full
            if len(values) == len(FIELDS):
                self.snapshots[int(values["snapshots"])].add(
                    (values["timestamp"], values["walked"], values["probed"]))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--scrapers", type=int, help="concurrent clients (default 50; --quick 5)")
    p.add_argument("--duration", type=float, help="seconds of scraping (default 60; "
                   "--quick 3)")
    p.add_argument("--interval", type=float, default=1.0, help="snapshot interval "
                   "(default 1)")
    add_host_options(p, idle=0)
    args = p.parse_args(argv)
    q = args.quick
    scrapers = args.scrapers or (5 if q else 50)
    duration = args.duration or (3.0 if q else 60.0)
    idle, jemalloc, threads = host_size(args)
    started, host = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir(args)
    results = Results()
    rss: list[tuple[float, float]] = []
    with Processes() as procs:
        if idle:
            procs.own(IdleHost(procs, args.work_dir, idle))
        spawn_jemalloc(procs, fixtures, jemalloc, threads, args.work_dir)
        daemon = procs.own(Daemon(procs, args.work_dir / "scrapers-daemon", args.interval))
        first = daemon.wait_for_snapshots(2)
        cpu = cpu_seconds(daemon.pid)
        log(f"{scrapers} scrapers for {duration:g} s")
        stop = threading.Event()
        clients = [Scraper(daemon.port, stop, results) for _ in range(scrapers)]
        t0 = time.monotonic()
        for client in clients:
            client.start()
        while (elapsed := time.monotonic() - t0) < duration:
            rss.append((elapsed, status_kib(daemon.pid) / 1024))
            time.sleep(max(0.0, t0 + len(rss) - time.monotonic()))
        stop.set()
        for client in clients:
            client.join(60)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(daemon.pid) - cpu
        final = parse_metrics(daemon.scrape())
        rss.append((time.monotonic() - t0, status_kib(daemon.pid) / 1024))
        status = daemon.stop()
    inconsistent = {n: sorted(v) for n, v in results.snapshots.items() if len(v) > 1}
    seen = sorted(results.snapshots)
    stamps = [min(results.snapshots[n])[0] for n in seen]
    gaps = [(b - a) / (nb - na) for (na, a), (nb, b) in zip(zip(seen, stamps),
                                                             zip(seen[1:], stamps[1:]))]
    snapshots_during = final[FIELDS["snapshots"]] - first[FIELDS["snapshots"]]
    rss_values = [r for _, r in rss]
    fit = linear_fit([t for t, _ in rss], rss_values) if len(rss) > 2 else {"slope": 0.0}
    out = {
        "scrapers": scrapers, "duration_seconds": round(elapsed, 2),
        "interval_seconds": args.interval,
        "host": {"jemalloc_fixtures": jemalloc, "threads_per_fixture": threads,
                 "idle_processes": idle,
                 "tgids_walked": final.get(FIELDS["walked"]),
                 "probed_ok": final.get(FIELDS["probed"])},
        "responses": results.responses,
        "responses_per_second": round(results.responses / elapsed, 1),
        "errors": dict(results.errors),
        "problems": dict(results.problems),
        "problem_examples": results.examples,
        "bodies_fully_parsed": results.full_parses,
        "latency_seconds": distribution(results.latencies, 4),
        "distinct_snapshots_seen": len(seen),
        "snapshots_with_inconsistent_bodies": inconsistent,
        "snapshots_during_run": snapshots_during,
        "snapshots_expected": round(elapsed / args.interval, 1),
        "overruns_before_run": first.get(FIELDS["overruns"]),
        "overruns_during_run": final.get(FIELDS["overruns"], 0) - first.get(FIELDS["overruns"], 0),
        "interval_between_snapshots_seconds": distribution(gaps, 4),
        "daemon_cpu_percent_of_one_cpu": round(cpu / elapsed * 100, 1),
        "rss_mib": {"start": round(rss_values[0], 1), "end": round(rss_values[-1], 1),
                    "max": round(max(rss_values), 1),
                    "slope_mib_per_minute": round(fit["slope"] * 60, 3)},
        "daemon_exit_status": status,
    }
    out["verdict"] = {
        "every_response_complete_and_consistent": not results.errors and not results.problems
        and not inconsistent,
        "schedule_kept": out["overruns_during_run"] == 0 and abs(
            snapshots_during - elapsed / args.interval) <= 1.5,
        "rss_flat": out["rss_mib"]["max"] - out["rss_mib"]["start"] <= max(
            2.0, 0.05 * out["rss_mib"]["start"]),
    }
    log(f"{out['verdict']}; {results.responses} responses, {dict(results.problems)}")
    write_result("scrapers", args, started, host, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
