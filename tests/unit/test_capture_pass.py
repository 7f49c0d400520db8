"""One probe pass (ctprofd/probe/capture.py) over a /proc of the test's own processes
(support/capture_host.py: links to /proc/PID of only what the test started, so that no
other process of the host, another ctprofd or other tests, changes what a pass counts).
Real processes with Debian's jemalloc preloaded (a small Python program allocating on
command, `sleep`), real ptrace, real state files."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ctprofd.probe import arena_stats, capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer, CaptureSettings
from ctprofd.report import tags
from ctprofd.report.snapshot import ARENA, THREADS, ProcessSample
from ctprofd.resolve import offsets_file
from ctprofd.resolve.parse_worker import WorkerLimits
from support.cgroups import in_unit, unique_unit
from support.capture_host import (FORK_BELOW, JEMALLOC, PYTHON, Agent, Host,  # noqa: F401
                                  between, counts, heard, host, layouts, sample, totals,
                                  within, written_in_a_child)

from support.procs import Spawned, is_dead, wait_until

# --- the tally of a walk ---------------------------------------------------------------

def test_a_walk_tallies_each_kind_of_process_once_and_the_same_in_every_pass(host: Host):
    """jemalloc read, no jemalloc, a kernel thread, an entry gone before its stat was read
    (an exit race, counted nowhere) and ctprofd's own process (not walked): the same
    summary in every pass, whether a quiet process is read again or counted unread."""
    jemalloc = host.sleeper()
    plain = host.sleeper(jemalloc=False)
    host.add(2)  # kthreadd
    host.add(os.getpid())
    gone = host.spawn(["sleep", "600"], jemalloc=False)
    gone.kill()
    engine = host.capturer()
    began, clock = time.time(), time.monotonic()
    first = engine.capture()
    took = time.monotonic() - clock
    assert began <= first.timestamp <= time.time()
    assert 0 < first.duration_seconds <= took
    assert first.summary.tgids_walked == 3
    assert first.summary.jemalloc_detected == 1
    assert first.summary.probed_ok == 1
    assert first.summary.failed == 0
    assert first.failures == {tags.JEMALLOC_NOT_FOUND: 1, tags.READLINK_FAILURE: 1}
    assert first.denied_tgids == 0 and first.failed_pids == ()
    assert [p.pid for p in first.processes] == [jemalloc]
    assert engine.stats.exit_races == 1
    assert engine.not_jemalloc_reason(plain) is not None
    assert engine.not_jemalloc_reason(jemalloc) is None
    for n in range(2 * NOT_JEMALLOC_RECHECK):
        again = engine.capture()
        assert counts(again) == counts(first), n
        assert totals(sample(again, jemalloc)) == totals(sample(first, jemalloc))
    assert engine.stats.exit_races == 1 + 2 * NOT_JEMALLOC_RECHECK


def test_a_pid_asked_for_that_does_not_exist_is_walked_and_failed(host: Host):
    """A pid named that has no /proc entry is `pid-missing`, listed as a failed pid; a pid
    named is read whatever it was at the last pass."""
    plain = host.sleeper(jemalloc=False)
    engine = host.capturer()
    missing = [4194304 + 2, 4194304 + 1]  # above any pid_max
    for _ in range(2):
        snapshot = engine.capture(pids=[*missing, plain])
        assert snapshot.summary.tgids_walked == 3
        assert snapshot.summary.failed == 2
        assert snapshot.summary.dominant_failure == tags.PID_MISSING
        assert snapshot.failures == {tags.PID_MISSING: 2, tags.JEMALLOC_NOT_FOUND: 1}
        assert [(f.pid, f.tag, f.reason) for f in snapshot.failed_pids] == [
            (pid, tags.PID_MISSING, "no such process") for pid in sorted(missing)]
    assert engine.stats.exit_races == 0


def test_a_kernel_thread_named_is_unreadable_not_denied(host: Host,
                                                        caplog: pytest.LogCaptureFixture):
    """kthreadd has no exe: `readlink-failure`, not failed, not denied, in every pass; said
    at debug only."""
    host.add(2)
    engine = host.capturer()
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.capture"):
            snapshot = engine.capture(pids=[2])
        [said] = [r for r in caplog.records if r.getMessage().startswith("pid 2 (")]
        assert said.levelno == logging.DEBUG
        assert said.getMessage() == "pid 2 (kthreadd) pid 2: readlink-failure: pid 2: a kernel thread"
        assert snapshot.failures == {tags.READLINK_FAILURE: 1}
        assert snapshot.denied_tgids == 0 and snapshot.summary.failed == 0
        assert snapshot.summary.tgids_walked == 1


def test_a_zombie_is_an_exit_race_whose_failures_are_taken_back(host: Host):
    """A process that exited (a zombie, never reaped) has no exe: what failed is taken back
    and counted as an exit race, not as a failure, in a walk and when named."""
    agent = host.agent()
    zombie = int(agent.ask("zombie")[1])
    wait_until(lambda: is_dead(zombie), "the child a zombie")
    host.add(zombie)
    engine = host.capturer()
    walked = engine.capture()
    assert walked.summary.tgids_walked == 2
    assert walked.failures == {} and walked.summary.failed == 0
    assert [p.pid for p in walked.processes] == [agent.pid]
    assert engine.stats.exit_races == 1
    named = engine.capture(pids=[zombie])
    assert named.failures == {} and named.processes == ()
    assert engine.stats.exit_races == 2


@pytest.mark.parametrize("level", [logging.WARNING, logging.DEBUG], ids=["warning", "debug"])
def test_a_failure_raised_while_reading_costs_that_process_only(host: Host,
                                                                caplog: pytest.LogCaptureFixture,
                                                                level: int):
    """Whatever goes wrong while a process is read (here the thread-stop hook raises) is
    that process's `worker-panic`, warned about (with its traceback at debug); the others
    are read."""
    first = host.sleeper()
    second = host.sleeper()
    calls: list[float] = []

    def hook(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 1:
            raise RuntimeError("hook broke")

    engine = host.capturer(on_thread_stop=hook)
    with caplog.at_level(level, logger="ctprofd.probe.capture"):
        snapshot = engine.capture()
    [warned] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (warned.exc_info is not None) == (level == logging.DEBUG)
    assert snapshot.failures == {tags.WORKER_PANIC: 1}
    assert snapshot.summary.failed == 1 and snapshot.summary.probed_ok == 1
    [failed] = snapshot.failed_pids
    assert failed.pid == first and failed.reason == "unexpected RuntimeError: hook broke"
    assert [p.pid for p in snapshot.processes] == [second]
    assert f"pid {first}: unexpected RuntimeError while attaching: hook broke" in caplog.text
    again = engine.capture()  # the failure was that snapshot's only
    assert again.failures == {} and {p.pid for p in again.processes} == {first, second}


# --- the selection ---------------------------------------------------------------------

def test_processes_left_out_by_the_selection_are_not_walked_and_named_after_a_change(
        host: Host):
    """A process the selection leaves out is not walked, counted or read; after the rules
    change, the next pass (only) names the live ones left out, never a zombie."""
    agent = host.agent()
    zombie = int(agent.ask("zombie")[1])
    wait_until(lambda: is_dead(zombie), "the child a zombie")
    host.add(zombie)
    plain = host.sleeper(jemalloc=False)
    chosen = {agent.pid}
    engine = host.capturer(select=lambda p: p.pid in chosen)
    for _ in range(NOT_JEMALLOC_RECHECK + 1):
        snapshot = engine.capture()
        assert snapshot.summary.tgids_walked == 1
        assert [p.pid for p in snapshot.processes] == [agent.pid]
        assert snapshot.failures == {} and snapshot.unselected == ()
    chosen.clear()
    chosen.add(plain)
    engine.selection_changed()
    changed = engine.capture()
    assert changed.summary.tgids_walked == 1
    assert changed.failures == {tags.JEMALLOC_NOT_FOUND: 1}
    start = int(Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert changed.unselected == ((agent.pid, start),)
    for _ in range(NOT_JEMALLOC_RECHECK + 1):
        later = engine.capture()
        assert later.unselected == () and later.summary.tgids_walked == 1
        assert later.failures == {tags.JEMALLOC_NOT_FOUND: 1}


# --- processes that cannot be seen -----------------------------------------------------

DENIED_PASSES = 3


def _capture_as_nobody(root: str, pipe: int) -> None:
    """In a forked child: drop to nobody (no capability left), take DENIED_PASSES
    snapshots, write what they tallied and the warnings to `pipe`."""
    warnings: list[str] = []
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())
            elif record.levelno == logging.INFO and "read again" in record.getMessage():
                said.append(record.getMessage())

    logging.getLogger("ctprofd").addHandler(Keep())
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    engine = Capturer(CaptureSettings(proc_root=root, debug_dirs=(), cache_dir=None))
    passes = []
    links = sorted(os.listdir(root))
    for n in range(DENIED_PASSES + 2):
        if n == DENIED_PASSES:  # none denied for a pass: the next one is warned about again
            for link in links:
                os.rename(os.path.join(root, link), os.path.join(root, "away" + link))
        elif n == DENIED_PASSES + 1:
            for link in links:
                os.rename(os.path.join(root, "away" + link), os.path.join(root, link))
        snapshot = engine.capture()
        passes.append([snapshot.denied_tgids, dict(snapshot.failures),
                       snapshot.summary.tgids_walked, snapshot.summary.failed])
    logging.getLogger("ctprofd").setLevel(logging.INFO)
    # no privilege to listen to the kernel's process events either: said, and done without
    unheard = Capturer(CaptureSettings(debug_dirs=(), cache_dir=None, process_events=True))
    unheard.close()
    os.write(pipe, json.dumps({"passes": passes, "warnings": warnings, "said": said}).encode())


def test_processes_whose_exe_is_refused_are_denied_in_every_pass_and_warned_about_once(
        host: Host):
    """Without privilege, a root process's exe link is refused (EACCES): denied, a
    `readlink-failure` but not failed, in every pass (read again or counted unread), and
    the cause warned about once while any is denied, again after a pass with none."""
    pids = [host.sleeper(jemalloc=False), host.sleeper(jemalloc=False)]
    # as root, the same processes are seen (and this process runs the code the child runs)
    seen = host.capturer(process_events=True).capture()
    assert seen.denied_tgids == 0 and seen.failures == {tags.JEMALLOC_NOT_FOUND: 2}
    root = Path(tempfile.mkdtemp(prefix="ctprofd-test-proc-"))  # pytest's tmp_path is 0700
    os.chmod(root, 0o777)  # the child renames its links
    for pid in pids:
        (root / str(pid)).symlink_to(f"/proc/{pid}")
    try:
        result = _denied_passes(root)
    finally:
        shutil.rmtree(root)
    denied = [2, {tags.READLINK_FAILURE: 2}, 2, 0]
    assert result["passes"] == [denied] * DENIED_PASSES + [[0, {}, 0, 0], denied]
    warnings = [w for w in result["warnings"] if "cannot be seen" in w]
    assert len(warnings) == 2  # once, and again after a pass with none denied
    for warning in warnings:
        assert warning.startswith("2 processes cannot be seen: reading their /proc/PID/exe "
                                  "was refused (EACCES/EPERM); ")
        assert "CAP_SYS_PTRACE" in warning
    [unheard] = result["said"]
    assert unheard.startswith(("no proc connector: ", "proc connector refused: ")), unheard
    assert unheard.endswith(": unchanged processes are read again once in "
                            f"{NOT_JEMALLOC_RECHECK} snapshots"), unheard


def _denied_passes(root: Path) -> dict:
    """What `_capture_as_nobody` wrote, run in a forked child."""
    return json.loads(written_in_a_child(lambda fd: _capture_as_nobody(str(root), fd)))


# --- exec -----------------------------------------------------------------------------

@pytest.mark.parametrize("into", ["same-file", "other-file"])
def test_an_exec_keeps_the_earlier_images_totals_beneath_the_new_ones(host: Host, into: str):
    """Before and after an exec, a thread allocates and exits before any pass reads it:
    only each image's arena statistics know it. After the exec the total is the earlier
    image's last total plus everything the new image counted (as a ctprofd that never saw
    the earlier image reads it), for deallocated bytes too; and the bytes not in a live
    thread are what is retained."""
    agent = host.agent()
    agent.ask("alloc 200000")
    agent.ask("burst 3000000")  # the earlier image's arena statistics alone know it
    engine = host.capturer()
    before = sample(engine.capture(), agent.pid)
    assert before.totals_source == ARENA
    assert before.allocated_bytes > sum(t.allocated_bytes for t in before.threads) + 1000000
    if into == "same-file":
        agent.process.send(f"exec {PYTHON} {host.script}")
    else:  # a copy of the interpreter: another file, told by its identity
        copy = host.root.parent / "python3"
        shutil.copy(os.path.realpath(PYTHON), copy)
        agent.process.send(f"exec {copy} {host.script}")
    agent.ready()
    agent.ask("burst 5000000")  # the new image's arena statistics alone know it
    # the new image alone: as read by a ctprofd that never saw the earlier one
    low, after, high = between(host, agent.pid, lambda: sample(engine.capture(), agent.pid))
    assert after.totals_source == high.totals_source == ARENA
    assert high.allocated_bytes > sum(t.allocated_bytes for t in high.threads) + 1000000
    # the earlier image counts with the larger of its last total and its threads' sums
    earlier = (max(before.allocated_bytes, sum(t.allocated_bytes for t in before.threads)),
               max(before.deallocated_bytes, sum(t.deallocated_bytes for t in before.threads)))
    within(after, earlier, low, high)
    assert (after.retained_allocated_bytes
            == after.allocated_bytes - sum(t.allocated_bytes for t in after.threads))
    assert (after.retained_deallocated_bytes
            == after.deallocated_bytes - sum(t.deallocated_bytes for t in after.threads))
    assert totals(sample(engine.capture(), agent.pid)) == totals(after)  # unchanged: the same


@pytest.mark.parametrize("middle", ["shell", "same-file"])
def test_an_exec_into_a_program_without_jemalloc_and_back_keeps_the_first_images_totals(
        host: Host, middle: str, monkeypatch: pytest.MonkeyPatch):
    """An image without jemalloc between two that have it (a shell, or the same program
    without jemalloc preloaded): the first image's total still counts beneath the last
    one's, and the process is reported again once it has jemalloc."""
    agent = host.agent()
    agent.ask("park 1000000")
    engine = host.capturer()
    before = sample(engine.capture(), agent.pid)
    if middle == "shell":
        wrapper = host.root.parent / "wrapper.sh"
        wrapper.write_text(f"read go\nLD_PRELOAD={JEMALLOC} exec {PYTHON} {host.script}\n")
        agent.process.send(f"exec - /bin/sh {wrapper}")
        shell = os.path.realpath("/bin/sh")
        wait_until(lambda: os.readlink(f"/proc/{agent.pid}/exe") == shell, "the shell running")
        assert agent.pid not in {p.pid for p in engine.capture().processes}
    else:
        monkeypatch.setattr(capture, "NOT_JEMALLOC_OBJECTS_RECHECK", 0)
        agent.process.send(f"exec - {PYTHON} {host.script}")
        agent.ready()
        changed = engine.capture()  # told by the image's AT_RANDOM, read with the threads
        assert changed.processes == () and changed.summary.failed == 0
    gap = engine.capture()
    assert agent.pid not in {p.pid for p in gap.processes}
    assert gap.failures == {tags.JEMALLOC_NOT_FOUND: 1} and gap.summary.jemalloc_detected == 0
    assert engine.not_jemalloc_reason(agent.pid)
    if middle == "shell":
        agent.process.send("go")
    else:  # the same file again: told by a look at its code objects (every pass here)
        agent.process.send(f"exec + {JEMALLOC} {PYTHON} {host.script}")
    agent.ready()
    def reported() -> ProcessSample:
        for _ in range(NOT_JEMALLOC_RECHECK):  # an image without jemalloc is looked at again
            snapshot = engine.capture()          # once in that many passes
            if agent.pid in {p.pid for p in snapshot.processes}:
                break
        return sample(snapshot, agent.pid)

    low, after, high = between(host, agent.pid, reported)
    earlier = (max(before.allocated_bytes, sum(t.allocated_bytes for t in before.threads)),
               max(before.deallocated_bytes, sum(t.deallocated_bytes for t in before.threads)))
    within(after, earlier, low, high)


