"""The shipped PodMonitor gives the scrape job the label the rules select.

Prometheus Operator turns a PodMonitor into a scrape job whose relabelling sets `job` to
`<namespace>/<name>`, then (with `jobLabel`) to the value of that pod label, and appends
the endpoint's own relabelings (prometheus-operator, pkg/prometheus/promcfg.go,
generatePodMonitorConfig). `operator_relabel_configs` writes that chain for
packaging/kubernetes/ctprofd-podmonitor.yaml; a real Prometheus applies it to two targets
carrying the Kubernetes discovery labels of a ctprofd pod (one a real `ctprofd run`, one a
closed port), and the `up` series it records are what the rules see. promtool then runs
CtprofdDown from the generated rules over exactly those series: the healthy target stays
silent and the down one alerts. Without `jobLabel` (the operator's default job,
`ctprofd/ctprofd`), the same check shows the down target is never alerted on.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.prometheus import Daemon, Prometheus, free_port, poll
from support.promql import REPO, RULES, promtool

POD_MONITOR = REPO / "packaging" / "kubernetes" / "ctprofd-podmonitor.yaml"
DAEMONSET = REPO / "packaging" / "kubernetes" / "ctprofd-daemonset.yaml"


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def operator_relabel_configs(monitor: dict[str, Any]) -> list[dict[str, Any]]:
    """The relabel_configs Prometheus Operator generates for the PodMonitor's one endpoint."""
    meta, spec = monitor["metadata"], monitor["spec"]
    [endpoint] = spec["podMetricsEndpoints"]
    configs: list[dict[str, Any]] = [
        {"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
         "regex": endpoint["port"]},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"},
    ]
    if spec.get("jobLabel"):
        configs.append({"source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(spec['jobLabel'])}"],
                        "target_label": "job", "regex": "(.+)", "replacement": "${1}"})
    configs.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    for relabeling in endpoint.get("relabelings", []):
        configs.append({"source_labels": relabeling["sourceLabels"],
                        "target_label": relabeling["targetLabel"],
                        "action": relabeling.get("action", "replace").lower()})
    return configs


