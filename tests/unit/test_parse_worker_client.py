"""The daemon's side of the sandboxed parser (ctprofd.resolve.parse_worker.ParseWorker), fast:
each phase through a real zygote on a small object gcc builds here, the same answers as in
process; a parse that hangs on a FIFO timed out; a zygote killed, stopped, never ready or
refused at start; and a compromised worker (the module's BOOTSTRAP replaced by a script
that answers what the test says, as a parser the file took over could) whose every
malformed, mismatched or oversized answer becomes a dwarf-parse-failure."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from ctprofd.report import tags
from ctprofd.resolve import parse_worker
from ctprofd.resolve.elf import Symbol
from ctprofd.resolve.layout import (LayoutFailure, NotJemalloc, ObjectFacts, TsdLayout,
                                    debug_identity, inspect_object, layout_from_code,
                                    layout_from_dwarf)
from ctprofd.resolve.loader import LoaderFacts, loader_facts
from ctprofd.resolve.parse_worker import MAX_REASON, ParseWorker, WorkerLimits
from support.lookalike import BUILD_ID, build_prog, sibling_cycle
from support.procs import is_dead, wait_for_exit

HANG_GUARD = 60  # seconds: only keeps a broken run from hanging, never a timing claim
# each test takes under a second: a hang (a mutant that never answers) fails in 30 s
pytestmark = pytest.mark.timeout(30)
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
FACTS = ObjectFacts(BUILD_ID, Symbol("je_tsd_tls", 40, 64), True, static_block_offset=112)
LAYOUT = TsdLayout(BUILD_ID, "je_tsd_tls", 40, 24, 40, static_block_offset=112)


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jemalloc look-alike executable with its DWARF: the TSD's counters at 24 and 40."""
    return build_prog(tmp_path_factory.mktemp("prog"))


@pytest.fixture
def worker():
    parser = ParseWorker(WorkerLimits(memory_bytes=512 << 20, timeout=10))
    yield parser
    pid = parser.pid
    parser.close()
    assert pid is None or is_dead(pid)


class Fd:
    """Anything with a file descriptor (the worker needs no more)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def hostile(monkeypatch: pytest.MonkeyPatch, hello: bytes | None, *replies: bytes | None,
            log: Path | None = None, linger: bool = False) -> None:
    """Zygotes started from now on are a script that says `hello` (nothing: exits at
    once), then answers each request with the next of `replies` (None: exits without
    answering), appending each request to `log`; after the last it exits (with `linger`,
    a minute later, its socket closed or not)."""
    script = f"""
import json, os, socket, sys
log = {str(log) if log else None!r}
if log:
    with open(log, "a") as f:
        f.write("start\\n")
s = socket.socket(fileno=int(sys.argv[2]))
if {hello!r} == None:
    sys.exit(3)
s.send({hello!r})
for reply in {list(replies)!r}:
    data, fds, _, _ = socket.recv_fds(s, 65536, 1)
    if log:
        with open(log, "a") as f:
            f.write(data.decode() + " fds=" + str(len(fds)) + "\\n")
    if reply is None:
        sys.exit(0)
    s.send(reply)
if {linger!r}:
    import time
    time.sleep(60)
