"""The sandbox side of ctprofd.resolve.parse_worker, fast and in the test process: what each
request parses (`_parse`), the child forked per request with its limits, its answer, its
timeout and its death by a signal (`_serve`, `_read_answer`), the zygote's drop of its
privileges and its request loop (`zygote`, `drop_privileges`), the capability calls, the
daemon's reserve of CAP_SETUID/CAP_SETGID, and how a root daemon picks the worker's
identity from a made-up /proc.

mutmut 3.8.1 picks the tests of a mutant by the calls the pytest process itself made to the
mutated function while it recorded them (a call in a forked child or in the zygote, a
fresh interpreter started with no environment, is not seen; a mutant is active in a forked
child, which inherits its selection). So these functions are called here, in the test
process: `_serve` forks its child from it; `zygote` and `drop_privileges`, which change the
whole process, run on a throwaway thread (capabilities, no_new_privs and the bounding set
are per thread) whose daemon is gone, so they stop before anything process-wide but
dumpability; the tests of their success path run them in a forked child and, to be picked
for their mutants, also run that refusal (`refused_on_a_thread`), whose every result they
check."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pwd
import resource
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from ctprofd.resolve import parse_worker
from ctprofd.resolve.layout import (debug_identity, inspect_object, layout_from_code,
                                    layout_from_dwarf)
from ctprofd.resolve.loader import loader_facts
from ctprofd.resolve.parse_worker import (CAP_SETGID, CAP_SETUID, DYNAMIC_IDS, MAX_MESSAGE,
                                          MAX_REASON, NOBODY, PARSER_USER, WorkerLimits,
                                          _capset, _held, _parse, _prctl,
                                          _read_answer, _serve, drop_privileges,
                                          reserve_setid_for_worker, worker_identity, zygote)
from support.lookalike import BUILD_ID, build_prog, nobits_abbrev, sibling_cycle
from support.procs import wait_for_exit, wait_until

HANG_GUARD = 60  # seconds: only keeps a broken run from hanging, never a timing claim
# each test takes under a second: a hang (a mutant that never answers) fails in 30 s
pytestmark = pytest.mark.timeout(30)
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 2, 3, 4
CAP_SYS_PTRACE = 19
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_prog(tmp_path_factory.mktemp("prog"))


def crash(why: str) -> bytes:
    return json.dumps({"crash": why}).encode()


def children() -> set[str]:
    """The children of the calling thread, zombies included."""
    return set(Path(f"/proc/self/task/{threading.get_native_id()}/children").read_text().split())


def status_of(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def on_a_thread(work) -> object:
    """`work()` run on a thread of its own, which then ends (with whatever it changed of
    its own credentials); its result, or the exception it raised."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(HANG_GUARD)
    assert not thread.is_alive()
    return out[0]


def limits_for(memory_over: int = 1 << 30, **kw) -> WorkerLimits:
    """Limits whose address space leaves `memory_over` bytes above what this process (the
    child is its fork) maps now."""
    size = int(status_of("/proc/self/status")["VmSize"].split()[0]) << 10
    return WorkerLimits(memory_bytes=size + memory_over, **kw)


# --- _parse: what each request reads -------------------------------------------------------

def test_each_request_is_parsed_by_its_phase_on_the_fd_left_open(prog):
    fd = os.open(prog, os.O_RDONLY)
    try:
        with open(prog, "rb") as stream:
            facts = inspect_object(stream, "prog", False)
            assert _parse({"op": "inspect", "what": "prog", "shared": False}, fd) == \
                facts.to_dict()
            assert _parse({"op": "inspect", "what": "p", "shared": True}, fd) == \
                inspect_object(stream, "p", True).to_dict()
            crc, build_id = debug_identity(stream, True)
            assert _parse({"op": "identify", "what": "p", "crc": True}, fd) == {
                "kind": "identity", "crc": crc, "build_id": BUILD_ID}
            for not_true in (False, 1, "yes"):  # only JSON's true asks for the CRC
                assert _parse({"op": "identify", "what": "p", "crc": not_true}, fd) == {
                    "kind": "identity", "crc": None, "build_id": BUILD_ID}
            layout = _parse({"op": "layout", "what": "p", "source": "debuglink /d",
                             "facts": facts.to_dict()}, fd)
            assert layout == layout_from_dwarf(stream, facts, "p", "debuglink /d").to_dict()
            assert (layout["allocated_offset"], layout["dwarf_source"]) == (24, "debuglink /d")
            assert _parse({"op": "code", "what": "p", "facts": facts.to_dict()}, fd) == \
                layout_from_code(stream, facts, "p").to_dict()
        os.fstat(fd)  # still open: the zygote closes it
        assert os.lseek(fd, 0, os.SEEK_CUR) >= 0
    finally:
        os.close(fd)
    fd = os.open(LIBC, os.O_RDONLY)
    try:
        with open(LIBC, "rb") as stream:
            assert _parse({"op": "loader", "what": "libc"}, fd) == \
                loader_facts(stream).to_dict()
            failed = _parse({"op": "layout", "what": "libc", "source": "embedded",
                             "facts": facts.to_dict()}, fd)
            assert failed == layout_from_dwarf(stream, facts, "libc", "embedded").to_dict()
            assert failed["kind"] == "failure" and failed["message"].startswith("libc: ")
    finally:
        os.close(fd)


