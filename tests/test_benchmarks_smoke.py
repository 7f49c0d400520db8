"""The benchmarks of benchmarks/ still run: each once with --quick at a tiny scale, checking
only that it completes and writes well-formed result JSON. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SMALL = {
    "steady_state": ["--idle", "5", "--jemalloc", "1", "--threads", "2", "--repeats", "2"],
    "scale": ["--sweep-idle", "0,50,100", "--jemalloc", "1", "--threads", "2", "--rounds", "2",
              "--sweep-threads", "1,2,3", "--first-snapshots", "1"],
    "cold_start": ["--units", "3", "--structs", "5", "--repeats", "1"],
    "target_impact": ["--rounds", "1", "--fixtures-per-round", "1", "--threads", "2",
                      "--pairs", "1", "--seconds", "1"],
    "footprint": ["--idle", "5", "--jemalloc", "1", "--threads", "2", "--duration", "2",
                  "--render-procs", "3", "--scrapes", "2"],
    "scrapers": ["--scrapers", "3", "--duration", "2", "--jemalloc", "1", "--threads", "2"],
    "hostile_schedule": ["--duration", "2"],
    "combined_attack": ["--duration", "2", "--phases", "all+accept"],  # every attacker at once
    "scrape_cost": [],
    "process_events": ["--rounds", "1"],
    "first_snapshot": ["--idle", "5", "--rounds", "1"],
}
EXPECTED = {
    "steady_state": ("snapshot", "bare_stat_walk", "moving", "render", "syscalls", "exporter"),
    "scale": ("process_sweep", "thread_sweep"),
    "cold_start": ("binary", "pahole", "daemon", "tsd_offsets", "resolve_object",
                   "code_stripped", "code_scan", "daemon_stripped", "code_stripped_found",
                   "ratios_to_pahole_p50_wall"),
    "target_impact": ("thread_stops", "throughput"),
    "footprint": ("footprint", "render"),
    "scrapers": ("responses", "verdict", "rss_mib"),
    "hostile_schedule": ("baseline", "attack", "schedule_ratio_attack_to_baseline"),
    "combined_attack": ("baseline", "all+accept", "cgroup", "ratios_to_baseline"),
    "scrape_cost": ("baseline", "cached", "p50_ratio", "unread", "bad-auth"),
    "process_events": ("fork_exit", "spawn", "connector_sockets_before"),
    "first_snapshot": ("warm", "empty", "processes"),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_benchmark_runs(name: str, fixture_bins, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out),
         "--work-dir", str(tmp_path / "work"), "--fixtures", str(fixture_bins.root),
         *SMALL[name]],
        cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads(out.read_text())
    assert document["benchmark"] == name
    assert document["quick"] is True
    assert document["machine"]["cpus"] >= 1
    for key in EXPECTED[name]:
        assert key in document["results"], (key, sorted(document["results"]))
    if name == "scale":  # a line (slope, intercept, R²) through every sweep's points
        for sweep, x, per, keys in (
                ("process_sweep", "tgids_walked", "per_process_us",
                 ("snapshot_wall_seconds", "snapshot_cpu_seconds", "walk_cpu_seconds",
                  "first_snapshot_wall_seconds")),
                ("thread_sweep", "threads", "per_thread_us",
                 ("first_wall_seconds", "steady_wall_seconds", "steady_cpu_seconds"))):
            results = document["results"][sweep]
            assert len(results["points"]) == 3
            for key in keys:
                fit = results["fits"][key]
                assert fit["points"] == 3 and 0 <= fit["r2"] <= 1, (sweep, key, fit)
                assert {per, "intercept_ms", f"segment_{per}"} <= fit.keys(), (sweep, key, fit)
        threads = document["results"]["thread_sweep"]["points"]
        # every thread of the process read, each stopped once by a first snapshot, no binary
        # parsed again by a Capturer that reads the cache
        assert [(p["probed_ok"], p["first_ptrace_stops"], p["first_elf_opens"])
                for p in threads] == [(1, 1, 0), (2, 2, 0), (3, 3, 0)]
        assert "steady_state_within_budget" in document["results"]["process_sweep"]["at_largest"]
    if name == "cold_start":  # the stripped twin is resolved from code, not found DWARF
        assert document["results"]["code_stripped_found"]["source"] == (
            "code: malloc/free fast paths")
        assert document["results"]["code_scan_found"]["source"] == (
            "scan of the executable segment")
    # every comparison tool (strace, process-exporter, pahole) is installed by setup.sh --test
    assert '"skipped"' not in json.dumps(document["results"])
    summary = summarize(str(out))
    assert summary.startswith(f"== {name} ({out.name}, ") and len(summary.splitlines()) > 1


def summarize(*paths: str) -> str:
    """`python -m benchmarks.summary PATHS` (no paths: the committed result files)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.summary", *paths], cwd=REPO,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_every_committed_result_file_has_a_summary() -> None:
    results = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    headers = [line for line in summarize().splitlines() if line.startswith("== ")]
    assert [h.split(" (")[1].split(",")[0] for h in headers] == [p.name for p in results]
