"""ELF/DWARF parsing of target binaries in a sandbox.

Any local user can make ctprofd parse a file of theirs (by running it), so the daemon never
parses a target's binary or debug file itself. A zygote process, started from a fresh
interpreter, drops its privileges once, then for each request forks a child that parses one
file under resource limits and replies. Whatever the file does to the parser (hang, eat
memory, crash, raise) becomes a `dwarf-parse-failure` with the reason, logged once.

Protocol, over an AF_UNIX SOCK_SEQPACKET socketpair, one JSON message each way per request:

    daemon -> zygote  {"op": "inspect", "what": NAME, "shared": BOOL}            + 1 fd
                      {"op": "identify", "what": NAME, "crc": BOOL}                + 1 fd
                      {"op": "layout", "what": NAME, "source": HOW, "facts": {...}} + 1 fd
                      {"op": "code", "what": NAME, "facts": {...}}                 + 1 fd
                      {"op": "loader", "what": NAME}                               + 1 fd
    zygote -> daemon  the child's answer: ObjectFacts.to_dict(), {"kind": "identity", "crc": N|null,
                      "build_id": HEX|null}
                      a Resolution's or LoaderFacts' to_dict(), or {"crash": WHY} when it raised, hung,
                      died or overran a limit

The fd (SCM_RIGHTS) is the open binary (/proc/PID/exe, map_files/...) or, for "identify" and
"layout", possibly its debug file ("code" reads the binary's machine code when no DWARF
gave the offsets): between the phases the daemon does the path work the sandbox cannot
(build-id path, debuglink, debuginfod) and opens each file once (files.target); every read
of a file's content, a debuglink's CRC and a debug file's own build-id included, is the worker's (layout.resolve).

What the worker runs as (it refuses to serve with a permitted, effective or ambient
capability left):
- daemon as root: bounding set emptied, no supplementary groups, uid/gid `WorkerLimits.uid`
  and `.gid`, which also clears every capability. Unless given, they are an identity nothing
  else on the host shares, so no other process can signal, stop or trace the worker
  (`worker_identity`): the system user `ctprofd-parser` when it exists (the install script
  and the image create it), else a uid free now in systemd's DynamicUser range (no user,
  group or process has it, and the user namespace maps it), else nobody (65534) with a warning. The documented
  container grants CAP_SETUID and CAP_SETGID for this; the daemon holds them only in its
  permitted set (`reserve_setid_for_worker`). A root without them (a container granted only
  CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH) stays uid 0 with no capabilities, and the daemon
  warns about it.
- daemon as a non-root user with ambient CAP_SYS_PTRACE + CAP_DAC_READ_SEARCH (the systemd
  unit): the uid cannot change, so the worker runs as the daemon's user with no
  capabilities: capset empties them or, where a seccomp filter refuses capset (the unit's
  ~@privileged), the worker clears its ambient set and execs itself once more, which
  leaves only the inert inheritable set.
- always: PR_SET_NO_NEW_PRIVS, not dumpable, RLIMIT_NOFILE 32, RLIMIT_CORE 0, killed with
  SIGKILL when the daemon thread that started it ends (PR_SET_PDEATHSIG; it is started
  again on the next request) or when the daemon closes the socket. Each child: RLIMIT_AS
  `memory_bytes`, RLIMIT_CPU `timeout` (rounded up), SIGKILL after `timeout` of wall clock.
"""

from __future__ import annotations

import ctypes
import grp
import json
import logging
import math
import os
import pwd
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

from ..procfs.capabilities import CAP_SYS_PTRACE, own_status
from ..report import tags
from .loader import LoaderFacts, loader_facts
from .layout import (BUILD_ID, LayoutFailure, NotJemalloc, ObjectFacts, Resolution, TsdLayout,
                     debug_identity, inspect_object, layout_from_code, layout_from_dwarf,
                     resolution_from_dict)

log = logging.getLogger(__name__)

NOBODY = 65534
PARSER_USER = "ctprofd-parser"
DYNAMIC_IDS = range(61184, 65520)  # systemd's DynamicUser= range
MAX_MESSAGE = 1 << 16   # bytes of a request or reply; a longer child answer is a crash
MAX_REASON = 500        # characters of a failure message from the sandbox
START_TIMEOUT = 10.0    # for the zygote to start and drop its privileges
GRACE = 5.0             # the daemon waits this long beyond the per-parse timeout
START_BACKOFF = 60.0    # after the zygote failed to start, fail fast for this long
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding ctprofd/
BOOTSTRAP = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "  # the daemon's imports
             "from ctprofd.resolve.parse_worker import zygote; zygote(*sys.argv[2:])")

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
PRIVILEGED_SETS = ("CapPrm", "CapEff", "CapAmb")  # the inheritable set alone grants nothing
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class WorkerLimits:
    """Limits of each parse, and who the worker becomes when the daemon runs as root."""

    memory_bytes: int = 1 << 30   # RLIMIT_AS of the parsing child
    timeout: float = 30.0         # wall clock per parse; RLIMIT_CPU is this, rounded up
    max_file_bytes: int = 4 << 30  # a larger binary or debug file is not opened
    uid: int | None = None        # None: `worker_identity()` picks them (daemon as root)
    gid: int | None = None