def test_a_phase_2_request_with_bad_facts_raises(prog):
    fd = os.open(prog, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="not object facts"):
            _parse({"op": "code", "what": "p", "facts": {"kind": "layout"}}, fd)
        with pytest.raises(KeyError):
            _parse({"op": "inspect", "shared": False}, fd)
    finally:
        os.close(fd)


# --- _read_answer ----------------------------------------------------------------------------

def read_from(write, deadline_in: float = HANG_GUARD) -> tuple[bytes, str | None]:
    """_read_answer on a pipe whose writer, a thread, calls write(fd) then closes it."""
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (write(w), os.close(w)))
    writer.start()
    try:
        with open(r, "rb", buffering=0) as pipe:
            return _read_answer(pipe, time.monotonic() + deadline_in)
    finally:
        writer.join(HANG_GUARD)


def test_an_answer_is_read_whole_until_the_writer_closes():
    def chunks(w: int) -> None:
        for part in (b"ab", b"cd", b"ef"):
            time.sleep(0.02)  # each part after the reader waits: a read per part
            os.write(w, part)
    assert read_from(chunks) == (b"abcdef", None)
    assert read_from(lambda w: None) == (b"", None)
    assert read_from(lambda w: os.write(w, b"x" * (MAX_MESSAGE - 1))) == (
        b"x" * (MAX_MESSAGE - 1), None)


def test_an_answer_of_the_bound_or_more_is_oversized():
    def write_all(size: int):
        def write(w: int) -> None:
            try:
                view = memoryview(b"y" * size)
                while view:
                    view = view[os.write(w, view):]
            except BrokenPipeError:  # the reader stopped at the bound
                pass
        return write
    answer, why = read_from(write_all(MAX_MESSAGE))
    assert (answer, why) == (b"y" * MAX_MESSAGE, "wrote an oversized answer")
    answer, why = read_from(write_all(3 * MAX_MESSAGE))
    assert why == "wrote an oversized answer" and MAX_MESSAGE <= len(answer) < 3 * MAX_MESSAGE


def test_a_writer_that_says_nothing_in_time_is_timed_out():
    r, w = os.pipe()
    try:
        with open(r, "rb", buffering=0) as pipe:
            assert _read_answer(pipe, time.monotonic() + 0.2) == (
                b"", "timed out after {timeout:g} s")
    finally:
        os.close(w)
    r, w = os.pipe()
    os.write(w, b"late")
    try:
        with open(r, "rb", buffering=0) as pipe:  # the deadline passed: not read at all
            assert _read_answer(pipe, time.monotonic() - 1) == (b"", "timed out after "
                                                                 "{timeout:g} s")
    finally:
        os.close(w)


def test_a_partial_answer_is_kept_when_time_runs_out():
    r, w = os.pipe()
    os.write(w, b"part")
    try:
        with open(r, "rb", buffering=0) as pipe:
            assert _read_answer(pipe, time.monotonic() + 0.2) == (b"part",
                                                                  "timed out after {timeout:g} s")
    finally:
        os.close(w)


# --- _serve: the child per request ------------------------------------------------------------

def serve(request: dict | bytes, path: Path | str | None, limits: WorkerLimits,
          fd: int | None = None) -> dict:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        data = request if isinstance(request, bytes) else json.dumps(request).encode()
        return json.loads(_serve(data, [fd], limits, theirs))
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


def test_the_child_answers_what_the_phase_gives(prog):
    before, were = set(os.listdir("/proc/self/fd")), children()
    with open(prog, "rb") as stream:
        facts = inspect_object(stream, "prog", False)
        assert serve({"op": "inspect", "what": "prog", "shared": False}, prog,
                     limits_for()) == facts.to_dict()
        assert serve({"op": "layout", "what": "prog", "source": "embedded",
                      "facts": facts.to_dict()}, prog, limits_for()) == \
            layout_from_dwarf(stream, facts, "prog", "embedded").to_dict()
    with open(LIBC, "rb") as stream:  # a longer answer, written whole
        assert serve({"op": "loader", "what": "libc"}, LIBC, limits_for()) == \
            loader_facts(stream).to_dict()
    assert set(os.listdir("/proc/self/fd")) == before  # the pipe closed
    assert children() == were  # each child reaped


