"""Fallbacks where they decide the result (issue 28): the counts of an image before an
execve, when the new image's arena statistics alone know part of its total. Real
processes, real ptrace."""

from __future__ import annotations

import json

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import ARENA
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