# --- a restart: the state file --------------------------------------------------------

def _keep_only(state: Path, kept: str) -> None:
    """Drop the other part of the state file (as an older ctprofd wrote it, or hand-made)."""
    if kept == "both":
        return
    saved = json.loads((state / "retained.json").read_text())
    saved.pop("threads" if kept == "reported" else "reported")
    (state / "retained.json").write_text(json.dumps(saved))


def _first_run(host: Host, agent: Agent, state: Path) -> tuple[ProcessSample, tuple[int, int]]:
    """A first ctprofd reads the agent with a thread parked (per-thread sums: its layout
    has no arena statistics), and stops; the thread exits while none runs. Returns what it
    read and that thread's last counters."""
    tid = int(agent.ask("park 1500000")[1])
    first = host.capturer(state_dir=str(state), offsets_files=(host.layouts["no_arena"],))
    read = sample(first.capture(), agent.pid)
    first.close()
    assert read.totals_source == THREADS
    [gone] = [(t.allocated_bytes, t.deallocated_bytes) for t in read.threads if t.tid == tid]
    assert gone[0] >= 1500000
    agent.ask("release")
    return read, gone


@pytest.mark.parametrize("kept", ["threads", "reported", "both"])
def test_a_restart_keeps_a_thread_that_exited_while_no_ctprofd_ran(host: Host, tmp_path: Path,
                                                                   kept: str):
    """What the state file kept of a thread that exited while no ctprofd ran still counts
    after a restart, whichever part of the file kept it: the thread's last counters, or
    the total last reported as a floor."""
    agent = host.agent()
    state = tmp_path / "state"
    state.mkdir()
    read, gone = _first_run(host, agent, state)
    _keep_only(state, kept)
    restarted = host.capturer(state_dir=str(state), offsets_files=(host.layouts["no_arena"],))
    low, after, high = between(host, agent.pid, lambda: sample(restarted.capture(), agent.pid),
                               offsets_files=(host.layouts["no_arena"],))
    assert after.totals_source == THREADS
    assert high.allocated_bytes < read.allocated_bytes  # the live threads alone fall short
    if kept == "reported":  # the floor of the total last reported
        assert totals(after) == (max(read.allocated_bytes, after.allocated_bytes),
                                 max(read.deallocated_bytes, after.deallocated_bytes))
        assert after.allocated_bytes == read.allocated_bytes
    else:
        within(after, gone, low, high)


