"""Debian programs on Debian's stock, stripped libjemalloc.so.2 (package libjemalloc2), with
no debug info anywhere: offsets from its machine code, and redis's own view of its heap as
the truth."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest

from ctprofd.export.aggregate import Aggregator
from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import ARENA
from support.procs import assert_no_thread_stopped_or_traced, wait_until
from support.redis import Redis
from support.stats_shim import STOCK, StatsShim

MIB = 1 << 20
WAIT = 20.0  # bound on a program's start
# no dbgsym, no debuginfod: the Capturers look in no debug directory (no_debug_info), and
# DEBUGINFOD_URLS, which they would ask, is unset
pytestmark = pytest.mark.usefixtures("no_debuginfod")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_debug_info(**settings: Any) -> Capturer:
    """A Capturer that looks in no debug directory (a test run with the no_debuginfod
    fixture: nor asks any debuginfod server)."""
    return Capturer(CaptureSettings(debug_dirs=(), **settings))


def maps_stock_libjemalloc(pid: int) -> bool:
    """The process maps Debian's libjemalloc.so.2 (as /usr/lib/… or /lib/…)."""
    with open(f"/proc/{pid}/maps") as f:
        return any(line.rstrip().endswith(STOCK.removeprefix("/usr")) for line in f)


def test_redis_server_live_bytes_match_allocator_allocated(spawn_process, tmp_path):
    redis = Redis(spawn_process, tmp_path, "--enable-debug-command", "yes")
    cli = redis.cli
    assert maps_stock_libjemalloc(redis.pid)
    assert cli("debug", "populate", "100000", "key", "128").strip() == "OK"
    engine = no_debug_info()
    snapshot = engine.capture(pids=[redis.pid])
    allocated = int(re.search(r"^allocator_allocated:(\d+)", cli("info", "memory"), re.M)[1])
    assert snapshot.summary.failed == 0, snapshot.failures
    [process] = snapshot.processes
    live = process.allocated_bytes - process.deallocated_bytes
    print(f"redis: live {live} bytes, allocator_allocated {allocated}")
    assert abs(live - allocated) <= allocated // 10, (live, allocated)
    assert [layout.source for layout in engine.cache.layouts()] == [
        "code: malloc/free fast paths"]
    assert_no_thread_stopped_or_traced(redis.pid)


def test_varnishd_manager_and_child_are_read(spawn_process, tmp_path):
    port = free_port()
    varnish = spawn_process(["varnishd", "-F", "-n", str(tmp_path / "varnish"), "-a",
                             f"127.0.0.1:{port}", "-b", "127.0.0.1:9", "-s", "malloc,8m"],
                            ready=None, stderr=subprocess.STDOUT)
    while not (started := re.match(r"Debug: Child \((\d+)\) Started", varnish.readline(WAIT))):
        pass
    child = int(started[1])

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        except urllib.error.HTTPError:  # 503: no backend, but the child served it
            return True
        except OSError:
            return False
        return True

    wait_until(answers, "varnishd answers HTTP", poll=0.1)
    assert maps_stock_libjemalloc(varnish.pid) and maps_stock_libjemalloc(child)
    engine = no_debug_info()
    snapshot = engine.capture(pids=[varnish.pid, child])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert {p.pid for p in snapshot.processes} == {varnish.pid, child}
    # the child is a fork() of the manager (no exec): it counts what it did after the fork,
    # less what threads that ended before its first read did (docs/totals.md#forks); it may
    # free more of what it inherited than it allocates (live 0, never below)
    samples = {p.pid: p for p in snapshot.processes}
    assert samples[varnish.pid].allocated_bytes > samples[varnish.pid].deallocated_bytes > 0
    assert samples[child].allocated_bytes >= samples[child].deallocated_bytes >= 0
    assert samples[child].allocated_bytes > 0 and samples[child].threads
    assert [layout.source for layout in engine.cache.layouts()] == [
        "code: malloc/free fast paths"]
    for pid in (varnish.pid, child):
        assert_no_thread_stopped_or_traced(pid)


def children_of(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return found


def test_a_redis_bgsave_does_not_make_the_exe_series_jump(spawn_process, tmp_path):
    """A real redis-server on Debian's stock libjemalloc.so.2 (no debug info): its BGSAVE
    child is a fork holding a copy of the main thread's counters and of every arena
    statistic. Before the BGSAVE, while the child saves and after it is gone (killed once
    read: it saves a key a second, so no window to hit), the exe series is held to what
    redis's own jemalloc counts, read inside redis by the stats shim just before and just
    after each snapshot: allocated to the bytes it counts as requested, live to
    stats.allocated less the thread caches (redis's allocator_allocated less them). Counted
    as read, the child doubled both."""
    shim = StatsShim(tmp_path)
    redis = Redis(spawn_process, tmp_path, "--enable-debug-command", "yes",
                  env={**shim.env, "PATH": "/usr/bin:/bin"})
    cli = redis.cli
    assert cli("debug", "populate", "200000", "key", "256").strip() == "OK"
    # the child saves 1 key a second: it runs until the test kills it, after it was read
    assert cli("config", "set", "rdb-key-save-delay", "1000000").strip() == "OK"
    engine = no_debug_info()
    aggregator = Aggregator(("exe",), max_series=100, retention=3600)
    alive = lambda pid, _start: os.path.exists(f"/proc/{pid}")  # noqa: E731

    def check(when: str, processes: int) -> None:
        first = shim.read()
        snapshot = engine.capture(pids=[redis.pid, *children_of(redis.pid)])
        last = shim.read()
        assert snapshot.summary.failed == 0, snapshot.failures
        for process in snapshot.processes:
            assert process.totals_source == ARENA, process.totals_reason
        [series] = aggregator.update(snapshot, alive).series
        held = [stats["allocated"] - stats["tcache"] for stats in (first, last)]
        print(f"redis exe series {when} BGSAVE ({series.processes} processes): allocated "
              f"{series.allocated_bytes}, requested {first['requested']}..{last['requested']};"
              f" live {series.live_bytes}, stats.allocated - tcache {held}")
        assert series.processes == processes
        assert first["requested"] >= 50 * MIB  # the populated keys
        assert (first["requested"] * 0.97 <= series.allocated_bytes
                <= last["requested"] * 1.03), when
        assert min(held) * 0.97 <= series.live_bytes <= max(held) * 1.03, when

    try:
        check("before", processes=1)
        assert "Background saving started" in cli("bgsave")
        [child] = wait_until(lambda: children_of(redis.pid), "the BGSAVE child", poll=0.05)
        check("during", processes=2)
        assert "rdb_bgsave_in_progress:1" in cli("info", "persistence")  # it still saved
        os.kill(child, signal.SIGKILL)  # redis reaps it and carries on
        # each INFO allocates in redis (a client, its buffers): polled slowly
        wait_until(lambda: "rdb_bgsave_in_progress:0" in cli("info", "persistence"),
                   "the BGSAVE ends", poll=0.5)
        wait_until(lambda: not os.path.exists(f"/proc/{child}"), "the child is reaped")
        check("after", processes=1)
    finally:
        shim.close()
        engine.close()
    assert [layout.source for layout in engine.cache.layouts()] == [
        "code: malloc/free fast paths"]
    assert_no_thread_stopped_or_traced(redis.pid)