"""
    monkeypatch.setattr(parse_worker, "BOOTSTRAP", script)


def reply(value: dict) -> bytes:
    return json.dumps(value).encode()


def assert_crashed(result: object, *words: str, lost: bool = False) -> None:
    assert isinstance(result, LayoutFailure), result
    assert result.tag == tags.DWARF_PARSE_FAILURE and result.crashed is True
    assert result.lost is lost, result
    for word in words:
        assert word in result.message, result.message


def test_each_phase_through_the_zygote_answers_as_in_process(worker, prog):
    """Every request kind reaches the sandbox with its file and its arguments, and its
    answer comes back whole: the same facts, layouts, identity and loader facts."""
    assert worker.pid is None  # started on first use
    with open(prog, "rb") as stream:
        facts = worker.inspect(stream, "prog", False)
        assert facts == inspect_object(stream, "prog", False) == FACTS
        assert worker.inspect(stream, "prog", True) == inspect_object(stream, "prog", True)
        layout = worker.layout(stream, facts, "prog", "build-id /x")
        assert layout == layout_from_dwarf(stream, facts, "prog", "build-id /x")
        assert (layout.allocated_offset, layout.deallocated_offset) == (24, 40)
        assert layout.dwarf_source == "build-id /x"
        code = worker.code(stream, facts, "prog")
        assert code == layout_from_code(stream, facts, "prog")
        assert isinstance(code, LayoutFailure) and not code.crashed
        assert code.message.startswith("machine code: no allocation entry point")
        crc = debug_identity(stream, True)
        assert worker.identify(stream, "prog", True) == crc and crc[0] is not None
        assert worker.identify(stream, "prog", False) == (None, BUILD_ID)
        first = worker.pid
    with open(LIBC, "rb") as libc:
        found = worker.loader(libc, "libc")
        assert isinstance(found, LoaderFacts) and found == loader_facts(libc)
        assert found.fields  # libc describes its descriptors
    assert worker.pid == first  # one zygote served them all
    status = Path(f"/proc/{first}/status").read_text()
    assert "\nNoNewPrivs:\t1\n" in status and "\nCapEff:\t0000000000000000\n" in status


def test_a_zygote_chosen_identity_is_kept_and_logged(prog, caplog):
    """A root daemon's worker gets an identity of its own, chosen once and kept across a
    restart; who it runs as is logged."""
    parser = ParseWorker(WorkerLimits(timeout=10))
    caplog.set_level(logging.INFO, logger="ctprofd.resolve.parse_worker")
    try:
        with open(prog, "rb") as stream:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
            uid, gid = parser.limits.uid, parser.limits.gid
            assert uid is not None and uid != 0 and gid is not None
            first = parser.pid
            status = Path(f"/proc/{first}/status").read_text()
            assert f"\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n" in status
            assert f"\nGid:\t{gid}\t{gid}\t{gid}\t{gid}\n" in status
            os.kill(first, signal.SIGKILL)
            assert wait_for_exit(first, HANG_GUARD)
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
            assert parser.pid != first and (parser.limits.uid, parser.limits.gid) == (uid, gid)
    finally:
        parser.close()
    chosen = [r for r in caplog.records if r.getMessage().startswith("parser worker identity")]
    assert len(chosen) == 1 and chosen[0].levelno == logging.INFO
    started = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("parser worker ") and " started, " in r.getMessage()]
    assert len(started) == 2
    assert started[0].endswith(f"started, uid={uid} gid={gid} groups=0 no capabilities, "
                               "no new privileges")


def test_with_no_free_id_the_worker_is_nobody_with_a_warning(prog, monkeypatch, caplog):
    monkeypatch.setattr(parse_worker, "DYNAMIC_IDS", range(0))
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(prog, "rb") as stream:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
        assert (parser.limits.uid, parser.limits.gid) == (65534, 65534)
        assert Path(f"/proc/{parser.pid}/status").read_text().count("\t65534") >= 8
    finally:
        parser.close()
    [record] = [r for r in caplog.records if r.getMessage().startswith("parser worker identity")]
    assert record.levelno == logging.WARNING and "nobody (65534)" in record.getMessage()


def test_a_given_identity_is_used_as_is(prog):
    parser = ParseWorker(WorkerLimits(timeout=10, uid=4243, gid=4244))
    try:
        with open(prog, "rb") as stream:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
        assert (parser.limits.uid, parser.limits.gid) == (4243, 4244)
        status = Path(f"/proc/{parser.pid}/status").read_text()
        assert "\nUid:\t4243\t4243\t4243\t4243\n" in status
        assert "\nGid:\t4244\t4244\t4244\t4244\n" in status
    finally:
        parser.close()


def test_not_elf_and_a_directory_are_failures_of_the_file(worker, tmp_path):
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\n")
    with open(text, "rb") as stream:
        result = worker.inspect(stream, str(text), False)
    assert isinstance(result, LayoutFailure) and not result.crashed
    assert result.message.startswith(f"{text}: malformed ELF")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert_crashed(worker.inspect(Fd(fd), "a directory", False),
                       "a directory: parser raised IsADirectoryError")
    finally:
        os.close(fd)


def test_a_parse_that_hangs_is_killed_on_time_and_the_zygote_serves_on(
        prog, tmp_path, monkeypatch):
    """The child's timeout ends it; the daemon waits that long and a grace period more."""
    monkeypatch.setattr(parse_worker, "GRACE", 0.5)
    hang = tmp_path / "hang"
    sibling_cycle(prog, hang)
    parser = ParseWorker(WorkerLimits(timeout=0.5))
    try:
        with open(hang, "rb") as stream:
            assert_crashed(parser.layout(stream, FACTS, "hang", "embedded"),
                           "hang: parser timed out after 0.5 s")
        first = parser.pid
        with open(prog, "rb") as stream:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
        assert parser.pid == first
    finally:
        parser.close()


