"""The sandboxed ELF/DWARF parser (ctprofd.resolve.parse_worker): same layouts as parsing in
process, an unprivileged worker, and files that hang, eat memory or are not ELF at all
turned into dwarf-parse-failure within the limits; the zygote comes back when killed."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report import tags
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import (LayoutFailure, ObjectFacts, TsdLayout, object_dirs_for, resolve,
                                    resolve_object)
from ctprofd.resolve.parse_worker import (NOBODY, PACKAGE_ROOT, ParseWorker, WorkerLimits,
                                          worker_identity)
from support import elf as support_elf
from support.build import MODES
from support.inotify import ReadWatch
from support.lookalike import nobits_abbrev, sibling_cycle
from support.procs import is_dead, wait_for_exit

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["static", "dynamic"] + [f"{link}-stripped-{mode}"
                                    for link in ("static", "dynamic") for mode in MODES]
CAP_KEYS = ("CapInh", "CapPrm", "CapEff", "CapAmb")
HANG_GUARD = 120  # seconds: only keeps a broken run from hanging, never a timing claim


class Fd:
    """Anything with a file descriptor (the worker needs no more), e.g. a directory's."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


@pytest.fixture
def worker():
    # 3 s: a fixture's binary must parse within the limit, which takes 0.12 to 0.32 s beside
    # two CPU hogs; 1 s would be a claim on a busy host's speed
    parser = ParseWorker(WorkerLimits(memory_bytes=512 << 20, timeout=3))
    yield parser
    parser.close()


def through(parser, path: Path | str, search: DebugSearch = DebugSearch(()), shared: bool = False):
    with open(path, "rb") as stream:
        return resolve(parser, stream, str(path), object_dirs_for(str(path), "/"), search, shared)


def in_process(path: Path | str, search: DebugSearch = DebugSearch(()), shared: bool = False):
    with open(path, "rb") as stream:
        return resolve_object(stream, str(path), object_dirs_for(str(path), "/"), search, shared)


def status(pid: int | str) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def assert_parse_failure(result, *words: str) -> None:
    assert isinstance(result, LayoutFailure), result
    assert result.tag == tags.DWARF_PARSE_FAILURE
    for word in words:
        assert word in result.message, result.message


def test_the_zygote_imports_ctprofd_from_where_the_daemon_did():
    """The worker starts with `-I` and the package root first on its path: the directory that
    holds this ctprofd, not ctprofd/ itself or a package inside it."""
    assert (Path(PACKAGE_ROOT) / "ctprofd" / "resolve" / "parse_worker.py").is_file()


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_resolves_like_in_process(fixture_bins, worker, variant):
    v = fixture_bins[variant]
    search = DebugSearch((str(fixture_bins.debug_root),))
    shared = v.linkage == "dynamic"
    expected = in_process(v.jemalloc_object, search, shared)
    assert through(worker, v.jemalloc_object, search, shared) == expected
    assert isinstance(expected, TsdLayout)
    if v.mode in ("badcrc", "nodebug"):
        assert expected.source == "code: malloc/free fast paths"
        assert (expected.allocated_offset, expected.deallocated_offset) == (824, 840)
    else:
        assert (expected.symbol, expected.allocated_offset, expected.deallocated_offset) == (
            "je_tsd_tls", 824, 840)
        assert expected.build_id == support_elf.build_id(v.jemalloc_object)


def wait_for_child_limits(zygote: int) -> tuple[str, str]:
    """A child of the zygote once it has set its limits (CPU time last), and its /proc limits.
    Children come and go (one per phase), and one just forked has not set its limits yet:
    a child that never sets them fails the test after the hang guard."""
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{zygote}/task/{zygote}/children").read_text().split():
            try:
                limits = Path(f"/proc/{child}/limits").read_text()
            except (FileNotFoundError, ProcessLookupError):  # exited as we looked
                continue
            if not re.search(r"^Max cpu time +unlimited", limits, re.M):  # set last
                return child, limits
        time.sleep(0.01)
    raise AssertionError(f"no child of the zygote {zygote} set its limits in {HANG_GUARD} s")


