"""Label values a target controls (exe, comm, unit, user) through the aggregate and the
collector into both exposition formats, checked by promtool and the OpenMetrics parser; a
sample that cannot be rendered is dropped, logged and counted instead of emptying the scrape."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from ctprofd.export.aggregate import Aggregator
from ctprofd.export.collector import DaemonCollector, DaemonState
from ctprofd.config import settings
from ctprofd.export.labels import LABEL_NAMES, label_value, label_values, username
from ctprofd.export.render import OPENMETRICS, TEXT, CollectError, Exposition
from ctprofd.procfs.processes import parse_maps, unit_from_cgroup
from ctprofd.report.snapshot import ProcessSample, Snapshot, ThreadSample
from ctprofd.report.summary import ProbeSummary

NASTY = {
    "invalid bytes": os.fsdecode(b"/opt/a\xff\xfe\xc3(b"),  # as os.readlink returns them
    "lone surrogate": "x\ud800y",
    "newline": "two\nlines\r\n",
    "quotes and backslash": 'say "hi" \\ \\n',
    "unicode separators": "a\u2028b\x85c\x1cd",
}


@pytest.mark.parametrize("value", NASTY.values(), ids=NASTY.keys())
def test_label_value_is_valid_utf8_and_keeps_what_was_valid(value):
    cleaned = label_value(value)
    cleaned.encode("utf-8")  # never raises
    assert cleaned.replace("\ufffd", "") == "".join(
        c for c in value if not 0xD800 <= ord(c) <= 0xDFFF)


def test_invalid_bytes_become_one_replacement_each():
    assert label_value(os.fsdecode(b"a\xffb")) == "a\ufffdb"
    assert label_value("plain") == "plain"


def sample(pid: int, value: str) -> ProcessSample:
    return ProcessSample(pid=pid, start_time=pid, comm=value, exe=value, build_id=None, uid=pid,
                         unit=value, threads=(ThreadSample(pid, value, 100 + pid, 40),))


def lint(text: bytes) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_label_of_hostile_processes_renders_lint_clean():
    users = {pid: value for pid, value in enumerate(NASTY.values(), start=1)}
    aggregator = Aggregator(("pid", "comm", "unit", "exe", "user"), 100, 300,
                            user_of=users.__getitem__)
    snapshot = Snapshot(1.0, 0.01, ProbeSummary(5, 5, 5, 0),
                        processes=tuple(sample(pid, value) for pid, value in users.items()))
    collector = DaemonCollector()
    collector.publish(DaemonState(snapshot=snapshot,
                                  aggregate=aggregator.update(snapshot, lambda *_: True)))
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry)
    lint(text)
    for pid, value in users.items():
        labels = {name: label_value(value) for name in ("comm", "unit", "exe", "user")}
        assert registry.get_sample_value("ctprofd_allocated_bytes_total",
                                         {"pid": str(pid), **labels}) == 100 + pid
    families = {f.name: f for f in text_string_to_metric_families(
        generate_openmetrics(registry).decode())}
    exes = {s.labels["exe"] for s in families["ctprofd_allocated_bytes"].samples}
    assert exes == {label_value(v) for v in NASTY.values()}


def test_state_file_keys_are_cleaned_on_restore():
    aggregator = Aggregator(("comm",), 10, 300)
    assert aggregator.restore({"version": 1, "labels": ["comm"], "series": [
        [["bad\udcff"], 5, 1, 0.0]], "processes": []}, same_boot=True)
    view = aggregator.update(Snapshot(1.0, 0.0, ProbeSummary()), lambda *_: True)
    assert [s.labels for s in view.series] == [("bad\ufffd",)]


def test_cgroup_and_maps_lines_end_only_at_newline():
    # splitlines() would also end a line at U+2028, U+0085 and \x1c-\x1e
    crafted = "0::/evil\u20280::/chosen.service\u2028/real.scope\n"
    assert unit_from_cgroup(crafted) == "real.scope"
    name = "/tmp/lib\x1cfake\u2028x.so"
    [mapping] = parse_maps(f"7f00-7f10 r--p 00000000 fe:00 42   {name}\n")
    assert mapping.path == name


class Broken:
    """A collector whose one series carries a label value no encoder can render."""

    def collect(self):
        family = GaugeMetricFamily("test_values", "Values.", labels=["name"])
        family.add_metric(["good"], 1)
        family.add_metric(["bad\udcff"], 2)
        family.add_metric(["also good"], 3)
        yield family
        yield GaugeMetricFamily("test_other", "Another family.", value=4)


@pytest.mark.parametrize("fmt", [TEXT, OPENMETRICS])
def test_a_sample_that_cannot_render_is_dropped_logged_and_counted(fmt, caplog):
    registry = CollectorRegistry()
    registry.register(Broken())
    exposition = Exposition(registry, CollectorRegistry(), lambda: None)
    encoder = {TEXT: generate_latest, OPENMETRICS: generate_openmetrics}[fmt]
    with pytest.raises(UnicodeEncodeError):
        encoder(registry)  # what the scrape did before: nothing at all
    with caplog.at_level(logging.ERROR, "ctprofd.export.render"):
        text = b"".join(exposition.body(fmt, False))
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "without 1 sample(s)" in caplog.records[0].getMessage()
    decoded = text.decode()
    assert 'test_values{name="good"} 1.0' in decoded
    assert 'test_values{name="also good"} 3.0' in decoded and "test_other 4.0" in decoded
    assert "ctprofd_render_failures_total 1.0" in decoded
    assert "ctprofd_render_dropped_samples_total 1.0" in decoded
    if fmt is TEXT:
        lint(text)
    else:
        assert text.endswith(b"# EOF\n") and text.count(b"# EOF") == 1


class Raising:
    def collect(self):
        raise RuntimeError("a bug")
        yield


def test_a_collector_that_raises_is_a_logged_counted_error(caplog):
    registry = CollectorRegistry()
    registry.register(Raising())
    exposition = Exposition(registry, CollectorRegistry(), lambda: None)
    with caplog.at_level(logging.ERROR, "ctprofd.export.render"), pytest.raises(CollectError):
        exposition.body(TEXT, False)
    assert [r.getMessage() for r in caplog.records] == [
        "collecting the metrics failed: RuntimeError: a bug"]
    assert exposition.renderer.failures == 1


def test_every_label_dimension_is_read_from_a_process_and_can_be_configured():
    """LABELS is the one place a dimension is defined: the configuration accepts exactly its
    names and the aggregate reads each from a process (comm: the name its series keeps)."""
    process = ProcessSample(pid=7, start_time=1, comm="renamed", exe="/opt/x", build_id=None,
                            uid=0, unit="x.service", threads=(), container_id="c" * 64,
                            pod_uid="p")
    assert dict(zip(LABEL_NAMES, label_values(LABEL_NAMES, process, "first", username))) == {
        "pid": "7", "comm": "first", "unit": "x.service", "exe": "/opt/x", "user": "root",
        "container_id": "c" * 64, "pod_uid": "p"}
    assert settings.parse(f"labels: [{', '.join(LABEL_NAMES)}]\n", "t").labels == LABEL_NAMES
    with pytest.raises(settings.ConfigError, match=r"unknown label 'host' \(choose from "
                       + ", ".join(LABEL_NAMES)):
        settings.parse("labels: [pid, host]\n", "t")



def test_container_labels_come_from_the_process_and_are_opt_in():
    """container_id and pod_uid are one LABELS entry each, read from the process; pid is
    not a default label (one series per process, docs/alerting.md: Cardinality)."""
    process = ProcessSample(pid=7, start_time=7, comm="api", exe="/api", build_id=None, uid=0,
                            unit="cri-containerd-x.scope", threads=(),
                            container_id="ab" * 32, pod_uid="6a1f93f0-5b1e-4c2a-9f57-1c2b1d2e3f40")
    assert label_values(("container_id", "pod_uid"), process, "api") == (
        "ab" * 32, "6a1f93f0-5b1e-4c2a-9f57-1c2b1d2e3f40")
    assert {"container_id", "pod_uid", "pid"} <= set(LABEL_NAMES)
    assert settings.Config().labels == ("comm", "unit")
