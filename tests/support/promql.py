"""The PromQL that ships with ctprofd, as concrete queries a real Prometheus can answer.

    dashboard_exprs(variables=None, path=DASHBOARD) -> list[Query]
        Every query of the Grafana dashboard (panel targets, then annotations), with the
        dashboard variables substituted: DEFAULT_VARIABLES updated with `variables`, e.g.
        dashboard_exprs({"instance": "127.0.0.1:19455"}).
    rule_exprs(path=RULES) -> list[Query]
        Every recording and alerting rule expression of the Prometheus rules file.
    grafana_alert_exprs(path=GRAFANA_ALERTS) -> list[Query]
        The PromQL of each Grafana-managed alert rule, as Grafana reads it ($$ is a $).
    dashboard_variable_queries(variables=None, path=DASHBOARD) -> list[LabelValuesQuery]
        The `label_values(selector, label)` queries behind the dashboard's drop-downs, with
        the variables in their selectors substituted; ask Prometheus
        /api/v1/label/<label>/values?match[]=<selector>.
    substitute(text, variables=None) -> str
        Grafana variable substitution ($name, ${name}, ${name:format}); raises KeyError for
        a variable with no value, so a new variable cannot slip through unsubstituted.
    metric_names(expr) -> set[str]
        The ctprofd_* sample names an expression reads (not recording-rule names).
    exposed_metric_names() -> set[str]
        The sample names ctprofd's collector exposes (from DaemonCollector.describe()).
    as_rule_file(queries) -> dict
        A Prometheus rule file with one recording rule per query, for `promtool check rules`
        (parses every expression) or for loading into a test Prometheus.
    promtool(*args) -> subprocess.CompletedProcess
        Runs promtool from PATH; fails the calling test (never skips) when it is missing.
    heading_anchors(markdown) -> set[str]
        The #anchors of a Markdown page's headings, as GitHub makes them (runbook_url's).

A Query has `source` ("dashboard", "record" or "alert"), `name` (panel title and refId,
or rule name) and `expr`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "packaging" / "grafana" / "ctprofd-dashboard.json"
RULES = REPO / "packaging" / "prometheus" / "ctprofd-rules.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "ctprofd-rules.test.yml"
GRAFANA_ALERTS = REPO / "packaging" / "grafana" / "provisioning" / "alerting" / "ctprofd-alerts.yaml"

# What Grafana would put in for "All" and for its built-in interval variables with a 15 s
# scrape interval ($__rate_interval = max(4 x scrape interval, $__interval + scrape interval)).
DEFAULT_VARIABLES: dict[str, str] = {
    "cluster": ".*",
    "job": ".+",
    "instance": ".+",
    "unit": ".*",
    "comm": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# $name, ${name} or ${name:format}; a name starts with a letter or "_", so the "$1" of a
# label_replace() replacement is left alone.
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")
# A ctprofd sample name that is not part of a recording-rule name (level:metric:operations).
_METRIC = re.compile(r"(?<![\w:])ctprofd_\w+(?![\w:])")


@dataclass(frozen=True)
class Query:
    source: str  # "dashboard", "record" or "alert"
    name: str
    expr: str


@dataclass(frozen=True)
class LabelValuesQuery:
    variable: str
    selector: str
    label: str


def substitute(text: str, variables: Mapping[str, str] | None = None) -> str:
    """`text` with every Grafana variable replaced by its value."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {text!r}")
        return values[name]

    return _VARIABLE.sub(value, text)


def metric_names(expr: str) -> set[str]:
    """The ctprofd_* sample names `expr` selects."""
    return set(_METRIC.findall(expr))


def exposed_metric_names() -> set[str]:
    from ctprofd.export.collector import DaemonCollector
    from ctprofd.export.render import Renderer

    suffixes = {"counter": ("_total",), "gauge": ("",), "info": ("_info",),
                "histogram": ("_bucket", "_sum", "_count")}
    collector = DaemonCollector()
    # the renderer's own counters (render failures) come with every scrape
    families = [*collector.describe(), *Renderer().counters()]
    return {family.name + suffix for family in families for suffix in suffixes[family.type]}


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(panels: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(variables: Mapping[str, str] | None = None,
                    path: Path = DASHBOARD) -> list[Query]:
    dashboard = load_dashboard(path)
    queries = []
    for panel in iter_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries.append(Query("dashboard", f"{panel['title']} / {target['refId']}",
                                 substitute(target["expr"], variables)))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            queries.append(Query("dashboard", f"annotation {annotation['name']}",
                                 substitute(annotation["expr"], variables)))
    return queries


_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\)\s*$")


def dashboard_variable_queries(variables: Mapping[str, str] | None = None,
                               path: Path = DASHBOARD) -> list[LabelValuesQuery]:
    queries = []
    for var in load_dashboard(path)["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        if not match:
            raise ValueError(f"variable {var['name']}: not a label_values() query: {query!r}")
        selector, label = match.groups()
        queries.append(LabelValuesQuery(var["name"], substitute(selector or "", variables),
                                        label))
    return queries


def load_rules(path: Path = RULES) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def iter_rules(rules: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rules["groups"]:
        yield from group["rules"]


def rule_exprs(path: Path = RULES) -> list[Query]:
    return [Query("alert", rule["alert"], rule["expr"]) if "alert" in rule
            else Query("record", rule["record"], rule["expr"])
            for rule in iter_rules(load_rules(path))]


def grafana_alert_exprs(path: Path = GRAFANA_ALERTS) -> list[Query]:
    """The PromQL of each Grafana-managed alert rule, as Grafana reads it ($$ is a $)."""
    return [Query("grafana", rule["title"], rule["data"][0]["model"]["expr"].replace("$$", "$"))
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown page's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+\s+(.+)$", markdown, flags=re.MULTILINE)}


def as_rule_file(queries: Sequence[Query], group: str = "ctprofd-queries") -> dict[str, Any]:
    return {"groups": [{"name": group, "rules": [
        {"record": f"ctprofd_query_{i}", "expr": query.expr}
        for i, query in enumerate(queries)]}]}


def promtool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run promtool; a missing promtool fails the test (CI installs Debian's prometheus)."""
    import pytest

    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found on PATH: apt-get install prometheus "
                    "(scripts/setup.sh --test installs it)", pytrace=False)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
