"""The collector over hand-built states: values, absent-when-unknown, histograms, one state per
scrape, describe without rendering, and promtool's lint."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ctprofd import __version__
from ctprofd.export.aggregate import AggregateView, SeriesValues
from ctprofd.export.collector import (SNAPSHOT_DURATION_BUCKETS, THREAD_STOP_BUCKETS,
                                      DaemonCollector, DaemonState, Histogram)
from ctprofd.export.revision import REVISION, source_revision
from ctprofd.report.snapshot import AllocatorHealth, Snapshot
from ctprofd.report.summary import ProbeSummary


def state(summary: ProbeSummary = ProbeSummary(7, 2, 5, 0), failures=None,
          series=(SeriesValues(("10", "redis", "redis.service"), 1000, 400, 600, 1, 3),),
          denied: int = 0, **kwargs) -> DaemonState:
    snapshot = Snapshot(timestamp=1700000000.5, duration_seconds=0.03, summary=summary,
                        failures=failures or {}, denied_tgids=denied)
    view = AggregateView(("pid", "comm", "unit"), series,
                         dropped={"live": kwargs.pop("dropped", 0)})
    return DaemonState(snapshot=snapshot, aggregate=view, **kwargs)


@pytest.fixture
def collector():
    return DaemonCollector()


@pytest.fixture
def registry(collector):
    reg = CollectorRegistry()
    reg.register(collector)
    return reg


def test_before_the_first_snapshot_only_self_metrics(registry):
    assert registry.get_sample_value("ctprofd_build_info", {
        "version": __version__, "revision": REVISION,
        "python_version": platform.python_version()}) == 1
    assert registry.get_sample_value("ctprofd_snapshots_total") == 0
    assert registry.get_sample_value("ctprofd_probe_tgids_walked") is None
    assert registry.get_sample_value("ctprofd_last_snapshot_timestamp_seconds") is None
    assert "ctprofd_allocated_bytes_total{" not in generate_latest(registry).decode()


def test_series_and_probe_values(collector, registry):
    collector.publish(state(snapshots_total=4, overruns_total=1, interval_seconds=15,
                            cache_hits=9, cache_misses=2, cache_entries=2, dropped=5))
    labels = {"pid": "10", "comm": "redis", "unit": "redis.service"}
    get = registry.get_sample_value
    assert get("ctprofd_allocated_bytes_total", labels) == 1000
    assert get("ctprofd_deallocated_bytes_total", labels) == 400
    assert get("ctprofd_live_bytes", labels) == 600
    assert get("ctprofd_processes", labels) == 1
    assert get("ctprofd_threads", labels) == 3
    assert get("ctprofd_series_dropped", {"reason": "live"}) == 5
    assert get("ctprofd_probe_tgids_walked") == 7
    assert get("ctprofd_probe_jemalloc_detected") == 2
    assert get("ctprofd_probe_probed_ok") == 5
    assert get("ctprofd_probe_failed") == 0
    assert get("ctprofd_probe_privilege_dominant") == 0
    assert get("ctprofd_last_snapshot_timestamp_seconds") == 1700000000.5
    assert get("ctprofd_snapshots_total") == 4
    assert get("ctprofd_snapshot_overruns_total") == 1
    assert get("ctprofd_snapshot_interval_seconds") == 15
    assert get("ctprofd_offset_cache_hits_total") == 9
    assert get("ctprofd_offset_cache_misses_total") == 2
    assert get("ctprofd_offset_cache_entries") == 2
    assert "ctprofd_probe_dominant_failure_info{" not in generate_latest(registry).decode()


def test_failures_dominant_tag_and_privilege(collector, registry):
    summary = ProbeSummary(9, 3, 4, 5, "ptrace-seize", True)
    collector.publish(state(summary, {"ptrace-seize": 3, "waitpid": 2,
                                      "jemalloc-not-found": 4}))
    get = registry.get_sample_value
    assert get("ctprofd_probe_dominant_failure_info", {"tag": "ptrace-seize"}) == 1
    assert get("ctprofd_probe_privilege_dominant") == 1
    assert get("ctprofd_probe_failures", {"tag": "ptrace-seize"}) == 3
    assert get("ctprofd_probe_failures", {"tag": "waitpid"}) == 2
    assert get("ctprofd_probe_failures", {"tag": "jemalloc-not-found"}) == 4
    assert get("ctprofd_probe_failures", {"tag": "get-regset"}) is None


def test_denied_tgids(collector, registry):
    collector.publish(state())
    assert registry.get_sample_value("ctprofd_probe_denied_tgids") == 0
    collector.publish(state(ProbeSummary(9, 1, 2, 0), {"readlink-failure": 6}, denied=5))
    assert registry.get_sample_value("ctprofd_probe_denied_tgids") == 5
    assert registry.get_sample_value("ctprofd_probe_failed") == 0


def test_failed_snapshots_counter(collector, registry):
    collector.publish(state(snapshot_failures_total=2))
    assert registry.get_sample_value("ctprofd_snapshot_failures_total") == 2


def test_revision_is_the_checkouts_commit_or_unknown(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert head.startswith(REVISION) and len(REVISION) == 12
    assert source_revision(tmp_path) == "unknown"  # not a checkout


def test_a_stamped_revision_comes_first_and_a_bad_stamp_is_ignored(tmp_path):
    """scripts/build-deb.sh stamps the revision into the package, which has no checkout."""
    stamp = tmp_path / "REVISION"
    stamp.write_text("0123456789ab\n")
    assert source_revision(tmp_path, stamp) == "0123456789ab"
    stamp.write_text("$(reboot)\n")
    assert source_revision(tmp_path, stamp) == "unknown"
    stamp.write_bytes(b"\xff\xfe")
    assert source_revision(tmp_path, stamp) == "unknown"


def test_histograms_are_cumulative(collector, registry):
    stops, durations = Histogram(THREAD_STOP_BUCKETS), Histogram(SNAPSHOT_DURATION_BUCKETS)
    for seconds in (0.00002, 0.00002, 0.0004, 3.0):
        stops.observe(seconds)
    durations.observe(0.2)
    collector.publish(state(thread_stops=stops.freeze(), snapshot_durations=durations.freeze()))
    get = registry.get_sample_value
    assert get("ctprofd_thread_stop_seconds_bucket", {"le": "1e-05"}) == 0
    assert get("ctprofd_thread_stop_seconds_bucket", {"le": "2.5e-05"}) == 2
    assert get("ctprofd_thread_stop_seconds_bucket", {"le": "0.0005"}) == 3
    assert get("ctprofd_thread_stop_seconds_bucket", {"le": "0.1"}) == 3
    assert get("ctprofd_thread_stop_seconds_bucket", {"le": "+Inf"}) == 4
    assert get("ctprofd_thread_stop_seconds_count") == 4
    assert get("ctprofd_thread_stop_seconds_sum") == pytest.approx(3.00044)
    assert get("ctprofd_snapshot_duration_seconds_bucket", {"le": "0.25"}) == 1
    assert get("ctprofd_snapshot_duration_seconds_bucket", {"le": "0.1"}) == 0


def test_snapshot_durations_resolve_1_to_50_ms(collector, registry):
    """A steady-state snapshot takes a few ms to a few tens: the buckets tell them apart."""
    durations = Histogram(SNAPSHOT_DURATION_BUCKETS)
    for seconds in (0.0015, 0.007, 0.011, 0.018, 0.035, 0.045):
        durations.observe(seconds)
    collector.publish(state(snapshot_durations=durations.freeze()))
    bounds = [b for b in SNAPSHOT_DURATION_BUCKETS if 0.001 <= b <= 0.05]
    assert len(bounds) >= 10 and bounds[0] == 0.001 and bounds[-1] == 0.05
    get = registry.get_sample_value
    counts = [get("ctprofd_snapshot_duration_seconds_bucket", {"le": le})
              for le in ("0.001", "0.002", "0.008", "0.0125", "0.02", "0.04", "0.05")]
    assert counts == [0, 1, 2, 3, 4, 5, 6]


def test_one_scrape_renders_one_state(collector):
    collector.publish(state(snapshots_total=1))
    families = collector.collect()
    first = next(families)
    collector.publish(state(snapshots_total=2, series=()))  # published mid-scrape
    rest = {f.name: f for f in families}
    assert first.samples[0].value == 1000
    assert rest["ctprofd_snapshots"].samples[0].value == 1
    assert len(rest["ctprofd_live_bytes"].samples) == 1


def test_describe_names_every_family_without_samples(collector):
    described = list(collector.describe())
    assert all(not f.samples for f in described)
    collector.publish(state(ProbeSummary(1, 1, 0, 1, "waitpid", False), {"waitpid": 1}))
    assert [f.name for f in described] == [f.name for f in collector.collect()]


def test_promtool_lint_is_clean(collector, registry, tmp_path):
    collector.publish(state(ProbeSummary(9, 3, 4, 5, "waitpid", False), {"waitpid": 5}))
    text = generate_latest(registry)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_allocator_gauges_absent_for_a_series_without_them(collector, registry):
    """Each figure of a series that has them, under its ctprofd_allocator_*_bytes name; a
    series whose processes were not all read has none of them, not zeros."""
    health = AllocatorHealth(1000, 1200, 2000, 3000, 500, 100, 700, 50)
    read = SeriesValues(("10", "redis", "redis.service"), 1000, 400, 600, 1, 3, 1, health)
    unread = SeriesValues(("11", "api", "api.service"), 10, 4, 6, 1, 1, 0, None)
    collector.publish(state(series=(read, unread)))
    get = registry.get_sample_value
    for name in ("allocated", "active", "resident", "mapped", "retained", "metadata", "dirty",
                 "muzzy"):
        assert get(f"ctprofd_allocator_{name}_bytes",
                   {"pid": "10", "comm": "redis", "unit": "redis.service"}) == getattr(health, name)
        assert get(f"ctprofd_allocator_{name}_bytes",
                   {"pid": "11", "comm": "api", "unit": "api.service"}) is None
    lines = generate_latest(registry).decode().splitlines()
    allocator = [line for line in lines if line.startswith("ctprofd_allocator_")]
    assert len(allocator) == 8 and not any('comm="api"' in line for line in allocator)
