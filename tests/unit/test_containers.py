"""Container id and pod UID from cgroup paths of the shapes the runtimes and the kubelet make.

The paths follow the projects' own naming: the kubelet's pod cgroup `pod<UID>` under
`kubepods[/<qos>]` (cgroupfs) or `kubepods[-<qos>]-pod<UID with - as _>.slice` (systemd:
kubelet's escapeSystemdCgroupName), the runtimes' scopes `cri-containerd-<id>.scope`,
`crio-<id>.scope` (and CRI-O's monitor `crio-conmon-<id>.scope`), `docker-<id>.scope`,
`libpod-<id>.scope` (and `libpod-conmon-<id>.scope`); the cgroupfs container `<id>` of
cAdvisor's containerd tests (a static pod, whose UID is 32 hex digits), and the
`run-containerd-…-rootfs.mount` unit that cAdvisor's tests show is no container.
"""

from __future__ import annotations

import pytest

from ctprofd.procfs.containers import Container, container_from_cgroup, container_from_path

ID = "40af7cdcbe507acad47a5a62025743ad3ddc6ab93b77b21363aa1c1d641047c9"
UID = "6a1f93f0-5b1e-4c2a-9f57-1c2b1d2e3f40"
ESCAPED = UID.replace("-", "_")
STATIC_UID = "d76e26fba3bf2bfd215eb29011d55250"

PATHS = {
    # containerd
    "containerd systemd burstable":
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{ESCAPED}.slice/"
         f"cri-containerd-{ID}.scope", Container(ID, UID)),
    "containerd systemd guaranteed":
        (f"/kubepods.slice/kubepods-pod{ESCAPED}.slice/cri-containerd-{ID}.scope",
         Container(ID, UID)),
    "containerd cgroupfs static pod (cAdvisor's test)":
        (f"/kubepods/besteffort/pod{STATIC_UID}/{ID}", Container(ID, STATIC_UID)),
    "containerd cgroupfs guaranteed": (f"/kubepods/pod{UID}/{ID}", Container(ID, UID)),
    # CRI-O
    "cri-o systemd":
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{ESCAPED}.slice/"
         f"crio-{ID}.scope", Container(ID, UID)),
    "cri-o systemd, its conmon":
        (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{ESCAPED}.slice/"
         f"crio-conmon-{ID}.scope", Container("", UID)),
    "cri-o cgroupfs": (f"/kubepods/burstable/pod{UID}/crio-{ID}", Container(ID, UID)),
    # Docker
    "docker systemd": (f"/system.slice/docker-{ID}.scope", Container(ID, "")),
    "docker cgroupfs": (f"/docker/{ID}", Container(ID, "")),
    "docker under the kubelet, systemd":
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{ESCAPED}.slice/"
         f"docker-{ID}.scope", Container(ID, UID)),
    # podman
    "podman systemd": (f"/machine.slice/libpod-{ID}.scope", Container(ID, "")),
    "podman systemd, a process in its sub-cgroup":
        (f"/machine.slice/libpod-{ID}.scope/container", Container(ID, "")),
    "podman rootless":
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope",
         Container(ID, "")),
    "podman cgroupfs": (f"/libpod_parent/libpod-{ID}", Container(ID, "")),
    "podman conmon": (f"/machine.slice/libpod-conmon-{ID}.scope", Container()),
    # none
    "a systemd service": ("/system.slice/redis-server.service", Container()),
    "a login session": ("/user.slice/user-1000.slice/session-3.scope", Container()),
    "containerd's rootfs mount unit (cAdvisor's test)":
        ("/system.slice/run-containerd-io.containerd.runtime.v1.linux-k8s.io-"
         "14ae50f1d3ada102aec3ab00168fdafb2dc0986d79ca9e8d5b75581fa89e9fea-rootfs.mount",
         Container()),
    "a pod-like name outside kubepods": (f"/system.slice/pod{UID}/x", Container()),
    "the pod's own cgroup (its pause process has a container)":
        (f"/kubepods.slice/kubepods-pod{ESCAPED}.slice", Container("", UID)),
    "an id one digit short": (f"/docker/{ID[:-1]}", Container()),
    "upper-case hex": (f"/docker/{ID.upper()}", Container()),
    "root": ("/", Container()),
}


@pytest.mark.parametrize("path, expected", PATHS.values(), ids=PATHS.keys())
def test_container_from_path(path: str, expected: Container) -> None:
    assert container_from_path(path) == expected


def test_cgroup_v2_file() -> None:
    path, expected = PATHS["cri-o systemd"]
    assert container_from_cgroup(f"0::{path}\n") == expected


def test_cgroup_v1_hybrid_file_reads_the_systemd_and_controller_lines() -> None:
    """On a hybrid host the unified line is `/`; the names are in the v1 hierarchies."""
    path, expected = PATHS["containerd cgroupfs guaranteed"]
    text = (f"12:memory:{path}\n11:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n")
    assert container_from_cgroup(text) == expected


def test_unreadable_or_empty_names_nothing() -> None:
    assert container_from_cgroup("") == Container()
    assert container_from_cgroup("garbage without colons\n") == Container()
