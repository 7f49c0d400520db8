"""First snapshot: what a new Capturer (a restarted daemon) pays once on a host of many idle
processes, this checkout against a baseline checkout in the same run (issue 27: a snapshot
of 20,000 processes within 3 s).

  host    JEMALLOC alloc_threads fixtures of 8 threads and IDLE hostsim processes (fork
          children of one parent) beside the machine's own processes.
  warm    a new Capturer whose resolution cache knows every binary on the host (each
          checkout fills a cache of its own once, beforehand): every process is new, no
          binary is parsed.
  empty   a new Capturer with an empty cache, the background resolver and the daemon's
          grace at a 15 s interval (7.5 s): the snapshot a daemon starting afresh takes.

Each first snapshot runs in a fresh interpreter started in the checkout measured (so a
baseline is any checkout, e.g. `git worktree add --detach /tmp/base COMMIT`), the two arms
alternating round by round: wall and CPU (process_time, user and system) of the one
capture() call, and the per-round ratio of this checkout to the baseline. Everything
started is killed at the end, on an error, Ctrl-C, SIGTERM or SIGHUP.

Run: .venv/bin/python -m benchmarks.first_snapshot --baseline DIR [--quick]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import REPO
from .processes import Processes, count_processes
from .report import log, machine, parser, write_result
from .simulated_host import IdleHost, fixtures_dir, spawn_jemalloc
from .stats import distribution

# One first snapshot, run with cwd = the checkout measured (its ctprofd is imported).
ARM = """
import gc, json, os, sys, tempfile, time
sys.path.insert(0, os.getcwd())
from ctprofd.probe.capture import Capturer, CaptureSettings
cache, mode = sys.argv[1], sys.argv[2]
if mode == "empty":
    settings = CaptureSettings(cache_dir=tempfile.mkdtemp(dir=cache), state_dir=None,
                               background=True, resolve_grace=7.5)
else:
    settings = CaptureSettings(cache_dir=cache, cache_writable=mode == "fill", state_dir=None)
capturer = Capturer(settings)
try:
    gc.collect()
    wall, cpu, times = time.perf_counter(), time.process_time(), os.times()
    snapshot = capturer.capture()
    cpu, after = time.process_time() - cpu, os.times()
    wall = time.perf_counter() - wall
    print(json.dumps({"wall": wall, "cpu": cpu, "user": after.user - times.user,
                      "system": after.system - times.system,
                      "tgids_walked": snapshot.summary.tgids_walked,
                      "pending": snapshot.pending, "elf_opens": capturer.stats.elf_opens}))
finally:
    capturer.close()
"""


def first_snapshot(checkout: Path, cache: str, mode: str) -> dict:
    """One first snapshot by a fresh interpreter in `checkout`."""
    out = subprocess.run([sys.executable, "-c", ARM, cache, mode], cwd=checkout,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"first snapshot in {checkout} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def compare(arms: dict[str, Path], mode: str, rounds: int, work_dir: Path) -> dict:
    """`rounds` first snapshots per arm in `mode`, alternating; distributions and ratios."""
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    caches = {arm: tempfile.mkdtemp(prefix=f"first-{arm}-", dir=work_dir) for arm in arms}
    try:
        if mode == "warm":
            for arm, checkout in arms.items():
                first_snapshot(checkout, caches[arm], "fill")
        for i in range(rounds):
            order = list(arms) if i % 2 == 0 else list(arms)[::-1]
            for arm in order:
                run = first_snapshot(arms[arm], caches[arm], mode)
                runs[arm].append(run)
                log(f"{mode} round {i}: {arm} wall {run['wall']:.2f} s CPU {run['cpu']:.2f} s "
                    f"({run['tgids_walked']} walked, {run['pending']} pending)")
    finally:
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)
    result: dict = {}
    for arm, values in runs.items():
        result[arm] = {key: distribution([v[key] for v in values])
                       for key in ("wall", "cpu", "user", "system")}
        result[arm]["tgids_walked"] = values[0]["tgids_walked"]
        result[arm]["pending"] = [v["pending"] for v in values]
    for key in ("wall", "cpu"):
        result[f"ratio_{key}"] = distribution(
            [n[key] / b[key] for n, b in zip(runs["this"], runs["baseline"])], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, default=REPO,
                   help="the checkout to compare with (default: this one, a ratio of ~1)")
    p.add_argument("--idle", type=int, help="idle processes (default 20,000; --quick 20)")
    p.add_argument("--jemalloc", type=int, help="jemalloc fixtures (default 4; --quick 1)")
    p.add_argument("--rounds", type=int, help="first snapshots per arm and mode "
                                              "(default 4; --quick 1)")
    args = p.parse_args(argv)
    q = args.quick
    idle = args.idle if args.idle is not None else (20 if q else 20_000)
    jemalloc = args.jemalloc if args.jemalloc is not None else (1 if q else 4)
    rounds = args.rounds or (1 if q else 4)
    baseline = args.baseline.resolve()
    if not (baseline / "ctprofd" / "probe" / "capture.py").is_file():
        raise SystemExit(f"first_snapshot: --baseline {args.baseline}: not a ctprofd checkout")
    started, host_info = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    fixtures = fixtures_dir(args)
    arms = {"baseline": baseline, "this": REPO}
    results: dict = {"idle": idle, "jemalloc_fixtures": jemalloc, "rounds": rounds,
                     "baseline": str(baseline)}
    with Processes() as procs:
        spawn_jemalloc(procs, fixtures, jemalloc, 8, args.work_dir, name="first")
        procs.own(IdleHost(procs, args.work_dir, idle, prefix="first-"))
        results["processes"] = count_processes()
        for mode in ("warm", "empty"):
            results[mode] = compare(arms, mode, rounds, args.work_dir)
    write_result("first_snapshot", args, started, host_info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
