"""The Grafana dashboard (packaging/grafana/ctprofd-dashboard.json, rendered from the mixin in
packaging/mixin/) is importable as-is.

Checks its structure (data source input and variable, unique ids, a valid non-overlapping
layout, non-empty queries on the data source variable) and that every query is valid
PromQL over metrics ctprofd really exposes. Whether the queries return data from a live
daemon is for the integration test (support.promql.dashboard_exprs gives them concrete).
"""

from __future__ import annotations

import re

import pytest
import yaml

from support.promql import (DEFAULT_VARIABLES, as_rule_file, dashboard_exprs,
                            dashboard_variable_queries, exposed_metric_names, iter_panels,
                            load_dashboard, metric_names, promtool, substitute)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


@pytest.fixture(scope="module")
def panels(dashboard: dict) -> list[dict]:
    return list(iter_panels(dashboard["panels"]))


@pytest.fixture(scope="module")
def query_panels(panels: list[dict]) -> list[dict]:
    return [p for p in panels if p["type"] != "row"]


def test_has_the_import_metadata(dashboard: dict) -> None:
    # Grafana 11.6's, the version of the grafana-foundation-sdk models
    # (tests/test_grafana_provisioning.py)
    assert dashboard["schemaVersion"] == 41
    assert dashboard["uid"] == "ctprofd"
    assert dashboard["id"] is None, "an exported dashboard carries no database id"
    inputs = dashboard["__inputs"]
    assert [(i["name"], i["type"], i["pluginId"]) for i in inputs] == \
        [("DS_PROMETHEUS", "datasource", "prometheus")]
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    used = {("panel", p["type"]) for p in iter_panels(dashboard["panels"]) if p["type"] != "row"}
    assert used <= required
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required


def test_template_variables(dashboard: dict) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "job", "instance", "unit", "comm"]

    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    # Import replaces ${DS_PROMETHEUS} with the chosen data source: it becomes the default.
    assert datasource["current"]["value"] == "${DS_PROMETHEUS}"

    assert variables["comm"]["label"] == "Process"
    assert variables["cluster"]["hide"] == 2  # shown only with the mixin's showMultiCluster
    for name in ("cluster", "job", "instance", "unit", "comm"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DATASOURCE
        assert var["multi"] and var["includeAll"]
        # "All" must also match series without the label (processes outside any unit).
        assert var["allValue"] in (".*", ".+")
        assert var["definition"] == var["query"]["query"]


def test_variable_queries_use_exposed_metrics() -> None:
    exposed = exposed_metric_names()
    queries = dashboard_variable_queries()
    assert [q.label for q in queries] == ["cluster", "job", "instance", "unit", "comm"]
    for query in queries:
        assert metric_names(query.selector) <= exposed, query


def test_panel_ids_are_unique(panels: list[dict]) -> None:
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"


def test_grid_positions_are_valid_and_do_not_overlap(dashboard: dict) -> None:
    boxes = []
    for panel in dashboard["panels"]:  # top level: expanded rows keep no nested panels
        pos = panel["gridPos"]
        assert set(pos) == {"x", "y", "w", "h"}, panel["title"]
        assert all(isinstance(v, int) for v in pos.values()), panel["title"]
        assert pos["x"] >= 0 and pos["y"] >= 0, panel["title"]
        assert pos["w"] >= 1 and pos["h"] >= 1, panel["title"]
        assert pos["x"] + pos["w"] <= GRID_COLUMNS, panel["title"]
        if panel["type"] == "row":
            assert not panel["collapsed"] and not panel["panels"], panel["title"]
            assert (pos["x"], pos["w"], pos["h"]) == (0, GRID_COLUMNS, 1), panel["title"]
        boxes.append((panel["title"], pos))
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"{title_a!r} overlaps {title_b!r}"


def test_every_panel_queries_the_datasource_variable(query_panels: list[dict]) -> None:
    for panel in query_panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"].strip() and panel.get("description", "").strip(), panel["id"]
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]


def test_queries_use_only_defined_variables(dashboard: dict) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} - {"datasource"}
    builtin = {name for name in DEFAULT_VARIABLES if name.startswith("__")}
    used = set()
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\$\{?([A-Za-z_]\w*)", target["expr"]))
    assert used <= defined | builtin
    assert {"cluster", "job", "instance", "unit", "comm", "__rate_interval"} <= used


def test_rates_use_rate_interval(query_panels: list[dict]) -> None:
    for panel in query_panels:
        for target in panel["targets"]:
            for window in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", target["expr"]):
                assert window == "$__rate_interval", (panel["title"], target["expr"])


def test_covers_the_contract_metrics() -> None:
    used = set().union(*(metric_names(q.expr) for q in dashboard_exprs()))
    assert used <= exposed_metric_names()
    assert {
        "ctprofd_allocated_bytes_total", "ctprofd_deallocated_bytes_total", "ctprofd_live_bytes",
        "ctprofd_processes", "ctprofd_threads", "ctprofd_arena_processes",
        "ctprofd_probe_tgids_walked", "ctprofd_probe_jemalloc_detected",
        "ctprofd_probe_probed_ok", "ctprofd_probe_failed", "ctprofd_probe_privilege_dominant",
        "ctprofd_probe_dominant_failure_info", "ctprofd_probe_failures",
        "ctprofd_snapshot_duration_seconds_bucket", "ctprofd_thread_stop_seconds_bucket",
        "ctprofd_snapshot_overruns_total", "ctprofd_last_snapshot_timestamp_seconds",
        "ctprofd_snapshot_interval_seconds", "ctprofd_series_dropped", "ctprofd_build_info",
    } <= used


def test_probe_summary_has_stat_panels(query_panels: list[dict]) -> None:
    stats = set().union(*(metric_names(t["expr"]) for p in query_panels if p["type"] == "stat"
                          for t in p["targets"]))
    assert {"ctprofd_probe_tgids_walked", "ctprofd_probe_jemalloc_detected",
            "ctprofd_probe_probed_ok", "ctprofd_probe_failed",
            "ctprofd_probe_privilege_dominant", "ctprofd_probe_dominant_failure_info"} <= stats


def test_substitution_leaves_no_variable() -> None:
    queries = dashboard_exprs({"instance": "127.0.0.1:19455"})
    assert queries
    for query in queries:
        assert "$" not in query.expr, query
    assert any('instance=~"127.0.0.1:19455"' in q.expr for q in queries)
    with pytest.raises(KeyError):
        substitute('up{job="$undefined"}')


def test_every_query_is_valid_promql(tmp_path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    queries = dashboard_exprs()
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(yaml.safe_dump(as_rule_file(queries), sort_keys=False))
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
