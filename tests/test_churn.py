"""Thread churn against real processes: threads that live well under a millisecond, a few
thousand a second. Their exits are never failures nor a privilege problem, and the process
totals count every thread that ever ran (from jemalloc's arena statistics), checked against
the truth the fixture sums from every thread's own mallctl("thread.allocated") report."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import ARENA, THREADS
from ctprofd.resolve import offsets_file
from support.procs import assert_no_thread_stopped_or_traced

MIB = 1 << 20


def capturer(fixture_bins) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),)))


def paused_truth(churn, threads: int = 0) -> tuple[int, int]:
    """Stop the churn (all its threads joined) and read its truth: (allocated, deallocated);
    first let it run until `threads` threads have ended."""
    while True:
        churn.send("pause")
        truth = json.loads(churn.readline())
        if truth["threads"] >= threads:
            return truth["allocated"], truth["deallocated"]
        churn.send("resume")


def assert_close(allocated: int, deallocated: int, truth: tuple[int, int]) -> None:
    """The issue's bounds: allocated and deallocated within 2 %, live within 1 MiB."""
    assert abs(allocated - truth[0]) <= 0.02 * truth[0], (allocated, truth)
    assert abs(deallocated - truth[1]) <= 0.02 * truth[1], (deallocated, truth)
    assert abs((allocated - deallocated) - (truth[0] - truth[1])) <= MIB, (
        allocated - deallocated, truth[0] - truth[1])


def test_exit_races_under_churn_are_not_failures(fixture_bins, spawn_process):
    """As root: a thread gone before PTRACE_SEIZE (ESRCH, or EPERM for a zombie) or while
    stopping is an exit race, so the privilege gate never opens."""
    churn = spawn_process([fixture_bins.churn, "4", "200"])
    engine = capturer(fixture_bins)
    try:
        for _ in range(40):
            snapshot = engine.capture(pids=[churn.pid])
            assert snapshot.summary.jemalloc_detected == 1
            assert not snapshot.summary.privilege_dominant, snapshot.failures
            assert snapshot.summary.failed == 0, snapshot.failures
    finally:
        engine.close()
    assert engine.stats.ptrace_stops > 0 and engine.stats.exit_races > 0
    assert_no_thread_stopped_or_traced(churn.pid)


def test_totals_count_every_thread_that_ever_ran(fixture_bins, spawn_process):
    """Snapshots taken while threads come and go, then one with the churn paused: the totals
    never go backwards, and match the truth of every thread that ever ran."""
    churn = spawn_process([fixture_bins.churn, "4", "200"])
    engine = capturer(fixture_bins)
    seen: list[tuple[int, int]] = []
    try:
        for round in range(1, 4):
            churn.send("resume")
            for _ in range(15):
                [process] = engine.capture(pids=[churn.pid]).processes
                assert process.totals_source == ARENA
                seen.append((process.allocated_bytes, process.deallocated_bytes))
            truth = paused_truth(churn, threads=1000 * round)  # thousands of threads ran
            [process] = engine.capture(pids=[churn.pid]).processes
            seen.append((process.allocated_bytes, process.deallocated_bytes))
            assert_close(*seen[-1], truth)
    finally:
        engine.close()
    assert [a for a, _ in seen] == sorted(a for a, _ in seen)
    assert [d for _, d in seen] == sorted(d for _, d in seen)


def test_snapshot_command_matches_the_truth_under_churn(fixture_bins, spawn_process):
    """A ctprofd started after thousands of threads ended still counts them all."""
    churn = spawn_process([fixture_bins.churn, "8", "100"])
    truth = paused_truth(churn, threads=2000)
    result = subprocess_snapshot(fixture_bins, churn.pid)
    [process] = result["processes"]
    assert process["totals_source"] == ARENA
    assert_close(process["allocated_bytes"], process["deallocated_bytes"], truth)
    assert result["probe_summary"]["failed"] == 0


def subprocess_snapshot(fixture_bins, pid: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "ctprofd", "snapshot", "--json", "--cache-dir", "",
                             "--pid", str(pid), "--debug-dir", str(fixture_bins.debug_root)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_pool_that_shrinks_and_grows_keeps_live_bytes_flat(fixture_bins, spawn_process):
    """Pool threads that live up to 20 ms are read mid-life, then free what they held and
    exit: the frees made after their last read must still count, or live bytes would only
    rise (a leak that is not there). At every pause, live bytes equal the truth's."""
    churn = spawn_process([fixture_bins.churn, "2", "20000"])
    engine = capturer(fixture_bins)
    lives = []
    try:
        for size in (16, 2, 32, 4, 24, 1):
            churn.send(f"threads {size}")
            churn.send("resume")
            for _ in range(10):
                engine.capture(pids=[churn.pid])
            truth = paused_truth(churn)
            [process] = engine.capture(pids=[churn.pid]).processes
            assert_close(process.allocated_bytes, process.deallocated_bytes, truth)
            lives.append(process.allocated_bytes - process.deallocated_bytes)
    finally:
        engine.close()
    assert max(lives) - min(lives) <= MIB, lives


def test_without_arena_types_totals_are_per_thread_sums(fixture_bins, spawn_fixture,
                                                        tmp_path):
    """A layout that carries no arena statistics (an offsets file without them, as offsets
    found without DWARF would be) keeps the per-thread sums, and says so."""
    exported = tmp_path / "offsets.json"
    binary = fixture_bins["static"].binary
    result = subprocess.run([sys.executable, "-m", "ctprofd", "offsets", "export",
                             str(exported), str(binary), "--cache-dir", ""], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(exported.read_text())
    for layout in data["layouts"].values():
        assert layout.pop("arena") is not None
    exported.write_text(json.dumps(data))
    fixture = spawn_fixture(binary, 4)
    engine = Capturer(CaptureSettings(debug_dirs=(), offsets_files=(str(exported),)))
    try:
        [process] = engine.capture(pids=[fixture.pid]).processes
    finally:
        engine.close()
    assert process.totals_source == THREADS
    assert (process.allocated_bytes, process.deallocated_bytes) == (
        sum(t["allocated"] for t in fixture.threads),
        sum(t["deallocated"] for t in fixture.threads))
    assert engine.stats.elf_opens == 1  # the layout came from the file, not the DWARF


def test_a_restart_never_reports_totals_below_the_last_ones(fixture_bins, spawn_process,
                                                            tmp_path):
    """The last reported totals are kept in the state directory: a ctprofd started again,
    here with layouts that carry no arena statistics (per-thread sums only, far below the
    truth after thousands of threads), still reports no less than before."""
    churn = spawn_process([fixture_bins.churn, "4", "200"])
    truth = paused_truth(churn, threads=1000)
    state = str(tmp_path)
    first = Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),),
                                     state_dir=state, select=lambda p: p.pid == churn.pid))
    try:
        [before] = [p for p in first.capture().processes if p.pid == churn.pid]
        exported = tmp_path / "offsets.json"
        offsets_file.dump([replace(layout, arena=None) for layout in first.cache.layouts()],
                          str(exported))
    finally:
        first.close()
    assert before.totals_source == ARENA
    assert_close(before.allocated_bytes, before.deallocated_bytes, truth)
    again = Capturer(CaptureSettings(debug_dirs=(), offsets_files=(str(exported),),
                                     state_dir=state, select=lambda p: p.pid == churn.pid))
    try:
        [after] = [p for p in again.capture().processes if p.pid == churn.pid]
    finally:
        again.close()
    assert after.totals_source == THREADS
    assert (after.allocated_bytes, after.deallocated_bytes) == (
        before.allocated_bytes, before.deallocated_bytes)