def test_whatever_the_parse_raises_is_the_answer(prog, tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    assert serve({"op": "inspect", "what": "d", "shared": False}, None, limits_for(),
                 fd)["crash"].startswith("raised IsADirectoryError: [Errno 21] Is a directory")
    assert serve(b"{not json", prog, limits_for())["crash"].startswith(
        "raised JSONDecodeError: ")
    long = serve({"op": "code", "what": "p", "facts": {"kind": "k" * 2000}}, prog, limits_for())
    assert long == {"crash": ("raised ValueError: not object facts: '" + "k" * 2000)[:MAX_REASON]}


def test_a_child_that_cannot_be_forked_is_told(prog):
    """fork refused (RLIMIT_NPROC, on a thread of a user whose processes it counts): the
    answer says why, and both ends of the pipe are closed."""
    fd = os.open(prog, os.O_RDONLY)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    before = set(os.listdir("/proc/self/fd"))

    def work() -> bytes:
        # this thread alone (the raw system call, not glibc's for every thread) becomes
        # uid 4251, losing its capabilities; root's processes are not counted
        assert _libc.syscall(117, 4251, 4251, 4251) == 0  # setresuid
        resource.setrlimit(resource.RLIMIT_NPROC, (0, hard))
        return _serve(b'{"op": "inspect", "what": "p", "shared": false}', [fd],
                      limits_for(), theirs)
    try:
        answer = on_a_thread(work)
        after = set(os.listdir("/proc/self/fd"))
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the uid change made the process not
        os.close(fd)
        ours.close()
        theirs.close()
    assert answer == crash("could not be started: Resource temporarily unavailable")
    assert after == before  # the pipe's two ends closed


def test_a_parse_over_the_memory_limit_says_so(prog, tmp_path):
    hog = tmp_path / "hog"
    nobits_abbrev(prog, hog, 3 << 30)
    limits = limits_for(memory_over=256 << 20)
    with open(prog, "rb") as stream:
        facts = inspect_object(stream, "prog", False).to_dict()
    assert serve({"op": "layout", "what": "hog", "source": "embedded", "facts": facts}, hog,
                 limits) == {"crash": f"ran out of memory (limit {limits.memory_bytes >> 20} MiB)"}
    assert "allocated_offset" in serve({"op": "layout", "what": "prog", "source": "embedded",
                                        "facts": facts}, prog, limits)


def test_a_parse_that_hangs_is_killed_at_the_timeout(prog, tmp_path):
    hang = tmp_path / "hang"
    sibling_cycle(prog, hang)
    with open(prog, "rb") as stream:
        facts = inspect_object(stream, "prog", False).to_dict()
    were = children()
    assert serve({"op": "layout", "what": "hang", "source": "embedded", "facts": facts}, hang,
                 limits_for(timeout=0.3)) == {"crash": "timed out after 0.3 s"}
    assert children() == were  # killed and reaped


def proc_limit(text: str, name: str) -> list[str]:
    """The soft and hard limit called `name` in a /proc/PID/limits."""
    [line] = [line for line in text.splitlines() if line.startswith(name + "  ")]
    return line[len(name):].split()[:2]


def own_pipes() -> set[str]:
    found = set()
    for n in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{n}")
        except FileNotFoundError:
            continue
        if link.startswith("pipe:"):
            found.add(link)
    return found


def hanging_child(prog: Path, tmp_path: Path, limits: WorkerLimits):
    """`_serve` on a thread, parsing a file that never ends; (its child once it has set its
    limits, that child's /proc limits, the thread, where the answer goes, the fds given)."""
    hang = tmp_path / "hang"
    sibling_cycle(prog, hang)
    with open(prog, "rb") as stream:
        facts = inspect_object(stream, "prog", False).to_dict()
    request = json.dumps({"op": "layout", "what": "hang", "source": "embedded",
                          "facts": facts}).encode()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.open(hang, os.O_RDONLY)
    answers: list[bytes] = []
    thread = threading.Thread(target=lambda: answers.append(_serve(request, [fd], limits,
                                                                    theirs)))
    thread.start()

    def child_with_limits() -> tuple[int, str] | None:
        for child in Path(f"/proc/self/task/{thread.native_id}/children").read_text().split():
            try:
                text = Path(f"/proc/{child}/limits").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if "Max cpu time              unlimited" not in text:  # set last
                return int(child), text
        return None
    child, text = wait_until(child_with_limits, "the parsing child's limits", HANG_GUARD)
    return child, text, thread, answers, (ours, theirs, fd)


def test_the_child_runs_under_its_limits_and_a_signal_ending_it_is_told(prog, tmp_path):
    limits = limits_for(timeout=30)
    pipes_before = own_pipes()
    child, text, thread, answers, (ours, theirs, fd) = hanging_child(prog, tmp_path, limits)
    try:
        assert proc_limit(text, "Max address space") == [str(limits.memory_bytes)] * 2
        assert proc_limit(text, "Max cpu time") == ["30", "31"]
        links = [os.readlink(f"/proc/{child}/fd/{n}") for n in os.listdir(f"/proc/{child}/fd")]
        # the daemon's socket closed in the child
        assert os.readlink(f"/proc/self/fd/{theirs.fileno()}") not in links
        [answer_pipe] = own_pipes() - pipes_before  # _serve's read end
        assert links.count(answer_pipe) == 1  # the child holds only the write end
        assert os.readlink(f"/proc/{child}/fd/{fd}") == str(tmp_path / "hang")
        os.kill(child, signal.SIGTERM)
        thread.join(HANG_GUARD)
        assert answers == [crash("killed by SIGTERM")]
    finally:
        ours.close()
        theirs.close()
        os.close(fd)


def test_a_child_killed_for_its_cpu_time_says_the_limit(prog, tmp_path):
    """SIGXCPU is what RLIMIT_CPU sends (sent here by the test: a parse of one thread reaches
    its wall-clock timeout first)."""
    child, _, thread, answers, (ours, theirs, fd) = hanging_child(
        prog, tmp_path, limits_for(timeout=2.5))
    try:
        assert Path(f"/proc/{child}/status").exists()
        os.kill(child, signal.SIGXCPU)
        thread.join(HANG_GUARD)
        assert answers == [crash("exceeded its CPU time limit (3 s)")]
    finally:
        ours.close()
        theirs.close()
        os.close(fd)


def test_a_parse_child_answers_and_dies_with_its_zygote(prog, tmp_path):
    """PR_SET_PDEATHSIG in the child: killed with the zygote that forked it (the zygote
    here a forked child of this process; `_serve` also called here, whose child answers)."""
    assert "kind" in serve({"op": "inspect", "what": "prog", "shared": False}, prog,
                           limits_for())
    hang = tmp_path / "hang"
    sibling_cycle(prog, hang)
    with open(prog, "rb") as stream:
        facts = inspect_object(stream, "prog", False).to_dict()
    z = Zygote(limits_for(timeout=60))
    fd = os.open(hang, os.O_RDONLY)
    try:
        socket.send_fds(z.ours, [json.dumps({"op": "layout", "what": "hang", "source":
                                             "embedded", "facts": facts}).encode()], [fd])
        def child_with_limits() -> str | None:
            """The zygote's child once it has set its parent-death signal (its limits, set
            after it, show it): the zygote killed sooner would leave it orphaned."""
            for child in Path(f"/proc/{z.pid}/task/{z.pid}/children").read_text().split():
                try:
                    text = Path(f"/proc/{child}/limits").read_text()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if proc_limit(text, "Max cpu time")[0] != "unlimited":
                    return child
            return None
        child = wait_until(child_with_limits, "the zygote's child's limits")
        os.kill(z.pid, signal.SIGKILL)
        assert wait_for_exit(int(child), HANG_GUARD), "the child outlived its zygote"
    finally:
        os.close(fd)
        z.ours.close()
        z.exit_code()


# --- the capability calls ---------------------------------------------------------------------

def thread_status() -> dict[str, str]:
    return status_of("/proc/thread-self/status")


def test_capset_sets_both_words_of_each_set_on_the_calling_thread():
    effective = 1 << 2 | 1 << 34 | 1 << 39
    permitted = effective | 1 << 7 | 1 << 35
    inheritable = 1 << 2 | 1 << 40

    def work() -> dict[str, str]:
        _capset(effective, permitted, inheritable)
        return thread_status()
    found = on_a_thread(work)
    assert int(found["CapEff"], 16) == effective
    assert int(found["CapPrm"], 16) == permitted
    assert int(found["CapInh"], 16) == inheritable
    assert int(thread_status()["CapEff"], 16) != effective  # this thread untouched

    def refused() -> object:
        _capset(0, 0, 0)
        _capset(1, 1, 0)  # cannot raise what is no longer permitted
    exc = on_a_thread(refused)
    assert isinstance(exc, OSError) and exc.errno == 1
    assert str(exc) == "[Errno 1] capset: Operation not permitted"


def test_prctl_refusal_names_the_option():
    with pytest.raises(OSError) as caught:
        _prctl(9999)
    assert caught.value.errno == 22 and str(caught.value) == (
        "[Errno 22] prctl(9999): Invalid argument")
    value = ctypes.c_int(-1)

    def work() -> int:
        _prctl(1, signal.SIGUSR2)  # PR_SET_PDEATHSIG, on this thread only
        assert _libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) == 0
        return value.value
    assert on_a_thread(work) == signal.SIGUSR2


