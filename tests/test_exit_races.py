"""Exit races at every step (issue 25): real jemalloc processes SIGKILLed at chosen points of
a capture (between the /proc walk and their read, at attach: identity, exe, maps, and at
their first memory read: GOT slot, counters, arena statistics), some reaped (their /proc
entry vanishes) and some left zombies, over many snapshots. None of them counts as a
failure in any tag nor is logged above debug; a process another tracer holds is still
counted, so the check can fail."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

from ctprofd.probe import capture
from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.procfs.processes import ProcessInfo, read_stat
from ctprofd.report import tags
from support.procs import assert_no_thread_stopped_or_traced, wait_until

ROUNDS = 8


def exited(pid: int) -> bool:
    """Whether the process is a zombie or reaped."""
    try:
        return read_stat(f"/proc/{pid}/stat").state in ("Z", "X")
    except FileNotFoundError:
        return True


class Victims:
    """Fixtures to be killed at one step each: pid -> (step, reap)."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[str, bool]] = {}
        self.fixtures: dict[int, object] = {}
        self.killed: set[int] = set()

    def add(self, fixture, step: str, reap: bool) -> None:
        self.at[fixture.pid] = (step, reap)
        self.fixtures[fixture.pid] = fixture

    def strike(self, pid: int, step: str) -> None:
        """SIGKILL `pid` if it is to die at `step`; wait until it has (reaped, or a zombie)."""
        if self.at.get(pid, ("", False))[0] != step or pid in self.killed:
            return
        self.killed.add(pid)
        os.kill(pid, signal.SIGKILL)
        if self.at[pid][1]:
            self.fixtures[pid].proc.wait(timeout=60)
        wait_until(lambda: exited(pid), f"pid {pid} killed at {step}")


def test_processes_that_exit_at_any_step_count_nowhere(fixture_bins, spawn_fixture, caplog):
    victims = Victims()
    ours: set[int] = set()

    def select(process) -> bool:
        victims.strike(process.pid, "walk")  # listed and its stat read: now gone
        return process.pid in ours

    engine = Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),),
                                      select=select))
    attach, read_ranges = engine.attacher.attach, engine.prober.read_ranges

    def attach_then_die(process, identity):
        victims.strike(process.pid, "attach")
        return attach(process, identity)

    def read_then_die(pid, ranges):
        victims.strike(pid, "read")
        return read_ranges(pid, ranges)

    engine.attacher.attach = attach_then_die
    engine.prober.read_ranges = read_then_die
    traced = spawn_fixture(fixture_bins["static"], 1, prefix=["strace", "-f", "-o", os.devnull])
    steady = spawn_fixture(fixture_bins["dynamic"], 1)
    ours |= {traced.pid, steady.pid}
    caplog.set_level(logging.DEBUG, logger="ctprofd")
    try:
        for round_ in range(ROUNDS):
            for step in ("walk", "attach", "read"):
                for variant in ("static", "dynamic"):
                    fixture = spawn_fixture(fixture_bins[variant], 2)
                    victims.add(fixture, step, reap=round_ % 2 == 0)
                    ours.add(fixture.pid)
            snapshot = engine.capture()
            # only the traced process fails: its two threads, held by strace
            assert snapshot.failures == {tags.PTRACE_TRACED: 2}, snapshot.failures
            assert snapshot.summary.failed == 2
            assert [f.pid for f in snapshot.failed_pids] == [traced.pid]
            assert steady.pid in {p.pid for p in snapshot.processes}
    finally:
        engine.close()
    assert len(victims.killed) == ROUNDS * 6  # every chosen step was reached
    assert engine.stats.exit_races >= ROUNDS * 6 // 2
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG
            and any(re.search(rf"\b{pid}\b", r.getMessage()) for pid in victims.killed)]
    assert not loud, [r.getMessage() for r in loud]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and "CAP_SYS_PTRACE" not in r.getMessage()]
    assert_no_thread_stopped_or_traced(steady.pid)


def test_a_pid_gone_between_the_listing_and_its_stat_counts_nowhere(tmp_path):
    """A /proc entry listed whose stat cannot be read any more (here a directory without
    one, in a proc root of our own) is an exit race, in no tag; a pid asked for by name and
    not there is still pid-missing."""
    (tmp_path / "4242").mkdir()
    engine = Capturer(CaptureSettings(proc_root=str(tmp_path)))
    try:
        snapshot = engine.capture()
        assert snapshot.failures == {} and snapshot.summary.failed == 0
        assert engine.stats.exit_races == 1
        assert engine.capture(pids=[4242]).failures == {tags.PID_MISSING: 1}
    finally:
        engine.close()


def test_an_unexpected_error_is_warned_about_unless_the_process_exited(fixture_bins,
                                                                       spawn_fixture, caplog,
                                                                       monkeypatch):
    """An unexpected error while attaching is worker-panic and a warning for a process that
    still runs, an exit race (no tag, said at debug) for one that exited meanwhile; whether
    it exited is asked once per process."""
    live, dying = spawn_fixture(fixture_bins["static"], 1), spawn_fixture(fixture_bins["static"], 1)
    engine = Capturer(CaptureSettings(debug_dirs=()))
    asked: list[int] = []
    exited_now = ProcessInfo.exited

    def exited_counted(process: ProcessInfo) -> bool:
        asked.append(process.pid)
        return exited_now(process)

    def attach_fails(process, identity):
        if process.pid == dying.pid:
            os.kill(dying.pid, signal.SIGKILL)
            wait_until(lambda: exited(dying.pid), "the SIGKILL")
        raise RuntimeError("made up")

    monkeypatch.setattr(ProcessInfo, "exited", exited_counted)
    engine.attacher.attach = attach_fails
    caplog.set_level(logging.DEBUG, logger="ctprofd")
    try:
        snapshot = engine.capture(pids=[live.pid, dying.pid])
    finally:
        engine.close()
    assert snapshot.failures == {tags.WORKER_PANIC: 1}
    assert [f.pid for f in snapshot.failed_pids] == [live.pid]
    assert sorted(asked) == sorted([live.pid, dying.pid])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [f"pid {live.pid}: unexpected RuntimeError while attaching: made up"]
    assert engine.stats.exit_races == 1


def test_an_unexpected_error_after_the_read_is_worker_panic_too(fixture_bins, spawn_fixture,
                                                                monkeypatch):
    """An error raised once the threads were read (making the process's sample) is
    tallied as worker-panic like one while attaching, not dropped with the sample."""
    fixture = spawn_fixture(fixture_bins["static"], 1)
    engine = Capturer(CaptureSettings(debug_dirs=()))

    def totals_fail(*args):
        raise RuntimeError("made up")
    monkeypatch.setattr(capture, "process_totals", totals_fail)
    try:
        snapshot = engine.capture(pids=[fixture.pid])
    finally:
        engine.close()
    assert snapshot.failures == {tags.WORKER_PANIC: 1}
    assert [f.pid for f in snapshot.failed_pids] == [fixture.pid]
    assert snapshot.processes == ()
