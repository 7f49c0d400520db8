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
              1 - ops_B / ops_A, as a distribution, and the ratio of the medians; also
              per CPU second of alloc_loop (wait4 rusage: what the target itself pays per
              operation, free of other jobs taking CPUs away), ctprofd's own CPU time
              during B, and the slowdown that CPU time implies on a saturated machine
              (its share of one CPU over the number of CPUs).
  phases      the same comparison without the variation between alloc_loop processes
              (+-10 % from one 5 s run to the next even on a quiet machine): one
              `alloc_loop LOOP_THREADS` runs throughout and prints its ops per second every
              second; PAIRS pairs of SECONDS-long phases A (no ctprofd) and B (a fresh
              `ctprofd run --interval 1`, counted from its first snapshot on, so it attaches
              to alloc_loop and stops its threads once in each B phase) alternate; the seconds
              in which ctprofd starts or stops count in neither. Figure: 1 - B / A per pair,
              each the mean of the phase's whole seconds.

Run: .venv/bin/python -m benchmarks.target_impact [--quick]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from .daemon import Daemon, parse_metrics
from .processes import Processes, cpu_seconds
from .report import log, machine, parser, write_result
from .simulated_host import IdleHost, fixtures_dir, spawn_jemalloc
from .stats import distribution, percentile

from ctprofd.probe.capture import Capturer, CaptureSettings  # noqa: E402

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
                spawned = None
                try:
                    if load is not None:
                        time.sleep(0.5)  # the spinners own the CPUs
                    spawned = spawn_jemalloc(procs, fixtures, count, threads, args.work_dir,
                                             name="stop")
                    del stops[:]
                    snapshot = capturer.capture(pids=spawned.pids)
                    per_condition[condition].extend(stops)
                    failures[condition] += snapshot.summary.failed
                finally:
                    if spawned is not None:
                        procs.release(spawned)
                    if load is not None:
                        procs.release(load)
            log(f"stops round {round_ + 1}/{rounds}: idle p99 "
                f"{percentile(per_condition['idle'], 99) * 1e3:.3f} ms, loaded p99 "
                f"{percentile(per_condition['loaded'], 99) * 1e3:.3f} ms")
    finally:
        capturer.close()
    results = {}
    for condition, values in per_condition.items():
        micros = [v * 1e6 for v in values]
        p99 = percentile(values, 99)
        results[condition] = {
            "stop_microseconds": distribution(micros, 1),
            "over_2ms": sum(1 for v in values if v > STOP_TARGET_SECONDS),
            "failed_probes": failures[condition],
            "target_p99_le_2ms": "met" if p99 <= STOP_TARGET_SECONDS else
            f"NOT met (p99 {p99 * 1e3:.2f} ms)"}
    return results


