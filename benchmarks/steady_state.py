"""Steady state: the cost of one snapshot of an unchanged host, against a bare walk of its
stat files and one scrape of the same host by prometheus-process-exporter, and the syscalls
of a snapshot (how the cost grows with processes and threads: benchmarks/scale.py).

Host: IDLE idle processes with distinct names (hostsim) plus JEMALLOC alloc_threads
fixtures of THREADS threads each, each under its own name; the machine's own processes
come on top. Phases:

  main       Capturer.capture() in this process after two warm-up snapshots: wall and CPU
             (process_time) per snapshot, REPEATS times; ptrace stops, ELF opens and cache
             misses over those snapshots (stats deltas); aggregate + render of /metrics
             as the daemon does it, as a second figure.
  bare walk  the baseline: list /proc and read every /proc/PID/stat, nothing else, in
             rounds with a snapshot and a snapshot by a Capturer whose layouts carry no
             arena statistics (per-thread sums only; its layouts come from an offsets
             file written without them), REPEATS rounds, order rotating: wall and CPU of
             each, and each snapshot's cost as a ratio of the walk's in the same round.
  moving     what the arena statistics cost where they are read (a process whose threads
             allocated since the last snapshot; the main host's fixtures are idle, so after
             the first snapshot their arenas are not read again): one `churn` fixture (4
             threads at a time, each living up to 200 us), capture(pids=[it]) REPEATS
             times, and the arena read alone, with its process_vm_readv calls.
  syscalls   one snapshot under `strace -f -p <this process>`: every syscall between two
             marker stat() calls (per-name counts, openat paths by kind, process_vm_readv
             calls per pid with their iovec counts, ptrace calls; opens and stops are also counted
             on processes and threads that existed before, to tell them from processes
             other jobs start meanwhile), and one under
             `strace -c -f` for the kernel's own summary table.
  exporter   prometheus-process-exporter on loopback, two configurations: `per_process`
             (every process matched, one group per command name: every simulated process
             has its own; default flags, i.e. per-thread metrics and smaps on) and `minimal`
             (one group for everything, -threads=false -gather-smaps=false: the least it
             can do while still reading every process). GET /metrics over loopback with
             urllib: wall per scrape, and CPU per scrape from the exporter's threads'
             /proc/PID/task/*/schedstat (ns) deltas.

Run: .venv/bin/python -m benchmarks.steady_state [--quick]
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from .daemon import free_port
from .processes import (Processes, count_processes, cpu_seconds, die_with_parent, tasks_cpu_ns,
                        wait_until)
from .report import log, machine, parser, write_result
from .simulated_host import IdleHost, add_host_options, fixtures_dir, host_size, spawn_jemalloc
from .stats import distribution

from ctprofd.export.aggregate import Aggregator  # noqa: E402
from ctprofd.export.collector import DaemonCollector, DaemonState  # noqa: E402
from ctprofd.probe import memory  # noqa: E402
from ctprofd.probe.arena_stats import read_totals  # noqa: E402
from ctprofd.probe.capture import Capturer, CaptureSettings  # noqa: E402
from ctprofd.resolve import offsets_file  # noqa: E402
from ctprofd.resolve.debuginfo import DebugSearch  # noqa: E402
from ctprofd.resolve.layout import HEALTH_FIELDS, resolve_path  # noqa: E402

BEGIN, END = "/ctprofd-bench-strace-begin", "/ctprofd-bench-strace-end"
EXPORTER = "prometheus-process-exporter"
EXPORTER_CONFIGS = {
    "per_process": ('process_names:\n  - name: "{{.Comm}}"\n    cmdline: [".+"]\n', []),
    "minimal": ('process_names:\n  - name: "all"\n    cmdline: [".+"]\n',
                ["-threads=false", "-gather-smaps=false"]),
}


def new_capturer(process_events: bool = True) -> Capturer:
    """A Capturer as the daemon makes it (listening to the kernel's process events, which
    the packaged unit does not grant: `process_events=False`)."""
    return Capturer(CaptureSettings(cache_dir=None, state_dir=None,
                                    process_events=process_events))


def timed_captures(capturer: Capturer, repeats: int, pids: list[int] | None = None) -> dict:
    """`repeats` snapshots: wall and CPU of each, and what they walked."""
    walls, cpus, walked = [], [], []
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        snapshot = capturer.capture(pids=pids)
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
        walked.append(snapshot.summary.tgids_walked)
    return {"wall_seconds": walls, "cpu_seconds": cpus, "tgids_walked": walked,
            "last": snapshot}


def bare_stat_walk() -> int:
    """List /proc and read every /proc/PID/stat: the least any per-process walk does."""
    read = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            except OSError:
                continue
            try:
                os.read(fd, 4096)
                read += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return read


def against_bare_walk(capturer: Capturer, per_thread: Capturer, no_allocator: Capturer,
                      no_events: Capturer, repeats: int) -> dict:
    """Bare stat walks, snapshots, per-thread-only snapshots, snapshots without the
    allocator's health figures and snapshots without process events, in rounds (order
    rotating)."""
    arms = {"walk": bare_stat_walk, "snapshot": capturer.capture,
            "snapshot_per_thread_only": per_thread.capture,
            "snapshot_without_allocator": no_allocator.capture,
            "snapshot_without_events": no_events.capture}
    costs = {name: {"wall": [], "cpu": []} for name in arms}
    for i in range(repeats):
        order = list(arms.items())
        for name, run in order[i % len(order):] + order[:i % len(order)]:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            costs[name]["cpu"].append(time.process_time() - cpu)
            costs[name]["wall"].append(time.perf_counter() - wall)
    result: dict = {f"{name}_{kind}_seconds": distribution(values)
                    for name, kinds in costs.items() for kind, values in kinds.items()}
    for name in ("snapshot", "snapshot_per_thread_only", "snapshot_without_allocator",
                 "snapshot_without_events"):
        ratios = {kind: sorted(s / w for s, w in zip(costs[name][kind], costs["walk"][kind]))
                  for kind in ("wall", "cpu")}
        result[f"{name}_ratio_p50"] = {k: round(r[len(r) // 2], 3) for k, r in ratios.items()}
        result[f"{name}_ratio_p90"] = {k: round(r[int(len(r) * 0.9)], 3)
                                       for k, r in ratios.items()}
    # what the allocator figures add: each snapshot against the one without them, same round
    ratios = {kind: sorted(s / w for s, w in zip(costs["snapshot"][kind],
                                                  costs["snapshot_without_allocator"][kind]))
              for kind in ("wall", "cpu")}
    result["allocator_ratio_p50"] = {k: round(r[len(r) // 2], 3) for k, r in ratios.items()}
    return result


def per_thread_capturer(capturer: Capturer, work_dir: Path) -> Capturer:
    """A Capturer with the layouts `capturer` resolved, less their arena statistics."""
    path = work_dir / "offsets-without-arena.json"
    offsets_file.dump([replace(layout, arena=None) for layout in capturer.cache.layouts()],
                      str(path))
    return Capturer(CaptureSettings(cache_dir=None, state_dir=None, offsets_files=(str(path),),
                                    process_events=True))


def no_allocator_capturer(capturer: Capturer, work_dir: Path) -> Capturer:
    """A Capturer with the layouts `capturer` resolved, their arena statistics without the
    allocator's health members (HEALTH_FIELDS)."""
    path = work_dir / "offsets-without-allocator.json"
    offsets_file.dump([replace(layout, arena=replace(layout.arena, **dict.fromkeys(
        HEALTH_FIELDS))) if layout.arena else layout for layout in capturer.cache.layouts()],
        str(path))
    return Capturer(CaptureSettings(cache_dir=None, state_dir=None, offsets_files=(str(path),),
                                    process_events=True))


