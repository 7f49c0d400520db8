"""Failure tags: the stable single-word tokens of the probe-summary wire contract."""

PID_MISSING = "pid-missing"
MAPS_READ_FAILURE = "maps-read-failure"
JEMALLOC_IN_DSO = "jemalloc-in-dso"
JEMALLOC_UNREADABLE = "jemalloc-unreadable"
ARCH_MISMATCH = "arch-mismatch"
DWARF_PARSE_FAILURE = "dwarf-parse-failure"
WORKER_PANIC = "worker-panic"

PTRACE_SEIZE = "ptrace-seize"
PTRACE_TRACED = "ptrace-traced"
PTRACE_INTERRUPT = "ptrace-interrupt"
WAITPID = "waitpid"
GET_REGSET = "get-regset"
PROCESS_VM_READV = "process-vm-readv"
TLS_ARITHMETIC = "tls-arithmetic"
ARENA_BUDGET = "arena-budget"

JEMALLOC_NOT_FOUND = "jemalloc-not-found"
READLINK_FAILURE = "readlink-failure"

ATTACH_TAGS = (PID_MISSING, MAPS_READ_FAILURE, JEMALLOC_IN_DSO, JEMALLOC_UNREADABLE, ARCH_MISMATCH,
               DWARF_PARSE_FAILURE, WORKER_PANIC)
PROBE_TAGS = (PTRACE_SEIZE, PTRACE_TRACED, PTRACE_INTERRUPT, WAITPID, GET_REGSET, PROCESS_VM_READV,
              TLS_ARITHMETIC, ARENA_BUDGET)
NOT_ACTIONABLE = frozenset({JEMALLOC_NOT_FOUND, READLINK_FAILURE})
ACTIONABLE = frozenset(ATTACH_TAGS + PROBE_TAGS)
PRIVILEGE = frozenset({PTRACE_SEIZE, PTRACE_INTERRUPT})
ALL_TAGS = ATTACH_TAGS + PROBE_TAGS + tuple(sorted(NOT_ACTIONABLE))


class ProbeError(Exception):
    """A failure to attach to a tgid or to probe a thread, carrying its contract tag.

    The message says what went wrong and where (binary, pid, tid, errno) in one line;
    `errno` is set when a system call's error decided the tag.
    """

    def __init__(self, tag: str, message: str, errno: int | None = None) -> None:
        if tag not in ALL_TAGS:
            raise ValueError(f"unknown failure tag {tag!r}")
        super().__init__(message)
        self.tag = tag
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.tag}: {self.message}"