def test_worker_runs_unprivileged_with_limits(fixture_bins, worker, tmp_path):
    assert isinstance(through(worker, fixture_bins["static"].binary), TsdLayout)
    zygote = status(worker.pid)
    assert zygote["NoNewPrivs"] == "1"
    assert all(int(zygote[k], 16) == 0 for k in CAP_KEYS), zygote
    if os.geteuid() == 0:  # an identity of its own (see test_worker_identity_is_shared_by_nobody)
        assert zygote["Uid"].split() == [str(worker.limits.uid)] * 4
        assert zygote["Gid"].split() == [str(worker.limits.gid)] * 4
        assert zygote["Groups"].strip() == ""
        assert int(zygote["CapBnd"], 16) == 0
    else:
        assert zygote["Uid"].split()[0] == str(os.getuid())
    # the child parsing a file that never ends: limits applied, killed on time
    hang = tmp_path / "hang"
    sibling_cycle(fixture_bins["static"].binary, hang)
    results = []
    thread = threading.Thread(target=lambda: results.append(through(worker, hang)))
    with ReadWatch(hang) as first_read:
        started = time.monotonic()
        thread.start()
        # the child reads the file only once its limits are set: that read is the signal
        first_read.wait(HANG_GUARD)
    # a phase-1 child may have read the file and exited before the parsing child starts
    child, limits = wait_for_child_limits(worker.pid)
    assert f"Max address space         {512 << 20}" in limits
    assert "Max cpu time              3                    4" in limits
    assert all(int(status(child)[k], 16) == 0 for k in CAP_KEYS)
    thread.join(HANG_GUARD)
    # the wall-clock timeout and RLIMIT_CPU are both 3 s: either may end the parse first
    assert_parse_failure(results[0], str(hang))
    assert ("parser timed out after 3 s" in results[0].message
            or "parser exceeded its CPU time limit (3 s)" in results[0].message)
    assert time.monotonic() - started >= 3  # neither limit can end it sooner
    assert is_dead(int(child))


def test_hanging_parse_times_out(fixture_bins, tmp_path):
    hang = tmp_path / "hang"
    sibling_cycle(fixture_bins["static"].binary, hang)
    parser = ParseWorker(WorkerLimits(timeout=3))  # the fixture's parse fits in it: see worker
    try:
        started = time.monotonic()
        result = through(parser, hang)
        assert_parse_failure(result)
        assert ("parser timed out after 3 s" in result.message
                or "parser exceeded its CPU time limit (3 s)" in result.message)
        assert time.monotonic() - started >= 3  # neither limit can end it sooner
        # the worker goes on with the next binary
        assert isinstance(through(parser, fixture_bins["static"].binary), TsdLayout)
    finally:
        parser.close()


def test_memory_hog_hits_the_address_space_limit(fixture_bins, worker, tmp_path):
    hog = tmp_path / "hog"
    nobits_abbrev(fixture_bins["static"].binary, hog, 3 << 30)
    assert_parse_failure(through(worker, hog), "parser ran out of memory (limit 512 MiB)")
    assert isinstance(through(worker, fixture_bins["static"].binary), TsdLayout)


