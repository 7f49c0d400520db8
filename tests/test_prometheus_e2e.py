"""A real Prometheus scraping real `ctprofd run` daemons that read real jemalloc fixtures,
with the shipped rules loaded, checked through Prometheus's HTTP API.

One stack per module (tests/support/prometheus.py starts the processes):

    daemon          labels                 reads (alloc_threads variants, workers)
    per-pid         pid, comm, unit        static (3), dynamic (2)
    no-pid          comm, unit             static-stripped-debuglink (2),
                                           dynamic-stripped-debuglink (1)
    no-ptrace       default                static-stripped-buildid (2), started with
                                           DROP_PTRACE_PREFIX; the daemon runs under setpriv
                                           with real uid 65534 and no CAP_SYS_PTRACE
    no-ptrace-dso   default                the same with dynamic-stripped-buildid (1): jemalloc
                                           in a shared object

Every daemon selects its fixtures by executable path (this session's build directory), so
other processes on the host, including other test sessions' fixtures, never show up. The
fixtures are disjoint because two daemons stopping the same thread at once would make one of
them fail with ptrace-seize. One Prometheus scrapes all four every second as job "ctprofd"
(what the rules assume), with a target label `daemon` naming each, and evaluates
packaging/prometheus/ctprofd-rules.yml every second.

Checked: the series equal the fixtures' own mallctl counters exactly (per pid and summed
without pid, and through the recording rules); every rule expression and every dashboard
query (support.promql, with Grafana's variables for a 1 s scrape interval) evaluates without
error and returns data unless listed in the allow-lists below; the rule groups evaluate
without errors; the dashboard's variables list the right values; CtprofdPtracePrivilege goes
pending for the daemon without CAP_SYS_PTRACE only; promtool accepts the daemons' real
scrapes with series and with probe failures in them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ctprofd.procfs.processes import unit_from_cgroup
from ctprofd.report.summary import REMEDIATION_HINT
from support.procs import DROP_PTRACE_PREFIX, Fixture, assert_no_thread_stopped_or_traced
from support.prometheus import Daemon, Prometheus, poll
from support.promql import (RULES, dashboard_exprs, dashboard_variable_queries,
                            grafana_alert_exprs, load_rules, rule_exprs)

# The daemon of the Yama-like case: root's effective uid (so it can read /proc/PID/maps and
# write its state) but another real uid and no CAP_SYS_PTRACE, so PTRACE_SEIZE is refused.
UNPRIVILEGED_PREFIX = ("setpriv", "--ruid=65534", "--bounding-set=-sys_ptrace",
                       "--inh-caps=-sys_ptrace", "--")

# Grafana's built-in variables for a 1 s scrape interval. $__rate_interval would be 4 s
# (4 x scrape interval); 10 s keeps several samples in every window under load.
GRAFANA_VARIABLES = {"__rate_interval": "10s", "__interval": "1s", "__interval_ms": "1000",
                     "__range": "5m", "__range_s": "300", "__range_ms": "300000"}

STARTUP_TIMEOUT = 45.0  # daemons and Prometheus up, first snapshots, first samples
QUERY_TIMEOUT = 20.0  # for a query that must return data, after the stack is up

# Queries that may return nothing here, each with the reason. Every other query must
# return data. Those also in MUST_BE_EMPTY are asserted to return nothing.
RULES_MAY_BE_EMPTY = {
    "CtprofdMemoryLeakSuspected": "compares recorded hourly floors with those 1 h and 2 h "
                                  "ago; a fresh TSDB has nothing that old",
    "CtprofdDown": "every target is up and scraped",
    "CtprofdStale": "every daemon completes a snapshot each second, never 3 intervals old",
    "CtprofdProbeFailures": "needs ctprofd_probe_failed from 15 minutes ago (offset 15m)",
    "CtprofdBlind": "every daemon selects by executable path, and a process whose exe link "
                    "is refused matches no exe glob, so none is walked (the denied count of "
                    "a real unprivileged capture is in tests/test_capture.py)",
    "CtprofdSeriesDropped": "max_series is far above the few series here",
    "CtprofdSnapshotFailures": "no snapshot fails",
    "CtprofdStateNotWritten": "every state file is written (tests/test_full_disk.py fills a disk)",
    "CtprofdRenderFailures": "every scrape renders",
    "CtprofdAllocatorFragmentation": "no fixture here holds 512 MiB beyond what it "
                                     "allocated (tests/prometheus/ctprofd-rules.test.yml "
                                     "makes it fire and stay silent)",
    "CtprofdSnapshotSlow": "a first snapshot that parses DWARF may overrun the 1 s interval: "
                           "test_snapshot_slow_names_exactly_the_daemons_that_overran "
                           "checks which daemons it names against the raw counters",
}
DASHBOARD_MAY_BE_EMPTY = {
    "annotation ctprofd alerts": "no alert fires within the test: each has a `for:` of at "
                                 "least 1 minute or looks 15 minutes back",
}
# The same dashboard for one healthy daemon's instance: it has no actionable failures, so
# no dominant failure, and ctprofd_probe_failures holds at most a transient
# readlink-failure (a process that exited during the /proc walk).
HEALTHY_INSTANCE_MAY_BE_EMPTY = {
    **DASHBOARD_MAY_BE_EMPTY,
    "Dominant failure / A": "no actionable failures: the info series is absent",
    "Dominant failure per instance / A": "no actionable failures: the info series is absent",
    "Failures by tag / A": "no failures, or a transient readlink-failure",
    "Probe failures per instance and tag / A": "no failures, or a transient readlink-failure",
}
MUST_BE_EMPTY = {"CtprofdMemoryLeakSuspected", "CtprofdDown", "CtprofdStale",
                 "CtprofdProbeFailures", "CtprofdBlind", "CtprofdSeriesDropped",
                 "CtprofdSnapshotFailures", "CtprofdStateNotWritten", "CtprofdRenderFailures",
                 "CtprofdAllocatorFragmentation", "annotation ctprofd alerts"}


@dataclass
class Stack:
    prometheus: Prometheus
    daemons: dict[str, Daemon]
    fixtures: dict[str, list[Fixture]]
    units: dict[int, str]  # fixture pid -> its systemd unit ("" for none)

    def instance(self, daemon: str) -> str:
        return self.daemons[daemon].address


# name: ({variant: worker threads}, labels (None: the default), daemon's command prefix,
# fixtures' command prefix)
DAEMONS = {
    "per-pid": ({"static": 3, "dynamic": 2}, ["pid", "comm", "unit"], (), ()),
    "no-pid": ({"static-stripped-debuglink": 2, "dynamic-stripped-debuglink": 1},
               ["comm", "unit"], (), ()),
    "no-ptrace": ({"static-stripped-buildid": 2}, None, UNPRIVILEGED_PREFIX,
                  DROP_PTRACE_PREFIX),
    # The same with jemalloc in a shared object (as in Debian's redis): see
    # test_privilege_alert_goes_pending_for_jemalloc_in_a_shared_object_too.
    "no-ptrace-dso": ({"dynamic-stripped-buildid": 1}, None, UNPRIVILEGED_PREFIX,
                      DROP_PTRACE_PREFIX),
}
HEALTHY = ("per-pid", "no-pid")


def _daemon_config(directory: Path, fixture_bins, variants: dict[str, int],
                   labels: list[str] | None) -> Path:
    config = {
        "cache_dir": str(directory / "cache"),
        "state_dir": str(directory / "state"),
        "debug_dirs": [str(fixture_bins.debug_root)],
        "selection": {"include": {"exe": [str(fixture_bins[v].binary) for v in variants]}},
    }
    if labels is not None:
        config["labels"] = labels
    path = directory / "ctprofd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _unit(pid: int) -> str:
    return unit_from_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


@pytest.fixture(scope="module")
def stack(fixture_bins) -> Iterator[Stack]:
    # Not under pytest's tmp_path (mode 0700): ctprofd's parser worker runs as nobody.
    root = Path(tempfile.mkdtemp(prefix="ctprofd-prometheus-e2e-"))
    root.chmod(0o755)
    daemons: dict[str, Daemon] = {}
    fixtures: dict[str, list[Fixture]] = {}
    prometheus: Prometheus | None = None
    try:
        for name, (variants, labels, daemon_prefix, fixture_prefix) in DAEMONS.items():
            fixtures[name] = []
            for variant, nthreads in variants.items():
                fixtures[name].append(Fixture(fixture_bins[variant].binary, nthreads,
                                              prefix=fixture_prefix))
            directory = root / name
            directory.mkdir()
            config = _daemon_config(directory, fixture_bins, variants, labels)
            daemons[name] = Daemon(config, directory / "ctprofd.log", prefix=daemon_prefix)
        for daemon in daemons.values():
            daemon.wait_listening()
        (root / "prometheus").mkdir()
        prometheus = Prometheus(root / "prometheus", [{
            "job_name": "ctprofd",
            "static_configs": [{"targets": [d.address], "labels": {"daemon": name}}
                               for name, d in daemons.items()],
        }], rule_files=[RULES])
        running = Stack(prometheus, daemons, fixtures,
                        {f.pid: _unit(f.pid) for fs in fixtures.values() for f in fs})
        _wait_for_samples(running)
        yield running
    finally:
        if prometheus is not None:
            prometheus.stop()
        for daemon in daemons.values():
            daemon.stop()
        for fs in fixtures.values():
            for fixture in fs:
                fixture.kill()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_samples(stack: Stack) -> None:
    """Every target up, and every series Prometheus should have in it for 3 scrapes (rates
    over $__rate_interval need 2)."""
    prom = stack.prometheus

    def logs() -> str:
        return "\n".join(f"--- {name}:\n{d.log()[-3000:]}" for name, d in stack.daemons.items())

    try:
        poll(lambda: {t["labels"]["daemon"]: t["health"]
                      for t in prom.api("targets")["activeTargets"]},
             lambda health: health == {name: "up" for name in stack.daemons},
             STARTUP_TIMEOUT, "every target up")
        expected = {("per-pid", "ctprofd_allocated_bytes_total"): 2,
                    ("no-pid", "ctprofd_allocated_bytes_total"): 1,
                    ("no-ptrace", "ctprofd_probe_failed"): 1,
                    ("no-ptrace-dso", "ctprofd_probe_failed"): 1}
        for (daemon, metric), series in expected.items():
            poll(lambda: prom.query(f'count_over_time({metric}{{daemon="{daemon}"}}[10s]) >= 3'),
                 lambda result: len(result) == series, STARTUP_TIMEOUT,
                 f"{series} series of {metric} with 3 samples from {daemon}")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{logs()}\n--- prometheus:\n{prom.log()[-3000:]}") from None


def _truth(fixtures: list[Fixture]) -> tuple[int, int]:
    """(allocated, deallocated) summed over the fixtures' threads' own mallctl reports."""
    return (sum(t["allocated"] for f in fixtures for t in f.threads),
            sum(t["deallocated"] for f in fixtures for t in f.threads))


def _one(prom: Prometheus, expr: str) -> tuple[dict[str, str], float]:
    result = prom.query(expr)
    assert len(result) == 1, f"{expr}: expected one sample, got {result}"
    return result[0]["metric"], float(result[0]["value"][1])


def _series_labels(stack: Stack, daemon: str, **labels: str) -> dict[str, str]:
    """The labels Prometheus keeps: target labels plus the non-empty series labels."""
    return {"instance": stack.instance(daemon), "job": "ctprofd", "daemon": daemon,
            **{k: v for k, v in labels.items() if v}}


def test_targets_are_up_and_their_scrapes_parse(stack: Stack) -> None:
    targets = stack.prometheus.api("targets")["activeTargets"]
    assert {t["labels"]["daemon"]: (t["health"], t["lastError"], t["scrapeUrl"])
            for t in targets} == {name: ("up", "", f"{d.url}/metrics")
                                  for name, d in stack.daemons.items()}


def test_per_process_series_equal_the_fixtures_own_counters(stack: Stack) -> None:
    prom = stack.prometheus
    for fixture in stack.fixtures["per-pid"]:
        allocated, deallocated = _truth([fixture])
        selector = f'{{daemon="per-pid", pid="{fixture.pid}"}}'
        labels = _series_labels(stack, "per-pid", pid=str(fixture.pid), comm="alloc_threads",
                                unit=stack.units[fixture.pid])
        for metric, value in (("ctprofd_allocated_bytes_total", allocated),
                              ("ctprofd_deallocated_bytes_total", deallocated),
                              ("ctprofd_live_bytes", allocated - deallocated),
                              ("ctprofd_processes", 1),
                              ("ctprofd_threads", len(fixture.threads))):
            assert _one(prom, metric + selector) == ({"__name__": metric, **labels}, value)
    # Summed by comm, as a query without pid would:
    allocated, deallocated = _truth(stack.fixtures["per-pid"])
    assert _one(prom, 'sum by (comm) (ctprofd_allocated_bytes_total{daemon="per-pid"})') == (
        {"comm": "alloc_threads"}, allocated)
    assert _one(prom, 'sum by (comm) (ctprofd_live_bytes{daemon="per-pid"})') == (
        {"comm": "alloc_threads"}, allocated - deallocated)


def test_series_without_pid_are_the_sums(stack: Stack) -> None:
    prom = stack.prometheus
    fixtures = stack.fixtures["no-pid"]
    [unit] = {stack.units[f.pid] for f in fixtures}
    allocated, deallocated = _truth(fixtures)
    labels = _series_labels(stack, "no-pid", comm="alloc_threads", unit=unit)
    for metric, value in (("ctprofd_allocated_bytes_total", allocated),
                          ("ctprofd_deallocated_bytes_total", deallocated),
                          ("ctprofd_live_bytes", allocated - deallocated),
                          ("ctprofd_processes", len(fixtures)),
                          ("ctprofd_threads", sum(len(f.threads) for f in fixtures))):
        assert _one(prom, f'{metric}{{daemon="no-pid"}}') == ({"__name__": metric, **labels},
                                                               value)


@pytest.mark.parametrize("daemon", HEALTHY)
def test_recording_rules_give_the_exact_group_and_unit_values(stack: Stack, daemon: str) -> None:
    """Live bytes per group and per unit equal the fixtures' sums; the fixtures allocate
    nothing after READY, so every rate is exactly 0 (no counter drifts between scrapes)."""
    prom = stack.prometheus
    fixtures = stack.fixtures[daemon]
    [unit] = {stack.units[f.pid] for f in fixtures}
    allocated, deallocated = _truth(fixtures)
    group = _series_labels(stack, daemon, comm="alloc_threads", unit=unit)
    per_unit = _series_labels(stack, daemon, unit=unit)
    expected = {
        "instance_group:ctprofd_live_bytes:sum": (group, allocated - deallocated),
        "instance_unit:ctprofd_live_bytes:sum": (per_unit, allocated - deallocated),
        "instance_group:ctprofd_allocated_bytes:rate5m": (group, 0.0),
        "instance_group:ctprofd_deallocated_bytes:rate5m": (group, 0.0),
        "instance_unit:ctprofd_allocated_bytes:rate5m": (per_unit, 0.0),
        "instance_unit:ctprofd_deallocated_bytes:rate5m": (per_unit, 0.0),
    }
    for record, (labels, value) in expected.items():
        got = poll(lambda: prom.query(f'{record}{{daemon="{daemon}"}}'), bool, QUERY_TIMEOUT,
                   f"{record} of {daemon}")
        assert [(s["metric"], float(s["value"][1])) for s in got] == [
            ({"__name__": record, **labels}, value)], record
    # The hourly floor equals the live bytes: they have not changed since READY.
    min1h = f'instance_group:ctprofd_live_bytes:min1h{{daemon="{daemon}"}}'
    floor = poll(lambda: prom.query(min1h), bool, QUERY_TIMEOUT, f"min1h of {daemon}")
    assert [float(s["value"][1]) for s in floor] == [allocated - deallocated]


def _evaluate(prom: Prometheus, name: str, expr: str, may_be_empty: dict[str, str]) -> list:
    """The query's result; a query error fails at once, a query that must have data is
    polled for it, one in MUST_BE_EMPTY must have none."""
    if name not in may_be_empty:
        return poll(lambda: prom.query(expr), bool, QUERY_TIMEOUT, f"{name}: data from {expr}")
    result = prom.query(expr)
    if name in MUST_BE_EMPTY:
        assert result == [], f"{name} ({may_be_empty[name]}) returned {result}"
    return result


@pytest.mark.parametrize("query", rule_exprs(), ids=lambda q: q.name)
def test_rule_expression(stack: Stack, query) -> None:
    result = _evaluate(stack.prometheus, query.name, query.expr, RULES_MAY_BE_EMPTY)
    if query.name == "CtprofdPtracePrivilege":
        assert {s["metric"]["daemon"] for s in result} - {"no-ptrace-dso"} == {"no-ptrace"}


@pytest.mark.parametrize("query", grafana_alert_exprs(), ids=lambda q: q.name)
def test_grafana_alert_expression(stack: Stack, query) -> None:
    """The Grafana-managed rules' queries, as Grafana sends them to this Prometheus."""
    _evaluate(stack.prometheus, query.name, query.expr, RULES_MAY_BE_EMPTY)


