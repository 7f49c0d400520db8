"""The Prometheus rules (packaging/prometheus/ctprofd-rules.yml, rendered from the mixin in
packaging/mixin/) load and behave as tested.

promtool must be installed (Debian's `prometheus` package; scripts/setup.sh --test): these
tests fail, never skip, without it. The alert behaviour itself is specified by the promtool
unit tests in tests/prometheus/ctprofd-rules.test.yml; here they are run, and the rules'
conventions checked: names, annotations, runbook anchors, metrics that really exist.
"""

from __future__ import annotations

import re

import pytest
import yaml

from ctprofd.report.summary import REMEDIATION_HINT
from support.promql import (REPO, RULE_TESTS, RULES, exposed_metric_names, heading_anchors,
                            iter_rules, load_rules, metric_names, promtool, rule_exprs)

ALERTS = {"CtprofdDown", "CtprofdStale", "CtprofdPtracePrivilege", "CtprofdBlind",
          "CtprofdProbeFailures", "CtprofdMemoryLeakSuspected", "CtprofdSnapshotSlow",
          "CtprofdSeriesDropped", "CtprofdSnapshotFailures", "CtprofdStateNotWritten",
          "CtprofdRenderFailures",
          "CtprofdAllocatorFragmentation"}
RUNBOOK = REPO / "docs" / "alerting.md"
RECORD_NAME = re.compile(r"^(instance_series|instance_group|instance_unit):(ctprofd_[a-z_]+):([a-z0-9_]+)$")


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return list(iter_rules(load_rules()))


@pytest.fixture(scope="module")
def alerts(rules: list[dict]) -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alerts() -> None:
    assert {q.name for q in rule_exprs() if q.source == "alert"} == ALERTS


def test_recording_rule_names_follow_level_metric_operations(rules: list[dict]) -> None:
    exposed = exposed_metric_names()
    records = [rule["record"] for rule in rules if "record" in rule]
    assert records
    for name in records:
        match = RECORD_NAME.match(name)
        assert match, name
        metric = match.group(2)
        # the metric part is the source metric, without _total once rate() has been applied
        assert metric in exposed or f"{metric}_total" in exposed, name
    assert {"instance_group:ctprofd_allocated_bytes:rate5m",
            "instance_group:ctprofd_deallocated_bytes:rate5m",
            "instance_unit:ctprofd_allocated_bytes:rate5m",
            "instance_unit:ctprofd_deallocated_bytes:rate5m",
            "instance_unit:ctprofd_live_bytes:sum"} <= set(records)


def test_rules_read_only_metrics_ctprofd_exposes() -> None:
    exposed = exposed_metric_names()
    for query in rule_exprs():
        assert metric_names(query.expr) <= exposed, query


def test_alerts_have_severity_and_annotations(alerts: dict[str, dict]) -> None:
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical", "info"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        # absolute: the mixin's runbookURLBase (tests/test_mixin.py) + the section's anchor
        assert re.fullmatch(rf"[a-z]+://\S+/alerting\.md#{name.lower()}",
                            annotations["runbook_url"]), name


def test_runbook_urls_point_at_runbook_sections(alerts: dict[str, dict]) -> None:
    anchors = heading_anchors(RUNBOOK.read_text())
    for name, rule in alerts.items():
        anchor = rule["annotations"]["runbook_url"].partition("#")[2]
        assert anchor in anchors, f"{name}: no heading for #{anchor} in {RUNBOOK.name}"


def test_privilege_alerts_carry_the_remediation_hint(alerts: dict[str, dict]) -> None:
    for name in ("CtprofdPtracePrivilege", "CtprofdBlind"):
        assert alerts[name]["annotations"]["description"].endswith(REMEDIATION_HINT), name


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired, silent = set(), set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert fired == ALERTS
    assert silent == ALERTS


def test_the_documented_prometheus_configurations_are_valid(tmp_path) -> None:
    """The `# prometheus.yml` examples in docs/alerting.md are valid: the first passes
    `promtool check config` (rule_files pointed at this tree's rules); the Kubernetes one
    only parses, as Debian's Prometheus is built without Kubernetes service discovery."""
    blocks = re.findall(r"```yaml\n(# prometheus\.yml.*?)```", RUNBOOK.read_text(),
                        flags=re.DOTALL)
    assert len(blocks) == 2
    for block in blocks:
        assert yaml.safe_load(block)["scrape_configs"][0]["job_name"] == "ctprofd"
    config = tmp_path / "prometheus.yml"
    config.write_text(blocks[0].replace("/etc/prometheus/rules/ctprofd-rules.yml", str(RULES)))
    result = promtool("check", "config", str(config))
    assert result.returncode == 0, blocks[0] + result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout
