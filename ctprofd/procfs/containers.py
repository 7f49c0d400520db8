"""Container identity from a process's cgroup path: the container id and the Kubernetes pod
UID, as the runtimes and the kubelet name their cgroups.

The container's own cgroup (innermost first, so a container's sub-cgroup such as podman's
`/container` still finds it), for each runtime and cgroup driver:

    containerd  systemd   cri-containerd-<id>.scope     cgroupfs  <id>
    CRI-O       systemd   crio-<id>.scope               cgroupfs  crio-<id>
    Docker      systemd   docker-<id>.scope             cgroupfs  <id> (under /docker or a pod)
    podman      systemd   libpod-<id>.scope             cgroupfs  libpod-<id>

where <id> is 64 lower-case hex digits (cAdvisor's containerd handler matches the same). A
`crio-conmon-`/`libpod-conmon-` scope is the runtime monitor, not the container, and
systemd's `run-containerd-…-<id>-rootfs.mount` is no cgroup of a process: neither matches.

The kubelet's pod cgroup is `pod<UID>` under `kubepods`: `/kubepods[/<qos>]/pod<UID>` with the
cgroupfs driver, `kubepods[-<qos>]-pod<UID>.slice` with systemd, which writes the UID's `-` as
`_` (kubelet's escapeSystemdCgroupName); static pods have a 32-hex-digit UID. The UID given
back is the API's form, with dashes: kube-state-metrics' `uid` label of `kube_pod_info`.

Any process that may create cgroups (a delegated subtree) can choose these names: the labels
say where a process runs, as its cgroup claims, not who it is.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_ID = r"[0-9a-f]{64}"
_CONTAINER = re.compile(rf"(?:(?:cri-containerd|crio|docker|libpod)-({_ID})\.scope"
                        rf"|(?:crio-|libpod-)?({_ID}))")
_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD = re.compile(rf"(?:kubepods(?:-besteffort|-burstable)?-)?pod({_UUID}|[0-9a-f]{{32}})"
                  r"(?:\.slice)?")


class Container(NamedTuple):
    """A process's container id and pod UID; '' for what its cgroup does not name."""

    container_id: str = ""
    pod_uid: str = ""


def cgroup_paths(text: str) -> list[str]:
    """The paths of a /proc/PID/cgroup file: the unified hierarchy's first, then systemd's
    (cgroup v1's name=systemd), then the controllers'."""
    ranked: list[tuple[int, str]] = []
    for line in text.split("\n"):
        hierarchy, _, path = line.partition(":")[2].partition(":")
        if path:
            ranked.append((0 if hierarchy == "" else 1 if "name=systemd" in hierarchy else 2,
                           path))
    return [path for _, path in sorted(ranked, key=lambda item: item[0])]


def container_from_path(path: str) -> Container:
    """The container id and pod UID a cgroup path names."""
    parts = path.split("/")
    container_id = ""
    for part in reversed(parts):
        match = _CONTAINER.fullmatch(part)
        if match:
            container_id = match.group(1) or match.group(2)
            break
    pod_uid = ""
    if any(part.startswith("kubepods") for part in parts):
        for part in parts:
            match = _POD.fullmatch(part)
            if match:
                pod_uid = match.group(1).replace("_", "-")
    return Container(container_id, pod_uid)


def container_from_cgroup(text: str) -> Container:
    """The container id and pod UID of a /proc/PID/cgroup file: each from the first path
    (in `cgroup_paths` order) that names one."""
    found = [container_from_path(path) for path in cgroup_paths(text)]
    return Container(next((c.container_id for c in found if c.container_id), ""),
                     next((c.pod_uid for c in found if c.pod_uid), ""))