def test_a_restart_that_cannot_attach_at_first_keeps_the_saved_state(host: Host,
                                                                     tmp_path: Path):
    """Restarted, ctprofd cannot read the process at first (its files are refused: over
    the size bound), and is restarted again with a bound that lets it: the thread saved by
    the first run still counts, once."""
    agent = host.agent()
    state = tmp_path / "state"
    state.mkdir()
    read, gone = _first_run(host, agent, state)
    refused = host.capturer(state_dir=str(state), offsets_files=(host.layouts["no_arena"],),
                            cache_dir=None, parser=WorkerLimits(max_file_bytes=1))
    snapshot = refused.capture()
    assert snapshot.processes == () and snapshot.summary.failed == 1
    refused.close()
    again = host.capturer(state_dir=str(state), offsets_files=(host.layouts["no_arena"],))
    low, after, high = between(host, agent.pid, lambda: sample(again.capture(), agent.pid),
                               offsets_files=(host.layouts["no_arena"],))
    within(after, gone, low, high)


def test_a_restart_that_finds_an_image_without_jemalloc_keeps_the_saved_threads(
        host: Host, tmp_path: Path):
    """While no ctprofd runs, a thread exits and the process execs a shell; restarted,
    ctprofd finds the shell, then the jemalloc program it execs: the saved threads (all the
    state file kept) count the first image beneath the last."""
    agent = host.agent()
    state = tmp_path / "state"
    state.mkdir()
    read, gone = _first_run(host, agent, state)
    _keep_only(state, "threads")
    wrapper = host.root.parent / "wrapper.sh"
    wrapper.write_text(f"read go\nLD_PRELOAD={JEMALLOC} exec {PYTHON} {host.script}\n")
    agent.process.send(f"exec - /bin/sh {wrapper}")
    shell = os.path.realpath("/bin/sh")
    wait_until(lambda: os.readlink(f"/proc/{agent.pid}/exe") == shell, "the shell running")
    restarted = host.capturer(state_dir=str(state), offsets_files=(host.layouts["no_arena"],))
    assert restarted.capture().processes == ()
    agent.process.send("go")
    agent.ready()
    def reported() -> ProcessSample:
        for _ in range(NOT_JEMALLOC_RECHECK):
            snapshot = restarted.capture()
            if snapshot.processes:
                break
        return sample(snapshot, agent.pid)

    low, after, high = between(host, agent.pid, reported,
                               offsets_files=(host.layouts["no_arena"],))
    within(after, totals(read), low, high)


