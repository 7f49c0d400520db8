"""Fallbacks where they decide the result (issue 28): the counts of an image before an
execve, when the new image's arena statistics alone know part of its total; the state
file's parts after a restart, when nothing else knows a thread that exited meanwhile. Real
processes, real ptrace."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer, CaptureSettings
from ctprofd.report.snapshot import ARENA, THREADS
from ctprofd.resolve import offsets_file
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import TsdLayout, resolve_path
from ctprofd.resolve.parse_worker import WorkerLimits
from support.procs import assert_no_thread_stopped_or_traced, wait_until


CACHE_STACK = 28 << 10


def capturer(fixture_bins) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),)))


def process_of(snapshot, pid: int):
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return process


def totals(threads) -> tuple[int, int]:
    return sum(t["allocated"] for t in threads), sum(t["deallocated"] for t in threads)


def without_arena_statistics(binary, tmp_path) -> Path:
    """An offsets file with `binary`'s layout, its arena statistics left out: its totals
    are the per-thread sums, and what the state file kept is all that counts a thread that
    exited while no ctprofd ran."""
    layout = resolve_path(str(binary), DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.arena is not None
    offsets = tmp_path / "offsets.json"
    offsets_file.dump([dataclasses.replace(layout, arena=None, arena_missing="left out")],
                      str(offsets))
    return offsets


def test_an_exec_then_a_thread_gone_unread_keeps_the_earlier_image(fixture_bins, spawn_fixture):
    """After an exec, a thread of the new image allocates and exits before any snapshot
    reads it: only the new image's arena statistics count it, and they start from zero
    again. The total is the earlier image's plus all of the new one's: neither the
    per-thread sums (blind to that thread) nor the arena statistics (blind to the earlier
    image) alone, nor the floor of the last total, give it."""
    fixture = spawn_fixture(fixture_bins.hostile_threads, 16)
    engine = capturer(fixture_bins)
    try:
        before = process_of(engine.capture(pids=[fixture.pid]), fixture.pid)
        assert (before.allocated_bytes, before.deallocated_bytes) == totals(fixture.threads)
        fixture.send(f"exec {fixture_bins['static'].binary} 3")
        image = [json.loads(line) for line in fixture.wait_for("READY")]
        assert len(image) == 4 and image[0]["tid"] == fixture.pid
        fixture.threads = image
        tid = fixture.exit_thread(0)
        [gone] = [t for t in image if t["tid"] == tid]
        after = process_of(engine.capture(pids=[fixture.pid]), fixture.pid)
        assert after.totals_source == ARENA
        exact = before.allocated_bytes + totals(fixture.threads)[0] + gone["allocated"]
        # the arena statistics' one known shortfall: a cache stack taken for unlinked
        # (28 KiB in a default 5.3.0 build; docs/totals.md, "How exact"), once per thread
        # cache torn down meanwhile: seen up to twice here (2 runs in 13)
        shortfalls = (0, CACHE_STACK, 2 * CACHE_STACK)
        assert exact - after.allocated_bytes in shortfalls, (exact, after)
        # neither view alone gives it: the threads miss the thread gone unread, the new
        # image's arena statistics miss the earlier image
        assert after.allocated_bytes > before.allocated_bytes + totals(fixture.threads)[0]
        assert exact - (after.allocated_bytes - before.allocated_bytes) not in shortfalls
    finally:
        engine.close()
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_an_exec_keeps_the_earlier_images_total_that_only_its_arena_statistics_knew(
        fixture_bins, spawn_fixture):
    """Before an exec, a thread allocates and exits before any snapshot reads it: the total
    reported (from the arena statistics) is above the per-thread sums. After the exec the
    earlier image counts with that total, not with its threads' sums."""
    binary = fixture_bins["static"].binary
    fixture = spawn_fixture(binary, 4)
    gone = fixture.threads[2]
    assert fixture.exit_thread(1) == gone["tid"]  # before any snapshot
    engine = capturer(fixture_bins)
    try:
        before = process_of(engine.capture(pids=[fixture.pid]), fixture.pid)
        assert before.totals_source == ARENA
        shortfalls = (0, CACHE_STACK, 2 * CACHE_STACK)  # as in the test above
        exact = totals(fixture.threads)[0] + gone["allocated"]
        assert exact - before.allocated_bytes in shortfalls, (exact, before)
        assert gone["allocated"] not in shortfalls
        fixture.send(f"exec {binary} 3")
        fixture.threads = [json.loads(line) for line in fixture.wait_for("READY")]
        after = process_of(engine.capture(pids=[fixture.pid]), fixture.pid)
        new_image = totals(fixture.threads)[0]
        assert before.allocated_bytes + new_image - after.allocated_bytes in shortfalls, (
            before, new_image, after)
    finally:
        engine.close()
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("kept", ["threads", "reported"])
def test_a_restart_where_one_part_of_the_state_is_the_only_floor(fixture_bins, spawn_fixture,
                                                                tmp_path, kept):
    """A thread exits while no ctprofd runs, and the restarted one cannot read the arena
    statistics (its layout, from an offsets file, has none): what the state file kept is
    all that still counts that thread. The file keeps it twice, as the thread's last read
    and in the reported total; each part alone (as an older ctprofd wrote it, or hand-made)
    must keep the total."""
    binary = fixture_bins["static"].binary
    offsets = without_arena_statistics(binary, tmp_path)
    fixture = spawn_fixture(binary, 4)
    state = tmp_path / "state"
    state.mkdir()
    first = Capturer(CaptureSettings(debug_dirs=(), state_dir=str(state),
                                     select=lambda p: p.pid == fixture.pid))
    try:
        read = process_of(first.capture(), fixture.pid)
    finally:
        first.close()
    assert (read.allocated_bytes, read.deallocated_bytes) == totals(fixture.threads)
    full = totals(fixture.threads)
    fixture.exit_thread(1)  # while no ctprofd runs
    saved = json.loads((state / "retained.json").read_text())
    saved.pop("threads" if kept == "reported" else "reported")
    (state / "retained.json").write_text(json.dumps(saved))
    restarted = Capturer(CaptureSettings(debug_dirs=(), state_dir=str(state),
                                         offsets_files=(str(offsets),),
                                         select=lambda p: p.pid == fixture.pid))
    try:
        after = process_of(restarted.capture(), fixture.pid)
    finally:
        restarted.close()
    assert after.totals_source == THREADS
    assert totals(fixture.threads)[0] < full[0]  # the live threads alone fall short
    assert after.totals_source == THREADS
    assert (after.allocated_bytes, after.deallocated_bytes) == full
    assert_no_thread_stopped_or_traced(fixture.pid)