def test_a_stopped_zygote_is_killed_after_the_grace_and_replaced(prog, monkeypatch):
    monkeypatch.setattr(parse_worker, "GRACE", 0.25)
    parser = ParseWorker(WorkerLimits(timeout=0.5))
    try:
        with open(prog, "rb") as stream:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
            first = parser.pid
            os.kill(first, signal.SIGSTOP)
            assert_crashed(parser.inspect(stream, "prog", False),
                           "parser worker lost while parsing prog: parser worker unresponsive "
                           "for 0.75 s; killed", lost=True)
            assert parser.pid is None and is_dead(first)
            assert isinstance(parser.layout(stream, FACTS, "prog", "embedded"), TsdLayout)
            assert parser.pid not in (None, first)
    finally:
        parser.close()


def test_a_zygote_found_dead_is_restarted_and_asked_again(prog):
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(prog, "rb") as stream:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
            first = parser.pid
            os.kill(first, signal.SIGKILL)
            assert wait_for_exit(first, HANG_GUARD)
            assert parser.layout(stream, FACTS, "prog", "embedded") == layout_from_dwarf(
                stream, FACTS, "prog", "embedded")
            assert parser.pid != first and not is_dead(parser.pid)
    finally:
        parser.close()


def test_close_ends_the_zygote_and_the_next_request_starts_another(prog):
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(prog, "rb") as stream:
        assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
        first = parser.pid
        parser.close()
        assert parser.pid is None and is_dead(first)
        parser.close()  # twice: nothing left to do
        try:
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
            assert parser.pid not in (None, first)
        finally:
            parser.close()


def test_a_worker_dying_on_each_request_is_asked_twice_then_lost(monkeypatch, tmp_path):
    log = tmp_path / "log"
    hostile(monkeypatch, b"ready uid=1 test", None, log=log)
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(LIBC, "rb") as stream:
        result = parser.inspect(stream, "libc", True)
    assert_crashed(result, lost=True)
    assert result.message == "parser worker lost while parsing libc: parser worker died"
    lines = log.read_text().splitlines()
    assert lines == ["start", '{"op": "inspect", "what": "libc", "shared": true} fds=1'] * 2
    assert parser.pid is None


def test_an_empty_answer_is_a_lost_worker_which_is_ended(monkeypatch, tmp_path):
    """An empty message (what a closed socket reads as) from a zygote that still runs: it
    is ended, not waited for, and a new one asked; twice, the worker is lost."""
    log = tmp_path / "log"
    hostile(monkeypatch, b"ready uid=1 test", b"", log=log, linger=True)
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(LIBC, "rb") as stream:
        result = parser.loader(stream, "libc")
    assert_crashed(result, lost=True)
    assert result.message == "parser worker lost while parsing libc: parser worker died"
    assert log.read_text().count("start") == 2 and parser.pid is None


def test_the_worker_that_never_says_ready_is_not_started_again_for_a_while(
        monkeypatch, tmp_path, caplog):
    log = tmp_path / "log"
    hostile(monkeypatch, None, log=log)
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(LIBC, "rb") as stream:
        first = parser.loader(stream, "libc")
        assert_crashed(first, "libc: parser worker cannot start: exited", lost=True)
        assert first.message == "libc: parser worker cannot start: exited"
        assert log.read_text() == "start\n"
        second = parser.identify(stream, "libc", False)  # within START_BACKOFF: not started
        assert second == first
        assert log.read_text() == "start\n" and parser.pid is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == ["parser worker cannot start: exited; not parsing binaries for 60 s"]


def test_a_refusal_not_in_utf_8_is_told_all_the_same(monkeypatch):
    hostile(monkeypatch, b"cannot \xff start")
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(LIBC, "rb") as stream:
        result = parser.inspect(stream, "libc", True)
    assert_crashed(result, lost=True)
    assert result.message == "libc: parser worker cannot start: cannot \ufffd start"