def test_the_state_file_keeps_live_processes_only_and_not_after_a_cancelled_pass(
        host: Host, tmp_path: Path):
    """Each complete walk writes what the processes alive carry (none for a process
    without jemalloc); a process gone is dropped from it; a pass cancelled writes nothing,
    and forgets nothing."""
    agent = host.agent()
    host.sleeper(jemalloc=False)
    state = tmp_path / "state"
    state.mkdir()
    engine = host.capturer(state_dir=str(state))
    read = sample(engine.capture(), agent.pid)
    saved = json.loads((state / "retained.json").read_text())
    assert saved["boot_id"] == host.boot_id
    start = read.start_time
    assert list(saved["reported"]) == [f"{agent.pid}:{start}"]
    assert saved["reported"][f"{agent.pid}:{start}"] == list(totals(read))
    (state / "retained.json").unlink()
    import threading
    cancel = threading.Event()
    cancel.set()
    cancelled = engine.capture(cancel=cancel)
    assert cancelled.processes == () and cancelled.summary.tgids_walked == 0
    assert not (state / "retained.json").exists()
    host.remove(agent.pid)
    engine.capture()
    saved = json.loads((state / "retained.json").read_text())
    assert saved["reported"] == {} or f"{agent.pid}:{start}" not in saved["reported"]
    assert f"{agent.pid}:{start}" not in saved["processes"]


# --- the arena statistics ---------------------------------------------------------------

