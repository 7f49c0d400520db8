"""The container image, built from the Dockerfile with podman, and its own ctprofd run the way a
container runtime would start it, reading a host process exactly.

`podman run` cannot start containers on the CI machines (crun refuses their hybrid cgroup
setup), so the image's root is mounted (`podman create` + `podman mount`) and its entry point
runs chrooted there with the host's /proc bound in (as `--pid=host` gives), its capabilities
limited by setpriv to the set the DaemonSet grants, and no_new_privs (as
allowPrivilegeEscalation: false). The base is the debootstrap tree scripts/test-roots.sh
builds (no image registry is reachable), imported under a tag of this run's own.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from support.machines import REPO, cached_roots, pip_config
from support.procs import assert_no_thread_stopped_or_traced

TAG = "localhost/ctprofd:test"
# what the image is built with (--build-arg CTPROFD_REVISION), as a release build would be
REVISION = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
MAX_IMAGE_MIB = 200
# Where the build sees the host's CA bundle: not the image's own path, which the
# ca-certificates package rewrites during the build.
BUILD_CA = "/run/ctprofd-build-ca.crt"


def container_capabilities() -> list[str]:
    """The capabilities the DaemonSet adds, in setpriv's spelling."""
    manifest = REPO / "packaging" / "kubernetes" / "ctprofd-daemonset.yaml"
    daemonset = [d for d in yaml.safe_load_all(manifest.read_text()) if d["kind"] == "DaemonSet"]
    [container] = daemonset[0]["spec"]["template"]["spec"]["containers"]
    return [cap.lower() for cap in container["securityContext"]["capabilities"]["add"]]


def podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image():
    """Built with the host's pip configuration and CA bundle bound in for the pip step (they
    are not part of any layer)."""
    # A base of its own, imported from the cached tree under a tag no other checkout uses:
    # the shared store's base tag may be another recipe's, and the image's size counts it.
    base = f"localhost/ctprofd-test-base:{os.getpid()}"
    podman("import", "--quiet", "--change", 'CMD ["/bin/bash"]', cached_roots()["BASE_TAR"],
           base, timeout=300)
    conf, binds = pip_config(ca_target=BUILD_CA)
    work = Path(tempfile.mkdtemp(prefix="ctprofd-image-"))
    (work / "pip.conf").write_text(conf)
    volumes = [f"--volume={host}:{guest}:ro" for host, guest in binds]
    try:
        podman("build", "--isolation=chroot", "--network=host", "--layers=false", *volumes,
               f"--build-arg=CTPROFD_REVISION={REVISION}", f"--build-arg=DEBIAN={base}",
               f"--volume={work / 'pip.conf'}:/etc/pip.conf:ro", "--tag", TAG, str(REPO),
               timeout=900)
        yield TAG
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["podman", "rmi", "--force", TAG, base], capture_output=True)


@pytest.fixture
def image_root(image):
    """The image's file system, mounted read-write as a container's would be."""
    container = podman("create", image)
    try:
        yield Path(podman("mount", container))
    finally:
        subprocess.run(["podman", "umount", container], capture_output=True)
        subprocess.run(["podman", "rm", "--force", container], capture_output=True)


def test_the_image_carries_the_revision_it_was_built_from(image_root):
    """Stamped at build time (the build argument; the image has no git checkout):
    ctprofd_build_info's revision and --version's."""
    [stamp] = image_root.glob("opt/ctprofd/lib/python3*/site-packages/ctprofd/export/REVISION")
    assert stamp.read_text().strip() == REVISION
    version = subprocess.run(["chroot", str(image_root), "/opt/ctprofd/bin/ctprofd", "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert f"(revision {REVISION}; Python 3." in version.stdout


def test_the_image_is_small(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image))
    assert size <= MAX_IMAGE_MIB << 20, f"{size / 2**20:.0f} MiB"


def test_the_image_holds_the_venv_only(image_root):
    """No source tree, compiler, pip or apt cache; of the build's bind mounts at most the
    empty mount points podman leaves."""
    assert (image_root / "opt/ctprofd/bin/ctprofd").exists()
    for leftover in ("src", "usr/bin/gcc", "opt/ctprofd/bin/pip", "var/lib/apt/lists/lock"):
        assert not (image_root / leftover).exists(), leftover
    assert not list((image_root / "var/cache/apt").rglob("*.deb"))
    for mount_point in ("etc/pip.conf", BUILD_CA.lstrip("/")):
        path = image_root / mount_point
        assert not path.exists() or path.stat().st_size == 0, mount_point


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_its_ctprofd_reads_a_host_process_exactly_with_a_parser_not_root(
        image_root, fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 4)
    port = free_port()
    (image_root / "tmp/test.yaml").write_text(
        f'listen: "127.0.0.1:{port}"\ninterval: 0.5\nlabels: [pid]\n'
        f"selection:\n  include:\n    exe: ['{fixture_bins['static'].binary}']\n")
    caps = ",".join(f"+{cap}" for cap in container_capabilities())
    # unshare: the /proc and /dev binds live and die with the daemon's own mount namespace
    daemon = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --rbind /proc "$1/proc" && mount --rbind /dev "$1/dev" && shift && '
         'exec chroot "$@"', "sh", str(image_root), str(image_root),
         "setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--no-new-privs",
         "/opt/ctprofd/bin/ctprofd", "run", "--config", "/tmp/test.yaml"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in daemon.stderr:
            lines.append(line)
            if re.search(r"parser worker \d+ started", line):
                break
        started = re.search(r"parser worker \d+ started, uid=(\d+) gid=(\d+) groups=0 no "
                            r"capabilities", lines[-1])
        assert started and 0 not in (int(started[1]), int(started[2])), lines
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{daemon.pid}/status").read_text().splitlines() if ":\t" in line)
        setid = 1 << 6 | 1 << 7  # CAP_SETGID, CAP_SETUID: permitted, not effective
        assert (int(status["CapPrm"], 16) & setid, int(status["CapEff"], 16) & setid) == (setid, 0)
        assert int(status["CapEff"], 16) == sum(1 << n for n in (2, 19))  # DAC_READ_SEARCH, SYS_PTRACE
        allocated = sum(t["allocated"] for t in fixture.threads)
        deallocated = sum(t["deallocated"] for t in fixture.threads)
        pattern = re.compile(rf'^ctprofd_(de)?allocated_bytes_total\{{pid="{fixture.pid}"\}} '
                             r"(\S+)$", re.M)
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                found = {bool(m.group(1)): float(m.group(2))
                         for m in pattern.finditer(r.read().decode())}
            if found:
                break
            assert time.monotonic() < deadline and daemon.poll() is None, lines
            time.sleep(0.2)
        assert found == {False: allocated, True: deallocated}
        assert_no_thread_stopped_or_traced(fixture.pid)
    finally:
        daemon.terminate()
        try:
            assert daemon.wait(30) == 0
        finally:
            daemon.kill()
