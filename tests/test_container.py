"""The Kubernetes DaemonSet's security properties and the Dockerfile's structure."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ctprofd import config

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "packaging" / "kubernetes" / "ctprofd-daemonset.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


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


def test_capabilities_are_ptrace_and_dac_read_search_only():
    security = container()["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {"SYS_PTRACE", "DAC_READ_SEARCH"}
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
    shipped = config.parse(documents()["ConfigMap"]["data"]["ctprofd.yaml"], "configmap")
    assert config.parse_listen(shipped.listen)[1] == port["containerPort"]


def test_writable_paths_are_volumes():
    shipped = config.parse(documents()["ConfigMap"]["data"]["ctprofd.yaml"], "configmap")
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