def test_held_names_the_sets_not_empty():
    status = {"CapInh": "0000000000000000", "CapPrm": "0000000000000004",
              "CapEff": "0000000000000000", "CapAmb": "0000010000000000"}
    assert _held(status, ("CapPrm", "CapEff", "CapAmb")) == ["CapPrm", "CapAmb"]
    assert _held(status, ("CapInh",)) == []
    assert _held({"CapEff": "000001ffffffffff"}, ("CapEff",)) == ["CapEff"]


def in_fork(work) -> object:
    """`work()` in a forked child; what it returned (JSON), or its exception's repr."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                result = {"ok": work()}
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                result = {"raised": repr(exc)}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with open(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_reserve_lowers_setuid_and_setgid_only_with_all_it_needs():
    setid = 1 << CAP_SETUID | 1 << CAP_SETGID
    full = int(status_of("/proc/self/status")["CapEff"], 16)
    assert full & setid == setid and full >> CAP_SYS_PTRACE & 1

    def work() -> dict[str, str]:
        assert reserve_setid_for_worker() is True
        return thread_status()
    found = on_a_thread(work)
    assert int(found["CapEff"], 16) == full & ~setid
    assert int(found["CapPrm"], 16) == int(status_of("/proc/self/status")["CapPrm"], 16)
    assert int(found["CapInh"], 16) == int(status_of("/proc/self/status")["CapInh"], 16)

    def without(cap: int):
        def work() -> list:
            _capset(full & ~(1 << cap), full, 0)
            lowered = reserve_setid_for_worker()
            return [lowered, thread_status()["CapEff"]]
        return work
    for cap in (CAP_SETUID, CAP_SETGID, CAP_SYS_PTRACE):
        lowered, eff = in_fork(without(cap))["ok"]
        assert lowered is False and int(eff, 16) == full & ~(1 << cap)

    def with_inheritable() -> list:
        set_caps(full, full, 0xa0)
        assert reserve_setid_for_worker() is True
        return [int(thread_status()["CapInh"], 16), int(thread_status()["CapEff"], 16)]
    assert in_fork(with_inheritable) == {"ok": [0xa0, full & ~setid]}

    def not_root() -> list:
        os.setresuid(0, 4248, 0)  # effective uid 4248: its capabilities go
        return [reserve_setid_for_worker()]
    assert in_fork(not_root) == {"ok": [False]}


# --- the zygote: its drop and its loop ----------------------------------------------------

def refused_on_a_thread() -> None:
    """The zygote on a thread of this process, as if its daemon were gone (its parent is not
    the pid it was given): it drops what is per thread, then refuses, saying why."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    limits = json.dumps(asdict(WorkerLimits()))
    value = ctypes.c_int(-1)

    given = theirs.detach()  # the zygote's socket object closes it

    def work() -> dict[str, str]:
        try:
            zygote(str(given), limits, str(os.getppid() + 1))
        except SystemExit as exc:
            assert exc.code == 1
        else:
            raise AssertionError("the zygote served with its daemon gone")
        assert _libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) == 0
        return {**thread_status(), "pdeathsig": value.value}
    try:
        assert _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0
        found = on_a_thread(work)
        assert not isinstance(found, BaseException), found
        assert _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0  # process-wide, put back below
        assert ours.recv(MAX_MESSAGE) == b"cannot drop privileges: the daemon is gone"
    finally:
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
        ours.close()
    assert found["pdeathsig"] == signal.SIGKILL
    assert found["NoNewPrivs"] == "1"
    for name in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
        assert int(found[name], 16) == 0, (name, found)
    assert int(thread_status()["CapEff"], 16) != 0  # this thread untouched


