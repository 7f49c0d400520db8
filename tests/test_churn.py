"""Thread churn against real processes: threads that live well under a millisecond, a few
thousand a second, never show up as failures or as a privilege problem."""

from __future__ import annotations

from ctprofd.capture import Capturer, CaptureSettings
from support.procs import assert_no_thread_stopped_or_traced


def capturer(fixture_bins) -> Capturer:
    return Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),)))


def test_exit_races_under_churn_are_not_failures(fixture_bins, spawn_process):
    """As root: a thread gone before PTRACE_SEIZE (ESRCH, or EPERM for a zombie) or while
    stopping is an exit race, so the privilege gate never opens."""
    churn = spawn_process([fixture_bins.churn, "4", "200"])
    engine = capturer(fixture_bins)
    try:
        for _ in range(40):
            snapshot = engine.capture(pids=[churn.pid])
            assert snapshot.summary.jemalloc_detected == 1
            assert not snapshot.summary.privilege_dominant, snapshot.failures
            assert snapshot.summary.failed == 0, snapshot.failures
    finally:
        engine.close()
    assert engine.stats.ptrace_stops > 0 and engine.stats.exit_races > 0
    assert_no_thread_stopped_or_traced(churn.pid)