def test_snapshot_slow_names_exactly_the_daemons_that_overran(stack: Stack) -> None:
    """Evaluated at one instant: the alert names, with reason "overruns", exactly the
    daemons whose raw overrun counter moved in the 10 minutes before, and with reason
    "p90-duration" exactly those its duration half selects; nothing else."""
    prom = stack.prometheus
    [expr] = [q.expr for q in rule_exprs() if q.name == "CtprofdSnapshotSlow"]
    at = str(prom.api("query", {"query": "time()"})["result"][0])

    def at_once(query: str) -> list[dict]:
        return prom.api("query", {"query": query, "time": at})["result"]
    overran = {series["metric"]["daemon"] for series in at_once(
        "ctprofd_snapshot_overruns_total[10m]")
        if len({value for _, value in series["values"]}) > 1}
    slow = {series["metric"]["daemon"] for series in at_once(
        "histogram_quantile(0.9, rate(ctprofd_snapshot_duration_seconds_bucket[10m]))"
        " / ctprofd_snapshot_interval_seconds > 0.8")}
    named = [(series["metric"]["daemon"], series["metric"]["reason"])
             for series in at_once(expr)]
    assert sorted(named) == sorted({(d, "overruns") for d in overran}
                                   | {(d, "p90-duration") for d in slow})


