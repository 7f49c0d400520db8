"""The monitoring mixin (packaging/mixin/, jsonnet) and the files rendered from it.

Every generated file (the Prometheus rules, the PrometheusRule, the Grafana-managed alerts,
the dashboard) is rendered again here and must equal the committed one; and the mixin's
_config really reaches every rule and query: another job selector, runbook base and threshold
change every place they belong and leave no trace of the defaults. What the rules do is
tests/test_prometheus_rules.py (promtool) and tests/test_prometheus_e2e.py (a real
Prometheus); the dashboard's structure is tests/test_dashboard.py.
"""

from __future__ import annotations

import functools
import re
import sys

import pytest
import yaml

from support.promql import REPO, iter_panels, metric_names

sys.path.insert(0, str(REPO / "scripts"))
import mixin  # noqa: E402

OTHER = {"ctprofdSelector": 'job="node-agents", team="infra"',
         "runbookURLBase": "https://wiki.example.org/ctprofd/alerting",
         "leakBytesPerHour": "64 * 1024 * 1024",
         "showMultiCluster": True}


RENDERED = mixin.render()


@functools.cache
def evaluate(other: bool) -> dict:
    """The mixin with its default _config, or with OTHER (each evaluation takes seconds)."""
    return mixin.evaluate(OTHER if other else None)


@pytest.mark.parametrize("path", list(RENDERED), ids=lambda p: p.name)
def test_committed_file_is_what_the_mixin_renders(path) -> None:
    assert path.read_text() == RENDERED[path], (
        f"{path.relative_to(REPO)} differs from the mixin: run python3 scripts/mixin.py")


def test_check_mode_names_a_stale_file(tmp_path, monkeypatch, capsys) -> None:
    """`scripts/mixin.py --check` (what to run before committing) fails on a difference."""
    stale = tmp_path / "ctprofd-rules.yml"
    stale.write_text(RENDERED[mixin.RULES] + "# edited by hand\n")
    monkeypatch.setattr(mixin, "render", lambda: {stale: stale.read_text()[:-17]})
    monkeypatch.setattr(mixin, "REPO", tmp_path)
    assert mixin.main(["--check"]) == 1
    assert "ctprofd-rules.yml: differs from the mixin" in capsys.readouterr().err


def _exprs(result: dict) -> list[tuple[str, str]]:
    rules = [(rule.get("alert") or rule["record"], rule["expr"])
             for group in result["groups"] for rule in group["rules"]]
    [board] = result["dashboards"].values()
    panels = [(f"{p['title']} / {t['refId']}", t["expr"]) for p in iter_panels(board["panels"])
              for t in p.get("targets", [])]
    variables = [(v["name"], v["query"]["query"]) for v in board["templating"]["list"]
                 if v["type"] == "query"]
    return rules + panels + variables


def test_the_job_selector_is_in_every_query_reading_a_ctprofd_metric() -> None:
    for other, selector in ((False, 'job="ctprofd"'), (True, OTHER["ctprofdSelector"])):
        for name, expr in _exprs(evaluate(other)):
            if metric_names(expr) or "up{" in expr:
                selectors = re.findall(r"(?:ctprofd_\w+|up|ALERTS)\{([^}]*)\}", expr)
                assert selectors and all(s.startswith(selector) for s in selectors), \
                    (name, expr)
            if other:
                assert 'job="ctprofd"' not in expr, (name, expr)


def test_runbook_urls_are_absolute_from_the_configured_base() -> None:
    for other, base in ((False, "file:///opt/ctprofd/share/doc/ctprofd/alerting.md"),
                        (True, OTHER["runbookURLBase"])):
        for group in evaluate(other)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["annotations"]["runbook_url"] == \
                        f"{base}#{rule['alert'].lower()}"


def test_thresholds_and_the_cluster_variable_follow_the_config() -> None:
    default, other = evaluate(False), evaluate(True)

    def leak(result: dict) -> str:
        return next(r["expr"] for g in result["groups"] for r in g["rules"]
                    if r.get("alert") == "CtprofdMemoryLeakSuspected")

    assert "/ 2 > 16 * 1024 * 1024" in leak(default)
    assert "/ 2 > 64 * 1024 * 1024" in leak(other)

    def cluster(result: dict) -> dict:
        [board] = result["dashboards"].values()
        return next(v for v in board["templating"]["list"] if v["name"] == "cluster")

    assert cluster(default)["hide"] == 2 and cluster(other)["hide"] == 0


def test_the_prometheus_rule_holds_the_same_groups_for_the_pod_monitor() -> None:
    resource = yaml.safe_load(mixin.PROMETHEUS_RULE.read_text())
    assert (resource["apiVersion"], resource["kind"]) == ("monitoring.coreos.com/v1",
                                                         "PrometheusRule")
    daemonset = REPO / "packaging" / "kubernetes" / "ctprofd-daemonset.yaml"
    namespace = next(yaml.safe_load_all(daemonset.read_text()))["metadata"]["name"]
    assert resource["metadata"]["namespace"] == namespace
    assert resource["spec"] == yaml.safe_load(mixin.RULES.read_text())
