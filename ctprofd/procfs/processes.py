"""Reading /proc: tgids, threads, identity (pid + start time), owner and systemd unit.

Every function takes the proc root so tests and containers can point it elsewhere.
A process that exits mid-read raises OSError (FileNotFoundError/ProcessLookupError);
callers treat that as a lost race, not an error.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from .containers import Container, container_from_cgroup

_UNIT_RE = re.compile(r"[^/]+\.(?:service|scope|socket|mount|swap)$")


PF_KTHREAD = 0x00200000
PF_EXITING = 0x00000004


@dataclass(frozen=True)
class StatLine:
    """The fields of /proc/PID/stat (or /proc/PID/task/TID/stat) that ctprofd uses."""

    comm: str
    state: str
    start_time: int  # clock ticks after boot (field 22): with the id, the identity
    kernel_thread: bool = False  # PF_KTHREAD in the flags (field 9): no exe, no memory
    ppid: int = 0  # the parent (field 4): a fork() child shares its image until it execs
    exiting: bool = False  # PF_EXITING in the flags: it is on its way out (do_exit)


def parse_stat(text: str) -> StatLine:
    """Parse a stat line; the comm may itself contain spaces and parentheses."""
    head, _, tail = text.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    flags = int(fields[6])
    return StatLine(comm=comm, state=fields[0], start_time=int(fields[19]),
                    kernel_thread=bool(flags & PF_KTHREAD), ppid=int(fields[1]),
                    exiting=bool(flags & PF_EXITING))


def read_file(path: str, limit: int | None = None) -> bytes:
    """A whole small file with raw os calls (a steady-state snapshot reads one per process
    and thread, and open() with its buffered file object costs about twice as much); with a
    `limit`, read to its end or to that many bytes, whatever each read returns."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if limit is not None:
            parts, size = [], 0
            while size < limit and (chunk := os.read(fd, min(_CHUNK, limit - size))):
                parts.append(chunk)
                size += len(chunk)
            return b"".join(parts)
        data = os.read(fd, _CHUNK)
        if len(data) == _CHUNK:  # a one-record /proc file comes whole when it fits
            parts = [data]
            while chunk := os.read(fd, _CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


_CHUNK = 4096
# A cgroup file is one line per hierarchy (13 on cgroup v1) of a path of at most PATH_MAX.
_CGROUP_MAX = 64 * 1024


def read_stat(path: str) -> StatLine:
    """Read and parse one stat file."""
    return parse_stat(read_file(path).decode("utf-8", "replace"))


def unit_from_cgroup(text: str) -> str:
    """The innermost systemd unit (.service, .scope, …) named in a /proc/PID/cgroup file."""
    for line in text.split("\n"):  # only \n ends a line: a name may hold U+2028, \x1c, ...
        hierarchy, _, path = line.partition(":")[2].partition(":")
        if hierarchy == "" or "name=systemd" in hierarchy:
            units = [part for part in path.split("/") if _UNIT_RE.match(part)]
            if units:
                return units[-1]
    return ""


def list_pids(directory: str) -> list[int]:
    """Numeric entries of a /proc or /proc/PID/task directory, sorted."""
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# What an exited (zombie) thread group leader no longer has: an address space and a root.
_LIVE_THREAD_ENTRIES = frozenset({"exe", "maps", "map_files", "root", "auxv"})


def _prefix(proc_root: str) -> str:
    """What a pid is appended to, so that prefix + pid == os.path.join(proc_root, pid)."""
    return proc_root if not proc_root or proc_root.endswith("/") else proc_root + "/"


class ProcessInfo:
    """What selection filters and labels see of one tgid, read lazily from /proc."""

    def __init__(self, proc_root: str, pid: int, stat: StatLine,
                 directory: str | None = None) -> None:
        self.proc_root = proc_root
        self.pid = pid
        self.comm = stat.comm
        self.start_time = stat.start_time
        self.state = stat.state
        self.kernel_thread = stat.kernel_thread
        self.ppid = stat.ppid
        # /proc/PID, built once: joining paths is a sizeable part of a steady-state snapshot
        self._directory = directory if directory is not None else _prefix(proc_root) + str(pid)

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_time)

    def path(self, *parts: str) -> str:
        """A path below /proc/PID (for exe, maps, map_files, root and auxv, below a live
        thread's /proc/PID/task/TID when the leader has exited: see `_live_thread`)."""
        directory = self._directory
        if self.state in ("Z", "X") and parts and parts[0] in _LIVE_THREAD_ENTRIES:
            directory = self._live_thread or directory
        if len(parts) == 1 and parts[0] and parts[0][0] != "/":  # as os.path.join would
            return directory + "/" + parts[0]
        return os.path.join(directory, *parts)

    @cached_property
    def _live_thread(self) -> str | None:
        """/proc/PID/task/TID of a thread still running. A thread group leader that called
        pthread_exit stays a zombie while the others run on; it has no address space or
        root left, so its exe, maps, map_files, root and auxv are empty."""
        try:
            tasks = self._task_stats()
        except OSError:
            return None
        return next((task for task, stat in tasks if stat.state not in ("Z", "X")), None)

    def _task_stats(self) -> list[tuple[str, StatLine]]:
        """(/proc/PID/task/TID, its stat) of each thread listed whose stat reads; raises
        OSError when the task list cannot be read."""
        task_dir = self._directory + "/task"
        tasks = []
        for tid in list_pids(task_dir):
            try:
                tasks.append((f"{task_dir}/{tid}", read_stat(f"{task_dir}/{tid}/stat")))
            except (OSError, ValueError, IndexError):
                continue
        return tasks

    def exited(self) -> bool:
        """Whether this process has exited by now (see `gone`). A leader that is a zombie
        while other threads of its group run on has not. Each stat file is read once."""
        try:
            stat = read_stat(self._directory + "/stat")
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            return True
        except OSError:
            return False  # refused to us: not known to be gone
        if stat.start_time != self.start_time:
            return True  # another process under its pid
        if not _gone(self._directory, stat, None):
            return False
        try:
            tasks = self._task_stats()
        except OSError:
            return True
        return all(_gone(task, thread, None) for task, thread in tasks)

    @cached_property
    def exe(self) -> str:
        """The executable's path as the kernel names it (may end in ' (deleted)');
        raises OSError when unreadable (exit race, or not allowed)."""
        return os.readlink(self.path("exe"))

    @cached_property
    def uid(self) -> int:
        """Real uid, -1 when unreadable."""
        try:
            status = read_file(self.path("status"))
        except OSError:
            return -1
        start = status.find(b"\nUid:")
        fields = status[start + 5:status.find(b"\n", start + 5)].split() if start >= 0 else []
        return int(fields[0]) if fields and fields[0].isdigit() else -1

    @cached_property
    def cgroup(self) -> str:
        """/proc/PID/cgroup, '' when unreadable."""
        try:
            return read_file(self.path("cgroup"), _CGROUP_MAX).decode("utf-8", "replace")
        except OSError:
            return ""

    @cached_property
    def unit(self) -> str:
        """The systemd unit from the cgroup path, '' when none or unreadable."""
        return unit_from_cgroup(self.cgroup)

    @cached_property
    def container(self) -> Container:
        """The container id and pod UID from the cgroup path ('' for what it does not name)."""
        return container_from_cgroup(self.cgroup)

    def __repr__(self) -> str:
        return f"ProcessInfo(pid={self.pid}, comm={self.comm!r})"


