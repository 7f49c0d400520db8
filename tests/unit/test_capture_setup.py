"""What a Capturer is made with (ctprofd/probe/capture.py: its settings reaching the debug
search, the debuginfod client, the layout parser and the process events), what a pass
counts of processes it does not read again, the warning about processes that cannot be
seen, and the wait for the background resolver. Real processes with Debian's jemalloc
preloaded, a real debuginfod-protocol server on loopback, real ptrace."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ctprofd.probe import capture
from ctprofd.probe.capture import NOT_JEMALLOC_RECHECK, Capturer, CaptureSettings
from ctprofd.report import tags
from ctprofd.report.summary import REFUSED_DESPITE_PRIVILEGE_HINT
from ctprofd.resolve.parse_worker import WorkerLimits
from support.capture_host import (JEMALLOC, Host, host, layouts,  # noqa: F401
                                  written_in_a_child)
from support.debuginfod_server import DebuginfodServer
from support.procs import Spawned, is_dead, wait_until

JEMALLOC_BUILD_ID = "1d5163c246dc9cd2b4d339f2ac42efd95c6e0ae1"  # Debian 12's libjemalloc2
WAIT = 60.0  # a hang guard, never a timing claim


# --- debuginfod and the debug search --------------------------------------------------------

def resolving_jemalloc(host: Host, tmp_path: Path, **settings: object) -> tuple[Capturer, Path]:
    """A Capturer whose cache knows every object of a `sleep` with jemalloc but jemalloc
    itself (so that a pass resolves jemalloc, and only it), and that cache directory."""
    cache = tmp_path / "cache"
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    return host.capturer(cache_dir=str(cache), **settings), cache


def no_dwarf_said(caplog: pytest.LogCaptureFixture) -> str:
    """The one line that says why jemalloc's offsets came from its machine code."""
    [said] = [m for m in caplog.messages if "libjemalloc.so.2: no DWARF: " in m]
    return said


@pytest.mark.parametrize("named", ["settings", "environment", "read-only", "nowhere"])
def test_the_debuginfod_servers_named_are_asked_and_downloads_kept_in_a_writable_cache(
        host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, named: str):
    """Debian's jemalloc is stripped: its debug file is asked of the debuginfod servers the
    settings name, else of those in DEBUGINFOD_URLS, else of none (the search says nothing
    of debuginfod); what a server sends is kept under the cache directory when the
    Capturer may write there, elsewhere when not. Here the server sends no ELF file: the
    offsets come from jemalloc's machine code, and the process is read all the same."""
    served = b"not an ELF file"
    server = DebuginfodServer()
    server.files[JEMALLOC_BUILD_ID] = served
    try:
        monkeypatch.delenv("DEBUGINFOD_URLS", raising=False)
        settings: dict[str, object] = {}
        if named in ("settings", "read-only"):
            settings["debuginfod_urls"] = (server.url,)
        elif named == "environment":
            monkeypatch.setenv("DEBUGINFOD_URLS", server.url)
        if named == "read-only":
            settings["cache_writable"] = False
        pid = host.sleeper()
        engine, cache = resolving_jemalloc(host, tmp_path, **settings)
        with caplog.at_level(logging.INFO, logger="ctprofd"):
            snapshot = engine.capture()
        assert [p.pid for p in snapshot.processes] == [pid]
        said = no_dwarf_said(caplog)
        download = cache / "debuginfod" / f"{JEMALLOC_BUILD_ID}.debug"
        if named == "nowhere":
            assert server.asked == []
            assert "debuginfod" not in said, said
            assert not download.exists()
            return
        assert server.asked == [f"/buildid/{JEMALLOC_BUILD_ID}/debuginfo"]
        assert (f"debuginfod {server.url}: refused: its build-id (none) is not "
                f"{JEMALLOC}'s {JEMALLOC_BUILD_ID}") in said, said
        if named == "read-only":
            assert not (cache / "debuginfod").exists()
        else:
            assert download.read_bytes() == served
    finally:
        server.close()


def test_a_debug_file_larger_than_the_parsers_bound_is_not_opened(
        host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture):
    """`parser.max_file_bytes` bounds the debug files the search opens too: a download one
    byte over it is refused for its size (jemalloc itself, under it, is read)."""
    bound = os.path.getsize(JEMALLOC) + 4096
    server = DebuginfodServer()
    server.files[JEMALLOC_BUILD_ID] = b"x" * (bound + 1)
    try:
        monkeypatch.delenv("DEBUGINFOD_URLS", raising=False)
        pid = host.sleeper()
        engine, cache = resolving_jemalloc(host, tmp_path, debuginfod_urls=(server.url,),
                                           parser=WorkerLimits(max_file_bytes=bound))
        with caplog.at_level(logging.INFO, logger="ctprofd"):
            snapshot = engine.capture()
        assert [p.pid for p in snapshot.processes] == [pid]
        download = cache / "debuginfod" / f"{JEMALLOC_BUILD_ID}.debug"
        assert f"{download}: too large ({bound + 1} bytes, limit {bound})" in no_dwarf_said(
            caplog)
    finally:
        server.close()