@pytest.mark.parametrize("query", dashboard_exprs(GRAFANA_VARIABLES), ids=lambda q: q.name)
def test_dashboard_query_over_all_instances(stack: Stack, query) -> None:
    _evaluate(stack.prometheus, query.name, query.expr, DASHBOARD_MAY_BE_EMPTY)


@pytest.mark.parametrize("daemon", HEALTHY)
def test_dashboard_queries_for_one_healthy_instance(stack: Stack, daemon: str) -> None:
    """The Instance drop-down on one daemon, with and without pid in its labels: every panel
    but the failure ones has data, and only from that instance."""
    instance = stack.instance(daemon)
    queries = dashboard_exprs({**GRAFANA_VARIABLES, "instance": re.escape(instance)
                               .replace("\\", "\\\\")})
    for query in queries:
        result = _evaluate(stack.prometheus, query.name, query.expr,
                           HEALTHY_INSTANCE_MAY_BE_EMPTY)
        instances = {s["metric"].get("instance") for s in result} - {None}
        assert instances <= {instance}, f"{query.name}: {result}"


def test_dashboard_variables_list_the_right_values(stack: Stack) -> None:
    prom = stack.prometheus
    reading = [f.pid for name in HEALTHY for f in stack.fixtures[name]]
    expected = {
        "cluster": set(),  # no cluster label here: "All" (.*) also matches its absence
        "job": {"ctprofd"},
        "instance": {d.address for d in stack.daemons.values()},
        # Prometheus has no empty labels: processes outside any unit add no value.
        "unit": {stack.units[pid] for pid in reading} - {""},
        "comm": {"alloc_threads"},
    }
    variables = dashboard_variable_queries()
    assert [v.variable for v in variables] == list(expected)
    for variable in variables:
        assert set(prom.label_values(variable.label, variable.selector)) == \
            expected[variable.variable], variable