def test_a_zygote_whose_daemon_is_gone_refuses():
    refused_on_a_thread()


def test_drop_privileges_refuses_when_the_daemon_is_gone():
    def work() -> object:
        return drop_privileges(WorkerLimits(), os.getppid() + 1)
    try:
        exc = on_a_thread(work)
    finally:
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    assert isinstance(exc, RuntimeError) and str(exc) == "the daemon is gone"


class Zygote:
    """`zygote` in a forked child of this process, as BOOTSTRAP runs it in the worker."""

    def __init__(self, limits: WorkerLimits, parent: int | None = None,
                 prepare=lambda: None) -> None:
        """`prepare()` runs in the child first (the daemon's credentials to start from)."""
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid() if parent is None else parent
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                keep = theirs.fileno()
                os.closerange(3, keep)  # as Popen's close_fds and pass_fds in the worker
                os.closerange(keep + 1, 1 << 16)
                os.set_inheritable(keep, True)
                args = [str(keep), json.dumps(asdict(limits)), str(parent)]
                path = [parse_worker.PACKAGE_ROOT, *(os.path.abspath(p) for p in sys.path if p)]
                sys.argv[:] = ["-c", json.dumps(path), *args]  # what BOOTSTRAP is given
                prepare()
                zygote(*args)
            except SystemExit as exc:
                code = exc.code
            except BaseException:  # noqa: BLE001 - told by the exit status
                code = 99
            finally:
                os._exit(code)
        theirs.close()
        self.ours.settimeout(HANG_GUARD)
        self.hello = self.ours.recv(MAX_MESSAGE).decode()

    def ask(self, request: dict, fds: list[int]) -> dict:
        socket.send_fds(self.ours, [json.dumps(request).encode()], fds)
        return json.loads(self.ours.recv(MAX_MESSAGE))

    def status(self) -> dict[str, str]:
        return status_of(f"/proc/{self.pid}/status")

    def exit_code(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)

    def close(self) -> int:
        self.ours.close()
        return self.exit_code()