def gone(directory: str, start_time: int | None) -> bool:
    """Whether the process or thread at `directory` (/proc/PID, /proc/PID/task/TID) with this
    start time (None: whichever it is now) has exited: the directory vanished, names a newer
    one (its id reused), is a zombie, or is on its way out (exiting, or SIGKILL pending: its
    group was killed or called exit). One refused to us (hidepid, an LSM) is not known to be
    gone. The one test of an exit race: what failed while reading something gone by then
    counts nowhere, and is said at debug only."""
    try:
        stat = read_stat(directory + "/stat")
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return True
    except OSError:
        return False
    return _gone(directory, stat, start_time)


def _gone(directory: str, stat: StatLine, start_time: int | None) -> bool:
    """`gone`, its stat file read already (`stat`)."""
    if ((start_time is not None and stat.start_time != start_time)
            or stat.state in ("Z", "X") or stat.exiting):
        return True
    try:
        status = read_file(directory + "/status")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    pending = re.search(rb"^SigPnd:\s*([0-9a-f]+)", status, re.M)
    return pending is not None and bool(int(pending.group(1), 16) & _SIGKILL_BIT)


_SIGKILL_BIT = 1 << (9 - 1)


def read_process(proc_root: str, pid: int) -> ProcessInfo | None:
    """The process `pid` from its stat file; None when that vanished (it exited)."""
    directory = _prefix(proc_root) + str(pid)
    try:
        stat = read_stat(directory + "/stat")
    except (OSError, ValueError, IndexError):
        return None
    return ProcessInfo(proc_root, pid, stat, directory)


def numbered_entries(directory: str) -> list[tuple[int, int]]:
    """(id, inode number) of the numeric entries of /proc or of a /proc/PID/task, sorted,
    from the listing alone (the number is the directory entry's). The kernel flushes
    /proc/PID and /proc/PID/task/TID when that process or thread is reaped, so a later one
    with the same id shows with another number: the same number is the same process or
    thread, though a process may have exec'ed since. A number may also change for the same
    one (its entry evicted from memory): a needless read, nothing lost."""
    with os.scandir(directory) as entries:
        found = [(int(entry.name), entry.inode()) for entry in entries if entry.name.isdigit()]
    found.sort()
    return found