def test_the_worker_is_tried_again_after_the_backoff(monkeypatch, tmp_path, prog):
    log = tmp_path / "log"
    monkeypatch.setattr(parse_worker, "START_BACKOFF", 0.0)
    real = parse_worker.BOOTSTRAP
    hostile(monkeypatch, b"cannot drop privileges: no", log=log)
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(prog, "rb") as stream:
            result = parser.inspect(stream, "prog", False)
            assert_crashed(result, lost=True)
            assert result.message == "prog: parser worker cannot start: cannot drop privileges: no"
            assert log.read_text() == "start\n" and parser.pid is None
            monkeypatch.setattr(parse_worker, "BOOTSTRAP", real)
            assert isinstance(parser.inspect(stream, "prog", False), ObjectFacts)
    finally:
        parser.close()


def test_an_interpreter_that_cannot_run_is_a_start_failure(monkeypatch, tmp_path, prog):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(prog, "rb") as stream:
        assert_crashed(parser.inspect(stream, "prog", False),
                       f"prog: parser worker cannot start: {tmp_path}/no-python: "
                       "No such file or directory", lost=True)
    assert parser.pid is None


def test_a_worker_silent_at_start_is_given_up_on(monkeypatch, tmp_path, prog):
    monkeypatch.setattr(parse_worker, "START_TIMEOUT", 0.2)
    monkeypatch.setattr(parse_worker, "BOOTSTRAP", "import time; time.sleep(60)")
    parser = ParseWorker(WorkerLimits(timeout=10))
    with open(prog, "rb") as stream:
        assert_crashed(parser.inspect(stream, "prog", False),
                       "prog: parser worker cannot start: no answer (timed out)", lost=True)
    assert parser.pid is None


def test_a_worker_as_root_is_warned_about(monkeypatch, caplog):
    hostile(monkeypatch, b"ready uid=0 gid=0 x", reply({"crash": "x"}))
    caplog.set_level(logging.INFO, logger="ctprofd.resolve.parse_worker")
    parser = ParseWorker(WorkerLimits(timeout=10, uid=0, gid=0))
    try:
        with open(LIBC, "rb") as stream:
            assert_crashed(parser.inspect(stream, "libc", True), "libc: parser x")
    finally:
        parser.close()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, "parser worker runs as root (uid 0, no capabilities): the daemon "
            "has no CAP_SETUID to give it a uid of its own") in messages
    assert any(m.startswith("parser worker ") and m.endswith(" started, uid=0 gid=0 x")
               for _, m in messages)
    assert (logging.WARNING, "libc: parser x") in messages


GOOD_IDENTITY = {"kind": "identity", "crc": 5, "build_id": BUILD_ID}


@pytest.mark.parametrize("answer, why", [
    (b"not json", "parser sent a malformed reply (Expecting value"),
    (reply({"kind": "nothing"}), "parser sent a malformed reply (unknown kind 'nothing')"),
    (reply({"no": "kind"}), "parser sent a malformed reply ('kind')"),
    (reply([1]), "parser sent a malformed reply ("),
    (reply({**GOOD_IDENTITY, "crc": -1}), "(a CRC32 must be a 32-bit integer)"),
    (reply({**GOOD_IDENTITY, "crc": 1 << 32}), "(a CRC32 must be a 32-bit integer)"),
    (reply({**GOOD_IDENTITY, "crc": True}), "(a CRC32 must be a 32-bit integer)"),
    (reply({**GOOD_IDENTITY, "crc": "5"}), "(a CRC32 must be a 32-bit integer)"),
    (reply({**GOOD_IDENTITY, "build_id": "AB"}),
     "(a build-id must be 2 to 128 lowercase hex digits)"),
    (reply({**GOOD_IDENTITY, "build_id": 5}), "parser sent a malformed reply ("),
    (reply({"kind": "facts"}), "parser sent a malformed reply ("),
    (reply({"kind": "loader"}), "parser sent a malformed reply ("),
    (reply({"kind": "failure", "tag": "made-up", "message": "m"}), "unknown tag 'made-up'"),
    (reply({"kind": "layout", **{k: v for k, v in LAYOUT.to_dict().items() if k != "kind"},
            "allocated_offset": -8}), "parser sent a malformed reply ("),
    (reply({"crash": "exceeded its CPU time limit (3 s)"}),
     "parser exceeded its CPU time limit (3 s)"),
    (b"[" * 100_000, "parser sent a malformed reply ("),  # RecursionError, and cut to 64 KiB
    (reply({"crash": "x" * 70_000}), "parser sent a malformed reply (Unterminated string"),
])
def test_a_malformed_answer_is_a_crash_of_the_file(monkeypatch, caplog, answer, why):
    hostile(monkeypatch, b"ready uid=1 test", answer)
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(LIBC, "rb") as stream:
            result = parser.inspect(stream, "libc", True)
    finally:
        parser.close()
    assert_crashed(result, "libc: ", why)
    assert len(result.message) <= MAX_REASON
    assert (logging.WARNING, result.message) in [(r.levelno, r.getMessage())
                                                 for r in caplog.records]