def test_the_zygote_of_a_root_daemon_drops_everything_then_serves(prog):
    refused_on_a_thread()
    limits = limits_for(uid=4246, gid=4247)
    z = Zygote(limits)
    try:
        assert z.hello == ("ready uid=4246 gid=4247 groups=0 no capabilities, "
                           "no new privileges")
        status = z.status()
        assert status["Uid"].split() == ["4246"] * 4 and status["Gid"].split() == ["4247"] * 4
        assert status["Groups"].strip() == "" and status["NoNewPrivs"] == "1"
        for name in ("CapInh", "CapPrm", "CapEff", "CapAmb", "CapBnd"):
            assert int(status[name], 16) == 0, name
        assert os.stat(f"/proc/{z.pid}/status").st_uid == 0  # not dumpable: root's
        text = Path(f"/proc/{z.pid}/limits").read_text()
        assert proc_limit(text, "Max open files") == ["32", "32"]
        assert proc_limit(text, "Max core file size") == ["0", "0"]
        fd = os.open(prog, os.O_RDONLY)
        try:
            open_before = len(os.listdir(f"/proc/{z.pid}/fd"))
            with open(prog, "rb") as stream:
                assert z.ask({"op": "inspect", "what": "prog", "shared": False}, [fd]) == \
                    inspect_object(stream, "prog", False).to_dict()
            assert z.ask({"op": "inspect", "what": "prog", "shared": False}, []) == {
                "crash": "was sent no file"}
            libc = os.open(LIBC, os.O_RDONLY)
            try:  # one fd taken: the first, the others dropped by the kernel
                with open(prog, "rb") as stream:
                    assert z.ask({"op": "inspect", "what": "prog", "shared": False},
                                 [fd, libc]) == inspect_object(stream, "prog", False).to_dict()
            finally:
                os.close(libc)
            assert len(os.listdir(f"/proc/{z.pid}/fd")) == open_before  # the fd closed
        finally:
            os.close(fd)
    finally:
        assert z.close() == 0  # the daemon closed its end: the zygote returns


def test_a_root_zygote_without_an_identity_keeps_uid_0_without_capabilities():
    refused_on_a_thread()
    z = Zygote(limits_for())
    try:
        groups = len(os.getgroups())
        assert z.hello == (f"ready uid=0 gid=0 groups={groups} no capabilities, "
                           "no new privileges")
        status = z.status()
        assert status["Uid"].split() == ["0"] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    finally:
        assert z.close() == 0


def test_the_zygote_dies_with_its_daemon():
    """PR_SET_PDEATHSIG: a zygote whose daemon (here a forked middle process) is killed is
    killed too."""
    refused_on_a_thread()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    limits = json.dumps(asdict(limits_for()))
    middle = os.fork()
    if middle == 0:
        try:
            ours.close()
            if os.fork() == 0:
                try:
                    keep = theirs.fileno()
                    os.closerange(3, keep)
                    os.closerange(keep + 1, 1 << 16)
                    zygote(str(keep), limits, str(os.getppid()))
                finally:
                    os._exit(0)
            select.select([], [], [])  # the daemon: waits until killed
        finally:
            os._exit(0)
    theirs.close()
    try:
        ours.settimeout(HANG_GUARD)
        assert ours.recv(MAX_MESSAGE).startswith(b"ready uid=0 ")
        [child] = Path(f"/proc/{middle}/task/{middle}/children").read_text().split()
        os.kill(middle, signal.SIGKILL)
        os.waitpid(middle, 0)
        assert wait_for_exit(int(child), HANG_GUARD), "the zygote outlived its daemon"
    finally:
        ours.close()


def test_the_zygote_ends_when_the_daemon_goes_mid_request(prog, tmp_path):
    """The daemon closing its end with an answer unread, or before the answer: the zygote
    returns (exit status 0), neither raising nor serving on."""
    refused_on_a_thread()
    hang = tmp_path / "hang"
    sibling_cycle(prog, hang)
    fd = os.open(prog, os.O_RDONLY)
    hang_fd = os.open(hang, os.O_RDONLY)
    try:
        request = {"op": "inspect", "what": "prog", "shared": False}
        z = Zygote(limits_for())
        socket.send_fds(z.ours, [json.dumps(request).encode()], [fd])
        assert select.select([z.ours], [], [], HANG_GUARD)[0]  # answered, not read
        assert z.close() == 0  # its next read: ECONNRESET
        with open(prog, "rb") as stream:
            facts = inspect_object(stream, "prog", False).to_dict()
        z = Zygote(limits_for(timeout=0.5))
        socket.send_fds(z.ours, [json.dumps({"op": "layout", "what": "hang", "source":
                                             "embedded", "facts": facts}).encode()], [hang_fd])
        z.ours.shutdown(socket.SHUT_RDWR)  # gone before the answer (a timeout): EPIPE
        assert z.close() == 0
    finally:
        os.close(fd)
        os.close(hang_fd)


def test_a_zygote_given_a_bad_parent_refuses_in_a_fork_too():
    refused_on_a_thread()
    z = Zygote(limits_for(), parent=1)
    assert z.hello == "cannot drop privileges: the daemon is gone"
    assert z.close() == 1