def discovery_labels(pod: str, node: str) -> dict[str, str]:
    """The Kubernetes service discovery labels of a pod of the shipped DaemonSet."""
    daemonset = next(d for d in yaml.safe_load_all(DAEMONSET.read_text())
                     if d["kind"] == "DaemonSet")
    template = daemonset["spec"]["template"]
    [container] = template["spec"]["containers"]
    labels = {f"__meta_kubernetes_pod_label_{_sanitize(k)}": v
              for k, v in template["metadata"]["labels"].items()}
    return {**labels, "__meta_kubernetes_namespace": daemonset["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": pod, "__meta_kubernetes_pod_node_name": node,
            "__meta_kubernetes_pod_container_name": container["name"],
            "__meta_kubernetes_pod_container_port_name": container["ports"][0]["name"]}


@pytest.fixture(scope="module")
def scraped() -> dict[str, dict[str, dict[str, str]]]:
    """{"shipped"|"no-job-label": {"up"|"down": labels of its `up` series}}, from one real
    Prometheus scraping one real ctprofd and a closed port through both relabel chains."""
    root = Path(tempfile.mkdtemp(prefix="ctprofd-podmonitor-"))
    root.chmod(0o755)  # the daemon's parser worker runs as nobody
    config = root / "ctprofd.yaml"
    config.write_text(yaml.safe_dump({  # walks nothing: this test needs its scrape only
        "cache_dir": str(root / "cache"), "state_dir": str(root / "state"),
        "selection": {"include": {"exe": [str(root / "no-such-program")]}}}))
    daemon = Daemon(config, root / "ctprofd.log")
    prometheus = None
    monitor = yaml.safe_load(POD_MONITOR.read_text())
    without = copy.deepcopy(monitor)
    del without["spec"]["jobLabel"]
    try:
        daemon.wait_listening()
        targets = [
            {"targets": [daemon.address], "labels": discovery_labels("ctprofd-4x7bq", "node-a")},
            {"targets": [f"127.0.0.1:{free_port()}"],
             "labels": discovery_labels("ctprofd-9zk2m", "node-b")},
        ]
        (root / "prometheus").mkdir()
        prometheus = Prometheus(root / "prometheus", [
            {"job_name": name, "static_configs": targets,
             "relabel_configs": operator_relabel_configs(m)}
            for name, m in (("shipped", monitor), ("no-job-label", without))])
        result = poll(lambda: prometheus.query("up"), lambda r: len(r) == 4, 30,
                      "an up series for each target of both jobs")
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    scraped: dict[str, dict[str, dict[str, str]]] = {"shipped": {}, "no-job-label": {}}
    for sample in result:
        labels = dict(sample["metric"])
        del labels["__name__"]
        chain = "shipped" if labels["job"] == "ctprofd" else "no-job-label"
        scraped[chain]["up" if sample["value"][1] == "1" else "down"] = labels
    return scraped


def test_the_job_is_ctprofd_and_the_instance_the_node(scraped) -> None:
    assert scraped["shipped"]["up"] == {
        "job": "ctprofd", "instance": "node-a", "namespace": "ctprofd",
        "pod": "ctprofd-4x7bq", "container": "ctprofd", "endpoint": "metrics"}
    assert scraped["shipped"]["down"]["instance"] == "node-b"
    assert {labels["job"] for labels in scraped["no-job-label"].values()} == {"ctprofd/ctprofd"}


def _down_alerts(tmp_path: Path, up: dict[str, str], down: dict[str, str]) -> list[dict]:
    """What CtprofdDown fires at 5m (down from 0m), as promtool reports it: the test case
    expects nothing, so a failure lists the alerts that did fire."""
    def series(labels: dict[str, str]) -> str:
        return "up{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"

    tests = tmp_path / "podmonitor.test.yml"
    tests.write_text(yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": series(up), "values": "1x10"},
                                    {"series": series(down), "values": "0x10"}],
                   "alert_rule_test": [{"eval_time": "5m", "alertname": "CtprofdDown",
                                        "exp_alerts": []}]}]}, sort_keys=False))
    result = promtool("test", "rules", str(tests))
    if result.returncode == 0:
        return []
    report = result.stdout + result.stderr
    assert "got:" in report, report
    got = report[report.index("got:"):]
    return [dict(re.findall(r'(\w+)="([^"]*)"', labels))
            for labels in re.findall(r"Labels:\{([^}]*)\}", got)]


def test_a_healthy_target_is_silent_and_a_down_one_alerts(scraped, tmp_path) -> None:
    fired = _down_alerts(tmp_path, scraped["shipped"]["up"], scraped["shipped"]["down"])
    assert fired == [{"alertname": "CtprofdDown", "severity": "warning",
                      **scraped["shipped"]["down"]}]


def test_without_job_label_the_down_target_goes_unnoticed(scraped, tmp_path) -> None:
    """What the PodMonitor did before jobLabel: the rules select job="ctprofd", the operator's
    default job is ctprofd/ctprofd, so only the no-target branch (absent) fires, naming no
    instance, whether the targets are up or down."""
    fired = _down_alerts(tmp_path, scraped["no-job-label"]["up"],
                         scraped["no-job-label"]["down"])
    assert [alert.get("instance") for alert in fired] == [None]


def test_the_rule_unit_tests_use_these_labels(scraped) -> None:
    """The case of tests/prometheus/ctprofd-rules.test.yml for the PodMonitor feeds promtool
    the labels measured here."""
    cases = yaml.safe_load((REPO / "tests" / "prometheus" / "ctprofd-rules.test.yml")
                           .read_text())["tests"]
    [case] = [c for c in cases if "PodMonitor" in c["name"]]
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', s["series"])) for s in case["input_series"]]
    assert labels == [scraped["shipped"]["up"], scraped["shipped"]["down"]]
