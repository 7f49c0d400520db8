"""The result of one probe pass: per-process and per-thread counters plus the summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from .summary import PidFailure, ProbeSummary

ARENA, THREADS = "arena", "threads"  # where a process's totals came from (totals_source)


@dataclass(frozen=True)
class ThreadSample:
    """One thread's cumulative counters as read in this snapshot."""

    tid: int
    comm: str
    allocated_bytes: int
    deallocated_bytes: int

    def to_dict(self) -> dict:
        return {"tid": self.tid, "comm": self.comm, "allocated_bytes": self.allocated_bytes,
                "deallocated_bytes": self.deallocated_bytes}


@dataclass(frozen=True)
class AllocatorHealth:
    """A process's allocator figures, in bytes, as jemalloc's own mallctl gives them after
    `epoch` (ctl_refresh over every arena): stats.allocated, stats.active, stats.resident,
    stats.mapped, stats.retained, stats.metadata, and the dirty and muzzy pages not purged
    yet (Σ stats.arenas.<i>.pdirty and pmuzzy, times the page size)."""

    allocated: int
    active: int
    resident: int
    mapped: int
    retained: int
    metadata: int
    dirty: int
    muzzy: int

    def to_dict(self) -> dict:
        return {f"{name}_bytes": getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class ProcessSample:
    """One jemalloc process. Its byte totals are the sum over the threads read now plus
    `retained_*`: what the process counted beyond them (threads that exited or were not
    read, frees after a thread's last read), from its arena statistics when
    `totals_source` is "arena", else the last-read values of its threads that exited or
    could not be read this time ("threads"). They never go backwards while it lives."""

    pid: int
    start_time: int
    comm: str
    exe: str
    build_id: str | None
    uid: int
    unit: str
    threads: tuple[ThreadSample, ...]
    retained_allocated_bytes: int = 0
    retained_deallocated_bytes: int = 0
    totals_source: str = THREADS
    totals_reason: str = ""  # with "threads": why the arena statistics were not used
    container_id: str = ""  # from the cgroup path (procfs/containers.py), '' outside one
    pod_uid: str = ""
    allocator: AllocatorHealth | None = None  # from the arena statistics; None: not read

    @property
    def allocated_bytes(self) -> int:
        return self.retained_allocated_bytes + sum(t.allocated_bytes for t in self.threads)

    @property
    def deallocated_bytes(self) -> int:
        return self.retained_deallocated_bytes + sum(t.deallocated_bytes for t in self.threads)

    @property
    def key(self) -> tuple[int, int]:
        """Process identity: a reused pid has another start time."""
        return (self.pid, self.start_time)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "exe": self.exe, "build_id": self.build_id,
                "start_time": self.start_time, "uid": self.uid, "unit": self.unit,
                "container_id": self.container_id, "pod_uid": self.pod_uid,
                "allocated_bytes": self.allocated_bytes,
                "deallocated_bytes": self.deallocated_bytes,
                "totals_source": self.totals_source,
                "totals_reason": self.totals_reason or None,
                "allocator": self.allocator.to_dict() if self.allocator else None,
                "threads": [t.to_dict() for t in self.threads]}


@dataclass(frozen=True)
class Snapshot:
    """One completed probe pass."""

    timestamp: float
    duration_seconds: float
    summary: ProbeSummary
    failures: dict[str, int] = field(default_factory=dict)
    processes: tuple[ProcessSample, ...] = ()
    traced_by: dict[int, int] = field(default_factory=dict)  # pid -> the other tracer's pid
    tracer_names: dict[int, str] = field(default_factory=dict)  # that tracer's pid -> comm
    failed_pids: tuple[PidFailure, ...] = ()  # each tgid with actionable failures, by pid
    denied_tgids: int = 0  # tgids whose /proc/PID/exe was refused: ctprofd cannot see them
    pending: int = 0  # tgids whose binary is still being resolved: not read yet, not failed
    left_out_threads: int = 0  # threads whose stop did not come, or was not waited for
    # (pid, start time) of the live processes a changed selection leaves out (first pass after)
    unselected: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict:
        """The `ctprofd snapshot --json` form (a contract)."""
        return {"timestamp": self.timestamp,
                "duration_seconds": self.duration_seconds,
                "probe_summary": self.summary.to_dict(),
                "failures": dict(sorted(self.failures.items())),
                "traced_by": {str(pid): tracer for pid, tracer in sorted(self.traced_by.items())},
                "denied_tgids": self.denied_tgids, "pending": self.pending,
                "left_out_threads": self.left_out_threads,
                "failed_pids": [f.to_dict() for f in self.failed_pids],
                "processes": [p.to_dict() for p in self.processes]}