def test_rule_groups_evaluate_without_errors(stack: Stack) -> None:
    def groups() -> list[dict]:
        return stack.prometheus.api("rules")["groups"]

    def all_evaluated(result: list[dict]) -> bool:
        return all(not r["lastEvaluation"].startswith("0001-") for g in result
                   for r in g["rules"])

    result = poll(groups, all_evaluated, QUERY_TIMEOUT, "every rule evaluated once")
    # The API lists the groups by name, each group's rules in file order.
    assert {(g["file"], g["name"]): [r["name"] for r in g["rules"]] for g in result} == {
        (str(RULES), group["name"]): [r.get("alert") or r["record"] for r in group["rules"]]
        for group in load_rules()["groups"]}
    problems = [(r["name"], r["health"], r.get("lastError")) for g in result for r in g["rules"]
                if r["health"] != "ok" or r.get("lastError")]
    assert problems == []


def test_privilege_alert_goes_pending_without_cap_sys_ptrace(stack: Stack) -> None:
    prom = stack.prometheus
    instance = stack.instance("no-ptrace")
    [fixture] = stack.fixtures["no-ptrace"]

    def privilege_alerts() -> list[dict]:
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "CtprofdPtracePrivilege"]

    alerts = poll(privilege_alerts, lambda alerts: any(
        a["labels"]["daemon"] == "no-ptrace" for a in alerts), QUERY_TIMEOUT,
        "CtprofdPtracePrivilege active")
    alerts = [a for a in alerts if a["labels"]["daemon"] != "no-ptrace-dso"]
    assert [(a["labels"], a["state"]) for a in alerts] == [(
        {"alertname": "CtprofdPtracePrivilege", "severity": "warning", "job": "ctprofd",
         "instance": instance, "daemon": "no-ptrace"}, "pending")]  # for: 10m
    assert alerts[0]["annotations"]["description"].endswith(REMEDIATION_HINT)
    assert f"ctprofd on {instance} lacks" in alerts[0]["annotations"]["summary"]
    # Where it comes from: every thread's PTRACE_SEIZE was refused, in the daemon without the
    # capability only; the daemons with it probe everything.
    assert prom.values('ctprofd_probe_privilege_dominant{daemon!="no-ptrace-dso"}') == {
        frozenset(_series_labels(stack, name).items() | {("__name__",
                  "ctprofd_probe_privilege_dominant")}): float(name == "no-ptrace")
        for name in ("per-pid", "no-pid", "no-ptrace")}
    assert _one(prom, 'ctprofd_probe_failures{daemon="no-ptrace", tag="ptrace-seize"}')[1] == \
        len(fixture.threads)
    assert _one(prom, 'ctprofd_probe_dominant_failure_info{daemon="no-ptrace"}')[0]["tag"] == \
        "ptrace-seize"
    assert "CAP_SYS_PTRACE" in stack.daemons["no-ptrace"].log()
    for fixtures in stack.fixtures.values():  # no daemon left a thread stopped or traced
        for f in fixtures:
            assert_no_thread_stopped_or_traced(f.pid)