def test_not_elf_truncated_and_directory_fail(fixture_bins, worker, tmp_path):
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho not an ELF file\n")
    assert_parse_failure(through(worker, text), "malformed ELF")
    data = fixture_bins["static"].binary.read_bytes()
    for size in (0, 16, 64, 200, len(data) // 2):
        truncated = tmp_path / f"truncated-{size}"
        truncated.write_bytes(data[:size])
        assert_parse_failure(through(worker, truncated), str(truncated))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert_parse_failure(worker.inspect(Fd(fd), "a directory", False),
                             "a directory: parser raised IsADirectoryError")
    finally:
        os.close(fd)


def test_killed_or_stopped_zygote_is_replaced(fixture_bins):
    parser = ParseWorker(WorkerLimits(timeout=3))  # the fixture's parse fits in it: see worker
    binary = fixture_bins["static"].binary
    try:
        assert isinstance(through(parser, binary), TsdLayout)
        first = parser.pid
        os.kill(first, signal.SIGKILL)
        assert isinstance(through(parser, binary), TsdLayout)
        assert parser.pid != first and is_dead(first)
        # a zygote that stops answering is killed after the timeout and a grace period
        second = parser.pid
        os.kill(second, signal.SIGSTOP)
        started = time.monotonic()
        assert_parse_failure(through(parser, binary), "parser worker unresponsive for 8 s")
        assert time.monotonic() - started >= 8  # not given up on sooner
        assert is_dead(second)
        assert isinstance(through(parser, binary), TsdLayout)
        assert parser.pid not in (first, second)
    finally:
        parser.close()


def test_close_ends_the_worker_and_a_killed_daemon_leaves_none(fixture_bins):
    parser = ParseWorker()
    assert isinstance(through(parser, fixture_bins["static"].binary), TsdLayout)
    zygote = parser.pid
    parser.close()
    assert parser.pid is None and is_dead(zygote)
    script = ("import sys; from ctprofd.resolve.parse_worker import ParseWorker; "
              "from ctprofd.resolve.layout import resolve; "
              "from ctprofd.resolve.debuginfo import DebugSearch; "
              "p = ParseWorker(); resolve(p, open(sys.argv[1], 'rb'), 'x', [], DebugSearch(()));"
              "print(p.pid, flush=True); sys.stdin.read()")
    daemon = subprocess.Popen([sys.executable, "-c", script, str(fixture_bins["static"].binary)],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        zygote = int(daemon.stdout.readline())
        assert not is_dead(zygote)
        daemon.kill()
        daemon.wait()
        # PR_SET_PDEATHSIG: the zygote is killed with its parent; wait for its exit event
        assert wait_for_exit(zygote, HANG_GUARD), "the worker outlived the daemon"
    finally:
        daemon.kill()
        daemon.wait()


def test_debug_file_only_the_daemon_can_open(fixture_bins, worker, tmp_path):
    """Phase 2 gets the debug file as an fd: the worker could not open it by path (a root
    0700 directory, when the daemon runs as root)."""
    variant = fixture_bins["static-stripped-buildid"]
    binary = tmp_path / "alloc_threads"
    shutil.copy(variant.binary, binary)
    debug_root = tmp_path / "debug"
    build_id = support_elf.build_id(binary)
    debug_file = support_elf.build_id_path(debug_root, build_id)
    debug_file.parent.mkdir(parents=True)
    shutil.copy(variant.debug_file, debug_file)
    os.chmod(tmp_path, 0o700)
    os.chmod(debug_file, 0o600)
    result = through(worker, binary, DebugSearch((str(debug_root),)))
    assert isinstance(result, TsdLayout), result
    assert result.dwarf_source == f"build-id {debug_file}"
    assert result == in_process(binary, DebugSearch((str(debug_root),)))
    assert result.build_id == build_id and result.allocated_offset == 824


def test_capture_attaches_through_the_worker(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["dynamic-stripped-debuglink"], 3)
    capturer = Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),),
                                        parser=WorkerLimits(timeout=10)))
    try:
        snapshot = capturer.capture(pids=[fixture.pid])
        assert snapshot.summary.jemalloc_detected == 1 and snapshot.summary.failed == 0
        [process] = snapshot.processes
        assert {t.tid: (t.allocated_bytes, t.deallocated_bytes) for t in process.threads} == {
            t["tid"]: (t["allocated"], t["deallocated"]) for t in fixture.threads}
        zygote = capturer.attacher.worker.pid
        assert zygote is not None
    finally:
        capturer.close()
    assert is_dead(zygote)


CAPABILITY_ONLY = r"""
import ctypes, errno, json, os, sys
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import resolve
from ctprofd.resolve.parse_worker import ParseWorker
if os.environ.get("SECCOMP_DENY"):  # like the unit's SystemCallFilter=~@privileged @resources
    seccomp = ctypes.CDLL("libseccomp.so.2")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    context = ctypes.c_void_p(seccomp.seccomp_init(ctypes.c_uint32(0x7FFF0000)))  # allow
    for name in os.environ["SECCOMP_DENY"].split():
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        assert seccomp.seccomp_rule_add(context, ctypes.c_uint32(0x50000 | errno.EPERM),
                                        number, 0) == 0, name
    assert seccomp.seccomp_load(context) == 0
def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
parser = ParseWorker()
with open(sys.argv[1], "rb") as stream:
    result = resolve(parser, stream, sys.argv[1], [], DebugSearch(()))
print(json.dumps({"result": result.to_dict(), "daemon": status("self"),
                  "worker": status(parser.pid) if parser.pid else None}))
parser.close()
"""
def importable_without_capabilities(uid: int) -> bool:
    """Whether `uid` without capabilities can start this Python and import ctprofd (not
    when the interpreter lives under /root, as with pyenv)."""
    path = json.dumps([str(REPO), *(os.path.abspath(p) for p in sys.path if p)])
    probe = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                            "--inh-caps=-all", "--", sys.executable, "-I", "-c",
                            "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
                            "import ctprofd.resolve.parse_worker", path],
                           cwd="/", capture_output=True, timeout=60)
    return probe.returncode == 0


UNIT_USER = ["--reuid=4242", "--regid=4242", "--clear-groups",
             "--inh-caps=-all,+sys_ptrace,+dac_read_search",
             "--ambient-caps=+sys_ptrace,+dac_read_search"]