@dataclass(frozen=True)
class ThreadInfo:
    """One thread of a process: its id, thread start time, name and state letter."""

    tid: int
    start_time: int
    comm: str
    state: str = ""


def list_threads(process: ProcessInfo, known: dict[int, tuple[int, ThreadInfo]] | None = None,
                 look_again: Callable[[int], bool] = lambda tid: True) -> list[ThreadInfo]:
    """The threads alive now; threads that exit while listed are left out, and so is a
    leader that exited before the others (a zombie until they do).

    `known` maps a tid to the inode number of its /proc/PID/task/TID and what was read there
    (kept up to date here, for the next call): a thread listed under the same number is the
    same thread and is taken as it was, its stat not read, unless `look_again(tid)` (its
    name, or a state the number cannot show). The leader comes from the process's stat."""
    task_dir = process.path("task")
    if known is None:
        entries = [(tid, -1) for tid in list_pids(task_dir)]
    else:
        entries = numbered_entries(task_dir)
    threads = []
    kept = 0
    for tid, inode in entries:
        entry = known.get(tid) if known is not None else None
        if entry is not None and entry[0] == inode and tid != process.pid and not look_again(tid):
            threads.append(entry[1])
            kept += 1
            continue
        if tid == process.pid and known is not None:
            stat = StatLine(process.comm, process.state, process.start_time)
        else:
            try:
                stat = read_stat(f"{task_dir}/{tid}/stat")
            except (OSError, ValueError, IndexError):
                continue
        if stat.state in ("Z", "X"):
            continue
        thread = ThreadInfo(tid, stat.start_time, stat.comm, stat.state)
        threads.append(thread)
        if known is not None:
            known[tid] = (inode, thread)
            kept += 1
    if known is not None and len(known) > kept:  # forget threads gone (or zombies now)
        alive = {thread.tid for thread in threads}
        for tid in [tid for tid in known if tid not in alive]:
            del known[tid]
    return threads


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps with a file behind it."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def map_files_name(self) -> str:
        """The entry name of this mapping under /proc/PID/map_files."""
        return f"{self.start:x}-{self.end:x}"


def parse_maps(text: str) -> list[Mapping]:
    """File-backed mappings (anonymous and pseudo ones like [heap] are left out)."""
    mappings = []
    for line in text.split("\n"):  # not splitlines(): a file name may hold U+2028, \x1c, ...
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        start, _, end = fields[0].partition("-")
        mappings.append(Mapping(int(start, 16), int(end, 16), fields[1], int(fields[2], 16),
                                int(fields[4]), fields[5]))
    return mappings


def code_objects(mappings: list[Mapping]) -> list[Mapping]:
    """A process's code objects: the first mapping (offset 0) of each file it maps with code
    in it (a loaded ELF object, not a data file such as a locale archive), in address
    order."""
    with_code = {(m.inode, m.path) for m in mappings if "x" in m.perms}
    firsts: dict[tuple[int, str], Mapping] = {}
    for mapping in mappings:
        if mapping.offset == 0 and (mapping.inode, mapping.path) in with_code:
            firsts.setdefault((mapping.inode, mapping.path), mapping)
    return list(firsts.values())


def code_objects_digest(mappings: list[Mapping]) -> int:
    """A digest of a process's code objects (`code_objects`): it changes when a module is
    loaded or unloaded. Only comparable within one run."""
    return hash(frozenset((m.inode, m.path) for m in code_objects(mappings)))


AT_RANDOM = 25  # auxv entry: address of 16 random bytes the kernel writes at each execve
_AUXV_ENTRY = struct.Struct("<QQ")


def at_random_address(process: ProcessInfo) -> int | None:
    """Where the current image's AT_RANDOM bytes are, from /proc/PID/auxv; None when the
    auxv has none. Raises OSError when unreadable."""
    data = read_file(process.path("auxv"))
    for kind, value in _AUXV_ENTRY.iter_unpack(data[:len(data) - len(data) % 16]):
        if kind == AT_RANDOM:
            return value
    return None


def read_maps(process: ProcessInfo) -> list[Mapping]:
    """The process's file-backed mappings; raises OSError when unreadable."""
    return parse_maps(read_maps_text(process))


def read_maps_text(process: ProcessInfo) -> str:
    """The process's /proc/PID/maps as text; raises OSError when unreadable."""
    return read_maps_bytes(process).decode("utf-8", "replace")


def read_maps_bytes(process: ProcessInfo) -> bytes:
    """The process's /proc/PID/maps as read, with raw os calls; raises OSError when
    unreadable. A read may end short of the buffer before the end (seq_file stops at a
    line), so it reads until end of file."""
    fd = os.open(process.path("maps"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, _MAPS_CHUNK):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


_MAPS_CHUNK = 64 * 1024  # most processes' maps in one read