# --- processes counted without a read ------------------------------------------------------

def record_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids whose /proc/PID/stat a pass reads (the real read, observed)."""
    reads: list[int] = []
    real = capture.read_process

    def reading(root: str, pid: int):  # type: ignore[no-untyped-def]
        reads.append(pid)
        return real(root, pid)

    monkeypatch.setattr(capture, "read_process", reading)
    return reads


def test_a_process_without_jemalloc_is_read_again_once_in_the_recheck_and_counted_every_pass(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """An unchanged process with no jemalloc is counted from the /proc listing alone: read
    at the first pass, then again only at the one of the next NOT_JEMALLOC_RECHECK passes its
    pid makes due ((pid + pass) % NOT_JEMALLOC_RECHECK == 0, passes counted from 1); meanwhile
    new processes without jemalloc are read, and every pass counts each of them once."""
    first = host.sleeper(jemalloc=False)
    engine = host.capturer()
    reads = record_reads(monkeypatch)
    plain, reading_first = [first], []
    for n in range(1, NOT_JEMALLOC_RECHECK + 2):
        if n > 1:
            plain.append(host.sleeper(jemalloc=False))  # new: read at once
        reads.clear()
        snapshot = engine.capture()
        assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: len(plain)}, n
        assert snapshot.summary.tgids_walked == len(plain) and snapshot.summary.failed == 0
        assert plain[-1] in reads
        if first in reads:
            reading_first.append(n)
    due = next(n for n in range(2, NOT_JEMALLOC_RECHECK + 2)
               if not (first + n) % NOT_JEMALLOC_RECHECK)
    assert reading_first == [1, due]


def test_a_jemalloc_process_that_became_a_zombie_is_an_exit_race_in_every_pass(host: Host):
    """A jemalloc process read before, killed and never reaped (a zombie with the same /proc
    entry): each pass reads it again and takes it for an exit race, never counting it as a
    process without jemalloc."""
    agent = host.agent()
    child = host.add(int(agent.ask("fork 100000 100000")[1]))
    engine = host.capturer()
    assert sorted(p.pid for p in engine.capture().processes) == sorted([agent.pid, child])
    os.kill(child, signal.SIGKILL)
    # the whole group gone, not only its leader: a thread still exiting would be read
    wait_until(lambda: is_dead(child) and os.listdir(f"/proc/{child}/task") == [str(child)],
               "the child a zombie, its other thread gone")
    for n in range(1, NOT_JEMALLOC_RECHECK + 2):
        snapshot = engine.capture()
        assert [p.pid for p in snapshot.processes] == [agent.pid]
        assert snapshot.failures == {} and snapshot.summary.tgids_walked == 2, n
        assert engine.stats.exit_races == n


def gate_resolver(engine: Capturer) -> threading.Event:
    """Hold every job the background resolver is given until the returned event is set (the
    real jobs, run then)."""
    resolver = engine.attacher.background
    assert resolver is not None
    gate = threading.Event()
    real = resolver.submit

    def submit(key: str, owner: int, job: Callable[[], object]) -> bool:
        def held() -> object:
            gate.wait(WAIT)
            return job()
        return real(key, owner, held)

    resolver.submit = submit  # type: ignore[method-assign]
    return gate


def asleep(pid: int) -> None:
    wait_until(lambda: Path(f"/proc/{pid}/syscall").read_text().split()[0] in ("230", "35"),
               "sleep asleep")


@pytest.mark.parametrize("outcome", ["failed", "pending"])
def test_a_process_without_jemalloc_that_execs_a_jemalloc_program_not_resolved_is_read_each_pass(
        host: Host, tmp_path: Path, outcome: str):
    """A process counted unread for having no jemalloc that exec's a program with jemalloc
    is attached again when its recheck comes; while that attach fails (its binary over the
    parser's bound) or waits for the background resolver, it is read again at every pass:
    failed or pending each time, never counted as a process without jemalloc again."""
    cache = tmp_path / "cache"
    shutil.copytree(host.layouts["cache"], cache)
    agent = host.agent(jemalloc=False)
    # every object of the agent without jemalloc known, by a Capturer without bounds
    assert host.capturer(cache_dir=str(cache)).capture().failures == {
        tags.JEMALLOC_NOT_FOUND: 1}
    copy = tmp_path / "sleep"  # a file no cache knows
    shutil.copy("/usr/bin/sleep", copy)
    if outcome == "failed":
        engine = host.capturer(cache_dir=str(cache), parser=WorkerLimits(max_file_bytes=1))
    else:
        engine = host.capturer(cache_dir=str(cache), background=True)
        gate = gate_resolver(engine)
    try:
        assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
        agent.process.send(f"exec + {JEMALLOC} {copy} 600")
        wait_until(lambda: os.readlink(f"/proc/{agent.pid}/exe") == str(copy), "the exec")
        asleep(agent.pid)
        host.traced.append(agent.pid)

        def attached(snapshot) -> bool:  # type: ignore[no-untyped-def]
            return (snapshot.summary.failed == 1 if outcome == "failed"
                    else snapshot.pending == 1)

        # counted unread until its recheck
        for _ in range(NOT_JEMALLOC_RECHECK):
            snapshot = engine.capture()
            if attached(snapshot):
                break
            assert snapshot.failures == {tags.JEMALLOC_NOT_FOUND: 1}
        for n in range(NOT_JEMALLOC_RECHECK + 1):
            assert attached(snapshot), n
            assert tags.JEMALLOC_NOT_FOUND not in snapshot.failures, n
            assert snapshot.processes == () and snapshot.summary.tgids_walked == 1
            snapshot = engine.capture()
        if outcome == "pending":
            gate.set()
            read = wait_until(lambda: [s for s in [engine.capture()] if s.processes],
                              "the process read once resolved", poll=0.05)[0]
            assert [p.pid for p in read.processes] == [agent.pid]
    finally:
        if outcome == "pending":
            gate.set()


# --- the kernel's process events ------------------------------------------------------------

def test_process_events_are_listened_to_only_when_the_settings_ask(
        caplog: pytest.LogCaptureFixture):
    """A Capturer of the kernel's /proc that is not asked to listen to process events does
    not (nor says anything of them)."""
    with caplog.at_level(logging.DEBUG, logger="ctprofd.probe.capture"):
        engine = Capturer(CaptureSettings(debug_dirs=(), cache_dir=None))
        engine.close()
    assert not [m for m in caplog.messages if "process events" in m or "proc connector" in m]


def test_while_events_are_heard_a_process_without_jemalloc_is_read_once_in_the_longer_recheck(
        host: Host, monkeypatch: pytest.MonkeyPatch):
    """Hearing the kernel's events, an unchanged process with no jemalloc is read again once
    in NOT_JEMALLOC_RECHECK_HEARD passes, not once in NOT_JEMALLOC_RECHECK: in a pass whose
    last NOT_JEMALLOC_RECHECK passes (itself included) all heard the events, it is read only
    when (pid + pass) % NOT_JEMALLOC_RECHECK_HEARD == 0 or an event named it."""
    plain = host.sleeper(jemalloc=False)
    ours = host.root
    engine = Capturer(CaptureSettings(debug_dirs=(), cache_dir=host.layouts["cache"],
                                      process_events=True,
                                      select=lambda p: (ours / str(p.pid)).is_symlink()))
    host.engines.append(engine)
    assert engine._events is not None, "no process events on this host"
    events = engine._events
    heard: list[object] = []  # what each pass's events said (None: could not be told)
    real = events.changed

    def changed():  # type: ignore[no-untyped-def]
        heard.append(real())
        return heard[-1]

    events.changed = changed  # type: ignore[method-assign]
    reads = record_reads(monkeypatch)
    checked = 0
    for n in range(1, 3 * NOT_JEMALLOC_RECHECK + 1):
        reads.clear()
        assert engine.capture().failures == {tags.JEMALLOC_NOT_FOUND: 1}
        window = heard[max(0, n - NOT_JEMALLOC_RECHECK):n]
        if n == 1 or len(window) < NOT_JEMALLOC_RECHECK or None in window:
            continue
        named = plain in heard[-1].processes  # type: ignore[attr-defined]
        if not named and (plain + n) % capture.NOT_JEMALLOC_RECHECK_HEARD:
            assert plain not in reads, n
            checked += not (plain + n) % NOT_JEMALLOC_RECHECK
    assert checked or None in heard  # a pass the shorter recheck would have read it in


# --- processes that cannot be seen --------------------------------------------------------

def _capture_in_a_user_namespace(root: str, pipe: int) -> None:
    """In a forked child: move to a new user namespace (every capability, in it only, so
    the processes of the host's are refused though CAP_SYS_PTRACE shows), take three
    passes, write what each denied and warned to `pipe`."""
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("ctprofd").addHandler(Keep())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    engine = Capturer(CaptureSettings(proc_root=root, debug_dirs=(), cache_dir=None))
    passes = []
    for _ in range(3):
        before = len(warnings)
        snapshot = engine.capture()
        passes.append([snapshot.denied_tgids, warnings[before:]])
    engine.close()
    os.write(pipe, json.dumps(passes).encode())


def test_processes_refused_despite_the_privilege_are_warned_about_once_with_what_else_refuses(
        host: Host):
    """A Capturer holding CAP_SYS_PTRACE (in a user namespace of its own) is refused the
    exe of another user's process of the host's namespace: denied in every pass, warned
    about at the first only, with the hint for a refusal despite the privilege."""
    sleeper = Spawned(["sleep", "600"], user=65534)
    host.spawned.append(sleeper)
    host.add(sleeper.pid)
    data = written_in_a_child(lambda fd: _capture_in_a_user_namespace(str(host.root), fd))
    passes = json.loads(data)
    assert [denied for denied, _ in passes] == [1, 1, 1]
    assert [len(warned) for _, warned in passes] == [1, 0, 0]
    assert passes[0][1][0] == ("1 processes cannot be seen: reading their /proc/PID/exe was "
                               f"refused (EACCES/EPERM); {REFUSED_DESPITE_PRIVILEGE_HINT}")


# --- the wait for the background resolver ---------------------------------------------------

class Waits:
    """The timeouts the passes wait for the background resolver with (the real waits,
    observed). While `gate` is shut, the held jobs cannot end within a wait: it is answered
    at once, as it would be at its end (not done). With `done_first`, the gate is opened
    and the resolver let finish before the pass's wait begins."""

    def __init__(self, engine: Capturer, gate: threading.Event) -> None:
        resolver = engine.attacher.background
        assert resolver is not None
        self.timeouts: list[float | None] = []
        self.done_first = False
        real = resolver.wait_idle
        grace = engine.settings.resolve_grace

        def wait_idle(timeout: float) -> bool:
            self.timeouts.append(timeout)
            assert timeout is not None and timeout <= grace, self.timeouts
            if self.done_first:
                gate.set()
                assert real(WAIT), "the resolver done"
            return real(timeout if gate.is_set() else 0)

        resolver.wait_idle = wait_idle  # type: ignore[method-assign]


def another_sleep(host: Host, tmp_path: Path, n: int) -> int:
    """A `sleep` with jemalloc running a copy of the file: a binary no cache knows."""
    copy = tmp_path / f"sleep{n}"
    shutil.copy("/usr/bin/sleep", copy)
    pid = host.spawn([str(copy), "600"]).pid
    host.traced.append(pid)
    asleep(pid)
    return pid


def test_after_a_wait_that_ended_with_the_resolver_busy_the_next_passes_do_not_wait(
        host: Host, tmp_path: Path):
    """A pass that gave the resolver new binaries waits for it up to the grace; when the
    wait ends with it still busy, the next one, then the next two such passes do not wait
    but ask whether it is done: when it is, their pending processes are read at once, and
    the next pass waits again."""
    cache = tmp_path / "cache"  # every object known but jemalloc: one to resolve
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    pids = [host.sleeper()]
    engine = host.capturer(cache_dir=str(cache), background=True, resolve_grace=WAIT)
    gate = gate_resolver(engine)
    try:
        waits = Waits(engine, gate)
        outcomes = []
        for n in range(6):
            if n:
                pids.append(another_sleep(host, tmp_path, n))  # a new binary each pass
            waits.done_first = n == 4
            snapshot = engine.capture()
            outcomes.append((snapshot.pending, sorted(p.pid for p in snapshot.processes)))
        assert outcomes == [(1, []), (2, []), (3, []), (4, []), (0, sorted(pids[:5])),
                            (0, sorted(pids))]
        waited = [timeout > 0 for timeout in waits.timeouts]  # type: ignore[operator]
        assert waited == [True, False, True, False, False, True], waits.timeouts
    finally:
        gate.set()


@pytest.mark.parametrize("grace", [0.0, 1.0])
def test_a_pass_waits_for_the_resolver_for_what_is_left_of_its_grace(
        host: Host, tmp_path: Path, grace: float):
    """A pass that gave the resolver a new binary waits for it no longer than what is left
    of the grace since the pass began, and (when some is left) waits: with none, it only
    asks whether the resolver is done."""
    cache = tmp_path / "cache"  # every object known but jemalloc: one to resolve
    shutil.copytree(host.layouts["all_but_jemalloc"], cache)
    host.sleeper()
    engine = host.capturer(cache_dir=str(cache), background=True, resolve_grace=grace)
    resolver = engine.attacher.background
    assert resolver is not None
    real = resolver.wait_idle
    waits: list[tuple[float, float]] = []  # the timeout, and when the wait began

    def wait_idle(timeout: float) -> bool:
        waits.append((timeout, time.monotonic()))
        return real(timeout)

    resolver.wait_idle = wait_idle  # type: ignore[method-assign]
    began = time.monotonic()
    engine.capture()
    [(timeout, asked)] = waits
    assert 0 <= timeout <= grace
    if asked - began < grace:  # some of the grace was left: waited for
        assert timeout > 0
