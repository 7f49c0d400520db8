"""Scale: how a snapshot's cost grows with the processes on the host (~100 .. 20,000) and
with the threads of one process (1 .. 2,000), least-squares lines through both, and whether
a steady-state snapshot of 20,000 processes fits in 20 % of a 15 s interval (3 s).

  processes  JEMALLOC alloc_threads fixtures of THREADS threads beside the host's own
             processes, then idle processes (hostsim) added until each --sweep-idle count has
             been added in all (they stay: each point adds to the last), so that the host
             has ~100 .. ~20,000 processes. At each point, after two snapshots that see
             the new processes: ROUNDS rounds of one bare /proc/PID/stat walk (the baseline:
             list /proc and read every stat file, nothing else) and one steady-state snapshot
             (Capturer.capture()), order alternating: wall and CPU of each, and the snapshot's
             ratio to the walk of its round. Then one first snapshot by a new Capturer that
             reads the first one's resolution cache (every binary on the host known): what a
             restarted daemon pays once. Lines of wall and CPU p50 against tgids walked.
             At the largest point, `ctprofd run --interval 15` (empty cache) for DAEMON
             seconds: the duration of each of its snapshots as it measures them. Its
             snapshots are apart by the interval, so they also carry the look at the code
             objects of processes with no jemalloc that falls due once a minute (back to back
             snapshots, a few a second, meet few of those).
  threads    one alloc_threads process of N threads (--sweep-threads) at a time, captured
             alone (capture(pids=[pid])): FIRST first snapshots by new Capturers that read
             the cache where its binary is known (every thread stopped once for its thread
             pointer: the ptrace stops are counted), then ROUNDS steady-state snapshots by one Capturer that has seen it.
             Lines against threads.

Each line comes with its R² and the slope of each segment between neighbouring points (a
knee shows as a segment slope far from the line's). CPU is process_time of this process
(the Capturer's ptrace thread included). Everything started is killed at the end, on an
error, Ctrl-C, SIGTERM or SIGHUP (processes.Processes), and dies with this process anyway
(PR_SET_PDEATHSIG).

Run: .venv/bin/python -m benchmarks.scale [--quick]
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

from .daemon import Daemon, parse_metrics
from .processes import Processes, count_processes, cpu_seconds
from .report import log, machine, parser, write_result
from .simulated_host import IdleHost, fixtures_dir, spawn_jemalloc
from .stats import distribution, linear_fit
from .steady_state import bare_stat_walk

from ctprofd.probe.capture import Capturer, CaptureSettings  # noqa: E402

INTERVAL_SECONDS = 15.0
SHARE_OF_INTERVAL = 0.20  # issue 27: a snapshot of 20,000 processes within 20 % of 15 s


def timed(run) -> tuple[float, float, object]:
    """(wall, CPU, result) of one call, after a full garbage collection."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    cpu = time.process_time() - cpu
    return time.perf_counter() - wall, cpu, result


def cached_capturer(cache_dir: Path, writable: bool = True) -> Capturer:
    """A Capturer whose resolution cache is `cache_dir` (a read-only one starts with what a
    writable one stored there: a restarted daemon with a warm cache)."""
    return Capturer(CaptureSettings(cache_dir=str(cache_dir), cache_writable=writable,
                                    state_dir=None))


def line(points: list[dict], x: str, key: str, unit: float, per: str) -> dict:
    """Least squares of points[key]['p50'] against points[x], in `per` (us per item), with
    the slope of every segment between neighbouring points."""
    xs = [p[x] for p in points]
    ys = [p[key]["p50"] for p in points]
    fit = linear_fit(xs, ys) if len(points) > 1 else {"points": len(points)}
    if len(points) > 1:
        fit[per] = round(fit["slope"] * unit, 3)
        fit["intercept_ms"] = round(fit["intercept"] * 1e3, 3)
    fit[f"segment_{per}"] = [round((y1 - y0) / (x1 - x0) * unit, 3) if x1 != x0 else None
                             for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])]
    return fit


# --- processes ------------------------------------------------------------------------------

