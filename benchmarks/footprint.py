"""Daemon footprint: RSS and CPU% of `ctprofd run` at a 15 s interval on a host of 1,000
idle processes and 10 jemalloc fixtures of 32 threads, and the time /metrics takes to
render with 1,000 jemalloc processes, against 5 % of the interval.

  footprint  `ctprofd run` (own config, cache and state dirs, loopback port, log level
             warning) on the host; once its first snapshot is published, DURATION seconds
             of sampling every second: VmRSS of the daemon and of its parse worker, CPU
             from /proc/PID/stat utime+stime deltas (clock ticks). Reported: CPU seconds of
             the start with an empty cache (up to the first snapshot; the parse worker's
             and its children's separately: the daemon does not parse binaries itself),
             CPU% over the steady window (percent of
             one CPU), RSS at the start of the window, at its end and its maximum, and the
             snapshot durations the daemon itself reports. /metrics is scraped once an
             interval, as Prometheus would, for a timeline of RSS against the daemon's
             offset-cache entries, cache lookups (one per attach: processes that started
             meanwhile) and series.
  render     RENDER_PROCS alloc_threads processes with one thread each (each under its
             own name, so one series each with the labels pid, comm, unit) and a
             fresh `ctprofd run --interval 15`; after its first snapshot, SCRAPES
             sequential GETs of /metrics over loopback: wall per scrape, body size, series.

Run: .venv/bin/python -m benchmarks.footprint [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time

from .daemon import Daemon, parse_metrics
from .processes import Processes, count_processes, cpu_seconds, status_kib
from .report import log, machine, parser, write_result
from .simulated_host import IdleHost, add_host_options, fixtures_dir, host_size, spawn_jemalloc
from .stats import distribution, linear_fit

RENDER_SHARE_TARGET = 0.05


def _state(daemon: Daemon) -> dict:
    """What the daemon's /metrics says about its size and work so far."""
    samples = parse_metrics(daemon.scrape())
    return {"snapshots": samples.get("ctprofd_snapshots_total", 0),
            "cache_entries": samples.get("ctprofd_offset_cache_entries", 0),
            "cache_lookups": samples.get("ctprofd_offset_cache_hits_total", 0)
            + samples.get("ctprofd_offset_cache_misses_total", 0),
            "cache_misses": samples.get("ctprofd_offset_cache_misses_total", 0),
            "series": sum(1 for key in samples if key.startswith("ctprofd_allocated_bytes_total{")),
            "tgids_walked": samples.get("ctprofd_probe_tgids_walked"),
            "probed_ok": samples.get("ctprofd_probe_probed_ok"),
            "overruns": samples.get("ctprofd_snapshot_overruns_total"),
            "duration_sum": samples.get("ctprofd_snapshot_duration_seconds_sum", 0),
            "duration_count": samples.get("ctprofd_snapshot_duration_seconds_count", 0)}


def footprint(procs: Processes, args, fixtures, idle: int, jemalloc: int, threads: int,
              interval: float, duration: float) -> dict:
    procs.own(IdleHost(procs, args.work_dir, idle))
    spawn_jemalloc(procs, fixtures, jemalloc, threads, args.work_dir)
    log(f"host of {count_processes()} processes; starting ctprofd run "
        f"--interval {interval:g} with an empty cache")
    started = time.monotonic()
    daemon = Daemon(procs, args.work_dir / "footprint-daemon", interval)
    daemon.wait_for_snapshots(1)
    startup_wall = time.monotonic() - started
    startup_cpu = cpu_seconds(daemon.pid)
    worker = daemon.worker_pid()
    startup_worker_cpu = cpu_seconds(worker, children=True) if worker else 0.0
    first = _state(daemon)
    samples, states = [], [{"t": 0.0, **first}]
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        worker = daemon.worker_pid()
        samples.append({"t": now - t0, "cpu": cpu_seconds(daemon.pid),
                        "rss_kib": status_kib(daemon.pid),
                        "worker_rss_kib": status_kib(worker) if worker else 0,
                        "worker_cpu": cpu_seconds(worker, children=True)
                        if worker else 0.0})
        if now - t0 >= duration:
            break
        if len(samples) % max(int(interval), 1) == 0:  # scraped once an interval, like Prometheus
            states.append({"t": round(now - t0, 1), **_state(daemon)})
        time.sleep(max(0.0, t0 + len(samples) - time.monotonic()))
    final = _state(daemon)
    states.append({"t": round(samples[-1]["t"], 1), **final})
    hwm = status_kib(daemon.pid, "VmHWM")
    daemon.stop()
    window = samples[-1]["t"] - samples[0]["t"]
    cpu = samples[-1]["cpu"] - samples[0]["cpu"]
    rss = [s["rss_kib"] / 1024 for s in samples]
    per_second = [(b["cpu"] - a["cpu"]) / (b["t"] - a["t"]) * 100
                  for a, b in zip(samples, samples[1:])]
    snapshots = final["snapshots"] - first["snapshots"]
    durations = final["duration_count"] - first["duration_count"]
    half = len(samples) // 2
    return {
        "host": {"idle_processes": idle, "jemalloc_fixtures": jemalloc,
                 "threads_per_fixture": threads, "tgids_walked": first["tgids_walked"],
                 "probed_ok": first["probed_ok"]},
        "interval_seconds": interval,
        "startup": {"wall_seconds_to_first_snapshot": round(startup_wall, 3),
                    "cpu_seconds_to_first_snapshot": round(startup_cpu, 3),
                    "parse_worker_cpu_seconds_to_first_snapshot": round(startup_worker_cpu, 3),
                    "binaries_parsed": first["cache_misses"]},
        "window_seconds": round(window, 1),
        "snapshots_in_window": snapshots,
        "cpu_percent_of_one_cpu": round(cpu / window * 100, 3) if window else None,
        "cpu_seconds_per_snapshot": round(cpu / snapshots, 4) if snapshots else None,
        "cpu_percent_per_second": distribution(per_second, 2),
        "snapshot_duration_mean_seconds": round(
            (final["duration_sum"] - first["duration_sum"]) / durations, 4) if durations else None,
        "cache_lookups_in_window": final["cache_lookups"] - first["cache_lookups"],
        "binaries_parsed_in_window": final["cache_misses"] - first["cache_misses"],
        "rss_mib": {"window_start": round(rss[0], 1), "window_end": round(rss[-1], 1),
                    "max": round(max(rss), 1), "vm_hwm": round(hwm / 1024, 1),
                    "slope_mib_per_minute": round(linear_fit(
                        [s["t"] for s in samples], rss)["slope"] * 60, 4)
                    if len(samples) > 2 else None,
                    "second_half_slope_mib_per_minute": round(linear_fit(
                        [s["t"] for s in samples[half:]], rss[half:])["slope"] * 60, 4)
                    if len(samples) - half > 2 else None},
        "parse_worker": {"rss_mib": round(samples[-1]["worker_rss_kib"] / 1024, 1),
                         "cpu_seconds_in_window": round(samples[-1]["worker_cpu"]
                                                        - samples[0]["worker_cpu"], 3)},
        "overruns": final["overruns"],
        "timeline": [{**state, "rss_mib": round(rss[min(int(state["t"]), len(rss) - 1)], 1)}
                     for state in states],
    }


