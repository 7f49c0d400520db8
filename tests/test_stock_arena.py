"""Arena statistics without DWARF: Debian's stock, stripped libjemalloc.so.2 read through
the layout table generated from a reference build (ctprofd/resolve/arena_tables.py), with
the truth read inside each target by its own mallctl."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctprofd.export.aggregate import Aggregator
from ctprofd.probe.arena_stats import ArenaReadError, read_totals
from ctprofd.report.snapshot import ARENA, THREADS
from ctprofd.resolve import arena_tables
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import TsdLayout, resolve_path
from support.build import _compile
from support.procs import assert_no_thread_stopped_or_traced, mapped_at, wait_until
from support.redis import Redis
from support.stats_shim import STOCK, StatsShim
from test_churn import MIB, assert_close, paused_truth
from test_stock_programs import no_debug_info

DEBIAN_BUILD = Path("/var/cache/ctprofd/jemalloc-5.3.0-debian/lib/libjemalloc.so.2")
REPO = Path(__file__).resolve().parents[1]
TABLE = "debian-12-libjemalloc2"
# no dbgsym, no debuginfod: the Capturers look in no debug directory (no_debug_info), and
# DEBUGINFOD_URLS, which they and the ctprofd commands run here would ask, is unset
pytestmark = pytest.mark.usefixtures("no_debuginfod")

# The python3 workloads of issue 20. Each step ends with the truth read by the program's own
# mallctl (through ctypes: LD_PRELOAD makes the stock library's mallctl global), printed as
# one JSON line, then waits for a line on stdin.
WORKLOAD = r"""
import ctypes, json, sys, threading
lib = ctypes.CDLL(None)
def read(name):
    value = ctypes.c_size_t()
    size = ctypes.c_size_t(8)
    assert lib.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0
    return value.value
def truth(step):
    epoch = ctypes.c_uint64(1)
    assert lib.mallctl(b"epoch", None, None, ctypes.byref(epoch), 8) == 0
    print(json.dumps({"step": step, "allocated": read("stats.allocated"),
                      "tcache": read("stats.arenas.4096.tcache_bytes")}), flush=True)
    sys.stdin.readline()
def run(target):
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
blocks = []
truth("start")
for round in range(5):
    if sys.argv[1] == "free-in-thread":   # (a) main allocates 100 MiB, a thread frees it
        blocks = [bytearray(1 << 20) for _ in range(100)]
        truth(f"allocated {round}")
        run(blocks.clear)
    else:                                 # (b) a thread allocates 200 MiB, main frees it
        run(lambda: blocks.extend(bytearray(1 << 20) for _ in range(200)))
        truth(f"allocated {round}")
        blocks.clear()
    truth(f"freed {round}")
