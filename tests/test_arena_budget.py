"""A process rewriting its own allocator's memory cannot make the root reader of its arena
statistics read, wait or remember without limit (issue 22, point 1). The attacker is the
real `poker` fixture (a jemalloc program) run as uid 65534 through setpriv; it writes what
the test computes from ctprofd's layout of its binary. Each attack is read by a root
`ctprofd snapshot`, beside a root jemalloc fixture that must be read to the byte."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from ctprofd.probe import arena_stats
from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import THREADS
from ctprofd.report import tags
from support.poker import (ATTACKS, Poker, distinct_overlapping_arenas, long_cache_ring,
                           sharded_bins_in_1024_arenas)
from support.procs import assert_no_thread_stopped_or_traced

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
          "--bounding-set=-all", "--")
RSS_LIMIT_KIB = 256 * 1024  # the bound on the daemon's peak RSS


@pytest.fixture
def poker(fixture_bins, spawn_process) -> Poker:
    """The poker program run as nobody, with its layout as `offsets --json` exports it."""
    exported = subprocess.run([sys.executable, "-m", "ctprofd", "offsets", "--json",
                               str(fixture_bins.poker), "--cache-dir", ""],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    return Poker(spawn_process([fixture_bins.poker], prefix=NOBODY), json.loads(exported.stdout))


def snapshot_as_root(pids: list[int], tmp_path) -> tuple[dict, int]:
    """`ctprofd snapshot --json` of `pids` as root, its layouts cached in tmp_path/cache:
    its output and its peak RSS in KiB."""
    argv = [sys.executable, "-m", "ctprofd", "snapshot", "--json", "--cache-dir",
            str(tmp_path / "cache"), "--log-level", "warning"]
    for pid in pids:
        argv += ["--pid", str(pid)]
    out, err = tmp_path / "snapshot.json", tmp_path / "snapshot.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        child = subprocess.Popen(argv, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode in (0, 1), err.read_text()
    return json.loads(out.read_text()), usage.ru_maxrss


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__)
def test_an_arena_rewriting_process_is_bounded_and_others_read_exactly(
        attack, poker, fixture_bins, spawn_fixture, tmp_path):
    assert os.stat(f"/proc/{poker.proc.pid}").st_uid == 65534
    reference = spawn_fixture(fixture_bins["static"], 4)  # root, read beside it
    # the layouts parsed and cached before: the snapshot measured holds no cold DWARF parse
    snapshot_as_root([poker.proc.pid, reference.pid], tmp_path)
    assert len(list((tmp_path / "cache/layouts").glob("*.json"))) >= 2
    attack(poker)
    snapshot, rss_kib = snapshot_as_root([poker.proc.pid, reference.pid], tmp_path)
    processes = {p["pid"]: p for p in snapshot["processes"]}
    hostile, root = processes[poker.proc.pid], processes[reference.pid]
    print(f"{attack.__name__}: {snapshot['duration_seconds']:.2f} s, peak RSS "
          f"{rss_kib // 1024} MiB, hostile totals from {hostile['totals_source']}: "
          f"{hostile.get('totals_reason')}; failures {snapshot['failures']}")
    assert rss_kib <= RSS_LIMIT_KIB
    assert snapshot["duration_seconds"] <= arena_stats.BUDGET_SECONDS * 5  # a hang guard
    assert {(t["tid"], t["allocated_bytes"], t["deallocated_bytes"]) for t in root["threads"]} \
        == {(t["tid"], t["allocated"], t["deallocated"]) for t in reference.threads}
    assert root["totals_source"] == "arena" and root["allocator"]["active_bytes"] > 0
    assert 0 <= hostile["deallocated_bytes"] <= hostile["allocated_bytes"]
    if hostile["totals_source"] == "threads":  # no allocator figures then: absent, not 0
        assert hostile["allocator"] is None
    if attack in (long_cache_ring, sharded_bins_in_1024_arenas):
        assert hostile["totals_source"] == "threads"
        assert snapshot["failures"].get(tags.ARENA_BUDGET) == 1
        [failed] = snapshot["failed_pids"]
        assert (failed["pid"], failed["tag"]) == (poker.proc.pid, tags.ARENA_BUDGET)
        assert "budget" in failed["reason"]
    elif attack is not distinct_overlapping_arenas:
        assert hostile["totals_source"] == "threads"
        assert "refused" in hostile["totals_reason"]
    for pid in (poker.proc.pid, reference.pid):
        assert_no_thread_stopped_or_traced(pid)


def test_over_budget_is_counted_every_snapshot_warned_once_and_not_reread_each_time(
        poker, caplog):
    """The daemon's view over snapshots: the tag in each, one warning, and the whole read
    retried only after skipping 1, 2, 4, ... snapshots (a counting reader sees the ranges asked
    for)."""
    long_cache_ring(poker)
    engine = Capturer(CaptureSettings(debug_dirs=()))
    asked: list[int] = []
    read = engine.prober.read_ranges

    def counting(pid: int, ranges: list[tuple[int, int]]) -> list:
        asked[-1] += len(ranges)
        return read(pid, ranges)

    engine.prober.read_ranges = counting
    try:
        with caplog.at_level(logging.WARNING, logger="ctprofd.probe.capture"):
            snapshots = []
            for _ in range(7):
                asked.append(0)
                snapshots.append(engine.capture(pids=[poker.proc.pid]))
    finally:
        engine.close()
    assert [s.failures.get(tags.ARENA_BUDGET) for s in snapshots] == [1] * 7
    assert [s.processes[0].totals_source for s in snapshots] == [THREADS] * 7
    assert [s.processes[0].allocator for s in snapshots] == [None] * 7
    warned = [r for r in caplog.records if "over budget" in r.getMessage()]
    assert len(warned) == 1 and str(poker.proc.pid) in warned[0].getMessage()
    full = [i for i, n in enumerate(asked) if n > 1000]  # the whole walk, not the threads
    assert full == [0, 2, 5], asked
    assert_no_thread_stopped_or_traced(poker.proc.pid)