def render(procs: Processes, args, fixtures, count: int, scrapes: int,
           interval: float) -> dict:
    log(f"starting {count} single-thread jemalloc processes")
    spawn_jemalloc(procs, fixtures, count, 1, args.work_dir, name="one")
    daemon = Daemon(procs, args.work_dir / "render-daemon", interval)
    first = daemon.wait_for_snapshots(1, timeout=600)
    log(f"first snapshot: {first.get('ctprofd_probe_jemalloc_detected'):.0f} jemalloc "
        "processes; scraping")
    walls, sizes = [], []
    cpu = cpu_seconds(daemon.pid)
    for _ in range(scrapes):
        started = time.perf_counter()
        body = daemon.scrape()
        walls.append(time.perf_counter() - started)
        sizes.append(len(body))
    cpu = (cpu_seconds(daemon.pid) - cpu) / scrapes
    samples = parse_metrics(body)
    series = sum(1 for key in samples if key.startswith("ctprofd_allocated_bytes_total{"))
    daemon.stop()
    share = statistics.median(walls) / interval
    worst = max(walls) / interval
    return {"jemalloc_processes": count,
            "jemalloc_detected": samples.get("ctprofd_probe_jemalloc_detected"),
            "series": series, "body_bytes": max(sizes), "interval_seconds": interval,
            "scrape_wall_seconds": distribution(walls, 5),
            "daemon_cpu_seconds_per_scrape": round(cpu, 4),
            "share_of_interval_p50": round(share, 5), "share_of_interval_max": round(worst, 5),
            "target_lt_5pct_of_interval": "met" if worst < RENDER_SHARE_TARGET else
            f"NOT met (slowest scrape {worst * 100:.2f} % of the interval)"}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    add_host_options(p)
    p.add_argument("--interval", type=float, help="snapshot interval (default 15; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds of sampling after the first "
                   "snapshot (default 240; --quick 3)")
    p.add_argument("--render-procs", type=int, help="single-thread jemalloc processes for "
                   "the render figure (default 1000; --quick 5)")
    p.add_argument("--scrapes", type=int, help="timed scrapes (default 30; --quick 3)")
    p.add_argument("--skip", choices=("footprint", "render"), action="append", default=[])
    args = p.parse_args(argv)
    q = args.quick
    idle, jemalloc, threads = host_size(args)
    interval = args.interval or (1.0 if q else 15.0)
    duration = args.duration or (3.0 if q else 240.0)
    render_procs = args.render_procs or (5 if q else 1000)
    scrapes = args.scrapes or (3 if q else 30)
    started, host = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir(args)
    results: dict = {}
    if "footprint" not in args.skip:
        with Processes() as procs:
            results["footprint"] = footprint(procs, args, fixtures, idle, jemalloc, threads,
                                             interval, duration)
            log(f"footprint: {results['footprint']}")
    if "render" not in args.skip:
        with Processes() as procs:
            results["render"] = render(procs, args, fixtures, render_procs, scrapes, interval)
            log(f"render: {results['render']}")
    write_result("footprint", args, started, host, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
