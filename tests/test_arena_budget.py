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
from support.procs import assert_no_thread_stopped_or_traced

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
          "--bounding-set=-all", "--")
RSS_LIMIT_KIB = 256 * 1024  # the bound on the daemon's peak RSS


class Poker:
    """The attacker: a jemalloc program writing its own memory on command."""

    def __init__(self, proc, layout: dict) -> None:
        self.proc, self.arena = proc, layout["arena"]
        self.base = self._base()

    def _base(self) -> int:
        exe = os.stat(f"/proc/{self.proc.pid}/exe")
        with open(f"/proc/{self.proc.pid}/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and int(fields[2], 16) == 0 and int(fields[4]) == exe.st_ino:
                    return int(fields[0].split("-")[0], 16)
        raise AssertionError("the poker's executable is not mapped")

    def region(self, size: int) -> int:
        self.proc.send(f"REGION {size}")
        word, address = self.proc.readline().split()
        assert word == "REGION"
        return int(address, 16)

    def fill(self, wide: int, address: int, count: int, stride: int, value: int,
             step: int = 0) -> None:
        self.proc.send(f"FILL{wide} {address:#x} {count} {stride} {value:#x} {step}")
        assert self.proc.readline() == "DONE"

    def at(self, name: str) -> int:
        return self.base + self.arena[name]

    def peek(self, address: int, size: int) -> bytes:
        with open(f"/proc/{self.proc.pid}/mem", "rb") as mem:
            mem.seek(address)
            return mem.read(size)

    def arena0(self) -> int:
        """Where arenas[0] leads: the real arena 0."""
        return int.from_bytes(self.peek(self.at("arenas"), 8), "little")


@pytest.fixture
def poker(fixture_bins, spawn_process) -> Poker:
    """The poker program run as nobody, with its layout as `offsets --json` exports it."""
    exported = subprocess.run([sys.executable, "-m", "ctprofd", "offsets", "--json",
                               str(fixture_bins.poker), "--cache-dir", ""],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    return Poker(spawn_process([fixture_bins.poker], prefix=NOBODY), json.loads(exported.stdout))


def same_region_arenas(poker: Poker) -> None:
    """narenas 1024, every arenas[i] but the real first pointing at one zeroed 1 MiB region."""
    region = poker.region(1 << 20)
    poker.fill(64, poker.at("arenas") + 8, 1023, 8, region)
    poker.fill(32, poker.at("narenas_total"), 1, 4, 1024)


def distinct_overlapping_arenas(poker: Poker) -> None:
    """narenas 1024, each arenas[i] a distinct address 64 bytes apart in one region, with
    the index it must hold: they pass every check, and read what 1,024 real arenas would."""
    region = poker.region(1 << 20)
    poker.fill(64, poker.at("arenas") + 8, 1023, 8, region, 64)
    poker.fill(32, region + poker.arena["arena_ind"], 1023, 64, 1, 1)
    poker.fill(32, poker.at("narenas_total"), 1, 4, 1024)


def huge_shard_counts(poker: Poker) -> None:
    """Every bin declares 4096 shards."""
    nbins = poker.arena["nsizes"] - poker.arena["nlarge"]
    poker.fill(32, poker.at("bin_infos") + poker.arena["bin_info_shards"], nbins,
               poker.arena["bin_info_size"], 4096)


def sharded_bins_in_1024_arenas(poker: Poker) -> None:
    """Every bin 64-way sharded, as many as jemalloc allows, in 1,024 overlapping arenas:
    half a gigabyte of bins to read, each value plausible."""
    distinct_overlapping_arenas(poker)
    nbins = poker.arena["nsizes"] - poker.arena["nlarge"]
    poker.fill(32, poker.at("bin_infos") + poker.arena["bin_info_shards"], nbins,
               poker.arena["bin_info_size"], 64)
    first = int.from_bytes(poker.peek(poker.at("arena_bin_offsets"), 4), "little")
    poker.fill(32, poker.at("arena_bin_offsets"), nbins, 4, first,
               64 * poker.arena["bin_size"])  # the shards one after the other, as declared


def long_cache_ring(poker: Poker) -> None:
    """Arena 0's ring of thread caches made 65,535 descriptors long, each leading to
    another bin array (8 bytes apart, overlapping: the attacker's memory stays small)."""
    count, stride = 65535, 32
    ring = poker.region(count * stride + 64)
    arrays = poker.region(count * 8 + 8192)
    poker.fill(64, ring + poker.arena["descriptor_next"], count - 1, stride, ring + stride,
               stride)
    poker.fill(64, ring + poker.arena["descriptor_bins"], count, stride, arrays, 8)
    poker.fill(64, poker.arena0() + poker.arena["arena_descriptors"], 1, 8, ring)


def failing_last_field(poker: Poker) -> None:
    """The last field read (the thread caches' stack size) made implausible, so that every
    read fails at its very end."""
    poker.fill(64, poker.at("tcache_bin_alloc_size"), 1, 8, (1 << 64) - 4096)


ATTACKS = [same_region_arenas, distinct_overlapping_arenas, huge_shard_counts,
           sharded_bins_in_1024_arenas, long_cache_ring, failing_last_field]


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
    assert root["totals_source"] == "arena"
    assert 0 <= hostile["deallocated_bytes"] <= hostile["allocated_bytes"]
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
    retried only after 2, 4, ... snapshots (a counting reader sees the ranges asked for)."""
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
    warned = [r for r in caplog.records if "over budget" in r.getMessage()]
    assert len(warned) == 1 and str(poker.proc.pid) in warned[0].getMessage()
    full = [i for i, n in enumerate(asked) if n > 1000]  # the whole walk, not the threads
    assert full == [0, 2, 6], asked
    assert_no_thread_stopped_or_traced(poker.proc.pid)