def test_arena_statistics_refused_fall_back_to_thread_sums_and_back_off(
        host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Arena statistics that cannot be used (here: more arenas than the bound allows) give
    the per-thread sums with the reason, no failure; they are not read again for 1, then
    2 passes, and used again at the first read that works."""
    pid = host.sleeper()
    engine = host.capturer()
    assert sample(engine.capture(), pid).totals_source == ARENA
    host.remove(pid)  # a pass without it: read anew below
    engine.capture()
    host.add(pid)
    monkeypatch.setattr(arena_stats, "MAX_ARENAS", 0)
    sources = []
    for n in range(8):
        if n == 3:  # after the second failure
            monkeypatch.setattr(arena_stats, "MAX_ARENAS", 1024)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.capture"):
            snapshot = engine.capture()
        assert snapshot.failures == {} and snapshot.summary.failed == 0
        process = sample(snapshot, pid)
        sources.append(process.totals_source)
        said = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(f"pid {pid}: arena statistics: ")]
        if process.totals_source == THREADS:
            assert process.totals_reason.startswith(
                "arena statistics refused: implausible counts: ")
        else:
            assert process.totals_reason == ""
        error = process.totals_reason.removeprefix("arena statistics refused: ")
        # said at debug when a read is refused
        assert said == ([f"pid {pid}: arena statistics: {error}"] if n in (0, 2) else []), said
    # failed at 0 (skip 1), at 2 (skip 2): read again at 5
    assert sources == [THREADS] * 5 + [ARENA] * 3


def test_a_layout_without_arena_statistics_says_why_totals_are_thread_sums(host: Host):
    """Offsets imported without the arena statistics: per-thread sums, and the reason."""
    pid = host.sleeper()
    engine = host.capturer(offsets_files=(host.layouts["no_arena"],))
    process = sample(engine.capture(), pid)
    assert process.totals_source == THREADS
    assert process.totals_reason == "no arena layout: left out"
    assert process.allocator is None
    assert any(layout.dwarf_source == f"imported from {host.layouts['no_arena']}"
               for layout in engine.cache.layouts())


# --- fork children -----------------------------------------------------------------------

def test_a_fork_child_reports_only_what_it_allocated_after_the_fork(host: Host):
    """A fork() child's thread starts with its parent's counters and arenas: read after its
    parent in a walk, it reports only what it allocated itself (in the thread fork() copied
    and in one it started); read with no parent known (named alone), nothing of what the
    copied thread had at its first read."""
    agent = host.agent()
    agent.ask("alloc 3000000")
    child = host.add(int(agent.ask("fork 1000000 500000")[1]))
    host.traced.append(child)
    engine = host.capturer()
    snapshot = engine.capture()
    parent, forked = sample(snapshot, agent.pid), sample(snapshot, child)
    assert parent.allocated_bytes > 3000000
    assert 1500000 <= forked.allocated_bytes < 1700000, forked
    assert forked.deallocated_bytes < 100000
    # the thread fork() copied, less what it inherited; and one the child started itself
    [copied] = [t for t in forked.threads if t.tid == child]
    [started] = [t for t in forked.threads if t.tid != child]
    assert 1000000 <= copied.allocated_bytes < 1100000 and copied.deallocated_bytes < 100000
    assert 500000 <= started.allocated_bytes < 600000
    assert totals(sample(engine.capture(), child)) == totals(forked)
    alone = sample(host.capturer().capture(pids=[child]), child)
    assert alone.allocated_bytes == started.allocated_bytes  # the copy's bytes not its own


# --- the kernel's process events ---------------------------------------------------------

def test_while_events_are_heard_new_and_ended_threads_an_exec_and_a_new_owner_show(
        host: Host, heard: Callable[..., Capturer]):
    """Listening to the kernel's events, a pass takes an unchanged process's threads, image
    and owner as they were: each change an event tells still shows in the next pass."""
    agent = host.agent()
    engine = heard()
    first = sample(engine.capture(), agent.pid)
    assert [t.tid for t in first.threads] == [agent.pid]
    assert first.uid == 0
    assert totals(sample(engine.capture(), agent.pid)) == totals(first)
    tid = int(agent.ask("park 2000000")[1])
    parked = sample(engine.capture(), agent.pid)
    assert sorted(t.tid for t in parked.threads) == sorted([agent.pid, tid])
    assert parked.allocated_bytes >= first.allocated_bytes + 2000000
    agent.ask("release")
    # the end of a thread is told after a join returns: it may take another pass
    released = wait_until(lambda: [p for p in [sample(engine.capture(), agent.pid)]
                                   if [t.tid for t in p.threads] == [agent.pid]],
                          "the thread that ended left out", poll=0.05)[0]
    assert released.allocated_bytes >= parked.allocated_bytes
    agent.process.send(f"exec {PYTHON} {host.script}")
    agent.ready()
    agent.ask("burst 3000000")
    low, after, high = between(host, agent.pid, lambda: sample(engine.capture(), agent.pid))
    earlier = max(released.allocated_bytes, sum(t.allocated_bytes for t in released.threads))
    assert earlier + low.allocated_bytes <= after.allocated_bytes <= earlier + high.allocated_bytes
    agent.ask("uid 65534")
    for _ in range(3):
        assert sample(engine.capture(), agent.pid).uid == 65534
    assert snapshot_walked(engine) == 1


def snapshot_walked(engine: Capturer) -> int:
    return engine.capture().summary.tgids_walked


def test_without_proc_as_root_no_events_are_listened_to(host: Host,
                                                        caplog: pytest.LogCaptureFixture):
    """Process events are the kernel's namespace's: with another proc root, none are
    listened to, and passes read as without them."""
    pid = host.sleeper()
    with caplog.at_level(logging.INFO, logger="ctprofd.probe.capture"):
        engine = host.capturer(process_events=True)
    assert f"no process events: {host.root} is not /proc" in caplog.messages
    for _ in range(3):
        assert [p.pid for p in engine.capture().processes] == [pid]


# --- logs and counters -------------------------------------------------------------------

def test_the_summary_line_is_logged_at_info_only_when_it_changes(
        host: Host, caplog: pytest.LogCaptureFixture):
    """A host that does not change would repeat the same line every interval: at debug."""
    host.sleeper()
    engine = host.capturer()
    levels = []
    for n in range(4):
        if n == 2:
            host.sleeper(jemalloc=False)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.capture"):
            snapshot = engine.capture()
        [record] = [r for r in caplog.records if r.getMessage() == snapshot.summary.log_line()]
        levels.append(record.levelno)
    assert levels == [logging.INFO, logging.DEBUG, logging.INFO, logging.DEBUG]


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["info", "debug"])
def test_a_binary_that_fails_is_logged_at_info_once_per_binary_and_tag(
        host: Host, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        level: int):
    """A failure is news once for each binary: at info the first time, then at debug; the
    set of those already said is bounded (forgotten whole when full)."""
    monkeypatch.setattr(capture, "LOGGED_FAILURES_MAX", 1)
    agent = host.agent()
    sleeper = host.sleeper()
    engine = host.capturer(cache_dir=None, parser=WorkerLimits(max_file_bytes=1))
    said = []
    for pids in ([sleeper], [sleeper], [agent.pid], [sleeper]):
        caplog.clear()
        with caplog.at_level(level, logger="ctprofd.probe.capture"):
            snapshot = engine.capture(pids=pids)
        assert snapshot.summary.failed == 1 and snapshot.processes == ()
        records = [r for r in caplog.records if r.getMessage().startswith(f"pid {pids[0]} (")]
        said.append(records[0].levelno if records else None)
        for record in records:
            assert snapshot.failed_pids[0].tag in record.getMessage()
    # at info, a repeat is not said at all
    assert said == [logging.INFO, None if level == logging.INFO else logging.DEBUG,
                    logging.INFO, logging.INFO]


def test_the_stats_count_what_the_passes_did(host: Host, tmp_path: Path):
    """Thread stops, cache use, exit races and state writes that failed, cumulative."""
    pid = host.sleeper()
    state = tmp_path / "state"
    state.mkdir()
    engine = host.capturer(cache_dir=str(tmp_path / "cache"), state_dir=str(state))
    state.rmdir()
    state.write_text("")  # no longer a directory: the state cannot be written
    engine.capture()
    stats = engine.stats
    assert stats.ptrace_stops == 1 and stats.stop_timeouts == 0
    assert stats.exit_races == 0 and stats.torn_reads == 0
    assert stats.cache_misses > 0 and stats.cache_entries > 0 and stats.cache_hits == 0
    assert stats.elf_opens > 0
    assert stats.state_write_failures == 1
    engine.capture()  # its thread located: read without a stop
    assert engine.stats.ptrace_stops == 1
    host.remove(pid)
    engine.capture()  # gone from the walk: forgotten
    host.add(pid)
    engine.capture()
    assert engine.stats.ptrace_stops == 2
    assert engine.stats.cache_hits > 0


# --- binaries resolved in the background ------------------------------------------------

def test_a_process_pending_resolution_is_counted_pending_then_read(host: Host, tmp_path: Path):
    """Without a grace, a process whose binaries the background resolver still works on is
    pending (not read, not failed) and read by a later pass once they are resolved."""
    pid = host.sleeper()
    engine = host.capturer(cache_dir=str(tmp_path / "cache"), background=True)
    first = engine.capture()
    assert first.pending == 1 and first.processes == ()
    assert first.summary.tgids_walked == 1 and first.summary.failed == 0
    assert first.summary.jemalloc_detected == 0 and first.failures == {}
    later = wait_until(lambda: [s for s in [engine.capture()] if s.processes],
                       "the process read once resolved", poll=0.05)[0]
    assert [p.pid for p in later.processes] == [pid] and later.pending == 0
    assert later.summary.jemalloc_detected == 1 and later.summary.probed_ok == 1


def test_without_a_grace_a_pass_does_not_wait_for_the_resolver(host: Host, tmp_path: Path):
    """With no grace, a pass that gave the resolver a binary does not wait for it: the
    process is pending, even when that binary is the only one it needs."""
    pid = host.sleeper()
    cache = tmp_path / "cache"  # every object known but jemalloc: one to resolve
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    engine = host.capturer(cache_dir=str(cache), background=True)
    snapshot = engine.capture()
    assert snapshot.pending == 1 and snapshot.processes == ()
    later = wait_until(lambda: [s for s in [engine.capture()] if s.processes],
                       "the process read once resolved", poll=0.05)[0]
    assert [p.pid for p in later.processes] == [pid]


@pytest.mark.parametrize("named", [False, True], ids=["walk", "named"])
def test_with_a_grace_a_pending_process_is_read_in_the_same_pass(host: Host, tmp_path: Path,
                                                                 named: bool):
    """With a grace, the pass that gave the resolver new binaries waits for it, then reads
    the processes that were pending: in the same snapshot, counted once."""
    pid = host.sleeper()
    plain = host.sleeper(jemalloc=False)
    cache = tmp_path / "cache"  # every object known but jemalloc: one to resolve
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    engine = host.capturer(cache_dir=str(cache), background=True, resolve_grace=120.0)
    snapshot = engine.capture(pids=[pid, plain] if named else None)
    assert [p.pid for p in snapshot.processes] == [pid]
    assert sample(snapshot, pid).totals_source == ARENA
    assert snapshot.pending == 0
    assert snapshot.summary.tgids_walked == 2 and snapshot.summary.jemalloc_detected == 1
    assert snapshot.summary.probed_ok == 1 and snapshot.summary.failed == 0
    assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}
    # a wait that ended with the resolver done leaves no back-off: the next pass that
    # gives it a binary (a copy of `sleep`, another file) waits again
    copy = tmp_path / "sleep"
    shutil.copy("/usr/bin/sleep", copy)
    other = host.spawn([str(copy), "600"]).pid
    host.traced.append(other)
    wait_until(lambda: Path(f"/proc/{other}/syscall").read_text().split()[0] in ("230", "35"),
               "the copy asleep")
    again = engine.capture(pids=[pid, plain, other] if named else None)
    assert sorted(p.pid for p in again.processes) == sorted([pid, other])
    assert again.pending == 0


# --- code objects mapped later -----------------------------------------------------------

def test_a_process_that_loads_jemalloc_later_is_read_once_its_objects_are_looked_at_again(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """A process without jemalloc at first dlopen()s it later (a module imported late): the
    next look at its code objects (here at every pass: a period of a microsecond) finds it
    and reads it; looks that find the same maps change nothing."""
    monkeypatch.setattr(capture, "NOT_JEMALLOC_OBJECTS_RECHECK", 1e-6)
    # room in the static TLS block for an initial-exec jemalloc loaded late
    agent = host.agent(jemalloc=False, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=65536")
    engine = host.capturer()
    for _ in range(3):
        snapshot = engine.capture()
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1} and snapshot.processes == ()
    assert agent.ask(f"dlopen {JEMALLOC} 2000000") == ["OK"]
    loaded = engine.capture()
    assert loaded.failures == {} and loaded.summary.jemalloc_detected == 1
    assert sample(loaded, agent.pid).allocated_bytes >= 2000000
    assert engine.not_jemalloc_reason(agent.pid) is None


# --- a fork child listed before its parent -----------------------------------------------

LOW_CHILD = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

""" + FORK_BELOW + r"""
/* A fork under the pid the kernel gives next (above this one's but after a wrap). */
static long fork_any(void) {
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    return syscall(SYS_clone3, &args, sizeof args);
}

/* Allocates 4 MiB, then forks a child under a lower pid, which allocates 2 MiB and forks
   a grandchild under a lower pid still, which allocates argv[1] bytes and frees 4 KiB,
   and another one under the next pid, which allocates 512 KiB. Each waits; after the
   fork, none allocates or frees anything but that (no stdio). Prints "CHILD GRANDCHILD
   OTHER". */
int main(int argc, char **argv) {
    size_t size = strtoul(argv[1], NULL, 10);
    volatile char *mine = malloc(4 << 20);
    mine[0] = 1;
    int up[2], down[2];  /* grandchild to child, child to this process */
    if (pipe(up) || pipe(down)) return 1;
    long child = fork_below();
    if (child == 0) {
        volatile char *own = malloc(2 << 20);
        own[0] = 1;
        long grandchild = fork_below();
        if (grandchild == 0) {
            volatile char *last = malloc(size);
            last[0] = 1;
            void *volatile freed = malloc(4096);  /* volatile: the pair is not optimised away */
            free(freed);
            long done = 0;
            if (write(up[1], &done, sizeof done) != sizeof done) _exit(1);
            for (;;) pause();
        }
        long got;  /* the grandchild's word, then this one's */
        if (grandchild < 0 || read(up[0], &got, sizeof got) != sizeof got) _exit(1);
        long other = fork_any();
        if (other == 0) {
            volatile char *last = malloc(512 << 10);
            last[0] = 1;
            long done = 0;
            if (write(up[1], &done, sizeof done) != sizeof done) _exit(1);
            for (;;) pause();
        }
        if (other < 0 || read(up[0], &got, sizeof got) != sizeof got) _exit(1);
        long pids[2] = {grandchild, other};
        if (write(down[1], pids, sizeof pids) != sizeof pids) _exit(1);
        for (;;) pause();
    }
    long pids[2];
    if (child < 0 || read(down[0], pids, sizeof pids) != sizeof pids) return 1;
    char line[64];
    int n = snprintf(line, sizeof line, "%ld %ld %ld\n", child, pids[0], pids[1]);
    if (write(1, line, n) != n) return 1;
    for (;;) pause();
}
"""


@pytest.fixture(scope="module")
def low_child(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("low_child") / "low_child.c"
    source.write_text(LOW_CHILD)
    binary = source.with_suffix("")
    subprocess.run(["cc", "-O1", "-o", str(binary), str(source)], check=True)
    return binary


def test_fork_children_with_lower_pids_than_their_parents_are_read_after_them(
        host: Host, low_child: Path):
    """After a pid wrap a fork() child can be listed before its parent, and that parent
    before its own; a child listed after its parent may find it held back for its own:
    each is read after its parent all the same, and so reports only what it did itself."""
    top = host.spawn([str(low_child), "1000000"])
    child, grandchild, other = (host.add(int(pid)) for pid in top.readline().split())
    host.traced += [top.pid, child, grandchild, other]
    assert grandchild < child < top.pid and child < other
    engine = host.capturer()
    snapshot = engine.capture()
    assert snapshot.summary.tgids_walked == 4 and snapshot.summary.probed_ok == 4, (
        top.pid, child, grandchild, sorted(os.listdir(host.root)), snapshot.processes)
    assert sample(snapshot, top.pid).allocated_bytes >= 4 << 20
    # none did anything after its fork but this: exactly their own bytes
    for pid, own in ((child, (2 << 20, 0)), (grandchild, ((1 << 20) + 4096, 4096)),
                     (other, (512 << 10, 0))):
        [thread] = sample(snapshot, pid).threads
        assert (thread.allocated_bytes, thread.deallocated_bytes) == own, (pid, snapshot)
        assert own[0] <= sample(snapshot, pid).allocated_bytes < own[0] + 100000


# --- another tracer ------------------------------------------------------------------------

@pytest.mark.parametrize("arena", [True, False], ids=["arena", "no-arena"])
def test_a_process_another_tracer_holds_is_read_from_its_arena_statistics_or_not_at_all(
        host: Host, arena: bool):
    """A process whose only thread another tracer holds: its thread is not read (the
    tracer named); with arena statistics its totals come from them, without them and with
    nothing read before, no sample (zeros would fake a counter reset)."""
    pid = host.sleeper()
    tracer = Spawned(["strace", "-qq", "-o", "/dev/null", "-p", str(pid)])
    try:
        wait_until(lambda: Path(f"/proc/{pid}/status").read_text().count(
            f"TracerPid:\t{tracer.pid}\n"), "strace attached")
        engine = host.capturer(**({} if arena else {
            "offsets_files": (host.layouts["no_arena"],)}))
        snapshot = engine.capture()
        assert snapshot.traced_by == {pid: tracer.pid}
        assert snapshot.tracer_names == {tracer.pid: "strace"}
        assert snapshot.failures == {tags.PTRACE_TRACED: 1}
        if arena:
            [process] = snapshot.processes
            assert process.threads == () and process.totals_source == ARENA
            assert process.allocated_bytes > 0
        else:
            assert snapshot.processes == ()
    finally:
        tracer.kill()
    wait_until(lambda: "TracerPid:\t0\n" in Path(f"/proc/{pid}/status").read_text(),
               "strace gone")


def test_while_events_are_heard_a_move_to_another_cgroup_shows_within_the_recheck(
        host: Host, heard: Callable[..., Capturer]):
    """No event tells a move to another cgroup: the unit is read again once in
    THREAD_RECHECK passes all the same."""
    agent = host.agent()
    engine = heard()
    assert sample(engine.capture(), agent.pid).unit == sample(engine.capture(), agent.pid).unit
    unit = unique_unit()
    with in_unit(agent.pid, unit):
        units = [sample(engine.capture(), agent.pid).unit
                 for _ in range(capture.THREAD_RECHECK)]
        assert units[-1] == unit


def test_listening_to_process_events_is_said_with_the_recheck_it_allows(
        host: Host, heard: Callable[..., Capturer], caplog: pytest.LogCaptureFixture):
    """The log says which recheck applies: events heard, the rarer one."""
    with caplog.at_level(logging.INFO, logger="ctprofd.probe.capture"):
        heard()
    assert ("listening to the kernel's process events: unchanged processes are read again "
            f"once in {capture.NOT_JEMALLOC_RECHECK_HEARD} snapshots") in caplog.messages


# --- the settings given to the layout cache ---------------------------------------------

@pytest.mark.parametrize("bounds", [{"cache_max_entries": 1}, {"cache_max_bytes": 1000},
                                    {"cache_writable": False}],
                         ids=["max-entries", "max-bytes", "read-only"])
def test_the_layout_cache_keeps_what_the_settings_allow(host: Host, tmp_path: Path,
                                                        bounds: dict):
    """`sleep` with jemalloc needs several objects resolved: each store of the cache
    directory keeps them within its bounds, or nothing when the directory is not the
    Capturer's to write."""
    sleeper = host.sleeper()
    cache = tmp_path / "cache"
    engine = host.capturer(cache_dir=str(cache), **bounds)
    assert [p.pid for p in engine.capture().processes] == [sleeper]
    stores = {store: [f.stat().st_size for f in (cache / store).glob("*.json")]
              for store in ("layouts", "negative")}
    if "cache_writable" in bounds:
        assert stores == {"layouts": [], "negative": []}
    elif "cache_max_entries" in bounds:
        assert [len(sizes) for sizes in stores.values()] == [1, 1]
    else:
        assert stores["negative"] and all(sum(sizes) <= 1000 for sizes in stores.values())


def test_arena_statistics_over_budget_are_failed_in_every_pass_and_warned_once_in_a_row(
        host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """A read of the arena statistics that would pass its budget (here made 64 bytes: the
    real Budget, smaller) is `arena-budget` with its reason in every pass until a read
    fits, read again after 1, then 2 passes; warned about at its first failure in a row
    only."""
    real = arena_stats.Budget
    agent = host.agent()
    engine = host.capturer()

    def small(reader):
        return real(reader, max_bytes=64)

    monkeypatch.setattr(arena_stats, "Budget", small)
    sources, warned = [], []
    for n in range(8):
        if n == 3:  # after the second failure: the next read (at 5) fits
            monkeypatch.setattr(arena_stats, "Budget", real)
        if n == 7:  # something allocated (a read again), over the budget again
            agent.ask("alloc 100000")
            monkeypatch.setattr(arena_stats, "Budget", small)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ctprofd.probe.capture"):
            snapshot = engine.capture()
        process = sample(snapshot, agent.pid)
        sources.append(process.totals_source)
        warned.append(len(caplog.records))
        if process.totals_source == THREADS:
            reason = (f"pid {agent.pid}: arena statistics over budget: reading ")
            assert process.totals_reason.startswith(reason), process.totals_reason
            assert process.totals_reason.endswith(" bytes passes the budget of 64 per snapshot; "
                                                  "per-thread sums instead")
            assert snapshot.failures == {tags.ARENA_BUDGET: 1}
            [failed] = snapshot.failed_pids
            assert (failed.pid, failed.tag, failed.reason) == (
                agent.pid, tags.ARENA_BUDGET, process.totals_reason)
        else:
            assert snapshot.failures == {} and process.totals_reason == ""
    assert sources == [THREADS] * 5 + [ARENA] * 2 + [THREADS]
    assert warned == [1, 0, 0, 0, 0, 0, 0, 1]
    [record] = caplog.records
    assert record.getMessage() == (
        f"{process.totals_reason} (python3, {os.path.realpath(PYTHON)}): a process that "
        "declares more arenas, bins or thread caches than a real jemalloc has, or rewrote "
        "its allocator's memory")


def test_the_next_look_keeps_to_its_grid_for_periods_under_a_second():
    """`next_look` on its grid (due + k * period) for a period of a second or less too;
    a period of 0 is every snapshot."""
    assert capture.next_look(10.0, 10.5, 1.0) == 11.0
    assert capture.next_look(10.0, 10.3, 0.25) == 10.5
    assert capture.next_look(10.0, 10.3, 0.0) == 10.3


def test_a_layout_without_arena_statistics_or_a_reason_names_where_it_came_from(
        host: Host, tmp_path: Path):
    """Offsets imported without the arena statistics and without saying why: the reason
    names where the offsets came from."""
    [layout] = offsets_file.load(host.layouts["no_arena"])
    offsets = tmp_path / "offsets.json"
    offsets_file.dump([dataclasses.replace(layout, arena_missing="")], str(offsets))
    cache = tmp_path / "cache"  # every object known but jemalloc: the file's layout is used
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    pid = host.sleeper()
    engine = host.capturer(offsets_files=(str(offsets),), cache_dir=str(cache))
    process = sample(engine.capture(), pid)
    [pinned] = engine.cache.layouts()
    assert process.totals_source == THREADS
    assert process.totals_reason == f"no arena layout (offsets from {pinned.source})"
    assert pinned.source


def test_a_pid_named_is_read_whatever_it_was_at_the_last_capture(host: Host):
    """A capture of named pids reads each of them: one without jemalloc at the last capture
    that has exec'ed a program with jemalloc since is read at once, not counted unread as
    a quiet process of a walk would be."""
    agent = host.agent()
    wrapper = host.root.parent / "wrapper.sh"
    wrapper.write_text(f"read go\nLD_PRELOAD={JEMALLOC} exec {PYTHON} {host.script}\n")
    agent.process.send(f"exec - /bin/sh {wrapper}")
    shell = os.path.realpath("/bin/sh")
    wait_until(lambda: os.readlink(f"/proc/{agent.pid}/exe") == shell, "the shell running")
    engine = host.capturer()
    for _ in range(2):
        assert engine.capture(pids=[agent.pid]).failures == {tags.JEMALLOC_NOT_FOUND: 1}
    agent.process.send("go")
    agent.ready()
    for _ in range(NOT_JEMALLOC_RECHECK):
        assert [p.pid for p in engine.capture(pids=[agent.pid]).processes] == [agent.pid]
