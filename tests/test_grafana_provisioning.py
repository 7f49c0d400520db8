"""Grafana provisioning files: the alert rules (packaging/grafana/provisioning/alerting/) with
the meaning of packaging/prometheus/ctprofd-rules.yml (both rendered from the mixin:
tests/test_mixin.py checks they are up to date), the dashboard provider, and both the
alert rules and the dashboard checked against Grafana's schema as grafana-foundation-sdk
(PyPI, generated from Grafana's own schema) models it.

No Grafana server can be installed here. What the SDK check proves: every key of the files
is a field of Grafana's schema at the place it is used (the SDK's models keep the fields they
know and drop the others, so a round trip keeps every key but the few listed below, each
with why), and the enumerated values are among those the schema allows. What it does not
prove: that a running Grafana accepts the files (provisioning-only fields such as `folder`,
the data source UID from the environment), that the queries return data (that is
test_prometheus_e2e.py, which evaluates every alert expression on a real Prometheus), or how
panels look.
"""

from __future__ import annotations

import importlib
import json
import typing
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.models import alerting, dashboard, expr, prometheus

from support.promql import (DASHBOARD, REPO, Query, as_rule_file, iter_rules, load_rules,
                            load_dashboard, promtool)

ALERTS_FILE = REPO / "packaging" / "grafana" / "provisioning" / "alerting" / "ctprofd-alerts.yaml"
PROVIDER_FILE = REPO / "packaging" / "grafana" / "provisioning" / "dashboards" / "ctprofd.yaml"

# Keys the SDK's Grafana schema does not model, each with why it is there anyway.
NOT_IN_SCHEMA = {
    ".__inputs": "import metadata: the data source chosen when importing",
    ".__elements": "import metadata: library panels (none)",
    ".__requires": "import metadata: the plugins and Grafana version needed",
    ".id": "null in an exported dashboard (the database assigns it)",
    ".annotations.list[1].step": "Prometheus annotation query fields, kept by Grafana in "
                                 "the annotation itself",
    ".annotations.list[1].tagKeys": "(as above)",
    ".annotations.list[1].textFormat": "(as above)",
    ".annotations.list[1].titleFormat": "(as above)",
    ".annotations.list[1].useValueForTime": "(as above)",
    **{f".templating.list[{i}].definition": "the query text the variable editor shows"
       for i in range(1, 6)},  # cluster, job, instance, unit, comm
}
NEWER_PANEL_OPTIONS = {  # written by newer Grafana versions than the SDK's schema
    ("stat", "options", ".showPercentChange"), ("stat", "options", ".wideLayout"),
    ("timeseries", "custom", ".axisBorderShow"),
}


def lost_keys(before: typing.Any, after: typing.Any, path: str = "") -> list[str]:
    """Paths of the keys of `before` that `after` (its round trip) no longer has."""
    if isinstance(before, dict):
        if not isinstance(after, dict):
            return [path]
        return [lost for key, value in before.items()
                for lost in ([f"{path}.{key}"] if key not in after
                             else lost_keys(value, after[key], f"{path}.{key}"))]
    if isinstance(before, list):
        if not isinstance(after, list) or len(after) != len(before):
            return [path]
        return [lost for i, (a, b) in enumerate(zip(before, after))
                for lost in lost_keys(a, b, f"{path}[{i}]")]
    return []


def plain(value: typing.Any) -> typing.Any:
    """An SDK object's to_json() with nested SDK objects turned into JSON too."""
    return json.loads(json.dumps(value, default=lambda o: o.to_json()))


def allowed(model: type, field: str) -> tuple[str, ...]:
    """The values a Literal-typed field of an SDK model may take."""
    return typing.get_args(typing.get_type_hints(model)[field])


def unescape(text: str) -> str:
    """What Grafana reads after expanding environment variables ($$ is a literal $)."""
    return text.replace("$$", "$")


@pytest.fixture(scope="module")
def grafana_rules() -> list[dict]:
    provisioning = yaml.safe_load(ALERTS_FILE.read_text())
    assert provisioning["apiVersion"] == 1
    [group] = provisioning["groups"]
    assert (group["orgId"], group["folder"], group["interval"]) == (1, "ctprofd", "1m")
    return group["rules"]


