"""State across snapshots: per-series byte counters that never go backwards, live bytes,
process and thread counts, a series cap, and a JSON form to survive daemon restarts.

A process is (pid, start time). Each one credits its series with its own counters since its
start; when it exits, its last counters are folded into the series so memory stays bounded by
the processes alive now. A process that is alive but missing from a snapshot (a transient
failure, or deselected) keeps its credit without being counted twice when it comes back.

The `comm` label is the name a process had when first seen (or at its last exec): a process
renaming itself stays in its series, and its current name is reported beside it
(`AggregateView.renamed`), so renames cannot mint series.

Under the cap, series with live processes come first, the longest-running first (then the
larger), and series whose processes all exited fill what is left, the most recent first: a
flood of short-lived processes cannot keep a service that started later out. Within each,
each user (the uid of a series' longest-running process) gets an equal share: the series are
taken in rounds, each user's best remaining one per round, so one user holding many series
cannot push out another user's service however long it has run. The internal
table holds at most TABLE_FACTOR x max_series series; beyond that, series whose processes all
exited are forgotten, the least recently active first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection

from ..report.snapshot import ARENA, AllocatorHealth, ProcessSample, Snapshot
from .labels import UserOf, label_value, label_values, username

SeriesKey = tuple[str, ...]
STATE_VERSION = 1
TABLE_FACTOR = 2
DROPPED_LIVE = "live"      # a series with live processes, outranked by older ones
DROPPED_EXITED = "exited"  # a series whose processes all exited, outranked by live ones


@dataclass(frozen=True)
class SeriesValues:
    """One exported series."""

    labels: SeriesKey
    allocated_bytes: int
    deallocated_bytes: int
    live_bytes: int
    processes: int
    threads: int
    arena_processes: int = 0  # of `processes`, those whose totals came from arena statistics
    # the allocator figures summed over its live processes; None unless every one has them
    allocator: AllocatorHealth | None = None


@dataclass(frozen=True)
class AggregateView:
    """An immutable rendering of the aggregate after one snapshot."""

    label_names: tuple[str, ...] = ()
    series: tuple[SeriesValues, ...] = ()
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> series not exported
    evicted: int = 0  # series forgotten since start because the table was full
    renamed: tuple[tuple[SeriesKey, int, str], ...] = ()  # (series, pid, current comm)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass
class _Process:
    """A tracked process: its series, last counters, and the part of them (`base_*`)
    already credited to an earlier series it belonged to."""

    series: SeriesKey
    allocated: int
    deallocated: int
    base_allocated: int = 0
    base_deallocated: int = 0
    comm: str | None = None  # when first seen or at the last exec: the comm label
    uid: int = -1  # its owner: the series' share of the cap is its user's


@dataclass
class _Series:
    folded_allocated: int = 0
    folded_deallocated: int = 0
    last_active: float = 0.0
    uid: int = -1  # the owner of its longest-running process when last live


class Aggregator:
    """Folds snapshots into series. Used by one thread; `update` returns immutable views."""

    def __init__(self, labels: tuple[str, ...], max_series: int, retention: float,
                 user_of: UserOf = username) -> None:
        self.labels = labels
        self.max_series = max_series
        self.retention = retention
        self._user_of = user_of
        self._processes: dict[tuple[int, int], _Process] = {}
        self._series: dict[SeriesKey, _Series] = {}
        self.evicted = 0

    def series_key(self, process: ProcessSample, comm: str | None = None) -> SeriesKey:
        """The label values of a process; `comm` overrides its current name."""
        return label_values(self.labels, process, process.comm if comm is None else comm,
                            self._user_of)

    def update(self, snapshot: Snapshot, alive: Callable[[int, int], bool]) -> AggregateView:
        """Take in one snapshot. `alive(pid, start_time)` tells whether a process missing
        from it still runs; only processes that do not are folded away. A process the
        selection now leaves out (after a reload) is forgotten instead, as a label change
        forgets every one: its series drops its counts (a counter reset), and goes at once
        when nothing else is counted in it. Selected again, it counts from its counters."""
        now = snapshot.timestamp
        live: dict[SeriesKey, list[int]] = {}
        health: dict[SeriesKey, AllocatorHealth | None] = {}
        renamed = []
        for sample in snapshot.processes:
            comm = self._label_comm(sample)
            key = self.series_key(sample, comm)
            self._track(sample, key, comm)
            if comm != sample.comm and "comm" in self.labels:
                renamed.append((key, sample.pid, label_value(sample.comm)))
            counts = live.setdefault(key, [0, 0, 0, 0])
            counts[0] += sample.allocated_bytes - sample.deallocated_bytes
            counts[1] += 1
            counts[2] += len(sample.threads)
            counts[3] += sample.totals_source == ARENA
            health[key] = (sample.allocator if counts[1] == 1
                           else _sum(health[key], sample.allocator))
        present = {sample.key for sample in snapshot.processes}
        left_out = set(snapshot.unselected)
        forgotten = set()
        for ident in [i for i in self._processes if i not in present]:
            if ident in left_out:
                forgotten.add(self._processes.pop(ident).series)
            elif not alive(*ident):
                self._fold(self._processes.pop(ident))
        if forgotten:  # only in the snapshot after a reload
            held = {process.series for process in self._processes.values()}
            for key in forgotten - held:
                series = self._series.get(key)
                if series is not None and not (series.folded_allocated
                                               or series.folded_deallocated):
                    del self._series[key]
        for process in self._processes.values():
            self._series.setdefault(process.series, _Series()).last_active = now
        for key in [k for k, s in self._series.items() if s.last_active + self.retention < now]:
            del self._series[key]
        self._bound_table()
        return self._view(live, health, tuple(renamed))

    def _label_comm(self, sample: ProcessSample) -> str:
        """The name for the comm label: the first seen, or the current one after an exec."""
        process = self._processes.get(sample.key)
        if process is None or process.comm is None or _restarted(process, sample):
            return sample.comm
        return process.comm

    def _bound_table(self) -> None:
        """Forget series whose processes all exited, least recently active first, while the
        table holds more than TABLE_FACTOR x max_series."""
        excess = len(self._series) - TABLE_FACTOR * self.max_series
        if excess <= 0:
            return
        held = {process.series for process in self._processes.values()}
        exited = sorted((k for k in self._series if k not in held),
                        key=lambda k: self._series[k].last_active)
        for key in exited[:excess]:
            del self._series[key]
            self.evicted += 1

    def _track(self, sample: ProcessSample, key: SeriesKey, comm: str) -> None:
        allocated, deallocated = sample.allocated_bytes, sample.deallocated_bytes
        process = self._processes.get(sample.key)
        if process is None:
            self._processes[sample.key] = _Process(key, allocated, deallocated, comm=comm,
                                                   uid=sample.uid)
            return
        process.comm, process.uid = comm, sample.uid
        if _restarted(process, sample):
            # Counters restarted under the same identity: a new image after execve.
            self._fold(process)
            process.base_allocated = process.base_deallocated = 0
        elif key != process.series:
            # Moved (another unit, say): what was counted so far stays with the old series.
            self._fold(process)
            process.base_allocated, process.base_deallocated = (process.allocated,
                                                                process.deallocated)
        process.series, process.allocated, process.deallocated = key, allocated, deallocated

    def _fold(self, process: _Process) -> None:
        series = self._series.setdefault(process.series, _Series())
        series.folded_allocated += process.allocated - process.base_allocated
        series.folded_deallocated += process.deallocated - process.base_deallocated

    def _view(self, live: dict[SeriesKey, list[int]],
              health: dict[SeriesKey, AllocatorHealth | None],
              renamed: tuple[tuple[SeriesKey, int, str], ...]) -> AggregateView:
        totals = {key: [s.folded_allocated, s.folded_deallocated]
                  for key, s in self._series.items()}
        started: dict[SeriesKey, int] = {}  # the earliest start time of a live process
        for (_, start), process in self._processes.items():
            total = totals[process.series]
            total[0] += process.allocated - process.base_allocated
            total[1] += process.deallocated - process.base_deallocated
            if start < started.get(process.series, start + 1):
                started[process.series] = start
                self._series[process.series].uid = process.uid

        def rank(key: SeriesKey) -> tuple:
            if key in started:  # live: the longest-running first, then the larger
                return (0, started[key], -totals[key][0])
            return (1, -self._series[key].last_active, -totals[key][0])

        ordered = sorted(totals, key=rank)
        exported = set(_fair_share(ordered, lambda key: self._series[key].uid, started,
                                   self.max_series))
        kept = [key for key in ordered if key in exported]
        left_out = [key for key in ordered if key not in exported]
        series = tuple(SeriesValues(key, *totals[key], *live.get(key, (0, 0, 0, 0)),
                                    allocator=health.get(key))
                       for key in kept)
        dropped = {DROPPED_LIVE: sum(1 for k in left_out if k in started)}
        dropped[DROPPED_EXITED] = len(left_out) - dropped[DROPPED_LIVE]
        return AggregateView(self.labels, series, dropped, self.evicted,
                             tuple(r for r in renamed if r[0] in exported))

    def to_state(self) -> dict[str, Any]:
        """A JSON-able form of everything needed to continue the counters later."""
        return {"version": STATE_VERSION, "labels": list(self.labels),
                "series": [[list(k), s.folded_allocated, s.folded_deallocated, s.last_active,
                            s.uid] for k, s in self._series.items()],
                "processes": [[pid, start, list(p.series), p.allocated, p.deallocated,
                               p.base_allocated, p.base_deallocated]
                              for (pid, start), p in self._processes.items()]}

    def restore(self, state: dict[str, Any], same_boot: bool) -> bool:
        """Continue from `to_state` output; False (nothing restored) when it was made with
        other labels or another format. From another boot, every process there has exited."""
        if state.get("version") != STATE_VERSION or tuple(state.get("labels", ())) != self.labels:
            return False
        # a series saved before owners were (4 fields) is nobody's until it is live again
        self._series = {_key(k): _Series(a, d, t, *(int(u) for u in owner[:1]))
                        for k, a, d, t, *owner in state["series"]}
        comm = self.labels.index("comm") if "comm" in self.labels else None
        self._processes = {(pid, start): _Process(_key(k), a, d, ba, bd,
                                                  None if comm is None else _key(k)[comm])
                           for pid, start, k, a, d, ba, bd in state["processes"]}
        if not same_boot:
            for ident in list(self._processes):
                self._fold(self._processes.pop(ident))
        return True


def _fair_share(ordered: list[SeriesKey], owner: Callable[[SeriesKey], int],
                live: Collection[SeriesKey], cap: int) -> list[SeriesKey]:
    """At most `cap` of the series `ordered` (best first): the live ones before those whose
    processes all exited, and among each, in rounds: every owner's best series not taken
    yet, best first (an owner with fewer series than its share leaves the rest to the
    others). A series' round is its place among its owner's, and the sort is stable."""
    depth: dict[SeriesKey, int] = {}
    held: dict[int, int] = {}
    for key in ordered:
        uid = owner(key)
        depth[key] = held.get(uid, 0)
        held[uid] = depth[key] + 1
    return sorted(ordered, key=lambda key: (key not in live, depth[key]))[:cap]


def _sum(a: AllocatorHealth | None, b: AllocatorHealth | None) -> AllocatorHealth | None:
    """Two processes' allocator figures added; None when either has none (a partial sum
    would pass for the whole series')."""
    if a is None or b is None:
        return None
    return AllocatorHealth(*(getattr(a, f) + getattr(b, f) for f in a.__dataclass_fields__))


def _restarted(process: _Process, sample: ProcessSample) -> bool:
    """Counters below the last read: a new image after execve under the same identity."""
    return (sample.allocated_bytes < process.allocated
            or sample.deallocated_bytes < process.deallocated)


def _key(values: list[str]) -> SeriesKey:
    """A series key from a state file, its values made valid label values."""
    return tuple(label_value(str(v)) for v in values)