def moving_process(procs: Processes, fixtures: Path, capturer: Capturer, repeats: int) -> dict:
    """The cost of a jemalloc process that allocates between snapshots."""
    churn = procs.popen([fixtures / "churn", "4", "200"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE)
    try:
        if churn.stdout.readline().strip() != b"READY":
            raise RuntimeError("churn did not start")
        capturer.capture(pids=[churn.pid])  # attach, parse
        run = timed_captures(capturer, repeats, pids=[churn.pid])
        layout = resolve_path(str(fixtures / "churn"), DebugSearch(())).arena
        base = _first_mapping(churn.pid, str(fixtures / "churn"))
        calls: list[int] = []

        def counting(pid: int, ranges: list[tuple[int, int]]) -> list:
            calls.append(len(ranges))
            return memory.read_ranges(pid, ranges)
        walls, cpus, totals = [], [], None
        for _ in range(repeats):
            calls.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            totals = read_totals(churn.pid, layout, base, counting)
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
        source = run["last"].processes[0].totals_source
    finally:
        procs.release(churn)
    return {"snapshot_of_it_wall_seconds": distribution(run["wall_seconds"]),
            "snapshot_of_it_cpu_seconds": distribution(run["cpu_seconds"]),
            "totals_source": source,
            "arena_read_wall_seconds": distribution(walls),
            "arena_read_cpu_seconds": distribution(cpus),
            "arena_read_process_vm_readv_calls": len(calls),
            "arena_read_iovecs": sum(calls), "thread_caches": totals.caches}


def _first_mapping(pid: int, path: str) -> int:
    """Where the file at `path` is mapped from its start in `pid`."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == path and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise RuntimeError(f"{path} is not mapped in {pid}")


def render_cost(capturer: Capturer, repeats: int) -> dict:
    """Snapshot + aggregate + render of /metrics, as one daemon cycle and one scrape."""
    aggregator = Aggregator(("pid", "comm", "unit"), 10000, 300.0)
    collector = DaemonCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    walls, cpus, render_walls, sizes = [], [], [], []
    for i in range(repeats + 1):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        snapshot = capturer.capture()
        view = aggregator.update(snapshot, lambda pid, start: False)
        collector.publish(DaemonState(snapshot=snapshot, aggregate=view, snapshots_total=i + 1,
                                      interval_seconds=15.0))
        rendered = time.perf_counter()
        body = generate_latest(registry)
        if i:  # the first one creates every series
            render_walls.append(time.perf_counter() - rendered)
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
            sizes.append(len(body))
    return {"cycle_wall_seconds": distribution(walls), "cycle_cpu_seconds": distribution(cpus),
            "render_wall_seconds": distribution(render_walls), "body_bytes": max(sizes)}


# --- syscalls ---------------------------------------------------------------------------

def _traced_by_strace() -> bool:
    with open("/proc/self/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


def _under_strace(capturer: Capturer, argv: list[str]) -> None:
    """One snapshot with strace attached to every thread of this process."""
    tracer = subprocess.Popen(argv + ["-p", str(os.getpid())], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=die_with_parent)
    try:
        wait_until(_traced_by_strace, 30, "strace to attach", 0.01)
        time.sleep(0.2)  # every thread attached
        os.path.exists(BEGIN)
        capturer.capture()
        os.path.exists(END)
    finally:
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=60)
    if tracer.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"strace failed ({tracer.returncode}): {err.decode()[-1000:]}")


_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)")


def syscalls(capturer: Capturer, work_dir: Path, own_pids: set[int]) -> dict:
    """Counts of one steady-state snapshot's syscalls, and the checks they prove."""
    if not shutil.which("strace"):
        return {"skipped": "strace is not installed"}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        log_path = Path(tmp) / "strace.log"
        capturer.capture()  # every process alive now has been seen
        known = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        known_tids = _all_tids()
        _under_strace(capturer, ["strace", "-f", "-qq", "-s", "256", "-o", str(log_path)])
        lines = log_path.read_text(errors="replace").splitlines()
        summary_path = Path(tmp) / "summary.txt"
        _under_strace(capturer, ["strace", "-c", "-f", "-qq", "-o", str(summary_path)])
        summary = summary_path.read_text().splitlines()
    inside, calls = False, []
    for line in lines:
        match = _CALL.match(line)
        if not match:
            continue
        if BEGIN in line or END in line:
            inside = BEGIN in line
            continue
        if inside:
            calls.append((int(match.group(1)), match.group(2), match.group(3)))
    names = Counter(name for _, name, _ in calls)
    opens: Counter[str] = Counter()
    elf_opens = []
    for _, name, rest in calls:
        if name not in ("open", "openat", "openat2"):
            continue
        path = re.search(r'"([^"]*)"', rest)
        path = path.group(1) if path else "?"
        kind = re.sub(r"/proc/\d+/task/\d+/", "/proc/PID/task/TID/", path)
        kind = re.sub(r"/proc/\d+/", "/proc/PID/", kind)
        kind = re.sub(r"^/proc/\d+$", "/proc/PID", kind)
        opens[kind] += 1
        if not (path == "/proc" or path.startswith("/proc/")) or re.search(
                r"/exe$|/map_files/|/root/", path):
            elf_opens.append(path)
    readv: dict[int, list[int]] = {}
    for _, name, rest in calls:
        if name == "process_vm_readv":
            args = [a.strip() for a in rest.split(",")]
            pid = int(args[0])
            riovcnt = int(re.search(r"\],\s*(\d+),\s*0\)", rest).group(1)) if re.search(
                r"\],\s*(\d+),\s*0\)", rest) else -1
            readv.setdefault(pid, []).append(riovcnt)
    ptraced = [int(re.match(r"\w+,\s*(\d+)", rest).group(1)) for _, name, rest in calls
               if name == "ptrace" and re.match(r"\w+,\s*(\d+)", rest)]
    ours = {pid: calls_ for pid, calls_ in readv.items() if pid in own_pids}
    return {
        "syscalls_in_snapshot": sum(names.values()),
        "by_name": dict(names.most_common()),
        "opens_by_path_kind": dict(opens.most_common()),
        "elf_or_non_proc_opens": elf_opens,
        "elf_opens_of_processes_seen_before": [
            path for path in elf_opens
            if (m := re.match(r"/proc/(\d+)/", path)) is None or int(m.group(1)) in known],
        "ptrace_calls": len(ptraced),
        "ptrace_calls_on_threads_seen_before": sum(1 for tid in ptraced if tid in known_tids),
        "ptrace_calls_on_our_fixtures": sum(1 for tid in ptraced if tid in own_pids),
        "process_vm_readv_calls": sum(len(v) for v in readv.values()),
        "process_vm_readv_per_pid_on_our_fixtures": {str(pid): len(v) for pid, v in ours.items()},
        "remote_iovecs_per_call_on_our_fixtures": sorted({n for v in ours.values() for n in v}),
        "strace_c_summary": summary,
    }


def _all_tids() -> set[int]:
    tids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                tids.update(int(t) for t in os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return tids


# --- prometheus-process-exporter -------------------------------------------------------------

def exporter_scrapes(procs: Processes, work_dir: Path, name: str, repeats: int) -> dict:
    if not shutil.which(EXPORTER):
        return {"skipped": f"{EXPORTER} is not installed"}
    config_text, flags = EXPORTER_CONFIGS[name]
    config = work_dir / f"process-exporter-{name}.yml"
    config.write_text(config_text)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    exporter = procs.popen([EXPORTER, "-config.path", config, "-web.listen-address",
                            f"127.0.0.1:{port}", *flags],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def scrape() -> bytes:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape()
                break
            except OSError:
                if time.monotonic() > deadline or exporter.poll() is not None:
                    raise RuntimeError(f"{EXPORTER} did not come up")
                time.sleep(0.1)
        for _ in range(2):
            scrape()
        walls, cpus = [], []
        ticks = cpu_seconds(exporter.pid)
        for _ in range(repeats):
            gc.collect()
            cpu = tasks_cpu_ns(exporter.pid)
            wall = time.perf_counter()
            body = scrape()
            walls.append(time.perf_counter() - wall)
            cpus.append((tasks_cpu_ns(exporter.pid) - cpu) / 1e9)
        ticks = (cpu_seconds(exporter.pid) - ticks) / repeats
        groups = body.count(b"namedprocess_namegroup_num_procs{")
        procs_line = re.findall(rb"^namedprocess_namegroup_num_procs\{[^}]*\} (\d+)", body, re.M)
    finally:
        procs.release(exporter)
    return {"flags": flags, "config": config_text,
            "wall_seconds": distribution(walls), "cpu_seconds": distribution(cpus),
            "cpu_seconds_per_scrape_from_ticks": round(ticks, 4),
            "groups": groups, "processes_in_groups": sum(int(x) for x in procs_line),
            "body_bytes": len(body)}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    add_host_options(p)
    p.add_argument("--repeats", type=int, help="timed snapshots/scrapes per figure "
                   "(default 30; --quick 3)")
    args = p.parse_args(argv)
    q = args.quick
    idle, jemalloc, threads = host_size(args)
    repeats = args.repeats or (3 if q else 30)
    started, host_info = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir(args)
    results: dict = {"host": {"idle_processes": idle, "jemalloc_fixtures": jemalloc,
                              "threads_per_fixture": threads}, "repeats": repeats}
    with Processes() as procs:
        procs.own(IdleHost(procs, args.work_dir, idle))
        spawned = spawn_jemalloc(procs, fixtures, jemalloc, threads, args.work_dir)
        own_pids = spawned.tids()
        capturer = new_capturer()
        try:
            log(f"host of {count_processes()} processes; warm-up snapshots")
            first = time.perf_counter()
            capturer.capture()
            results["first_snapshot_wall_seconds"] = round(time.perf_counter() - first, 3)
            capturer.capture()
            before, pids_before = capturer.stats, set(os.listdir("/proc"))
            run = timed_captures(capturer, repeats)
            after, pids_after = capturer.stats, set(os.listdir("/proc"))
            summary = run["last"].summary
            results["snapshot"] = {
                "wall_seconds": distribution(run["wall_seconds"]),
                "cpu_seconds": distribution(run["cpu_seconds"]),
                "tgids_walked": summary.tgids_walked,
                "jemalloc_detected": summary.jemalloc_detected,
                "probed_ok": summary.probed_ok,
                "ptrace_stops_during": after.ptrace_stops - before.ptrace_stops,
                "elf_opens_during": after.elf_opens - before.elf_opens,
                "cache_misses_during": after.cache_misses - before.cache_misses,
                "processes_started_or_ended_by_others_during":
                    len({x for x in pids_before ^ pids_after if x.isdigit()}),
            }
            log(f"snapshot: {results['snapshot']}")
            per_thread = per_thread_capturer(capturer, args.work_dir)
            no_allocator = no_allocator_capturer(capturer, args.work_dir)
            no_events = new_capturer(process_events=False)
            try:
                for other in (per_thread, no_allocator, no_events) * 2:
                    other.capture()
                results["bare_stat_walk"] = against_bare_walk(capturer, per_thread,
                                                              no_allocator, no_events, repeats)
            finally:
                per_thread.close()
                no_allocator.close()
                no_events.close()
            log(f"against the bare stat walk: {results['bare_stat_walk']}")
            results["moving"] = moving_process(procs, fixtures, capturer, repeats)
            log(f"a moving process: {results['moving']}")
            results["render"] = render_cost(capturer, repeats)
            log("syscalls of one snapshot (strace)")
            results["syscalls"] = syscalls(capturer, args.work_dir, own_pids)
            results["exporter"] = {}
            for name in EXPORTER_CONFIGS:
                log(f"{EXPORTER}: {name}")
                results["exporter"][name] = exporter_scrapes(procs, args.work_dir, name,
                                                             repeats)
            ours = results["snapshot"]
            ratios = {}
            for name, figures in results["exporter"].items():
                if "skipped" in figures:
                    continue
                ratios[name] = {
                    "wall": round(ours["wall_seconds"]["p50"] / figures["wall_seconds"]["p50"], 4),
                    "cpu": round(ours["cpu_seconds"]["p50"] / figures["cpu_seconds"]["p50"], 4),
                    "wall_with_render": round(results["render"]["cycle_wall_seconds"]["p50"]
                                              / figures["wall_seconds"]["p50"], 4),
                    "cpu_with_render": round(results["render"]["cycle_cpu_seconds"]["p50"]
                                             / figures["cpu_seconds"]["p50"], 4)}
            results["ratio_to_exporter_scrape_p50"] = ratios
            log(f"ratios: {ratios}")
        finally:
            procs.kill_all()
            capturer.close()
    write_result("steady_state", args, started, host_info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
