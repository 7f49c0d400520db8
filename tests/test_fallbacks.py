"""Fallbacks where they decide the result (issue 28): the counts of an image before an
execve, when the new image's arena statistics alone know part of its total; the state
file's parts after a restart, when nothing else knows a thread that exited meanwhile. Real
processes, real ptrace."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import ARENA, THREADS
from ctprofd.resolve import offsets_file
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import TsdLayout, resolve_path
from support.procs import assert_no_thread_stopped_or_traced


CACHE_STACK = 28 << 10


def capturer(fixture_bins) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),)))


def process_of(snapshot, pid: int):
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return process


def totals(threads) -> tuple[int, int]:
    return sum(t["allocated"] for t in threads), sum(t["deallocated"] for t in threads)


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


@pytest.mark.parametrize("kept", ["threads", "reported"])
def test_a_restart_where_one_part_of_the_state_is_the_only_floor(fixture_bins, spawn_fixture,
                                                                tmp_path, kept):
    """A thread exits while no ctprofd runs, and the restarted one cannot read the arena
    statistics (its layout, from an offsets file, has none): what the state file kept is
    all that still counts that thread. The file keeps it twice, as the thread's last read
    and in the reported total; each part alone (as an older ctprofd wrote it, or hand-made)
    must keep the total."""
    binary = fixture_bins["static"].binary
    layout = resolve_path(str(binary), DebugSearch(()))
    assert isinstance(layout, TsdLayout) and layout.arena is not None
    offsets = tmp_path / "offsets.json"
    offsets_file.dump([dataclasses.replace(layout, arena=None, arena_missing="left out")],
                      str(offsets))
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
    assert (after.allocated_bytes, after.deallocated_bytes) == full
    assert_no_thread_stopped_or_traced(fixture.pid)