@pytest.mark.parametrize("daemon", ["per-pid", "no-ptrace"])
def test_promtool_accepts_a_real_scrape(stack: Stack, daemon: str) -> None:
    """Real scrapes with per-process series (per-pid) and with probe failures and the
    dominant-failure info (no-ptrace); test_daemon lints one that reads no process."""
    text = stack.daemons[daemon].scrape()
    assert "ctprofd_live_bytes{" in text or daemon != "per-pid"
    assert 'ctprofd_probe_dominant_failure_info{tag="ptrace-seize"}' in text or \
        daemon != "no-ptrace"
    exe = shutil.which("promtool")
    assert exe, "promtool not found on PATH: apt-get install prometheus"
    lint = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert (lint.returncode, lint.stdout.strip(), lint.stderr.strip()) == (0, "", "")


def test_a_process_none_of_whose_threads_was_read_is_not_exported(stack: Stack) -> None:
    """docs/alerting.md: processes that fail to probe are missing from the per-process
    metrics. Exported at 0, they count as measured, and once readable (e.g. a debugger that
    held them detaches) their counters jump from 0 to their lifetime totals, which rate()
    takes for one scrape interval's allocations."""
    assert stack.prometheus.query('ctprofd_processes{daemon="no-ptrace"}') == []


def test_privilege_alert_goes_pending_for_jemalloc_in_a_shared_object_too(stack: Stack) -> None:
    prom = stack.prometheus
    assert _one(prom, 'ctprofd_probe_privilege_dominant{daemon="no-ptrace-dso"}')[1] == 1
    poll(lambda: [a for a in prom.api("alerts")["alerts"]
                  if a["labels"] == {"alertname": "CtprofdPtracePrivilege",
                                     "severity": "warning", "job": "ctprofd",
                                     "instance": stack.instance("no-ptrace-dso"),
                                     "daemon": "no-ptrace-dso"}
                  and a["state"] == "pending"],
         bool, QUERY_TIMEOUT, "CtprofdPtracePrivilege pending for no-ptrace-dso")
