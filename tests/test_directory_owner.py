"""One owner per state and cache directory: a second `ctprofd run` on them refuses to start
(exit 75, one line naming the holder's pid and the directory), a lock left by a killed daemon
is no lock, a lock file planted as a FIFO or symlink is refused, and the one-shot commands
read a cache a daemon owns without writing to it (real daemons, real CLI runs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from daemon_process import CTPROFD, REPO, DaemonProcess, clean_env, write_config
from support.procs import wait_until

QUIET = "selection:\n  include:\n    comm: ['^ctprofd-test-none$']\n"  # walks, reads nobody


def run_daemon(config: Path, *args: str) -> subprocess.CompletedProcess:
    """A `ctprofd run` expected to exit by itself."""
    return subprocess.run([*CTPROFD, "run", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          stdin=subprocess.DEVNULL, env=clean_env())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CTPROFD, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, stdin=subprocess.DEVNULL, env=clean_env())


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def open_files(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


def tree(directory: Path) -> dict[str, int]:
    """Every file under `directory` with its mtime: what a writer would change."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_daemon_on_the_same_directories_exits_75_naming_the_holder(
        tmp_path, fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 1)
    reads_it = f"selection:\n  include:\n    exe: ['{fixture_bins['static'].binary}']\n"
    config = write_config(tmp_path, reads_it)
    first = DaemonProcess("--config", str(config), "--log-level", "info")
    try:
        first.started()
        wait_until(lambda: first.sample("ctprofd_probe_jemalloc_detected"),
                   "the first daemon reads the fixture (so its parse worker runs)", poll=0.2)
        second = run_daemon(config)
        assert second.returncode == 75, second.stderr
        [line] = second.stderr.splitlines()
        assert f"{tmp_path / 'cache'} is in use by pid {first.proc.pid}" in line, line
        # the state directory alone is enough to refuse
        own_cache = tmp_path / "state-only.yaml"
        own_cache.write_text(config.read_text().replace(f"cache_dir: {tmp_path / 'cache'}",
                                                        f"cache_dir: {tmp_path / 'other'}"))
        third = run_daemon(own_cache)
        assert third.returncode == 75, third.stderr
        assert f"{tmp_path / 'state'} is in use by pid {first.proc.pid}" in third.stderr
        assert first.proc.poll() is None  # the first one runs on, untouched
        # the parse worker (and anything else it starts) does not inherit the lock
        lock_files = {str(tmp_path / "cache" / ".lock"), str(tmp_path / "state" / ".lock")}
        assert lock_files <= open_files(first.proc.pid)
        workers = children(first.proc.pid)
        assert workers, "the daemon started no parse worker"
        for pid in workers:
            assert not lock_files & open_files(pid), pid
        first.proc.send_signal(signal.SIGKILL)  # no clean exit: the kernel drops the lock
        first.proc.wait()
    finally:
        first.kill()
    assert (tmp_path / "cache" / ".lock").read_text() == f"{first.proc.pid}\n"  # stale pid
    after = DaemonProcess("--config", str(config))
    try:
        after.started()
        assert (tmp_path / "cache" / ".lock").read_text() == f"{after.proc.pid}\n"
    finally:
        assert after.stop() == 0
    assert fixture.proc.poll() is None


@pytest.mark.parametrize("plant", ["fifo", "symlink"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path, plant):
    config = write_config(tmp_path, QUIET)
    (tmp_path / "state").mkdir()
    lock = tmp_path / "state" / ".lock"
    if plant == "fifo":
        os.mkfifo(lock)  # opened blocking, it would hang the daemon
    else:
        lock.symlink_to(tmp_path / "elsewhere")  # would create or truncate another file
    result = run_daemon(config)
    assert result.returncode == 78, result.stderr
    [line] = result.stderr.splitlines()
    assert f"{lock} is" in line and "remove it" in line, line
    assert plant != "fifo" or "not a regular file (a FIFO)" in line, line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_the_cli_reads_but_never_writes_a_cache_a_daemon_owns(fixture_bins, spawn_fixture,
                                                               tmp_path):
    # a daemon that reads nobody: whatever changes in its cache would be the CLI's doing
    config = write_config(tmp_path, QUIET, interval=3600)
    fixture = spawn_fixture(fixture_bins["static"], 1)  # a binary neither has parsed
    daemon = DaemonProcess("--config", str(config))
    try:
        daemon.started()
        before = tree(tmp_path / "cache")
        result = cli("snapshot", "--json", "--config", str(config), "--log.level", "info",
                     "--pid", str(fixture.pid))
        assert result.returncode == 0, result.stderr
        assert f"a ctprofd (pid {daemon.proc.pid}) owns {tmp_path / 'cache'}" in result.stderr
        [process] = json.loads(result.stdout)["processes"]
        assert len(process["threads"]) == 2  # it did resolve the binary: in memory only
        assert tree(tmp_path / "cache") == before
    finally:
        assert daemon.stop() == 0
    # without the daemon, the same command caches what it resolved
    result = cli("snapshot", "--config", str(config), "--pid", str(fixture.pid))
    assert result.returncode == 0, result.stderr
    assert tree(tmp_path / "cache") != before