def test_the_rest_of_an_oversized_answer_is_dropped_with_it(monkeypatch):
    """Each answer is one message: one over the bound is cut and its rest never taken for
    the next request's answer."""
    hostile(monkeypatch, b"ready uid=1 test", reply({"crash": "x" * 100_000}),
            reply({"crash": "second"}))
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(LIBC, "rb") as stream:
            assert_crashed(parser.inspect(stream, "libc", True), "parser sent a malformed reply")
            assert_crashed(parser.inspect(stream, "libc", True), "libc: parser second")
    finally:
        parser.close()


def test_a_long_crash_reason_is_cut(monkeypatch):
    hostile(monkeypatch, b"ready uid=1 test", reply({"crash": "x" * 1000}))
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(LIBC, "rb") as stream:
            result = parser.inspect(stream, "libc" * 10, True)
    finally:
        parser.close()
    assert_crashed(result)
    assert result.message == ("libc" * 10 + ": parser " + "x" * 1000)[:MAX_REASON]


def test_each_request_takes_only_its_own_kind_of_answer(monkeypatch, tmp_path):
    """An answer of another phase's kind (what a compromised parser could send) is a crash,
    never taken for the kind asked for; the right kinds pass, checked."""
    identity = reply(GOOD_IDENTITY)
    facts, layout = reply(FACTS.to_dict()), reply(LAYOUT.to_dict())
    loader = reply(LoaderFacts({}, {}, {}, 4096).to_dict())
    not_jemalloc = reply(NotJemalloc("none here").to_dict())
    failure = reply(LayoutFailure(tags.DWARF_PARSE_FAILURE, "libc: bad").to_dict())
    log = tmp_path / "log"
    hostile(monkeypatch, b"ready uid=1 test",
            identity, layout, loader, facts, not_jemalloc, failure,  # inspect
            facts, identity, layout, loader, failure,  # identify
            facts, identity, loader, layout,  # layout
            facts, identity, loader, not_jemalloc,  # code
            facts, layout, identity, loader, failure, log=log)  # loader
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(LIBC, "rb") as stream:
            got = [parser.inspect(stream, "i", False) for _ in range(6)]
            got += [parser.identify(stream, "d", True) for _ in range(5)]
            got += [parser.layout(stream, FACTS, "l", "embedded") for _ in range(4)]
            got += [parser.code(stream, FACTS, "c") for _ in range(4)]
            got += [parser.loader(stream, "o") for _ in range(5)]
    finally:
        parser.close()
    wrong = "parser answered {} with something else"
    for i in (0, 1, 2):
        assert_crashed(got[i], "i: " + wrong.format("phase 1"))
    assert got[3:6] == [FACTS, NotJemalloc("none here"),
                        LayoutFailure(tags.DWARF_PARSE_FAILURE, "libc: bad")]
    for i in (6, 8, 9):
        assert_crashed(got[i], "d: " + wrong.format("an identify request"))
    assert got[7] == (5, BUILD_ID)
    assert got[10] == LayoutFailure(tags.DWARF_PARSE_FAILURE, "libc: bad")
    for i in (11, 12, 13):
        assert_crashed(got[i], "l: " + wrong.format("phase 2"))
    assert got[14] == LAYOUT
    for i in (15, 16, 17):
        assert_crashed(got[i], "c: " + wrong.format("phase 2"))
    assert got[18] == NotJemalloc("none here")
    for i in (19, 20, 21):
        assert_crashed(got[i], "o: " + wrong.format("a loader request"))
    assert got[22] == LoaderFacts({}, {}, {}, 4096)
    assert got[23] == LayoutFailure(tags.DWARF_PARSE_FAILURE, "libc: bad")
    lines = log.read_text().splitlines()[1:]
    assert all(line.endswith(" fds=1") for line in lines)
    requests = [json.loads(line.rsplit(" fds=", 1)[0]) for line in lines]
    assert requests[0] == {"op": "inspect", "what": "i", "shared": False}
    assert requests[6] == {"op": "identify", "what": "d", "crc": True}
    assert requests[11] == {"op": "layout", "what": "l", "source": "embedded",
                            "facts": FACTS.to_dict()}
    assert requests[15] == {"op": "code", "what": "c", "facts": FACTS.to_dict()}
    assert requests[19] == {"op": "loader", "what": "o"}