@pytest.mark.parametrize("kept", ["threads", "reported", "both"])
def test_a_restart_that_cannot_attach_keeps_the_saved_threads_once(fixture_bins, spawn_fixture,
                                                                   tmp_path, kept):
    """Restarted, ctprofd cannot read a process at first (its binary is refused: over the
    size bound), and is restarted again with a bound that lets it: the threads the first
    run saved count once, the live ones as read again, the one that exited while no ctprofd
    could read it as it was saved."""
    offsets = without_arena_statistics(fixture_bins["static"].binary, tmp_path)
    fixture = spawn_fixture(fixture_bins["static"].binary, 4)
    state = tmp_path / "state"
    state.mkdir()

    def run(limits: WorkerLimits = WorkerLimits()):
        engine = Capturer(CaptureSettings(debug_dirs=(), offsets_files=(str(offsets),),
                                          state_dir=str(state), parser=limits,
                                          select=lambda p: p.pid == fixture.pid))
        try:
            return {p.pid: p for p in engine.capture().processes}.get(fixture.pid)
        finally:
            engine.close()

    assert run() is not None
    full = totals(fixture.threads)
    fixture.exit_thread(1)  # while no ctprofd runs
    if kept != "both":
        saved = json.loads((state / "retained.json").read_text())
        saved.pop("threads" if kept == "reported" else "reported")
        (state / "retained.json").write_text(json.dumps(saved))
    assert run(WorkerLimits(max_file_bytes=1)) is None  # refused: not read
    after = run()
    assert after.totals_source == THREADS
    assert (after.allocated_bytes, after.deallocated_bytes) == full
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_a_restart_that_finds_an_image_without_jemalloc_keeps_the_saved_threads(
        fixture_bins, spawn_fixture, tmp_path):
    """While no ctprofd runs, a thread exits and the process execs a shell (no jemalloc);
    restarted, ctprofd finds that shell, and later the jemalloc program it execs in turn.
    The state file kept only the threads (as an older ctprofd wrote it): they are all that
    counts the first image, through the image without jemalloc."""
    offsets = without_arena_statistics(fixture_bins["static"].binary, tmp_path)
    fixture = spawn_fixture(fixture_bins["static"].binary, 4)
    state = tmp_path / "state"
    state.mkdir()
    settings = CaptureSettings(debug_dirs=(), offsets_files=(str(offsets),),
                               state_dir=str(state), select=lambda p: p.pid == fixture.pid)
    first = Capturer(settings)
    try:
        assert process_of(first.capture(), fixture.pid).totals_source == THREADS
    finally:
        first.close()
    earlier = totals(fixture.threads)
    fixture.exit_thread(1)
    saved = json.loads((state / "retained.json").read_text())
    saved.pop("reported")
    (state / "retained.json").write_text(json.dumps(saved))
    wrapper = tmp_path / "wrapper.sh"
    wrapper.write_text(f"read go\nexec {fixture_bins['static'].binary} 3\n")
    fixture.send(f"exec /bin/sh {wrapper}")
    shell = os.path.realpath("/bin/sh")
    wait_until(lambda: os.readlink(f"/proc/{fixture.pid}/exe") == shell, "the shell running")
    restarted = Capturer(settings)
    try:
        assert fixture.pid not in {p.pid for p in restarted.capture().processes}  # the shell
        fixture.send("go")
        fixture.threads = [json.loads(line) for line in fixture.wait_for("READY")]
        for _ in range(NOT_JEMALLOC_RECHECK):  # a process without jemalloc is read again
            snapshot = restarted.capture()       # once in that many snapshots
            if fixture.pid in {p.pid for p in snapshot.processes}:
                break
        after = process_of(snapshot, fixture.pid)
    finally:
        restarted.close()
    assert (after.allocated_bytes, after.deallocated_bytes) == (
        earlier[0] + totals(fixture.threads)[0], earlier[1] + totals(fixture.threads)[1])
    assert_no_thread_stopped_or_traced(fixture.pid)
