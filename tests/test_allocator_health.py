"""The allocator's health figures (stats.active, resident, mapped, retained, metadata, the
dirty and muzzy pages), read from outside, against what the process's own mallctl says
after `epoch`: on the debug jemalloc (its DWARF) and on Debian's stock, stripped library
(the layout table), in a real process that fragments its heap and then holds still."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ctprofd.probe import memory
from ctprofd.probe.arena_stats import read_totals, unchanged
from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import ARENA, THREADS
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import HEALTH_FIELDS, TsdLayout, resolve_path
from support.procs import assert_no_thread_stopped_or_traced, mapped_at, wait_until
from support.redis import Redis

STOCK = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
FIGURES = ("allocated", "active", "resident", "mapped", "retained", "metadata", "dirty",
           "muzzy")

# Fragments its heap (small blocks, three in four freed again; 3 MiB blocks, every other
# one freed), in the main thread and in a thread of its own (another arena with narenas),
# then holds still: for each line on stdin, jemalloc's own figures after `epoch` as one
# JSON line (ctypes: LD_PRELOAD makes the library's mallctl global).
WORKLOAD = r"""
import ctypes, json, sys, threading
lib = ctypes.CDLL(None)
def read(name, kind=ctypes.c_size_t):
    value, size = kind(), ctypes.c_size_t(ctypes.sizeof(kind))
    assert lib.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0
    return value.value
kept = []
def fragment():
    small = [bytearray(200) for _ in range(200000)]
    del small[::4]; del small[::3]
    big = [bytearray(3 << 20) for _ in range(20)]
    del big[::2]
    kept.append((small, big))
fragment()
thread = threading.Thread(target=fragment)
thread.start()
thread.join()
names = ("allocated", "active", "resident", "mapped", "retained", "metadata")
while True:
    epoch = ctypes.c_uint64(1)
    assert lib.mallctl(b"epoch", None, None, ctypes.byref(epoch), 8) == 0
    page = read("arenas.page")
    truth = {name: read("stats." + name) for name in names}
    truth.update(dirty=read("stats.arenas.4096.pdirty") * page,
                 muzzy=read("stats.arenas.4096.pmuzzy") * page,
                 narenas=read("arenas.narenas", ctypes.c_uint))
    print(json.dumps(truth), flush=True)
    if not sys.stdin.readline():
        break
