"""The daemon's state on a full disk (issue 22, point 5), on a real tmpfs of 8 MiB mounted
as its state_dir and filled to the last page: a write first uses the space set aside for
it, then fails, is counted, warned about once and retried every snapshot; the series
counters served meanwhile stay at those written, so none is lower after a SIGKILL and a
restart; once there is room again, the state is written and the reserve made again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import DaemonProcess, write_config
from support.procs import wait_until
from support.disk import fill, tmpfs

MIB = 1 << 20
SERIES = re.compile(r'^ctprofd_allocated_bytes_total\{pid="(\d+)"\} (\S+)$', re.M)
FAILURES = re.compile(r'^ctprofd_state_write_failures_total\{file="aggregate.json"\} (\S+)$',
                      re.M)


def allocated(text: str) -> dict[int, float]:
    """pid -> ctprofd_allocated_bytes_total in a scrape."""
    return {int(pid): float(value) for pid, value in SERIES.findall(text)}


def failures(text: str) -> float:
    match = FAILURES.search(text)
    return float(match.group(1)) if match else 0.0


def scrape_when(daemon: DaemonProcess, check, what: str) -> str:
    """A scrape for which `check(text)` holds, scraping until one does."""
    def attempt() -> str | None:
        text = daemon.get()
        return text if check(text) else None
    return wait_until(attempt, what, poll=0.05)


@pytest.fixture
def small_disk(tmp_path, request) -> Iterator[Path]:
    """A tmpfs of `request.param` (mount's size=) at tmp_path/state, unmounted at teardown."""
    with tmpfs(tmp_path / "state", request.param) as state:
        yield state


def start_daemon(tmp_path: Path, binary) -> tuple[DaemonProcess, Path]:
    """`ctprofd run` reading only `binary`'s processes, a series per pid; and its config."""
    config = write_config(tmp_path, "labels: [pid]\nselection:\n  include:\n"
                                    f"    exe: ['{binary.binary}']\n")
    return DaemonProcess("--config", str(config)).started(), config


@pytest.mark.parametrize("small_disk", ["8m"], indirect=True)
def test_on_a_full_disk_the_state_is_written_in_the_space_set_aside(
        small_disk, tmp_path, fixture_bins, spawn_fixture):
    """Filled to the last page, the disk still takes the state: the reserve is given up for
    the write, and made again from what the replaced file frees, write after write."""
    binary = fixture_bins["static"]
    first = spawn_fixture(binary, 2)
    daemon, _ = start_daemon(tmp_path, binary)
    try:
        scrape_when(daemon, lambda t: first.pid in allocated(t), "the first fixture is served")
        reserve = small_disk / ".aggregate.json.reserve"
        wait_until(lambda: reserve.exists() and reserve.stat().st_blocks * 512 >= MIB,
                   "the reserve is set aside")
        fill(small_disk, "filler")
        for _ in range(3):  # new series, the state written each time
            fixture = spawn_fixture(binary, 2)
            scrape_when(daemon, lambda t: fixture.pid in allocated(t),
                        "the new fixture is served, its series written")
        assert failures(daemon.get()) == 0
    finally:
        daemon.kill()
    log = daemon.lines + daemon.remaining_lines()
    warned = [line for line in log
              if "is full: written in the space set aside" in line and "aggregate.json" in line]
    assert len(warned) == 1, log  # once, not at every write


@pytest.mark.parametrize("small_disk", ["512k"], indirect=True)
def test_writes_that_fail_are_retried_and_no_counter_goes_back(
        small_disk, tmp_path, fixture_bins, spawn_fixture):
    """With no room even for a reserve (512 KiB), a full disk fails the writes: counted,
    warned about once, tried again every snapshot, and the series served stay at those
    written, so that after a SIGKILL and a restart none is lower than a scrape showed."""
    binary = fixture_bins["static"]
    first = spawn_fixture(binary, 2)
    daemon, config = start_daemon(tmp_path, binary)
    try:
        scrape_when(daemon, lambda t: first.pid in allocated(t), "the first fixture is served")
        fill(small_disk, "filler")
        second = spawn_fixture(binary, 2)  # a new series: the state changes
        daemon.wait_for(r"cannot write \S+aggregate.json \(No space left on device\)")
        text = scrape_when(daemon, lambda t: failures(t) >= 3,
                           "failed writes are retried and counted")
        held = allocated(text)
        assert second.pid not in held and first.pid in held
    finally:
        daemon.kill()  # SIGKILL: no state written on the way out
    log = daemon.lines + daemon.remaining_lines()
    assert len([line for line in log if "cannot write" in line and "aggregate.json" in line]) == 1

    (small_disk / "filler").unlink()
    restarted = DaemonProcess("--config", str(config)).started()
    try:
        text = scrape_when(restarted, lambda t: second.pid in allocated(t),
                           "the restarted daemon serves both fixtures")
        assert allocated(text)[first.pid] >= held[first.pid]
        assert failures(text) == 0
    finally:
        restarted.kill()


@pytest.mark.parametrize("small_disk", ["512k"], indirect=True)
def test_a_daemon_that_never_wrote_its_state_serves_its_series_as_they_are(
        small_disk, tmp_path, fixture_bins, spawn_fixture):
    """A disk full before the daemon starts: there is no written state to hold the series
    to, so every new series is served at once (none is held back for ever), and the
    failures are counted."""
    binary = fixture_bins["static"]
    fill(small_disk, "filler")
    first = spawn_fixture(binary, 2)
    daemon, _ = start_daemon(tmp_path, binary)
    try:
        scrape_when(daemon, lambda t: first.pid in allocated(t), "the first fixture is served")
        second = spawn_fixture(binary, 2)
        text = scrape_when(daemon, lambda t: second.pid in allocated(t),
                           "a series that came after the failed writes is served")
        assert failures(text) >= 1
    finally:
        daemon.kill()
