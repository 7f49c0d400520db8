"""Real deployments: jemalloc as a shared object, debug info from a real debuginfod server,
portable offsets for stripped binaries, and a real Debian program (redis-server)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from support.procs import assert_no_thread_stopped_or_traced

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def truth(fixture) -> dict[int, tuple[int, int]]:
    return {t["tid"]: (t["allocated"], t["deallocated"]) for t in fixture.threads}


def by_tid(snapshot) -> dict[int, tuple[int, int]]:
    [process] = snapshot.processes
    return {t.tid: (t.allocated_bytes, t.deallocated_bytes) for t in process.threads}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctprofd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctprofd", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def debuginfod_server(fixture_bins, tmp_path):
    """A real debuginfod on loopback indexing the split debug file of the stripped
    libjemalloc.so.2 of the `dynamic-stripped-buildid` variant (found nowhere else)."""
    variant = fixture_bins["dynamic-stripped-buildid"]
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(variant.debug_file, served / "libjemalloc.so.2.debug")
    port = free_port()
    server = subprocess.Popen(["debuginfod", "-d", str(tmp_path / "db.sqlite"), "-p", str(port),
                               "-F", str(served), "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    build_id = subprocess.run(["readelf", "-n", str(variant.jemalloc_object)], text=True,
                              capture_output=True).stdout.split("Build ID: ")[1].split()[0]
    deadline = time.monotonic() + 60
    try:
        while True:  # until the scan indexed our file
            try:
                with urllib.request.urlopen(f"{url}/buildid/{build_id}/debuginfo", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "debuginfod never served the debug file"
                assert server.poll() is None, "debuginfod exited"
                time.sleep(0.3)
        yield url
    finally:
        server.kill()
        server.wait()


def test_stripped_shared_object_resolved_through_debuginfod(fixture_bins, spawn_fixture,
                                                            debuginfod_server, tmp_path):
    fixture = spawn_fixture(fixture_bins["dynamic-stripped-buildid"], 8)
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),),
                                      debuginfod_urls=(debuginfod_server,),
                                      cache_dir=str(tmp_path / "cache")))
    snapshot = engine.capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot) == truth(fixture)
    downloaded = os.listdir(tmp_path / "cache" / "debuginfod")
    assert len(downloaded) == 1 and downloaded[0].endswith(".debug")


def test_debuginfod_down_falls_back_to_code_leaving_nothing_behind(fixture_bins, spawn_fixture,
                                                                   tmp_path, monkeypatch):
    fixture = spawn_fixture(fixture_bins["dynamic-stripped-buildid"], 2)
    down = f"http://127.0.0.1:{free_port()}"
    scratch = tmp_path / "tmp"  # where temporary files go; no cache dir is configured
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),),
                                      debuginfod_urls=(down,)))
    try:
        snapshot = engine.capture(pids=[fixture.pid])
    finally:
        engine.close()
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot) == truth(fixture)
    assert [layout.source for layout in engine.cache.layouts()] == [
        "code: malloc/free fast paths"]
    assert list(scratch.iterdir()) == []
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_debuginfod_downloads_without_a_cache_dir_go_when_the_engine_closes(
        fixture_bins, spawn_fixture, debuginfod_server, tmp_path, monkeypatch):
    fixture = spawn_fixture(fixture_bins["dynamic-stripped-buildid"], 2)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),),
                                      debuginfod_urls=(debuginfod_server,)))
    try:
        snapshot = engine.capture(pids=[fixture.pid])
        assert by_tid(snapshot) == truth(fixture)
        assert [p.name for p in scratch.glob("*/debuginfod/*.debug")]  # used while open
    finally:
        engine.close()
    assert list(scratch.iterdir()) == []


def strip_copy(source, target) -> None:
    subprocess.run(["objcopy", "--strip-all", str(source), str(target)], check=True)


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
def test_stripped_binary_probed_after_offsets_import(fixture_bins, spawn_fixture, tmp_path,
                                                     linkage):
    """A host without debug info probes what a host with it resolved (same build-id)."""
    debug_twin = fixture_bins[linkage].jemalloc_object
    exported = tmp_path / "offsets.json"
    result = ctprofd("offsets", "export", str(exported), str(debug_twin), "--cache-dir", "")
    assert result.returncode == 0, result.stderr
    stripped_dir = tmp_path / "stripped"
    stripped_dir.mkdir()
    env = None
    if linkage == "static":
        binary = stripped_dir / "alloc_threads"
        strip_copy(debug_twin, binary)
    else:
        binary = fixture_bins["dynamic"].binary
        strip_copy(debug_twin, stripped_dir / "libjemalloc.so.2")
        env = {**os.environ, "LD_LIBRARY_PATH": str(stripped_dir)}  # searched before RUNPATH
    fixture = spawn_fixture(binary, 4, env=env)
    without = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),)))
    assert by_tid(without.capture(pids=[fixture.pid])) == truth(fixture)
    assert [layout.source for layout in without.cache.layouts()] == [
        "code: malloc/free fast paths"]
    cache = tmp_path / "cache"
    result = ctprofd("offsets", "import", str(exported), "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    imported = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),),
                                        cache_dir=str(cache)))
    snapshot = imported.capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    assert by_tid(snapshot) == truth(fixture)
    assert [layout.source for layout in imported.cache.layouts()] == ["dwarf: embedded"]
    loaded = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),),
                                      offsets_files=(str(exported),)))
    assert by_tid(loaded.capture(pids=[fixture.pid])) == truth(fixture)


def test_corrupt_offsets_file_is_refused_with_one_line(tmp_path):
    bad = tmp_path / "offsets.json"
    bad.write_text('{"format": "ctprofd-offsets", "version": 1, "layouts": {"abcdef0123": '
                   '{"kind": "layout", "build_id": "abcdef0123", "symbol": "je_tsd_tls", '
                   '"symbol_offset": 0, "allocated_offset": 900, "deallocated_offset": 800, '
                   '"static_block_offset": 2632}}}')
    result = ctprofd("offsets", "import", str(bad), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"{bad}: layouts.abcdef0123: invalid layout" in result.stderr
    assert "Traceback" not in result.stderr


def redis(socket_path: str, *command: str) -> str:
    return subprocess.run(["redis-cli", "-s", socket_path, *command], text=True,
                          capture_output=True, check=True).stdout


def redis_field(text: str, name: str) -> str:
    [value] = [line.split(":", 1)[1].strip() for line in text.splitlines()
               if line.strip().startswith(name + ":")]
    return value


def test_debian_redis_on_the_debug_jemalloc(fixture_bins, spawn_process, tmp_path):
    """Debian's redis-server links libjemalloc.so.2; run it on the debug build of the same
    jemalloc 5.3.0 and compare our totals with what redis says about its allocator."""
    sock = str(tmp_path / "redis.sock")
    env = {**os.environ, "LD_LIBRARY_PATH": str(fixture_bins.jemalloc_dir / "lib")}
    server = spawn_process(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                            "--appendonly", "no", "--jemalloc-bg-thread", "no",
                            "--enable-debug-command", "yes",
                            "--logfile", str(tmp_path / "redis.log")], ready=None, env=env)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    assert redis(sock, "DEBUG", "POPULATE", "20000", "key", "300").strip() == "OK"
    snapshot = Capturer().capture(pids=[server.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    [process] = snapshot.processes
    assert {t.comm for t in process.threads} >= {"redis-server", "bio_lazy_free"}
    info = redis(sock, "INFO", "memory")
    assert redis_field(info, "mem_allocator") == "jemalloc-5.3.0"
    # jemalloc's stats.allocated also counts freed objects parked in thread caches
    in_use = (int(redis_field(info, "allocator_allocated"))
              - int(redis_field(redis(sock, "MEMORY", "MALLOC-STATS"), "tcache_bytes")))
    live = process.allocated_bytes - process.deallocated_bytes
    assert live > 20000 * 300
    assert abs(live - in_use) <= max(128 * 1024, in_use // 50), (live, in_use)
    assert_no_thread_stopped_or_traced(server.pid)