"""


def spawn_workload(spawn_process, library: str, conf: str):
    process = spawn_process([sys.executable, "-c", WORKLOAD], ready=None,
                            env={"LD_PRELOAD": library, "PATH": "/usr/bin:/bin",
                                 **({"MALLOC_CONF": conf} if conf else {})})
    return process, json.loads(process.readline(timeout=60))


def settle(pid: int, arena, base: int):
    """Arena totals of the workload once it holds still: the thread it joined tears its
    cache down after the join returns, which moves the statistics for a moment."""
    def attempt():
        totals = read_totals(pid, arena, base)
        return totals if unchanged(pid, arena, base, totals) else None
    return wait_until(attempt, "the workload holds still", poll=0.05)


def assert_within(got: dict, before: dict, after: dict, share: float = 0.02) -> None:
    """Each figure within `share` of the truth read just before and just after (with
    background threads, decay moves pages between the two)."""
    for name in FIGURES:
        low, high = sorted((before[name], after[name]))
        assert low * (1 - share) <= got[name] <= high * (1 + share), (name, got, before, after)


@pytest.mark.parametrize("conf", [
    "",                                      # dirty pages left to decay
    # purged lazily by the decay threads at once: muzzy pages, kept
    "dirty_decay_ms:1,muzzy_decay_ms:-1,background_thread:true",
    "narenas:3,background_thread:true",      # arenas and decay threads
])
@pytest.mark.parametrize("route", ["dwarf", "table"])
def test_each_figure_is_the_process_own(spawn_process, jemalloc_dir, tmp_path, route, conf):
    """Every figure within 2 % of mallctl("stats.<name>") (the bar of issue 26), on the debug
    build through its DWARF and on the stock library through the layout table."""
    library = str(jemalloc_dir / "lib/libjemalloc.so.2") if route == "dwarf" else STOCK
    workload, before = spawn_workload(spawn_process, library, conf)
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),)))
    try:
        for _ in range(2):  # the second read takes the path of a process that did not move
            [process] = engine.capture(pids=[workload.pid]).processes
            workload.send("")
            after = json.loads(workload.readline(timeout=60))
            assert process.totals_source == ARENA, process.totals_reason
            got = {name: getattr(process.allocator, name) for name in FIGURES}
            print(f"{route} {conf or 'default'}: ctprofd {got}; mallctl {before} .. {after}")
            assert_within(got, before, after)
            before = after
    finally:
        engine.close()
    assert after["retained"] > 0 and after["active"] > after["allocated"]
    if conf.startswith("dirty_decay_ms:1"):
        assert after["muzzy"] > 0
    elif not conf:
        assert after["dirty"] > 0
    else:
        assert after["narenas"] == 3 + 1  # and the huge arena
    assert_no_thread_stopped_or_traced(workload.pid)


def counting(calls: list) -> memory.Reader:
    def read(pid, ranges):
        calls.append(len(ranges))
        return memory.read_ranges(pid, ranges)
    return read


def test_the_figures_add_no_read_call(spawn_process):
    """The health words ride in the calls that read the arena statistics already: as many
    process_vm_readv calls as without them, and one (the check it always had) for a process
    that did not move."""
    layout = resolve_path(STOCK, DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.arena is not None
    workload, _ = spawn_workload(spawn_process, STOCK, "")
    base = mapped_at(workload.pid, "libjemalloc.so.2")
    settle(workload.pid, layout.arena, base)
    without = dataclasses.replace(layout.arena, **{name: None for name in HEALTH_FIELDS})
    calls_with: list[int] = []
    calls_without: list[int] = []
    totals = read_totals(workload.pid, layout.arena, base, counting(calls_with))
    assert read_totals(workload.pid, without, base, counting(calls_without)).health is None
    assert totals.health is not None and len(calls_with) == len(calls_without)
    assert sum(calls_with) > sum(calls_without)  # more ranges in the same calls
    calls: list[int] = []
    assert unchanged(workload.pid, layout.arena, base, totals, counting(calls))
    assert len(calls) == 1


def test_pages_that_moved_alone_are_read_again(spawn_process):
    """A process whose counters and caches did not move is not read in full again unless
    a health word moved (decay purging pages with no allocation): one changed word, here
    served by the reader as the target could have written it, makes it read again."""
    layout = resolve_path(STOCK, DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.arena is not None
    workload, _ = spawn_workload(spawn_process, STOCK, "")
    base = mapped_at(workload.pid, "libjemalloc.so.2")
    totals = settle(workload.pid, layout.arena, base)
    dirty = totals.arenas[0] + layout.arena.arena_dirty_pages

    def decayed(pid, ranges):
        return [(struct.pack("<Q", struct.unpack("<Q", data)[0] ^ 1)
                 if address == dirty else data)
                for (address, _), data in zip(ranges, memory.read_ranges(pid, ranges))]
    assert not unchanged(workload.pid, layout.arena, base, totals, decayed)


def test_absent_where_the_arena_statistics_are_not_read(spawn_process, tmp_path):
    """A process on a stripped jemalloc built otherwise (no table applies) has no figures:
    null in `snapshot --json`, never zeros, and its totals_reason says why."""
    stripped = tmp_path / "libjemalloc.so.2"
    subprocess.run(["strip", "-o", stripped,
                    "/var/cache/ctprofd/jemalloc-5.3.0-prof/lib/libjemalloc.so.2"], check=True)
    stripped.chmod(0o755)
    workload, _ = spawn_workload(spawn_process, str(stripped), "")
    out = subprocess.run([sys.executable, "-m", "ctprofd", "snapshot", "--json", "--cache-dir",
                          "", "--debug-dir", str(tmp_path / "empty"), "--pid",
                          str(workload.pid)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    [process] = json.loads(out.stdout)["processes"]
    assert process["totals_source"] == THREADS and process["allocator"] is None
    assert re.match(r"no arena layout: table \S+: its data is placed otherwise",
                    process["totals_reason"]), process["totals_reason"]


def allocator_info(redis: Redis) -> dict[str, int]:
    """redis's INFO memory figures of its allocator (jemalloc's own, after `epoch`)."""
    fields = dict(line.split(":", 1) for line in redis.cli("info", "memory").splitlines()
                  if line.startswith("allocator_"))
    return {name: int(fields[f"allocator_{name}"]) for name in ("allocated", "active",
                                                                  "resident")}


def next_info(redis: Redis, last: dict[str, int]) -> dict[str, int]:
    """INFO memory's allocator figures once they differ from `last`: redis asks jemalloc
    for them in its cron, every 100 ms, and INFO shows the last answer."""
    seen: list[dict[str, int]] = []
    wait_until(lambda: seen.append(allocator_info(redis)) or seen[-1] != last,
               "redis's cron refreshes its allocator figures", poll=0.002)
    return seen[-1]


def test_redis_under_load_as_its_info_memory(spawn_process, tmp_path):
    """Debian's redis-server on the stock library while redis-benchmark writes: active and
    resident within 2 % of INFO memory's allocator_active and allocator_resident, from
    the refresh of redis's cron just before each snapshot and the one just after."""
    redis = Redis(spawn_process, tmp_path, "--maxmemory", "256mb",
                  "--maxmemory-policy", "allkeys-lru")
    # -l: the load loops until killed, whatever the snapshots take on a busy host
    load = subprocess.Popen(["redis-benchmark", "-s", str(redis.socket), "-l", "-n", "2000000",
                             "-c", "8", "-r", "200000", "-d", "200", "-t", "set,lpush,get",
                             "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),)))
    try:
        wait_until(lambda: allocator_info(redis)["allocated"] > 20 * MIB, "redis holds 20 MiB",
                   poll=0.1)
        engine.capture(pids=[redis.pid])  # attached: the snapshots below only read
        for _ in range(10):
            before = next_info(redis, allocator_info(redis))  # a refresh just now
            [process] = engine.capture(pids=[redis.pid]).processes
            after = next_info(redis, allocator_info(redis))  # the first after the snapshot
            assert process.totals_source == ARENA, process.totals_reason
            got = {name: getattr(process.allocator, name) for name in before}
            print(f"redis: ctprofd {got}; INFO memory {before} .. {after}")
            for name in ("active", "resident"):
                low, high = sorted((before[name], after[name]))
                assert low * 0.98 <= got[name] <= high * 1.02, (name, got, before, after)
        assert load.poll() is None  # the snapshots were taken under load
    finally:
        load.kill()
        load.wait()
        engine.close()
    assert_no_thread_stopped_or_traced(redis.pid)


def fixture_stats(fixture) -> dict[str, int]:
    """jemalloc's own figures inside an alloc_threads fixture (its `stats` command)."""
    fixture.send("stats")
    line = fixture.readline()
    assert line.startswith("STATS "), line
    return json.loads(line[len("STATS "):])


@pytest.mark.parametrize("variant", ["static", "dynamic", "static-stripped-buildid"])
def test_the_fixtures_linked_against_the_debug_jemalloc(fixture_bins, spawn_fixture, variant):
    """The alloc_threads fixture, linked statically and dynamically against the debug
    jemalloc (its DWARF in the binary, or found through a .build-id tree): each figure
    within 2 % of its own mallctl, asked just before and just after each snapshot."""
    fixture = spawn_fixture(fixture_bins[variant], 8)
    engine = Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),)))
    try:
        for _ in range(2):
            before = fixture_stats(fixture)
            [process] = engine.capture(pids=[fixture.pid]).processes
            after = fixture_stats(fixture)
            assert process.totals_source == ARENA, process.totals_reason
            got = {name: getattr(process.allocator, name) for name in FIGURES}
            print(f"{variant}: ctprofd {got}; mallctl {before} .. {after}")
            assert_within(got, before, after)
    finally:
        engine.close()
    assert after["allocated"] > 0 and after["retained"] > 0
    assert_no_thread_stopped_or_traced(fixture.pid)