# --- the zygote of a daemon with fewer capabilities ---------------------------------------

def set_caps(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2) of the calling thread, for the tests' own set-up."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    data = (Data * 2)(*(Data(effective >> s & 0xFFFFFFFF, permitted >> s & 0xFFFFFFFF,
                             inheritable >> s & 0xFFFFFFFF) for s in (0, 32)))
    if _libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def deny(*names: str) -> None:
    """A seccomp filter on this thread refusing the system calls `names` with EPERM (as
    the systemd unit's SystemCallFilter=~@privileged does); it also sets no_new_privs."""
    seccomp = ctypes.CDLL("libseccomp.so.2")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    context = ctypes.c_void_p(seccomp.seccomp_init(ctypes.c_uint32(0x7FFF0000)))  # allow
    for name in names:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        assert seccomp.seccomp_rule_add(context, ctypes.c_uint32(0x50000 | errno.EPERM),
                                        number, 0) == 0, name
    assert seccomp.seccomp_load(context) == 0


FULL = int(status_of("/proc/self/status")["CapEff"], 16)
CAP_SETPCAP = 8


@pytest.mark.parametrize("missing", [CAP_SETPCAP, CAP_SETGID, CAP_SETUID])
def test_a_root_zygote_spends_only_the_capabilities_it_has(missing):
    """Without CAP_SETPCAP the bounding set stays, without CAP_SETGID the groups and gid,
    without CAP_SETUID the uid; the rest is dropped all the same."""
    refused_on_a_thread()
    without = FULL & ~(1 << missing)
    z = Zygote(limits_for(uid=4246, gid=4247), prepare=lambda: set_caps(without, without, 0))
    try:
        uid = "0" if missing == CAP_SETUID else "4246"
        gid = "0" if missing == CAP_SETGID else "4247"
        groups = len(os.getgroups()) if missing == CAP_SETGID else 0
        assert z.hello == (f"ready uid={uid} gid={gid} groups={groups} no capabilities, "
                           "no new privileges")
        status = z.status()
        assert status["Uid"].split() == [uid] * 4 and status["Gid"].split() == [gid] * 4
        bounding = int(status["CapBnd"], 16)
        assert bounding == (int(status_of("/proc/self/status")["CapBnd"], 16)
                            if missing == CAP_SETPCAP else 0)
        for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(status[name], 16) == 0, name
    finally:
        assert z.close() == 0


def test_a_root_zygote_whose_capset_is_refused_refuses_to_serve():
    """Root that cannot change uid and whose capset a seccomp filter refuses would keep
    its capabilities: it says which and exits."""
    refused_on_a_thread()
    z = Zygote(limits_for(), prepare=lambda: deny("capset"))
    assert z.hello == ("cannot drop privileges: capabilities left in CapPrm, CapEff, "
                       "NoNewPrivs 1")
    assert z.close() == 1


PTRACE_CAPS = 1 << CAP_SYS_PTRACE | 1 << 2  # and CAP_DAC_READ_SEARCH


def as_the_systemd_unit() -> None:
    """The unit's daemon: a system user with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH
    ambient, capset refused by its seccomp filter."""
    os.setgroups([])
    assert _libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS
    os.setresgid(4250, 4250, 4250)
    os.setresuid(4250, 4250, 4250)
    set_caps(PTRACE_CAPS, PTRACE_CAPS, PTRACE_CAPS)
    for cap in (CAP_SYS_PTRACE, 2):
        assert _libc.prctl(47, 2, cap, 0, 0) == 0  # PR_CAP_AMBIENT_RAISE
    deny("capset")


def test_a_zygote_with_ambient_capabilities_execs_itself_without_them(prog):
    """capset refused to a non-root zygote: it clears its ambient set and execs the
    worker's interpreter once more, which starts with no capabilities but the inert
    inheritable set, says so, and serves."""
    refused_on_a_thread()
    limits = limits_for()
    z = Zygote(limits, prepare=as_the_systemd_unit)
    try:
        assert z.hello == ("ready uid=4250 gid=4250 groups=0 no capabilities (inheritable "
                           f"{PTRACE_CAPS:016x}: inert under no_new_privs), no new privileges")
        status = z.status()
        for name in ("CapPrm", "CapEff", "CapAmb"):
            assert int(status[name], 16) == 0, name
        argv = Path(f"/proc/{z.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert argv[:4] == [sys.executable.encode(), b"-I", b"-c",
                            parse_worker.BOOTSTRAP.encode()]
        assert json.loads(argv[4])[0] == parse_worker.PACKAGE_ROOT  # given on, all of them
        assert argv[6:] == [json.dumps(asdict(limits)).encode(), str(os.getpid()).encode()]
        fd = os.open(prog, os.O_RDONLY)
        try:
            with open(prog, "rb") as stream:
                assert z.ask({"op": "inspect", "what": "prog", "shared": False}, [fd]) == \
                    inspect_object(stream, "prog", False).to_dict()
        finally:
            os.close(fd)
    finally:
        assert z.close() == 0