print("DONE", flush=True)
"""


def load_generator():
    spec = importlib.util.spec_from_file_location("arena_tables_script",
                                                  REPO / "scripts/arena_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_debian_table_regenerates_from_its_reference_build():
    """The checked-in table of Debian's library is what its reference build (made by
    setup: scripts/build-jemalloc.sh debian) gives, to the byte."""
    assert DEBIAN_BUILD.exists(), "run scripts/build-jemalloc.sh debian (scripts/setup.sh --test)"
    generator = load_generator()
    checked_in = json.loads(arena_tables.TABLES.read_text())
    [(name, lib, how)] = [b for b in generator.REFERENCE_BUILDS if b[0] == TABLE]
    [entry] = [t for t in checked_in["tables"] if t["name"] == TABLE]
    assert generator.entry(name, lib, how) == entry
    tables, _ = generator.generate(checked_in)
    assert generator.render(tables) == arena_tables.TABLES.read_text()


def test_reference_build_places_its_data_as_debian_does(tmp_path):
    """Why the table applies: the stripped library's data sections are where the reference
    build has them (only the code differs), and the DWARF route on the reference build
    gives the very layout the table holds."""
    stock = resolve_path(STOCK, DebugSearch(()))
    reference = resolve_path(str(DEBIAN_BUILD), DebugSearch(()))
    assert isinstance(stock, TsdLayout) and isinstance(reference, TsdLayout)
    assert stock.code_source and stock.arena is not None and stock.arena.table == TABLE
    assert reference.dwarf_source == "embedded" and reference.arena is not None
    assert dataclasses.replace(stock.arena, table="") == reference.arena
    out = subprocess.run([sys.executable, "-m", "ctprofd", "offsets", "--cache-dir", "",
                          "--debug-dir", str(tmp_path / "empty"), STOCK],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert f"arena statistics:    yes (layout table {TABLE})" in out.stdout, out


def test_table_refused_where_the_data_is_placed_otherwise(tmp_path):
    """The same jemalloc version built otherwise (--enable-prof alone), stripped: its
    offsets come from code, the table is refused, and the reason says what differs."""
    stripped = tmp_path / "libjemalloc.so.2"
    subprocess.run(["strip", "-o", stripped,
                    "/var/cache/ctprofd/jemalloc-5.3.0-prof/lib/libjemalloc.so.2"], check=True)
    layout = resolve_path(str(stripped), DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.code_source and layout.arena is None
    assert re.search(rf"table {TABLE}: its data is placed otherwise \(.*\.bss at ",
                     layout.arena_missing), layout.arena_missing


def spawn_workload(spawn_process, mode: str, conf: str = ""):
    return spawn_process([sys.executable, "-c", WORKLOAD, mode], ready=None,
                         env={"LD_PRELOAD": STOCK, "PATH": "/usr/bin:/bin",
                              **({"MALLOC_CONF": conf} if conf else {})})


@pytest.mark.parametrize("mode, conf", [
    ("free-in-thread", ""), ("allocate-in-thread", ""),
    # fewer cached classes than bins, and bins of 4 shards: read from the process, not the table
    ("allocate-in-thread", "tcache_max:4096,bin_shards:1-160:4")])
def test_python_workloads_on_the_stock_library(spawn_process, tmp_path, mode, conf):
    """Issue 20's python3 workloads on Debian's stock library: live bytes within 8 MiB of
    jemalloc's own stats.allocated less what thread caches hold, at every step, never
    negative, and from the arena statistics."""
    workload = spawn_workload(spawn_process, mode, conf)
    engine = no_debug_info()
    steps = 0
    try:
        while (line := workload.readline()) != "DONE":
            truth = json.loads(line)
            [process] = engine.capture(pids=[workload.pid]).processes
            live = process.allocated_bytes - process.deallocated_bytes
            expected = truth["allocated"] - truth["tcache"]
            print(f"{mode} {truth['step']}: live {live}, stats.allocated {truth['allocated']}"
                  f" - tcache {truth['tcache']}")
            assert process.totals_source == ARENA, process.totals_reason
            assert live >= 0 and abs(live - expected) <= 8 * MIB, (truth, live)
            workload.send("")
            steps += 1
    finally:
        engine.close()
    assert steps == 11
    assert_no_thread_stopped_or_traced(workload.pid)


# Issue 20's forking process: holds 256 MiB and forks a child on each FORK; a child allocates
# nothing, it waits for its pipe to close (REAP closes them all), then exits. TRUTH prints
# the parent's own thread.allocated/deallocated (its one thread does all its allocating).
FORKER = r"""
import ctypes, os, sys
lib = ctypes.CDLL(None)
def read(name):
    value = ctypes.c_uint64()
    size = ctypes.c_size_t(8)
    assert lib.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) == 0
    return value.value
held = [bytearray(1 << 20) for _ in range(256)]
children = {}
print("READY", flush=True)
while line := sys.stdin.readline():
    if line == "FORK\n":
        inbound, outbound = os.pipe()
        pid = os.fork()
        if pid == 0:
            for other in (outbound, *children.values()):
                os.close(other)
            os.read(inbound, 1)
            os._exit(0)
        os.close(inbound)
        children[pid] = outbound
        print("CHILD", pid, flush=True)
    elif line == "TRUTH\n":
        print("TRUTH", read("thread.allocated"), read("thread.deallocated"), flush=True)
    elif line == "REAP\n":
        for pid, outbound in children.items():
            os.close(outbound)
            os.waitpid(pid, 0)
        children.clear()
        print("REAPED", flush=True)
