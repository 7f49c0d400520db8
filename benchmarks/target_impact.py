"""Target impact: how long each target thread is stopped (first sight only), on an idle and
on a loaded machine, and the throughput an allocation-heavy program loses while
`ctprofd run --interval 1` runs beside it.

  stops       ROUNDS rounds; in each, for the idle and the loaded condition (alternating
              which goes first), FIXTURES new alloc_threads processes of THREADS threads are
              captured once (capture(pids=...), so only our fixtures are stopped, not other
              processes that happen to start on the machine) by one Capturer, and every
              stop is recorded through CaptureSettings.on_thread_stop. The figure is from
              just after PTRACE_SEIZE returns to just after PTRACE_DETACH returns: an upper
              bound of the time the thread could not run. Load: one spinning process per
              CPU (hostsim spin).
  throughput  PAIRS A/B pairs run in the order A B A B ...: A is `alloc_loop LOOP_THREADS
              SECONDS` alone, B the same started once a fresh `ctprofd run --interval 1`
              (own config, cache and state dirs, loopback port) has completed its first
              snapshot; ctprofd then sees alloc_loop appear, attaches, stops its threads
              once and reads it every second. The figure is each pair's slowdown
              1 - ops_B / ops_A, as a distribution, and the ratio of the medians.

Run: .venv/bin/python -m benchmarks.target_impact [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import common
from .common import Daemon, IdleHost, Processes, distribution, log, spawn_jemalloc

from ctprofd.capture import Capturer, CaptureSettings  # noqa: E402

STOP_TARGET_SECONDS = 0.002
SLOWDOWN_TARGET = 0.01


def stop_times(procs: Processes, args, fixtures: Path, rounds: int, count: int,
               threads: int) -> dict:
    stops: list[float] = []
    capturer = Capturer(CaptureSettings(cache_dir=None, state_dir=None,
                                        on_thread_stop=stops.append))
    per_condition: dict[str, list[float]] = {"idle": [], "loaded": []}
    failures: dict[str, int] = {"idle": 0, "loaded": 0}
    try:
        for round_ in range(rounds):
            order = ("idle", "loaded") if round_ % 2 == 0 else ("loaded", "idle")
            for condition in order:
                load = (procs.own(IdleHost(procs, args.work_dir, os.cpu_count() or 2, "spin"))
                        if condition == "loaded" else None)
                spawned = []
                try:
                    if load is not None:
                        time.sleep(0.5)  # the spinners own the CPUs
                    spawned = spawn_jemalloc(procs, fixtures, count, threads, args.work_dir,
                                             name="stop")
                    del stops[:]
                    snapshot = capturer.capture(pids=[f.pid for f in spawned])
                    per_condition[condition].extend(stops)
                    failures[condition] += snapshot.summary.failed
                finally:
                    for fixture in spawned:
                        procs.release(fixture)
                    if load is not None:
                        procs.release(load)
            log(f"stops round {round_ + 1}/{rounds}: idle p99 "
                f"{common.percentile(per_condition['idle'], 99) * 1e3:.3f} ms, loaded p99 "
                f"{common.percentile(per_condition['loaded'], 99) * 1e3:.3f} ms")
    finally:
        capturer.close()
    results = {}
    for condition, values in per_condition.items():
        micros = [v * 1e6 for v in values]
        p99 = common.percentile(values, 99)
        results[condition] = {
            "stop_microseconds": distribution(micros, 1),
            "over_2ms": sum(1 for v in values if v > STOP_TARGET_SECONDS),
            "failed_probes": failures[condition],
            "target_p99_le_2ms": "met" if p99 <= STOP_TARGET_SECONDS else
            f"NOT met (p99 {p99 * 1e3:.2f} ms)"}
    return results


def alloc_loop(procs: Processes, binary: Path, threads: int, seconds: float,
               during=None) -> float:
    """ops (malloc+free pairs) per second of one alloc_loop run, and what `during(pid)`
    said: it is called every 0.25 s until it returns true (at most for 90 % of the run)."""
    proc = procs.popen([binary, str(threads), str(seconds)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    try:
        checked = None
        if during is not None:  # until it says yes, for at most 90 % of the run
            deadline = time.monotonic() + seconds * 0.9
            while not (checked := during(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.25)
        out = proc.stdout.read()  # alloc_loop exits on end of file on stdin: keep it open
        proc.wait(timeout=60)
        result = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        procs.release(proc)
    return result["total_ops"] / result["seconds"], checked


def throughput(procs: Processes, args, fixtures: Path, pairs: int, seconds: float,
               threads: int) -> dict:
    binary = fixtures / "alloc_loop"
    base = args.work_dir / "target-impact-daemon"
    a_runs, b_runs, slowdowns, seen = [], [], [], []
    for pair in range(pairs):
        a, _ = alloc_loop(procs, binary, threads, seconds)
        daemon = procs.own(Daemon(procs, base, interval=1.0))
        try:
            daemon.wait_for_snapshots(1)

            def probe(pid: int) -> bool:
                samples = common.parse_metrics(daemon.scrape())
                return any(f'pid="{pid}"' in key and value > 0 for key, value in samples.items()
                           if key.startswith("ctprofd_threads{"))

            b, read_it = alloc_loop(procs, binary, threads, seconds, during=probe)
            snapshots = common.parse_metrics(daemon.scrape()).get("ctprofd_snapshots_total", 0)
        finally:
            daemon.stop()
            procs.release(daemon)
        a_runs.append(a)
        b_runs.append(b)
        slowdowns.append(1 - b / a)
        seen.append(read_it)
        log(f"pair {pair + 1}/{pairs}: A {a:,.0f} ops/s, B {b:,.0f} ops/s, slowdown "
            f"{slowdowns[-1] * 100:+.2f} % (ctprofd read alloc_loop: {read_it}, "
            f"{snapshots:.0f} snapshots)")
    ratio = 1 - statistics.median(b_runs) / statistics.median(a_runs)
    return {"alloc_loop_threads": threads, "seconds_per_run": seconds, "pairs": pairs,
            "order": "A B A B ...",
            "ops_per_second_without": distribution(a_runs, 0),
            "ops_per_second_with": distribution(b_runs, 0),
            "slowdown_per_pair": distribution(slowdowns, 5),
            "slowdown_of_medians": round(ratio, 5),
            "ctprofd_read_alloc_loop_in_every_b_run": all(seen),
            "target_slowdown_lt_1pct": "met" if statistics.median(slowdowns) < SLOWDOWN_TARGET
            else f"NOT met (median slowdown {statistics.median(slowdowns) * 100:.2f} %)"}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="stop-time rounds (default 10; --quick 1)")
    p.add_argument("--fixtures-per-round", type=int, help="processes per round and "
                   "condition (default 10; --quick 1)")
    p.add_argument("--threads", type=int, help="threads per process (default 32; --quick 4)")
    p.add_argument("--pairs", type=int, help="A/B pairs (default 10; --quick 1)")
    p.add_argument("--seconds", type=float, help="seconds per alloc_loop run (default 10; "
                   "--quick 1)")
    p.add_argument("--loop-threads", type=int, help="alloc_loop threads (default: one per "
                   "CPU)")
    p.add_argument("--skip", choices=("stops", "throughput"), action="append", default=[])
    args = p.parse_args(argv)
    q = args.quick
    rounds = args.rounds or (1 if q else 10)
    count = args.fixtures_per_round or (1 if q else 10)
    threads = args.threads or (4 if q else 32)
    pairs = args.pairs or (1 if q else 10)
    seconds = args.seconds or (1.0 if q else 10.0)
    loop_threads = args.loop_threads or os.cpu_count() or 2
    started, host = time.time(), common.machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = common.fixtures_dir(args)
    results: dict = {}
    with Processes() as procs:
        if "stops" not in args.skip:
            results["thread_stops"] = {"rounds": rounds, "processes_per_round": count,
                                       "threads_per_process": threads,
                                       **stop_times(procs, args, fixtures, rounds, count,
                                                    threads)}
        if "throughput" not in args.skip:
            results["throughput"] = throughput(procs, args, fixtures, pairs, seconds,
                                               loop_threads)
    common.write_result("target_impact", args, started, host, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