def test_identity_bounds_are_inclusive_where_they_should_be(monkeypatch):
    hostile(monkeypatch, b"ready uid=1 test",
            reply({"kind": "identity", "crc": 0, "build_id": None}),
            reply({"kind": "identity", "crc": (1 << 32) - 1, "build_id": "ab"}),
            reply({"kind": "identity", "crc": None, "build_id": "ab" * 64}))
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(LIBC, "rb") as stream:
            assert parser.identify(stream, "d", True) == (0, None)
            assert parser.identify(stream, "d", True) == ((1 << 32) - 1, "ab")
            assert parser.identify(stream, "d", True) == (None, "ab" * 64)
    finally:
        parser.close()


def test_a_long_failure_from_the_sandbox_is_cut_with_an_ellipsis(monkeypatch):
    at_bound = LayoutFailure(tags.DWARF_PARSE_FAILURE, "m" * MAX_REASON)
    over = LayoutFailure(tags.JEMALLOC_UNREADABLE, "n" * (MAX_REASON + 1), crashed=False,
                         lost=True)
    hostile(monkeypatch, b"ready uid=1 test", reply(at_bound.to_dict()), reply(over.to_dict()))
    parser = ParseWorker(WorkerLimits(timeout=10))
    try:
        with open(LIBC, "rb") as stream:
            assert parser.layout(stream, FACTS, "l", "embedded") == at_bound
            assert parser.layout(stream, FACTS, "l", "embedded") == LayoutFailure(
                tags.JEMALLOC_UNREADABLE, "n" * MAX_REASON + "…", False, True)
    finally:
        parser.close()


def test_requests_from_threads_are_served_one_at_a_time(prog):
    """Concurrent callers share the zygote: each gets its own answer."""
    parser = ParseWorker(WorkerLimits(timeout=10))
    results: list[object] = []
    try:
        def ask() -> None:
            with open(prog, "rb") as stream:
                results.append(parser.layout(stream, FACTS, "prog", "embedded"))
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_GUARD)
    finally:
        parser.close()
    assert len(results) == 4 and all(isinstance(r, TsdLayout) for r in results)


def test_the_zygote_takes_the_daemons_imports(worker, prog):
    """The zygote runs isolated (-I, no environment), in /, with the daemon's import path,
    the package root first, and stdin and stdout on /dev/null."""
    with open(prog, "rb") as stream:
        assert isinstance(worker.inspect(stream, "prog", False), ObjectFacts)
    pid = worker.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert argv[:4] == [sys.executable.encode(), b"-I", b"-c", parse_worker.BOOTSTRAP.encode()]
    path = json.loads(argv[4])
    assert path[0] == parse_worker.PACKAGE_ROOT
    assert path[1:] == [os.path.abspath(p) for p in sys.path if p]
    assert json.loads(argv[6]) == {"memory_bytes": 512 << 20, "timeout": 10,
                                   "max_file_bytes": 4 << 30, "uid": worker.limits.uid,
                                   "gid": worker.limits.gid}
    assert int(argv[7]) == os.getpid()
    assert Path(f"/proc/{pid}/environ").read_bytes() == b""
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    assert os.getsid(pid) == pid  # a session of its own: no terminal's ^C
    assert os.readlink(f"/proc/{pid}/fd/{int(argv[5])}").startswith("socket:")