"""


def test_forks_on_the_stock_library_are_counted_once(spawn_process):
    """Issue 20's forking process on Debian's stock library, read by the machine-code route
    and the Debian table: a process holding 256 MiB forks six children that allocate
    nothing. Its comm series' allocated stays within 10 % of the parent's own
    thread.allocated after every fork and after the children are reaped (it was x12), and
    no live figure is negative."""
    forker = spawn_process([sys.executable, "-c", FORKER],
                           env={"LD_PRELOAD": STOCK, "PATH": "/usr/bin:/bin"})
    family = {forker.pid}
    engine = no_debug_info(select=lambda p: p.pid in family)
    aggregator = Aggregator(("comm",), max_series=100, retention=3600)
    alive = lambda pid, _start: os.path.exists(f"/proc/{pid}")  # noqa: E731

    def parents_own() -> int:
        forker.send("TRUTH")
        word, allocated, _ = forker.readline().split()
        assert word == "TRUTH"
        return int(allocated)

    def check(children: int) -> None:
        snapshot = engine.capture()
        assert snapshot.summary.failed == 0, snapshot.failures
        assert len(snapshot.processes) == 1 + children
        for process in snapshot.processes:
            assert process.totals_source == ARENA, process.totals_reason
            assert process.allocated_bytes >= process.deallocated_bytes >= 0
        [series] = aggregator.update(snapshot, alive).series
        truth = parents_own()
        print(f"{children} children: comm {series.labels[0]} allocated "
              f"{series.allocated_bytes}, live {series.live_bytes}; parent's own {truth}")
        assert series.processes == 1 + children
        assert abs(series.allocated_bytes - truth) <= truth // 10, (series, truth)
        assert series.live_bytes >= 0
        assert series.deallocated_bytes <= series.allocated_bytes

    try:
        check(children=0)
        assert parents_own() >= 256 * MIB
        for children in range(1, 7):
            forker.send("FORK")
            word, child = forker.readline().split()
            assert word == "CHILD"
            family.add(int(child))
            check(children)
        forker.send("REAP")
        assert forker.readline() == "REAPED"
        check(children=0)
    finally:
        engine.close()
    [layout] = engine.cache.layouts()
    assert layout.source == "code: malloc/free fast paths"
    assert layout.arena is not None and layout.arena.table == TABLE
    assert_no_thread_stopped_or_traced(forker.pid)


def test_churn_on_the_stock_library(fixture_bins, spawn_process, tmp_path):
    """The thread-churn fixture linked against Debian's stock library: the bars the debug
    build meets (tests/test_churn.py), allocated within 2 %, live within 1 MiB."""
    churn_bin = tmp_path / "churn-stock"
    _compile("churn.c", churn_bin, fixture_bins.jemalloc_dir, [STOCK, "-lpthread"])
    churn = spawn_process([churn_bin, "4", "200"])
    engine = no_debug_info()
    try:
        for _ in range(2):
            churn.send("resume")
            for _ in range(10):
                [process] = engine.capture(pids=[churn.pid]).processes
                assert process.totals_source == ARENA, process.totals_reason
            truth = paused_truth(churn, threads=2000)
            [process] = engine.capture(pids=[churn.pid]).processes
            print(f"churn: {process.allocated_bytes}/{process.deallocated_bytes}, truth {truth}")
            assert_close(process.allocated_bytes, process.deallocated_bytes, truth)
    finally:
        engine.close()
    assert [layout.source for layout in engine.cache.layouts()] == [
        "code: malloc/free fast paths"]
    assert_no_thread_stopped_or_traced(churn.pid)


def test_a_table_the_live_process_contradicts_is_refused(spawn_process):
    """Before a figure is believed, the live process is checked against the table: with
    arena_t's own index placed wrongly, arenas[0] leads to an arena of another index."""
    layout = resolve_path(STOCK, DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.arena is not None
    workload = spawn_workload(spawn_process, "free-in-thread")
    workload.readline()
    base = mapped_at(workload.pid, "libjemalloc.so.2")
    assert read_totals(workload.pid, layout.arena, base).live > 0
    wrong = dataclasses.replace(layout.arena, arena_ind=layout.arena.arena_ind + 8)
    with pytest.raises(ArenaReadError, match=r"arenas\[0\] leads to an arena whose own index "
                                             r"is \d+"):
        read_totals(workload.pid, wrong, base)
    wrong = dataclasses.replace(layout.arena, bin_info_reg_size=layout.arena.bin_info_nregs)
    with pytest.raises(ArenaReadError, match=r"bin_infos\[0\] holds .* the size class is 8 "):
        read_totals(workload.pid, wrong, base)
    assert_no_thread_stopped_or_traced(workload.pid)


def test_a_process_refused_a_table_says_why(spawn_process, tmp_path):
    """A process on a stripped jemalloc of the right version built otherwise keeps
    per-thread totals, and its snapshot says why."""
    stripped = tmp_path / "libjemalloc.so.2"
    subprocess.run(["strip", "-o", stripped,
                    "/var/cache/ctprofd/jemalloc-5.3.0-prof/lib/libjemalloc.so.2"], check=True)
    stripped.chmod(0o755)
    workload = spawn_process([sys.executable, "-c", WORKLOAD, "free-in-thread"], ready=None,
                             env={"LD_PRELOAD": str(stripped), "PATH": "/usr/bin:/bin"})
    workload.readline()
    out = subprocess.run([sys.executable, "-m", "ctprofd", "snapshot", "--json", "--cache-dir",
                          "", "--debug-dir", str(tmp_path / "empty"), "--pid",
                          str(workload.pid)], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    [process] = json.loads(out.stdout)["processes"]
    assert process["totals_source"] == THREADS
    assert re.match(rf"no arena layout: table {TABLE}: its data is placed otherwise",
                    process["totals_reason"]), process["totals_reason"]


def test_redis_under_load_reads_its_arena_statistics(spawn_process, tmp_path):
    """Debian's redis-server on the stock library, tcache on, while redis-benchmark writes:
    live bytes within 1 % of jemalloc's stats.allocated (redis's allocator_allocated) less
    the bytes in thread caches, both read inside redis by an LD_PRELOAD shim around each
    snapshot."""
    shim = StatsShim(tmp_path)
    # maxmemory: the load loops (-l) and LPUSHes to one list, so without a bound redis grows
    # by hundreds of MB a minute for as long as the snapshots take on a busy host
    redis = Redis(spawn_process, tmp_path, "--maxmemory", "256mb",
                  "--maxmemory-policy", "allkeys-lru",
                  env={**shim.env, "PATH": "/usr/bin:/bin"})

    def truth() -> int:
        stats = shim.read()
        return stats["allocated"] - stats["tcache"]

    # -l: the load loops until killed, whatever the snapshots take on a busy host
    load = subprocess.Popen(["redis-benchmark", "-s", str(redis.socket), "-l", "-n", "2000000", "-c", "8",
                             "-r", "200000", "-d", "200", "-t", "set,lpush,get", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = no_debug_info()
    try:
        wait_until(lambda: truth() > 20 * MIB, "redis holds 20 MiB", poll=0.1)
        for _ in range(10):
            first = truth()
            [process] = engine.capture(pids=[redis.pid]).processes
            last = truth()
            live = process.allocated_bytes - process.deallocated_bytes
            print(f"redis: live {live}, stats.allocated - tcache {first} .. {last}")
            assert process.totals_source == ARENA, process.totals_reason
            assert min(first, last) * 0.99 <= live <= max(first, last) * 1.01, (live, first, last)
        assert load.poll() is None  # the snapshots were taken under load
    finally:
        load.kill()
        load.wait()
        shim.close()
        engine.close()
    assert_no_thread_stopped_or_traced(redis.pid)


def test_an_offsets_file_carries_the_table_layout(spawn_process, tmp_path):
    """`offsets export` of the stock library writes the layout with its arena part (from the
    table); a host importing that file reads the arena statistics with the layout from it."""
    exported = tmp_path / "offsets.json"
    result = subprocess.run([sys.executable, "-m", "ctprofd", "offsets", "export", exported,
                             STOCK, "--cache-dir", "", "--debug-dir", str(tmp_path / "empty")],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    [layout] = json.loads(exported.read_text())["layouts"].values()
    assert layout["arena"]["table"] == TABLE
    workload = spawn_workload(spawn_process, "free-in-thread")
    truth = json.loads(workload.readline())
    engine = no_debug_info(offsets_files=(str(exported),))
    try:
        [process] = engine.capture(pids=[workload.pid]).processes
    finally:
        engine.close()
    live = process.allocated_bytes - process.deallocated_bytes
    assert process.totals_source == ARENA, process.totals_reason
    assert abs(live - (truth["allocated"] - truth["tcache"])) <= 8 * MIB
    assert [layout.dwarf_source for layout in engine.cache.layouts()
            if layout.arena is not None] == [f"imported from {exported}"]