class _WorkerDown(Exception):
    """The zygote timed out, died or cannot start: the message says which."""


class _Unavailable(_WorkerDown):
    """The zygote cannot start (already logged)."""


class ParseWorker:
    """The daemon's side: a `layout.Parser` whose phases run in the sandbox. The zygote
    is started on first use and again after it died; one request at a time."""

    def __init__(self, limits: WorkerLimits = WorkerLimits()) -> None:
        self.limits = limits
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._unavailable: tuple[float, str] | None = None  # (until, why) after a failed start

    @property
    def pid(self) -> int | None:
        """The zygote's pid, while it runs."""
        return self._process.pid if self._process is not None else None

    def inspect(self, stream: BinaryIO, what: str,
                shared: bool) -> ObjectFacts | NotJemalloc | LayoutFailure:
        found = self._request({"op": "inspect", "what": what, "shared": shared}, stream, what)
        if isinstance(found, (ObjectFacts, NotJemalloc, LayoutFailure)):
            return found
        return self._crashed(what, "parser answered phase 1 with something else")

    def identify(self, stream: BinaryIO, what: str,
                 crc: bool) -> tuple[int | None, str | None] | LayoutFailure:
        """A debug file's CRC32 (when `crc`) and own build-id (see layout.debug_identity)."""
        found = self._request({"op": "identify", "what": what, "crc": crc}, stream, what)
        return found if isinstance(found, (tuple, LayoutFailure)) else self._crashed(
            what, "parser answered an identify request with something else")

    def layout(self, stream: BinaryIO, facts: ObjectFacts, what: str, source: str) -> Resolution:
        request = {"op": "layout", "what": what, "source": source, "facts": facts.to_dict()}
        return self._phase_two(request, stream, what)

    def code(self, stream: BinaryIO, facts: ObjectFacts, what: str) -> Resolution:
        request = {"op": "code", "what": what, "facts": facts.to_dict()}
        return self._phase_two(request, stream, what)

    def loader(self, stream: BinaryIO, what: str) -> LoaderFacts | LayoutFailure:
        """The loader's descriptors and symbols in a mapped object (libc, ld.so)."""
        found = self._request({"op": "loader", "what": what}, stream, what)
        return found if isinstance(found, (LoaderFacts, LayoutFailure)) else self._crashed(
            what, "parser answered a loader request with something else")

    def _phase_two(self, request: dict, stream: BinaryIO, what: str) -> Resolution:
        found = self._request(request, stream, what)
        if isinstance(found, (TsdLayout, NotJemalloc, LayoutFailure)):
            return found
        return self._crashed(what, "parser answered phase 2 with something else")

    def close(self) -> None:
        """Stop the zygote: it exits when its socket closes (killed after 2 s)."""
        with self._lock:
            self._stop(wait=2.0)

    def _request(self, request: dict, stream: BinaryIO,
                 what: str) -> (ObjectFacts | Resolution | LoaderFacts
                                | tuple[int | None, str | None]):
        with self._lock:
            try:
                data = self._exchange(json.dumps(request).encode(), stream.fileno())
            except _Unavailable as exc:
                return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{what}: {exc}", crashed=True,
                                     lost=True)
            except _WorkerDown as exc:
                message = f"parser worker lost while parsing {what}: {exc}"[:MAX_REASON]
                return LayoutFailure(tags.DWARF_PARSE_FAILURE, message, crashed=True, lost=True)
        try:
            reply = json.loads(data)
            if "crash" in reply:
                return self._crashed(what, f"parser {reply['crash']}")
            if reply["kind"] == "facts":
                return ObjectFacts.from_dict(reply)
            if reply["kind"] == "loader":
                return LoaderFacts.from_dict(reply)
            if reply["kind"] == "identity":
                crc, build_id = reply["crc"], reply["build_id"]
                if crc is not None and (type(crc) is not int or not 0 <= crc < 1 << 32):
                    raise ValueError("a CRC32 must be a 32-bit integer")
                if build_id is not None and not BUILD_ID.match(build_id):
                    raise ValueError("a build-id must be 2 to 128 lowercase hex digits")
                return crc, build_id
            found = resolution_from_dict(reply)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            return self._crashed(what, f"parser sent a malformed reply ({exc})")
        if isinstance(found, LayoutFailure) and len(found.message) > MAX_REASON:
            return LayoutFailure(found.tag, found.message[:MAX_REASON] + "…", found.crashed,
                                 found.lost)
        return found

    @staticmethod
    def _crashed(what: str, reason: str) -> LayoutFailure:
        message = f"{what}: {reason}"[:MAX_REASON]
        log.warning("%s", message)
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, message, crashed=True)

    def _exchange(self, request: bytes, fd: int) -> bytes:
        """Send a request with its fd; the reply. A zygote found dead is started again and
        asked once more (it never parses itself: the request cannot have killed it)."""
        for _ in range(2):
            sock = self._running()
            try:
                socket.send_fds(sock, [request], [fd])
                sock.settimeout(self.limits.timeout + GRACE)
                reply = sock.recv(MAX_MESSAGE)
            except TimeoutError:
                self._stop(wait=0)
                raise _WorkerDown(f"parser worker unresponsive for "
                                  f"{self.limits.timeout + GRACE:g} s; killed") from None
            except OSError:  # the zygote is gone (EPIPE, ECONNRESET)
                reply = b""
            if reply:
                return reply
            self._stop(wait=0)
        raise _WorkerDown("parser worker died")

    def _running(self) -> socket.socket:
        """The zygote's socket, starting the zygote unless it runs."""
        if self._process is not None and self._process.poll() is None:
            assert self._socket is not None
            return self._socket
        self._stop(wait=0)
        if self._unavailable is not None and time.monotonic() < self._unavailable[0]:
            raise _Unavailable(self._unavailable[1])
        try:
            return self._start()
        except _WorkerDown as exc:
            why = f"parser worker cannot start: {exc}"
            log.warning("%s; not parsing binaries for %g s", why, START_BACKOFF)
            self._unavailable = (time.monotonic() + START_BACKOFF, why)
            raise _Unavailable(why) from None

    def _start(self) -> socket.socket:
        if self.limits.uid is None and int(own_status()["CapPrm"], 16) >> CAP_SETUID & 1:
            # chosen once, kept across restarts; without CAP_SETUID the uid cannot change
            # (permitted, not effective: `reserve_setid_for_worker` lowers the latter, and
            # the worker, exec'd as root, gets the permitted set as its effective one)
            uid, gid, how = worker_identity()
            log.log(logging.WARNING if uid == NOBODY else logging.INFO,
                    "parser worker identity: %s", how)
            self.limits = replace(self.limits, uid=uid, gid=gid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        path = [PACKAGE_ROOT, *(os.path.abspath(p) for p in sys.path if p)]
        argv = [sys.executable, "-I", "-c", BOOTSTRAP, json.dumps(path), str(theirs.fileno()),
                json.dumps(asdict(self.limits)), str(os.getpid())]
        try:
            with theirs:
                process = subprocess.Popen(argv, pass_fds=[theirs.fileno()], cwd="/", env={},
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           start_new_session=True)  # no terminal's ^C
        except OSError as exc:
            ours.close()
            raise _WorkerDown(f"{sys.executable}: {exc.strerror}") from None
        ours.settimeout(START_TIMEOUT)
        try:
            hello = ours.recv(MAX_MESSAGE).decode("utf-8", "replace")
        except OSError as exc:
            hello = f"no answer ({exc})"
        self._process, self._socket = process, ours
        if not hello.startswith("ready "):
            self._stop(wait=0)
            raise _WorkerDown(hello or "exited")
        log.info("parser worker %d started, %s", process.pid, hello.removeprefix("ready "))
        if hello.startswith("ready uid=0 "):
            log.warning("parser worker runs as root (uid 0, no capabilities): the daemon has "
                        "no CAP_SETUID to give it a uid of its own")
        return ours

    def _stop(self, wait: float) -> None:
        """Close the socket and end the zygote, waiting up to `wait` s before killing it."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            try:
                self._process.wait(wait)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def worker_identity(proc_root: str = "/proc", user: str = PARSER_USER) -> tuple[int, int, str]:
    """(uid, gid, how chosen) for the worker of a root daemon: an identity no other process
    on the host shares, so none can signal it (see the module docstring)."""
    try:
        entry = pwd.getpwnam(user)
        return entry.pw_uid, entry.pw_gid, f"the system user {user} (uid {entry.pw_uid})"
    except KeyError:
        pass
    taken = ({e.pw_uid for e in pwd.getpwall()} | {e.pw_gid for e in pwd.getpwall()}
             | {g.gr_gid for g in grp.getgrall()} | _ids_in_use(proc_root))
    mapped = _mapped(f"{proc_root}/self/uid_map") & _mapped(f"{proc_root}/self/gid_map")
    free = [i for i in DYNAMIC_IDS if i not in taken and i in mapped]
    if not free:
        return NOBODY, NOBODY, (f"nobody ({NOBODY}), which other processes may share: no id "
                                f"in {DYNAMIC_IDS.start}-{DYNAMIC_IDS.stop - 1} is free; "
                                f"create the system user {PARSER_USER}")
    uid = random.SystemRandom().choice(free)
    return uid, uid, f"uid and gid {uid}, which no user, group or process has now"


def _ids_in_use(proc_root: str) -> set[int]:
    """Every uid and gid (real, effective, saved, filesystem) of the running processes."""
    used = set()
    for pid in os.listdir(proc_root):
        if not pid.isdigit():
            continue
        try:
            with open(f"{proc_root}/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"Uid:", b"Gid:")):
                        used.update(int(v) for v in line.split()[1:])
        except (OSError, ValueError):
            continue
    return used


def _mapped(path: str) -> set[int]:
    """The ids of DYNAMIC_IDS that a uid_map or gid_map maps into this namespace."""
    ids: set[int] = set()
    try:
        with open(path) as f:
            for line in f:
                inside, _, count = (int(v) for v in line.split())
                ids.update(range(max(inside, DYNAMIC_IDS.start),
                                 min(inside + count, DYNAMIC_IDS.stop)))
    except (OSError, ValueError):
        pass
    return ids


# --- the worker process ----------------------------------------------------------------

def zygote(sock_fd: str, limits_json: str, parent_pid: str) -> None:
    """The worker's main loop: drop privileges, then serve one request at a time until the
    daemon closes its end."""
    sock = socket.socket(fileno=int(sock_fd))
    limits = WorkerLimits(**json.loads(limits_json))
    try:
        sock.send(f"ready {drop_privileges(limits, int(parent_pid))}".encode())
    except (OSError, RuntimeError) as exc:
        sock.send(f"cannot drop privileges: {exc}".encode())
        sys.exit(1)
    while True:
        try:
            request, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except ConnectionResetError:
            return
        if not request:
            return
        try:
            reply = _serve(request, fds, limits, sock) if len(fds) == 1 else _crash(
                "was sent no file")
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(reply)
        except OSError:  # the daemon is gone
            return


def drop_privileges(limits: WorkerLimits, parent: int) -> str:
    """Become a process that can only compute on the files it is handed; says what it
    runs as. Raises OSError or RuntimeError when that cannot be reached; may exec the
    worker again (see below)."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    effective = int(own_status()["CapEff"], 16)
    if effective >> CAP_SETPCAP & 1:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            for cap in range(int(f.read()) + 1):
                _prctl(PR_CAPBSET_DROP, cap)
    if effective >> CAP_SETGID & 1 and limits.gid is not None:
        os.setgroups([])
        os.setresgid(limits.gid, limits.gid, limits.gid)
    if effective >> CAP_SETUID & 1 and limits.uid is not None:
        os.setresuid(limits.uid, limits.uid, limits.uid)
    try:
        _capset_none()
    except OSError:
        # capset refused (the systemd unit's seccomp filter): a non-root process loses
        # the capabilities it got from the ambient set by exec'ing, now that set is empty
        if os.geteuid() != 0 and _held(own_status(), PRIVILEGED_SETS):
            os.execv(sys.executable, [sys.executable, "-I", "-c", BOOTSTRAP, *sys.argv[1:]])
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    if os.getppid() != parent:
        raise RuntimeError("the daemon is gone")
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    status = own_status()
    if _held(status, PRIVILEGED_SETS) or status["NoNewPrivs"] != "1":
        raise RuntimeError(f"capabilities left in {', '.join(_held(status, PRIVILEGED_SETS))}, "
                           f"NoNewPrivs {status['NoNewPrivs']}")
    inert = (f" (inheritable {status['CapInh']}: inert under no_new_privs)"
             if _held(status, ("CapInh",)) else "")
    return (f"uid={os.getuid()} gid={os.getgid()} groups={len(os.getgroups())} "
            f"no capabilities{inert}, no new privileges")


def _held(status: dict[str, str], sets: tuple[str, ...]) -> list[str]:
    """Which of the capability sets in /proc/self/status are not empty."""
    return [name for name in sets if int(status[name], 16)]


def _serve(request: bytes, fds: list[int], limits: WorkerLimits, sock: socket.socket) -> bytes:
    """Fork a child to parse; its answer, or a crash report when it gave none in time.
    (The child's code is here, not in a function of its own, so that mutmut, which picks
    the tests of a function by the calls the test process makes, reaches it.)"""
    read_end, write_end = os.pipe()
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return _crash(f"could not be started: {exc.strerror}")
    if pid == 0:  # the child: parse under the limits, write the answer, exit
        sock.close()
        os.close(read_end)
        out_of_memory = _crash(f"ran out of memory (limit {limits.memory_bytes >> 20} MiB)")
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != zygote:  # it died before the line above: nobody to answer
                os._exit(1)
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
            cpu = math.ceil(limits.timeout)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            answer = json.dumps(_parse(json.loads(request), fds[0])).encode()
        except MemoryError:
            answer = out_of_memory
        except BaseException as exc:  # noqa: BLE001 - whatever the file does, the child answers
            try:
                answer = _crash(f"raised {type(exc).__name__}: {exc}"[:MAX_REASON])
            except MemoryError:
                answer = out_of_memory
        try:
            view = memoryview(answer)
            while view:
                view = view[os.write(write_end, view):]
        finally:
            os._exit(0)
    os.close(write_end)
    with open(read_end, "rb", buffering=0) as pipe:
        answer, why = _read_answer(pipe, time.monotonic() + limits.timeout)
    if why:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if why:
        return _crash(why.format(timeout=limits.timeout))
    if answer:
        return answer
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU:
            return _crash(f"exceeded its CPU time limit ({math.ceil(limits.timeout)} s)")
        return _crash(f"killed by {signal.Signals(number).name}")
    return _crash(f"exited with status {os.waitstatus_to_exitcode(status)} without answering")


def _read_answer(pipe, deadline: float) -> tuple[bytes, str | None]:
    """Everything the child writes until it exits; (partial, why) if it takes too long or
    writes too much."""
    answer = b""
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return answer, "timed out after {timeout:g} s"
        chunk = pipe.read(MAX_MESSAGE)
        if not chunk:
            return answer, None
        answer += chunk
        if len(answer) >= MAX_MESSAGE:
            return answer, "wrote an oversized answer"


def _parse(request: dict, fd: int) -> dict:
    with open(fd, "rb", closefd=False) as stream:
        what = request["what"]
        if request["op"] == "inspect":
            return inspect_object(stream, what, request["shared"]).to_dict()
        if request["op"] == "identify":
            crc, build_id = debug_identity(stream, request["crc"] is True)
            return {"kind": "identity", "crc": crc, "build_id": build_id}
        if request["op"] == "loader":
            return loader_facts(stream).to_dict()
        facts = ObjectFacts.from_dict(request["facts"])
        if request["op"] == "code":
            return layout_from_code(stream, facts, what).to_dict()
        return layout_from_dwarf(stream, facts, what, request["source"]).to_dict()


def _crash(why: str) -> bytes:
    return json.dumps({"crash": why}).encode()


def _prctl(option: int, arg: int = 0) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                   ctypes.c_ulong(0)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capset_none() -> None:
    """Empty the effective, permitted and inheritable capability sets."""
    _capset(0, 0, 0)


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    data = (_CapData * 2)()
    for word in range(2):
        shift = 32 * word
        data[word] = _CapData(effective >> shift & 0xFFFFFFFF, permitted >> shift & 0xFFFFFFFF,
                              inheritable >> shift & 0xFFFFFFFF)
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"capset: {os.strerror(errno)}")


def reserve_setid_for_worker() -> bool:
    """Daemon side, as root holding CAP_SETUID and CAP_SETGID (the container grants them for
    this): take them out of the effective set and keep them permitted. The daemon makes no
    use of them; each worker it starts gets them back on exec (root's permitted set becomes
    effective, also under no_new_privs, which only refuses capabilities beyond the permitted
    set) and spends them on a uid of its own. Call it before starting threads: capabilities
    are per thread, and new threads inherit them. True when they were lowered.

    Only with CAP_SYS_PTRACE effective: without it, the kernel lets us read a process's
    /proc/PID/exe only while our effective set covers its permitted set, so lowering would
    hide every root process."""
    status = own_status()
    effective = int(status["CapEff"], 16)
    setid = 1 << CAP_SETUID | 1 << CAP_SETGID
    if (os.geteuid() != 0 or effective & setid != setid
            or not effective >> CAP_SYS_PTRACE & 1):
        return False
    _capset(effective & ~setid, int(status["CapPrm"], 16), int(status["CapInh"], 16))
    return True

