"""Renders the latest completed snapshot and the aggregate as Prometheus metrics.

The snapshot thread publishes one immutable DaemonState after each snapshot; `collect()`
reads that reference once, so one scrape always shows one snapshot, and never waits for or
triggers a capture.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from .. import __version__
from ..report.snapshot import Snapshot
from ..report.summary import ProbeSummary
from .aggregate import DROPPED_EXITED, DROPPED_LIVE, AggregateView
from .revision import REVISION

# A steady-state snapshot takes a few to a few tens of ms: 1-50 ms is resolved finely.
SNAPSHOT_DURATION_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02,
                             0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                             10.0, 30.0, 60.0, 120.0)
THREAD_STOP_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01,
                       0.025, 0.05, 0.1)


@dataclass(frozen=True)
class HistogramValues:
    """Frozen histogram: per-bucket (not cumulative) counts, the last one for +Inf."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> HistogramValues:
        return cls(bounds, (0,) * (len(bounds) + 1))


class Histogram:
    """A histogram filled by one thread and frozen for publication."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self._total += value

    def freeze(self) -> HistogramValues:
        return HistogramValues(self.bounds, tuple(self._counts), self._total)


@dataclass(frozen=True)
class DaemonState:
    """Everything one scrape shows; `snapshot` is None until the first one completes."""

    snapshot: Snapshot | None = None
    aggregate: AggregateView = AggregateView()
    snapshots_total: int = 0
    snapshot_failures_total: int = 0
    overruns_total: int = 0
    interval_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_entries: int = 0
    stop_timeouts_total: int = 0
    state_write_failures: dict[str, int] = field(default_factory=dict)  # file -> failed writes
    snapshot_durations: HistogramValues = field(
        default_factory=lambda: HistogramValues.empty(SNAPSHOT_DURATION_BUCKETS))
    thread_stops: HistogramValues = field(
        default_factory=lambda: HistogramValues.empty(THREAD_STOP_BUCKETS))


# jemalloc's own figures (mallctl "stats.<name>" after "epoch"), summed over the series'
# live processes; a series with a process whose arena statistics were not read has none
_EVERY = " Summed over the series' processes; absent unless each one's were read."
ALLOCATOR_FIGURES = (
    ("allocated", "jemalloc's stats.allocated: bytes in regions and large extents handed out, "
                  "thread caches' included." + _EVERY),
    ("active", "jemalloc's stats.active: bytes in pages of active extents (allocated plus "
               "the free regions of partly used slabs)." + _EVERY),
    ("resident", "jemalloc's stats.resident: bytes in pages jemalloc holds that are mapped "
                 "to memory (active and dirty extents, base allocators)." + _EVERY),
    ("mapped", "jemalloc's stats.mapped: bytes in extents jemalloc has mapped, retained "
               "ones excluded." + _EVERY),
    ("retained", "jemalloc's stats.retained: bytes of address space kept (decommitted or "
                 "purged) for reuse instead of unmapped." + _EVERY),
    ("metadata", "jemalloc's stats.metadata: bytes of its own metadata (base allocators and "
                 "internal allocations)." + _EVERY),
    ("dirty", "Bytes in dirty pages (freed, not yet purged by decay): the arenas' pdirty "
              "times the page size." + _EVERY),
    ("muzzy", "Bytes in muzzy pages (purged lazily with MADV_FREE, not yet purged for "
              "good): the arenas' pmuzzy times the page size." + _EVERY),
)

_PROBE_FIELDS = (
    ("tgids_walked", "Processes (/proc entries) seen in the last snapshot, minus ctprofd."),
    ("jemalloc_detected", "Processes whose jemalloc counters could be located in the last "
                          "snapshot."),
    ("probed_ok", "Threads whose counters were read in the last snapshot."),
    ("failed", "Actionable attach or probe failures in the last snapshot."),
)


class DaemonCollector:
    """The prometheus_client collector of `ctprofd run`."""

    def __init__(self, version: str = __version__) -> None:
        self.version = version
        self._state = DaemonState()

    @property
    def state(self) -> DaemonState:
        return self._state

    def publish(self, state: DaemonState) -> None:
        """Replace what scrapes see (one reference assignment: atomic)."""
        self._state = state

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples, so registering never renders or captures."""
        return self._families(DaemonState(snapshot=_EMPTY_SNAPSHOT), describe_only=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._state, describe_only=False)

    def _families(self, state: DaemonState, describe_only: bool) -> Iterator[Metric]:
        yield from self._series(state, describe_only)
        if state.snapshot is not None:
            yield from self._probe(state.snapshot, describe_only)
        yield from self._self(state, describe_only)

    def _series(self, state: DaemonState, describe_only: bool) -> Iterator[Metric]:
        names = list(state.aggregate.label_names)
        families = (
            (CounterMetricFamily("ctprofd_allocated_bytes",
                                 "Bytes allocated through jemalloc by the series' processes, "
                                 "including processes that exited.", labels=names),
             lambda s: s.allocated_bytes),
            (CounterMetricFamily("ctprofd_deallocated_bytes",
                                 "Bytes freed through jemalloc by the series' processes, "
                                 "including processes that exited.", labels=names),
             lambda s: s.deallocated_bytes),
            (GaugeMetricFamily("ctprofd_live_bytes",
                               "Allocated minus freed bytes of the series' processes alive in "
                               "the last snapshot.", labels=names),
             lambda s: s.live_bytes),
            (GaugeMetricFamily("ctprofd_processes", "Processes of the series read in the last "
                               "snapshot.", labels=names), lambda s: s.processes),
            (GaugeMetricFamily("ctprofd_threads", "Threads of the series read in the last "
                               "snapshot.", labels=names), lambda s: s.threads),
            (GaugeMetricFamily("ctprofd_arena_processes", "Processes of the series whose "
                               "totals came from jemalloc's arena statistics in the last "
                               "snapshot (every thread that ever ran); the others are "
                               "per-thread sums.", labels=names), lambda s: s.arena_processes),
        )
        for family, value in families:
            if not describe_only:
                for series in state.aggregate.series:
                    family.add_metric(list(series.labels), value(series))
            yield family
        for name, doc in ALLOCATOR_FIGURES:
            family = GaugeMetricFamily(f"ctprofd_allocator_{name}_bytes", doc, labels=names)
            if not describe_only:
                for series in state.aggregate.series:
                    if series.allocator is not None:  # absent, never 0, when not read
                        family.add_metric(list(series.labels), getattr(series.allocator, name))
            yield family
        view = state.aggregate
        dropped = GaugeMetricFamily(
            "ctprofd_series_dropped", "Series left out of the output by max_series, by reason: "
            "live (outranked by longer-running ones) or exited (all its processes exited).",
            labels=["reason"])
        evicted = CounterMetricFamily(
            "ctprofd_series_evicted", "Series of exited processes forgotten (their counters "
            "with them) because the series table held twice max_series.")
        renamed = InfoMetricFamily(
            "ctprofd_renamed_process", "A live process whose name differs from its series' "
            "comm label (the name when first seen): its current name, with the series labels "
            "and pid.")
        if not describe_only:
            for reason in (DROPPED_LIVE, DROPPED_EXITED):
                dropped.add_metric([reason], view.dropped.get(reason, 0))
            evicted.add_metric([], view.evicted)
            for labels, pid, current in view.renamed:
                renamed.add_metric([], dict(zip(names, labels), pid=str(pid),
                                            current_comm=current))
        yield from (dropped, evicted, renamed)

    def _probe(self, snapshot: Snapshot, describe_only: bool) -> Iterator[Metric]:
        summary = snapshot.summary
        for name, doc in _PROBE_FIELDS:
            yield _gauge(f"ctprofd_probe_{name}", doc,
                         None if describe_only else getattr(summary, name))
        yield _gauge("ctprofd_probe_privilege_dominant",
                     "1 when ptrace-seize and ptrace-interrupt make up at least half of the "
                     "failures of the last snapshot: grant CAP_SYS_PTRACE.",
                     None if describe_only else int(summary.privilege_dominant))
        yield _gauge("ctprofd_probe_denied_tgids",
                     "Processes of the last snapshot whose /proc/PID/exe was refused (EACCES "
                     "or EPERM; kernel threads and exits are not counted): ctprofd cannot "
                     "see them, and they are not in `failed`. Grant CAP_SYS_PTRACE.",
                     None if describe_only else snapshot.denied_tgids)
        yield _gauge("ctprofd_probe_left_out_threads",
                     "Threads of the last snapshot not read because their stop did not come "
                     "in time, they are backed off after missing it, or the snapshot's stop "
                     "wait (0.5 s) was spent: each is tried at a later snapshot.",
                     None if describe_only else snapshot.left_out_threads)
        yield _gauge("ctprofd_probe_pending",
                     "Processes of the last snapshot whose binary was still being resolved "
                     "(parsed beside the snapshots): not read yet, and not in `failed`.",
                     None if describe_only else snapshot.pending)
        dominant = InfoMetricFamily("ctprofd_probe_dominant_failure",
                                    "The most frequent actionable failure tag of the last "
                                    "snapshot; absent without failures.")
        if not describe_only and summary.dominant_failure:
            dominant.add_metric([], {"tag": summary.dominant_failure})
        yield dominant
        failures = GaugeMetricFamily("ctprofd_probe_failures",
                                     "Failures of the last snapshot by tag, actionable or not.",
                                     labels=["tag"])
        if not describe_only:
            for tag, count in sorted(snapshot.failures.items()):
                failures.add_metric([tag], count)
        yield failures
        yield _gauge("ctprofd_last_snapshot_timestamp_seconds",
                     "Unix time of the last completed snapshot.",
                     None if describe_only else snapshot.timestamp)

    def _self(self, state: DaemonState, describe_only: bool) -> Iterator[Metric]:
        yield _histogram("ctprofd_snapshot_duration_seconds", "Time taken by each snapshot.",
                         state.snapshot_durations, describe_only)
        yield _histogram("ctprofd_thread_stop_seconds",
                         "Time each target thread was stopped to read its thread pointer.",
                         state.thread_stops, describe_only)
        counters = (
            ("ctprofd_snapshots", "Snapshots completed.", state.snapshots_total),
            ("ctprofd_snapshot_failures", "Snapshots that failed with an unexpected error "
             "(logged with its traceback); the exported data stays at the last completed one.",
             state.snapshot_failures_total),
            ("ctprofd_snapshot_overruns", "Scheduled snapshots skipped because the previous "
             "one was still running.", state.overruns_total),
            ("ctprofd_thread_stop_timeouts", "Target threads that did not stop within their "
             "wait (a vfork wait, an uninterruptible sleep): left out of that snapshot, tried "
             "again after 1, 2, 4 ... 64 snapshots.", state.stop_timeouts_total),
            ("ctprofd_offset_cache_hits", "Layout lookups answered by the offset cache.",
             state.cache_hits),
            ("ctprofd_offset_cache_misses", "Layout lookups that had to read DWARF.",
             state.cache_misses),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc)
            if not describe_only:
                family.add_metric([], value)
            yield family
        family = CounterMetricFamily(
            "ctprofd_state_write_failures", "Writes of a state file (in state_dir) that failed, "
            "e.g. a full disk even after using the space set aside for it; tried again every "
            "snapshot. While aggregate.json fails, the series shown stay at those last written.",
            labels=["file"])
        if not describe_only:
            for name, failures in sorted(state.state_write_failures.items()):
                family.add_metric([name], failures)
        yield family
        yield _gauge("ctprofd_offset_cache_entries", "Layouts held in the offset cache.",
                     None if describe_only else state.cache_entries)
        yield _gauge("ctprofd_snapshot_interval_seconds", "Configured time between snapshots.",
                     None if describe_only else state.interval_seconds)
        build = InfoMetricFamily("ctprofd_build", "ctprofd's version, source revision and "
                                 "Python version.")
        if not describe_only:
            build.add_metric([], {"version": self.version, "revision": REVISION,
                                  "python_version": platform.python_version()})
        yield build


_EMPTY_SNAPSHOT = Snapshot(timestamp=0.0, duration_seconds=0.0, summary=ProbeSummary())


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], value)
    return family


def _histogram(name: str, doc: str, values: HistogramValues,
               describe_only: bool) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    if describe_only:
        return family
    buckets, cumulative = [], 0
    for bound, count in zip(values.bounds + (float("inf"),), values.counts):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric([], buckets, values.total)
    return family