# --- worker_identity -----------------------------------------------------------------------

def fake_proc(tmp_path: Path, uid_map: str, gid_map: str | None = None,
              pids: dict[str, str] | None = None) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "uid_map").write_text(uid_map)
    (proc / "self" / "gid_map").write_text(uid_map if gid_map is None else gid_map)
    for pid, status in (pids or {}).items():
        (proc / pid).mkdir()
        if status is not None:
            (proc / pid / "status").write_text(status)
    return proc


NO_USER = "ctprofd-test-no-such-user"


def test_an_existing_parser_user_is_taken():
    entry = pwd.getpwnam("daemon")
    assert worker_identity("/nonexistent", user="daemon") == (
        entry.pw_uid, entry.pw_gid, f"the system user daemon (uid {entry.pw_uid})")
    assert PARSER_USER == "ctprofd-parser"


def test_the_only_free_mapped_id_is_chosen(tmp_path):
    start = DYNAMIC_IDS.start
    proc = fake_proc(tmp_path, f"{start} {start} 4\n", pids={
        "100": f"Name:\tx\nUid:\t{start}\t0\t0\t0\nGid:\t0\t0\t0\t{start + 1}\n",
        "101": f"Uid:\t0\t{start + 2}\t0\t0\n",
        "102": None,  # gone as we look
        "103": "Uid:\tnot a number\n",
        "self2": f"Uid:\t{start + 3}\n",  # not a pid
    })
    assert worker_identity(str(proc), user=NO_USER) == (
        start + 3, start + 3, f"uid and gid {start + 3}, which no user, group or process "
        "has now")


def test_the_ids_in_use_are_every_uid_and_gid_of_each_process(tmp_path):
    proc = fake_proc(tmp_path, "", pids={
        "1": "Name:\tinit\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9\n",
        "20": "Uid:\t20\t20\t20\t20\nGid:\t21\t21\t21\t21\n",
        "3": None, "4": "Uid:\tbad\n", "5": None, "6": "Gid:\t?\n",
        "300": "Gid:\t300\t301\t302\t303\n", "abc": "Uid:\t99\n"})
    (proc / "7" / "status").mkdir(parents=True)  # unreadable as a file
    assert parse_worker._ids_in_use(str(proc)) == {1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 300, 301,
                                                   302, 303}


def test_only_ids_mapped_for_both_uid_and_gid_in_the_dynamic_range_are_free(tmp_path):
    stop = DYNAMIC_IDS.stop
    proc = fake_proc(tmp_path, f"0 0 {stop - 1}\n{stop - 1} {stop - 1} 10\n",
                     gid_map=f"{stop - 3} 0 2\n{stop} {stop} 5\n")
    # uid_map: everything below the range's end, and its last id; gid_map: the 2 before it
    assert parse_worker._mapped(str(proc / "self" / "uid_map")) == set(DYNAMIC_IDS)
    assert parse_worker._mapped(str(proc / "self" / "gid_map")) == {stop - 3, stop - 2}
    uid, gid, _ = worker_identity(str(proc), user=NO_USER)
    assert uid == gid and uid in (stop - 3, stop - 2)
    below = fake_proc(tmp_path / "below", f"0 0 {DYNAMIC_IDS.start + 1}\n")
    assert parse_worker._mapped(str(below / "self" / "uid_map")) == {DYNAMIC_IDS.start}


def test_a_malformed_map_maps_what_came_before(tmp_path):
    start = DYNAMIC_IDS.start
    proc = fake_proc(tmp_path, f"{start} {start} 1\nnonsense\n{start + 1} {start + 1} 1\n")
    assert parse_worker._mapped(str(proc / "self" / "uid_map")) == {start}
    assert parse_worker._mapped(str(tmp_path / "missing")) == set()


def test_with_no_free_id_the_worker_is_nobody(tmp_path):
    proc = fake_proc(tmp_path, "0 0 1000\n")
    assert worker_identity(str(proc), user=NO_USER) == (
        NOBODY, NOBODY, f"nobody ({NOBODY}), which other processes may share: no id in "
        f"{DYNAMIC_IDS.start}-{DYNAMIC_IDS.stop - 1} is free; create the system user "
        "ctprofd-parser")


def test_ids_of_users_groups_and_processes_are_taken(tmp_path):
    """The real /proc and user database: a chosen id is none of theirs."""
    proc = fake_proc(tmp_path, "0 0 4294967295\n")
    taken = ({e.pw_uid for e in pwd.getpwall()} | {e.pw_gid for e in pwd.getpwall()})
    for _ in range(5):
        uid, gid, how = worker_identity(str(proc), user=NO_USER)
        assert uid == gid and uid in DYNAMIC_IDS and uid not in taken
    used = parse_worker._ids_in_use("/proc")
    assert 0 in used and os.getuid() in used