PTRACE_CAPS = 1 << 19 | 1 << 2  # CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH


@pytest.mark.parametrize("prefix, deny, uid", [
    # a system user with the two capabilities ambient
    (UNIT_USER, "", 4242),
    # the systemd unit: also no new privileges, and capset & co. refused by seccomp
    (["--no-new-privs", *UNIT_USER], "capset setuid setresuid setreuid setgroups setfsuid "
     "setrlimit chroot", 4242),
    # a container: root limited to the two capabilities, so it cannot change uid
    (["--bounding-set=-all,+sys_ptrace,+dac_read_search", "--inh-caps=-all"], "", 0),
], ids=["ambient", "systemd-unit", "root-container"])
def test_worker_in_a_daemon_with_only_ptrace_capabilities(fixture_bins, prefix, deny, uid):
    if os.geteuid() != 0:
        pytest.fail("needs root to set up the daemon's credentials")
    binary = str(fixture_bins["static"].binary)
    run = subprocess.run(["setpriv", *prefix, "--", sys.executable, "-c", CAPABILITY_ONLY, binary],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO), "SECCOMP_DENY": deny})
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert int(report["daemon"]["CapEff"], 16) == PTRACE_CAPS
    if deny and not importable_without_capabilities(uid):
        # the worker, exec'd again without capabilities, cannot read this Python: it fails
        # closed rather than parse with the daemon's capabilities
        assert report["worker"] is None
        assert report["result"]["kind"] == "failure", report["result"]
        assert "parser worker cannot start" in report["result"]["message"]
        return
    assert report["result"]["kind"] == "layout", report["result"]
    worker_status = report["worker"]
    assert worker_status["Uid"].split() == [str(uid)] * 4
    assert all(int(worker_status[k], 16) == 0 for k in ("CapPrm", "CapEff", "CapAmb"))
    # capset refused: the inheritable set stays, inert (no new privileges, no file caps)
    assert int(worker_status["CapInh"], 16) == (PTRACE_CAPS if deny else 0)
    assert worker_status["NoNewPrivs"] == "1"
    if uid == 0:
        assert "parser worker runs as root" in run.stderr


def test_facts_from_the_sandbox_are_checked():
    good = ObjectFacts("ab" * 20, None, False, ("libjemalloc.so.2.debug", 0x1234abcd),
                       static_block_offset=2632)
    assert ObjectFacts.from_dict(json.loads(json.dumps(good.to_dict()))) == good
    for change in ({"debuglink": ["../../etc/shadow", 1]}, {"debuglink": ["x", -1]},
                   {"build_id": "../x"}, {"build_id": "AB" * 20}, {"embedded_dwarf": 1},
                   {"static_block_offset": None}, {"tpoff_got": 4096},
                   {"symbol": {"name": 1, "value": 0, "size": 0}}, {"extra": 1}):
        with pytest.raises((KeyError, TypeError, ValueError)):
            ObjectFacts.from_dict({**good.to_dict(), **change})


def ids_of_other_processes(exclude: int) -> set[int]:
    used = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == exclude:
            continue
        try:
            found = status(int(pid))
        except OSError:
            continue
        used.update(int(v) for v in found["Uid"].split() + found["Gid"].split())
    return used


def test_worker_identity_is_shared_by_nobody(fixture_bins, worker):
    if os.geteuid() != 0:
        pytest.fail("the worker's own identity is chosen by a root daemon; run as root")
    assert isinstance(through(worker, fixture_bins["static"].binary), TsdLayout)
    uid, gid = worker.limits.uid, worker.limits.gid
    assert uid != NOBODY and uid != 0
    assert uid not in ids_of_other_processes(worker.pid) and gid not in ids_of_other_processes(
        worker.pid)
    assert uid not in {e.pw_uid for e in pwd.getpwall()} or pwd.getpwuid(uid).pw_name == (
        "ctprofd-parser")
    # nobody, the uid sandboxed services share, cannot stop it
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "kill", "-STOP", str(worker.pid)], capture_output=True, text=True)
    assert result.returncode != 0 and "not permitted" in result.stderr
    assert status(worker.pid)["State"].startswith("S")


def test_worker_identity_falls_back_to_nobody_when_no_id_is_mapped(tmp_path):
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "uid_map").write_text("         0          0       1000\n")
    (proc / "self" / "gid_map").write_text("         0          0       1000\n")
    uid, gid, how = worker_identity(str(proc), user="ctprofd-test-no-such-user")
    assert (uid, gid) == (NOBODY, NOBODY) and "create the system user ctprofd-parser" in how