def process_point(capturer: Capturer, rounds: int, cache_dir: Path) -> dict:
    """Steady-state snapshots against bare stat walks, same rounds, then one first snapshot
    of the whole host by a new Capturer with `capturer`'s cache."""
    for _ in range(2):  # the first sees the processes just added: not steady state
        capturer.capture()
    costs: dict[str, dict[str, list[float]]] = {
        arm: {"wall": [], "cpu": []} for arm in ("walk", "snapshot")}
    walked = []
    for i in range(rounds):
        arms = [("walk", bare_stat_walk), ("snapshot", capturer.capture)]
        for arm, run in arms if i % 2 == 0 else arms[::-1]:
            wall, cpu, result = timed(run)
            costs[arm]["wall"].append(wall)
            costs[arm]["cpu"].append(cpu)
            if arm == "snapshot":
                walked.append(result.summary.tgids_walked)
    point: dict = {"tgids_walked": sorted(walked)[len(walked) // 2]}
    for arm, kinds in costs.items():
        for kind, values in kinds.items():
            point[f"{arm}_{kind}_seconds"] = distribution(values)
    for kind in ("wall", "cpu"):
        ratios = [s / w for s, w in zip(costs["snapshot"][kind], costs["walk"][kind])]
        point[f"ratio_to_walk_{kind}"] = distribution(ratios, 3)
    fresh = cached_capturer(cache_dir, writable=False)
    try:
        wall, cpu, snapshot = timed(fresh.capture)
        point["first_snapshot"] = {"wall_seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
                                   "tgids_walked": snapshot.summary.tgids_walked,
                                   "elf_opens": fresh.stats.elf_opens,
                                   "ptrace_stops": fresh.stats.ptrace_stops,
                                   # threads of other jobs' processes that did not stop: each
                                   # waited for up to the snapshot's budget (0.5 s in all)
                                   "stop_timeouts": fresh.stats.stop_timeouts}
    finally:
        fresh.close()
    return point


def sweep_processes(procs: Processes, args, fixtures: Path, cache_dir: Path,
                    idle_counts: list[int], jemalloc: int, threads: int, rounds: int,
                    daemon_interval: float, daemon_seconds: float) -> dict:
    """The points, the lines, and at the largest point the daemon's snapshots and the
    verdict against 20 % of the interval."""
    spawn_jemalloc(procs, fixtures, jemalloc, threads, args.work_dir, name="scale")
    capturer = cached_capturer(cache_dir)
    points = []
    try:
        capturer.capture()  # resolves the fixtures' binary and the host's
        added = 0
        for k, idle in enumerate(idle_counts):
            adding, added = idle - added, idle
            if adding:
                started = time.perf_counter()
                procs.own(IdleHost(procs, args.work_dir, adding, prefix=f"s{k}-"))
                log(f"processes: {adding} idle processes added in "
                    f"{time.perf_counter() - started:.1f} s")
            point = {"idle_added": idle,
                     **process_point(capturer, rounds, cache_dir)}
            points.append(point)
            log(f"processes: {point['tgids_walked']} walked: snapshot wall p50 "
                f"{point['snapshot_wall_seconds']['p50'] * 1e3:.1f} ms p99 "
                f"{point['snapshot_wall_seconds']['p99'] * 1e3:.1f} ms, CPU p50 "
                f"{point['snapshot_cpu_seconds']['p50'] * 1e3:.1f} ms; walk CPU p50 "
                f"{point['walk_cpu_seconds']['p50'] * 1e3:.1f} ms; ratio CPU p50 "
                f"{point['ratio_to_walk_cpu']['p50']}; first snapshot "
                f"{point['first_snapshot']['wall_seconds']:.2f} s")
    finally:
        capturer.close()
    fits = {key: line(points, "tgids_walked", key, 1e6, "per_process_us")
            for key in ("snapshot_wall_seconds", "snapshot_cpu_seconds", "walk_wall_seconds",
                        "walk_cpu_seconds")}
    first = [{"tgids_walked": p["first_snapshot"]["tgids_walked"],
              "wall": {"p50": p["first_snapshot"]["wall_seconds"]},
              "cpu": {"p50": p["first_snapshot"]["cpu_seconds"]}} for p in points]
    for kind in ("wall", "cpu"):
        fits[f"first_snapshot_{kind}_seconds"] = line(first, "tgids_walked", kind, 1e6,
                                                      "per_process_us")
    log(f"ctprofd run --interval {daemon_interval:g} for {daemon_seconds:g} s on "
        f"{count_processes()} processes")
    daemon = daemon_snapshots(procs, args, daemon_interval, daemon_seconds)
    log(f"daemon: snapshots {daemon['snapshot_seconds']}, first {daemon['first_snapshot_seconds']}"
        f" s")
    largest = points[-1]
    budget = INTERVAL_SECONDS * SHARE_OF_INTERVAL
    worst = daemon["snapshot_seconds"].get("max", float("nan"))
    verdict = {
        "tgids_walked": largest["tgids_walked"],
        "budget_seconds": budget,
        "snapshot_wall_p50_seconds": largest["snapshot_wall_seconds"]["p50"],
        "snapshot_wall_p99_seconds": largest["snapshot_wall_seconds"]["p99"],
        "daemon_snapshot_p50_seconds": daemon["snapshot_seconds"].get("p50"),
        "daemon_snapshot_max_seconds": worst,
        "share_of_interval_worst": round(max(worst, largest["snapshot_wall_seconds"]["p99"])
                                         / INTERVAL_SECONDS, 4),
        "first_snapshot_wall_seconds": largest["first_snapshot"]["wall_seconds"],
        "daemon_first_snapshot_seconds": daemon["first_snapshot_seconds"],
        # every steady-state snapshot, back to back and the daemon's at its interval
        "steady_state_within_budget": (largest["snapshot_wall_seconds"]["p99"] <= budget
                                       and worst <= budget),
        "first_snapshot_within_budget": (largest["first_snapshot"]["wall_seconds"] <= budget
                                         and daemon["first_snapshot_seconds"] <= budget),
    }
    return {"jemalloc_fixtures": jemalloc, "threads_per_fixture": threads, "rounds": rounds,
            "points": points, "fits": fits, "daemon": daemon, "at_largest": verdict}


def daemon_snapshots(procs: Processes, args, interval: float, duration: float) -> dict:
    """`ctprofd run --interval INTERVAL` (empty cache) on the host as it is, for DURATION
    seconds after its first snapshot: each snapshot's duration as the daemon measures it (the
    change of its histogram's sum, read after every snapshot) and the daemon's CPU over each
    interval (snapshot, render and this function's scrapes, two a second)."""
    daemon = Daemon(procs, args.work_dir / "scale-daemon", interval)
    try:
        samples = daemon.wait_for_snapshots(1, timeout=600)
        count = samples["ctprofd_snapshot_duration_seconds_count"]
        total = samples["ctprofd_snapshot_duration_seconds_sum"]
        first, cpu = total / count, cpu_seconds(daemon.pid)
        durations, cpus, walked = [], [], []
        ends = time.monotonic() + duration
        while time.monotonic() < ends:
            time.sleep(0.5)
            samples = parse_metrics(daemon.scrape())
            now = samples["ctprofd_snapshot_duration_seconds_count"]
            if now > count:
                durations.append((samples["ctprofd_snapshot_duration_seconds_sum"] - total)
                                 / (now - count))
                cpus.append((cpu_seconds(daemon.pid) - cpu) / (now - count))
                walked.append(samples["ctprofd_probe_tgids_walked"])
                count, total = now, samples["ctprofd_snapshot_duration_seconds_sum"]
                cpu = cpu_seconds(daemon.pid)
        overruns = samples.get("ctprofd_snapshot_overruns_total", 0)
    finally:
        daemon.stop()
    return {"interval_seconds": interval, "seconds": duration,
            "first_snapshot_seconds": round(first, 4),
            "tgids_walked": sorted(walked)[len(walked) // 2] if walked else None,
            "snapshot_seconds": distribution(durations, 4),
            "snapshot_seconds_each": [round(d, 4) for d in durations],
            "cpu_seconds_per_interval": distribution(cpus, 3), "overruns": overruns}


# --- threads --------------------------------------------------------------------------------

def thread_point(procs: Processes, args, fixtures: Path, cache_dir: Path, capturer: Capturer,
                 threads: int, firsts: int, rounds: int) -> dict:
    fixture = spawn_jemalloc(procs, fixtures, 1, threads, args.work_dir, name="scalethr")
    try:
        pid = fixture.pids[0]
        capturer.capture(pids=[pid])  # resolves the layout once (cached for the others)
        first_walls, first_cpus, stops, opens = [], [], [], []
        for _ in range(firsts):
            fresh = cached_capturer(cache_dir, writable=False)
            try:
                wall, cpu, snapshot = timed(lambda: fresh.capture(pids=[pid]))
                stops.append(fresh.stats.ptrace_stops)
                opens.append(fresh.stats.elf_opens)
            finally:
                fresh.close()
            first_walls.append(wall)
            first_cpus.append(cpu)
        capturer.capture(pids=[pid])
        walls, cpus, probed = [], [], []
        for _ in range(rounds):
            wall, cpu, snapshot = timed(lambda: capturer.capture(pids=[pid]))
            walls.append(wall)
            cpus.append(cpu)
            probed.append(snapshot.summary.probed_ok)
    finally:
        procs.release(fixture)
    return {"threads": threads, "probed_ok": min(probed),
            "first_ptrace_stops": sorted(stops)[len(stops) // 2], "first_elf_opens": max(opens),
            "first_wall_seconds": distribution(first_walls),
            "first_cpu_seconds": distribution(first_cpus),
            "steady_wall_seconds": distribution(walls),
            "steady_cpu_seconds": distribution(cpus)}


def sweep_threads(procs: Processes, args, fixtures: Path, cache_dir: Path, counts: list[int],
                  firsts: int, rounds: int) -> dict:
    capturer = cached_capturer(cache_dir)
    points = []
    try:
        for threads in counts:
            point = thread_point(procs, args, fixtures, cache_dir, capturer, threads, firsts,
                                 rounds)
            points.append(point)
            log(f"threads: {threads} ({point['probed_ok']} read): first snapshot wall p50 "
                f"{point['first_wall_seconds']['p50'] * 1e3:.1f} ms "
                f"({point['first_ptrace_stops']} stops), steady wall p50 "
                f"{point['steady_wall_seconds']['p50'] * 1e3:.2f} ms, CPU p50 "
                f"{point['steady_cpu_seconds']['p50'] * 1e3:.2f} ms")
    finally:
        capturer.close()
    fits = {key: line(points, "threads", key, 1e6, "per_thread_us")
            for key in ("first_wall_seconds", "first_cpu_seconds", "steady_wall_seconds",
                        "steady_cpu_seconds")}
    return {"first_snapshots": firsts, "rounds": rounds, "points": points, "fits": fits}


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"scale: {text!r}: expected comma-separated integers") from None
    if not counts or any(n < 0 for n in counts) or counts != sorted(counts):
        raise SystemExit(f"scale: {text!r}: expected non-negative integers in increasing order")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sweep-idle", metavar="N,N,...",
                   help="idle processes added in all by each point of the process sweep "
                        "(default 0,900,2400,4900,9900,14900,19900: with the host's own ~100, "
                        "~100 .. ~20,000 processes; --quick 0,20)")
    p.add_argument("--jemalloc", type=int,
                   help="jemalloc fixtures during the process sweep (default 4; --quick 1)")
    p.add_argument("--threads", type=int,
                   help="threads of each of those fixtures (default 8; --quick 2)")
    p.add_argument("--sweep-threads", metavar="N,N,...",
                   help="threads of the thread sweep's process (default "
                        "1,10,100,500,1000,1500,2000; --quick 1,4)")
    p.add_argument("--daemon-seconds", type=float,
                   help="how long `ctprofd run` runs on the largest host after its first "
                        "snapshot (default 240; --quick 3)")
    p.add_argument("--daemon-interval", type=float,
                   help=f"its interval (default {INTERVAL_SECONDS:g}; --quick 1)")
    p.add_argument("--rounds", type=int,
                   help="steady-state snapshots per point (default 20; --quick 3)")
    p.add_argument("--first-snapshots", type=int,
                   help="first snapshots per point of the thread sweep (default 9; --quick 2)")
    args = p.parse_args(argv)
    q = args.quick
    idle_counts = _counts(args.sweep_idle or ("0,20" if q else
                                              "0,900,2400,4900,9900,14900,19900"))
    thread_counts = _counts(args.sweep_threads or ("1,4" if q else "1,10,100,500,1000,1500,2000"))
    if thread_counts[0] < 1 or thread_counts[-1] > 4097:
        raise SystemExit("scale: --sweep-threads: 1..4097 threads (alloc_threads' limit)")
    jemalloc = args.jemalloc if args.jemalloc is not None else (1 if q else 4)
    threads = args.threads or (2 if q else 8)
    rounds = args.rounds or (3 if q else 20)
    firsts = args.first_snapshots or (2 if q else 9)
    daemon_seconds = args.daemon_seconds or (3 if q else 240)
    daemon_interval = args.daemon_interval or (1 if q else INTERVAL_SECONDS)
    started, host_info = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir(args)
    results: dict = {"interval_seconds": INTERVAL_SECONDS,
                     "share_of_interval": SHARE_OF_INTERVAL}
    with Processes() as procs, tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        cache_dir = Path(tmp)
        log(f"process sweep: {count_processes()} processes, {idle_counts[-1]} idle to add")
        try:
            results["process_sweep"] = sweep_processes(procs, args, fixtures, cache_dir,
                                                       idle_counts, jemalloc, threads, rounds,
                                                       daemon_interval, daemon_seconds)
        finally:
            procs.kill_all()
        log(f"thread sweep, {thread_counts[0]} .. {thread_counts[-1]} threads")
        results["thread_sweep"] = sweep_threads(procs, args, fixtures, cache_dir,
                                                thread_counts, firsts, rounds)
    write_result("scale", args, started, host_info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