def test_every_prometheus_alert_is_a_grafana_rule_with_the_same_meaning(grafana_rules) -> None:
    prometheus_alerts = [r for r in iter_rules(load_rules()) if "alert" in r]
    assert [r["title"] for r in grafana_rules] == [r["alert"] for r in prometheus_alerts]
    for rule, alert in zip(grafana_rules, prometheus_alerts):
        query, condition = rule["data"]
        assert query["datasourceUid"] == "${CTPROFD_PROMETHEUS_UID}"
        assert query["model"]["instant"] is True
        assert unescape(query["model"]["expr"]) == alert["expr"].strip()
        assert rule["condition"] == condition["refId"] == "B"
        assert unescape(condition["model"]["expression"]) == \
            "is_number($A) || is_nan($A) || is_inf($A)"
        assert rule["for"] == alert.get("for", "0s")
        assert rule["labels"] == alert["labels"]
        assert rule["noDataState"] == "OK"  # a Prometheus rule with no series is not firing
        for key, text in alert["annotations"].items():
            grafana = unescape(rule["annotations"][key])
            assert grafana == text.strip().replace("$value", "$values.A.Value").replace(
                "$values.A.Values", "$values"), key
            assert "$" not in rule["annotations"][key].replace("$$", ""), key


def test_alert_expressions_are_valid_promql(tmp_path, grafana_rules) -> None:
    queries = [Query("alert", r["title"], unescape(r["data"][0]["model"]["expr"]))
               for r in grafana_rules]
    path = tmp_path / "grafana-alert-queries.yml"
    path.write_text(yaml.safe_dump(as_rule_file(queries), sort_keys=False))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fit_grafanas_schema(grafana_rules) -> None:
    """Through grafana-foundation-sdk's alerting models: every key survives the round trip,
    the states are values the schema allows, and each query model fits its data source's
    schema (Prometheus, server-side expressions)."""
    for rule in grafana_rules:
        assert lost_keys(rule, plain(alerting.Rule.from_json(rule).to_json())) == [], rule["uid"]
        assert rule["noDataState"] in allowed(alerting.Rule, "no_data_state")
        assert rule["execErrState"] in allowed(alerting.Rule, "exec_err_state")
        assert len(rule["uid"]) <= 40
        query, condition = rule["data"]
        assert lost_keys(query["model"],
                         plain(prometheus.Dataquery.from_json(query["model"]).to_json())) == []
        assert lost_keys(condition["model"],
                         plain(expr.TypeMath.from_json(condition["model"]).to_json())) == []
    assert len({r["uid"] for r in grafana_rules}) == len(grafana_rules)


def test_dashboard_fits_grafanas_schema() -> None:
    """Through grafana-foundation-sdk's dashboard model, and each panel's options, field
    config and queries through the models of its panel type and of Prometheus queries."""
    board = load_dashboard()
    lost = lost_keys(board, plain(dashboard.Dashboard.from_json(board).to_json()))
    assert set(lost) == set(NOT_IN_SCHEMA), lost
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        module = importlib.import_module(f"grafana_foundation_sdk.models.{panel['type']}")
        options = panel.get("options", {})
        for path in lost_keys(options, plain(module.Options.from_json(options).to_json())):
            assert (panel["type"], "options", path) in NEWER_PANEL_OPTIONS, (panel["title"], path)
        custom = panel["fieldConfig"]["defaults"].get("custom", {})
        if hasattr(module, "FieldConfig"):
            for path in lost_keys(custom, plain(module.FieldConfig.from_json(custom).to_json())):
                assert (panel["type"], "custom", path) in NEWER_PANEL_OPTIONS, (panel["title"], path)
        for target in panel["targets"]:
            assert lost_keys(target, plain(prometheus.Dataquery.from_json(target).to_json())) == []


def test_dashboard_provider_loads_the_dashboard_into_the_ctprofd_folder() -> None:
    provisioning = yaml.safe_load(PROVIDER_FILE.read_text())
    assert provisioning["apiVersion"] == 1
    [provider] = provisioning["providers"]
    assert (provider["type"], provider["folder"], provider["allowUiUpdates"]) == (
        "file", "ctprofd", False)
    assert Path(provider["options"]["path"]).is_absolute()
    assert DASHBOARD.name.endswith(".json")  # what the provider's path must hold


def test_growth_panel_is_the_top_hourly_deriv_of_live_bytes() -> None:
    [panel] = [p for p in load_dashboard()["panels"] if p["title"].startswith(
        "Live bytes growth per process")]
    [target] = panel["targets"]
    assert target["expr"].startswith("topk(10, ")
    assert "deriv(ctprofd_live_bytes{" in target["expr"] and target["expr"].endswith("[1h])))")
    assert panel["fieldConfig"]["defaults"]["unit"] == "Bps"


def test_totals_source_panel_splits_the_processes_by_source() -> None:
    [panel] = [p for p in load_dashboard()["panels"]
               if p["title"] == "Where the process totals come from"]
    exprs = [t["expr"] for t in panel["targets"]]
    assert exprs[0].startswith("sum(ctprofd_arena_processes{")
    assert exprs[1].startswith("sum(ctprofd_processes{") and "- sum(ctprofd_arena_processes{" in exprs[1]
    assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
