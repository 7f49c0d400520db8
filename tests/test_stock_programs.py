"""Debian programs on Debian's stock, stripped libjemalloc.so.2 (package libjemalloc2), with
no debug info anywhere: offsets from its machine code, and redis's own view of its heap as
the truth."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.error
import urllib.request

from ctprofd.probe.capture import Capturer, CaptureSettings
from support.procs import assert_no_thread_stopped_or_traced, wait_until
from support.redis import Redis

STOCK = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
WAIT = 20.0  # bound on a program's start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def no_debug_info(tmp_path) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),)))


def maps_stock_libjemalloc(pid: int) -> bool:
    """The process maps Debian's libjemalloc.so.2 (as /usr/lib/… or /lib/…)."""
    with open(f"/proc/{pid}/maps") as f:
        return any(line.rstrip().endswith(STOCK.removeprefix("/usr")) for line in f)


def test_redis_server_live_bytes_match_allocator_allocated(spawn_process, tmp_path):
    redis = Redis(spawn_process, tmp_path, "--enable-debug-command", "yes")
    cli = redis.cli
    assert maps_stock_libjemalloc(redis.pid)
    assert cli("debug", "populate", "100000", "key", "128").strip() == "OK"
    engine = no_debug_info(tmp_path)
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
    engine = no_debug_info(tmp_path)
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