def alloc_loop(procs: Processes, binary: Path, threads: int, seconds: float,
               during=None) -> dict:
    """One alloc_loop run: ops (malloc+free pairs) per second of wall time and per second
    of its own CPU time (wait4), and what `during(pid)` said: it is called every 0.25 s
    until it returns true (at most for 90 % of the run)."""
    proc = procs.popen([binary, str(threads), str(seconds)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
    try:
        checked = None
        if during is not None:
            deadline = time.monotonic() + seconds * 0.9
            while not (checked := during(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.25)
        out = proc.stdout.read()  # alloc_loop exits on end of file on stdin: keep it open
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        result = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        procs.release(proc)
    return {"ops_per_second": result["total_ops"] / result["seconds"],
            "ops_per_cpu_second": result["total_ops"] / (usage.ru_utime + usage.ru_stime),
            "cpu_share": (usage.ru_utime + usage.ru_stime) / result["seconds"] / threads,
            "checked": checked}


def throughput(procs: Processes, args, fixtures: Path, pairs: int, seconds: float,
               threads: int) -> dict:
    binary = fixtures / "alloc_loop"
    base = args.work_dir / "target-impact-daemon"
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    daemon_cpu_share, seen = [], []
    for pair in range(pairs):
        runs["A"].append(alloc_loop(procs, binary, threads, seconds))
        # the first start parses the host's binaries; later ones find them in its cache
        daemon = procs.own(Daemon(procs, base, interval=1.0, fresh=pair == 0))
        try:
            daemon.wait_for_snapshots(1)

            def probe(pid: int) -> bool:
                samples = parse_metrics(daemon.scrape())
                return any(f'pid="{pid}"' in key and value > 0 for key, value in samples.items()
                           if key.startswith("ctprofd_threads{"))

            cpu, wall = cpu_seconds(daemon.pid), time.monotonic()
            runs["B"].append(alloc_loop(procs, binary, threads, seconds, during=probe))
            daemon_cpu_share.append((cpu_seconds(daemon.pid) - cpu)
                                    / (time.monotonic() - wall))
        finally:
            daemon.stop()
            procs.release(daemon)
        seen.append(runs["B"][-1]["checked"])
        a, b = runs["A"][-1], runs["B"][-1]
        log(f"pair {pair + 1}/{pairs}: A {a['ops_per_second']:,.0f} ops/s, B "
            f"{b['ops_per_second']:,.0f} ops/s ({(1 - b['ops_per_second'] / a['ops_per_second']) * 100:+.2f} %); "
            f"per CPU second {(1 - b['ops_per_cpu_second'] / a['ops_per_cpu_second']) * 100:+.2f} %; "
            f"ctprofd {daemon_cpu_share[-1] * 100:.2f} % of a CPU; read alloc_loop: {seen[-1]}")
    results: dict = {"alloc_loop_threads": threads, "cpus": os.cpu_count(),
                     "seconds_per_run": seconds, "pairs": pairs, "order": "A B A B ...",
                     "ctprofd_read_alloc_loop_in_every_b_run": all(seen)}
    for key in ("ops_per_second", "ops_per_cpu_second"):
        a = [r[key] for r in runs["A"]]
        b = [r[key] for r in runs["B"]]
        slowdowns = [1 - y / x for x, y in zip(a, b)]
        results[key] = {"without": distribution(a, 0), "with": distribution(b, 0),
                        "slowdown_per_pair": distribution(slowdowns, 5),
                        "slowdown_mean_ci95": mean_ci95(slowdowns),
                        "slowdown_of_medians": round(1 - statistics.median(b)
                                                     / statistics.median(a), 5)}
    results["alloc_loop_cpu_share"] = {
        run: distribution([r["cpu_share"] for r in runs[run]], 4) for run in runs}
    share = statistics.median(daemon_cpu_share)
    results["ctprofd_cpu_share_of_one_cpu_during_b"] = distribution(daemon_cpu_share, 5)
    # On a machine alloc_loop saturates, what ctprofd runs comes out of its CPU time:
    results["slowdown_bound_from_ctprofd_cpu"] = round(share / (os.cpu_count() or 1), 5)
    median = results["ops_per_second"]["slowdown_per_pair"]["p50"]
    results["target_slowdown_lt_1pct"] = (
        "met" if median < SLOWDOWN_TARGET else f"NOT met (median slowdown {median * 100:.2f} %)")
    return results


def phases(procs: Processes, args, fixtures: Path, pairs: int, seconds: float,
           threads: int) -> dict:
    """One alloc_loop for the whole test, printing its ops per second every second;
    `ctprofd run` is started and stopped around it, so that phases without (A) and with
    (B) it alternate over the same process: no process-to-process variation."""
    binary = fixtures / "alloc_loop"
    base = args.work_dir / "target-impact-daemon"
    loop = procs.popen([binary, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lines: list[tuple[float, float]] = []

    def read() -> None:
        for line in loop.stdout:
            lines.append((time.monotonic(), json.loads(line)["ops_per_sec"]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(3)  # its threads started and its heap warmed
    spans: list[tuple[str, float, float, float]] = []  # (phase, start, end, loop CPU)
    daemon_cpu_share, seen = [], []
    try:
        for pair in range(pairs):
            start, cpu = time.monotonic(), cpu_seconds(loop.pid)
            time.sleep(seconds)
            spans.append(("A", start, time.monotonic(), cpu_seconds(loop.pid) - cpu))
            daemon = procs.own(Daemon(procs, base, interval=1.0, fresh=pair == 0))
            try:
                daemon.wait_for_snapshots(1)
                start, cpu = time.monotonic(), cpu_seconds(loop.pid)
                own = cpu_seconds(daemon.pid)
                time.sleep(seconds)
                end = time.monotonic()
                spans.append(("B", start, end, cpu_seconds(loop.pid) - cpu))
                daemon_cpu_share.append((cpu_seconds(daemon.pid) - own) / (end - start))
                samples = parse_metrics(daemon.scrape())
                seen.append(any(f'pid="{loop.pid}"' in key and value > 0
                                for key, value in samples.items()
                                if key.startswith("ctprofd_threads{")))
            finally:
                daemon.stop()
                procs.release(daemon)
            time.sleep(1)  # the second the daemon stopped in belongs to neither phase
    finally:
        procs.release(loop)
    reader.join(5)

    def rate(phase_start: float, phase_end: float) -> float:
        # a line arriving at t counts the second before t: keep whole seconds of the phase
        values = [v for t, v in lines if phase_start + 1.0 <= t <= phase_end]
        return statistics.fmean(values) if values else math.nan

    rates = [(phase, rate(start, end), cpu / (end - start) / threads)
             for phase, start, end, cpu in spans]
    a = [r for phase, r, _ in rates if phase == "A"]
    b = [r for phase, r, _ in rates if phase == "B"]
    slowdowns = [1 - y / x for x, y in zip(a, b)]
    log(f"phases: slowdown per pair {[round(x * 100, 2) for x in slowdowns]} %")
    median = statistics.median(slowdowns)
    share = statistics.median(daemon_cpu_share)
    return {"alloc_loop_threads": threads, "cpus": os.cpu_count(), "seconds_per_phase": seconds,
            "pairs": pairs, "order": "A B A B ... (one alloc_loop process throughout)",
            "ctprofd_read_alloc_loop_in_every_b_phase": all(seen),
            "ops_per_second": {"without": distribution(a, 0), "with": distribution(b, 0),
                               "slowdown_per_pair": distribution(slowdowns, 5),
                               "slowdown_mean_ci95": mean_ci95(slowdowns),
                               "slowdown_of_medians": round(1 - statistics.median(b)
                                                            / statistics.median(a), 5)},
            "alloc_loop_cpu_share": {phase: distribution(
                [c for p, _, c in rates if p == phase], 4) for phase in ("A", "B")},
            "ctprofd_cpu_share_of_one_cpu_during_b": distribution(daemon_cpu_share, 5),
            "slowdown_bound_from_ctprofd_cpu": round(share / (os.cpu_count() or 1), 5),
            "target_slowdown_lt_1pct": "met" if median < SLOWDOWN_TARGET else
            f"NOT met (median slowdown {median * 100:.2f} %)"}


def mean_ci95(values: list[float]) -> list[float] | None:
    """The mean's 95 % confidence interval (Student's t), to show what the noise allows."""
    if len(values) < 2:
        return None
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26,
         15: 2.14, 20: 2.09, 30: 2.05}
    factor = t[max(k for k in t if k <= len(values))]  # n not in the table: the wider one
    half = factor * statistics.stdev(values) / len(values) ** 0.5
    mean = statistics.fmean(values)
    return [round(mean - half, 5), round(mean + half, 5)]


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="stop-time rounds (default 10; --quick 1)")
    p.add_argument("--fixtures-per-round", type=int, help="processes per round and "
                   "condition (default 10; --quick 1)")
    p.add_argument("--threads", type=int, help="threads per process (default 32; --quick 4)")
    p.add_argument("--pairs", type=int, help="A/B pairs (default 20; --quick 1)")
    p.add_argument("--seconds", type=float, help="seconds per alloc_loop run (default 5; "
                   "--quick 1)")
    p.add_argument("--loop-threads", type=int, help="alloc_loop threads (default: one per "
                   "CPU)")
    p.add_argument("--skip", choices=("stops", "phases", "throughput"), action="append",
                   default=[])
    args = p.parse_args(argv)
    q = args.quick
    rounds = args.rounds or (1 if q else 10)
    count = args.fixtures_per_round or (1 if q else 10)
    threads = args.threads or (4 if q else 32)
    pairs = args.pairs or (1 if q else 20)
    seconds = args.seconds or (1.0 if q else 5.0)
    loop_threads = args.loop_threads or os.cpu_count() or 2
    started, host = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir(args)
    results: dict = {}
    with Processes() as procs:
        if "stops" not in args.skip:
            results["thread_stops"] = {"rounds": rounds, "processes_per_round": count,
                                       "threads_per_process": threads,
                                       **stop_times(procs, args, fixtures, rounds, count,
                                                    threads)}
        if "phases" not in args.skip:
            results["phases"] = phases(procs, args, fixtures, pairs, seconds, loop_threads)
        if "throughput" not in args.skip:
            results["throughput"] = throughput(procs, args, fixtures, pairs, seconds,
                                               loop_threads)
    write_result("target_impact", args, started, host, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
