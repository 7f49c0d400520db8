"""Real Debian 12 systems for the deployment tests: the cached root filesystems of
scripts/test-roots.sh, a copy-on-write overlay of one booted with systemd as PID 1 under
systemd-nspawn, and the host's pip configuration handed to what installs inside.

Installs inside reach the same package indexes as the host: the pip configuration the host's
pip sees (files and PIP_* variables, `pip config list`) is written into the guest as one file,
and every local path it names (CA bundle, find-links, file:// indexes, constraints) is bound
in read-only at the same place (a file:// index with its parent directory, where such trees
keep the files their pages link to), as is the host's CA bundle. No index host is named here.
"""

from __future__ import annotations

import configparser
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "NO_PROXY")
# What a copy of the repository for an install leaves out (as .dockerignore does).
REPO_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                     "dist", ".pytest_cache", ".hypothesis")


def cached_roots() -> dict[str, str]:
    """SYSTEMD_ROOT, BASE_TAG and BASE_TAR from scripts/test-roots.sh (which builds what is missing:
    about 3 minutes cold, nothing once scripts/setup.sh --test has run)."""
    result = subprocess.run([str(REPO / "scripts" / "test-roots.sh"), "--print"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def pip_config(ca_target: str = CA_BUNDLE) -> tuple[str, list[tuple[str, str]]]:
    """The host's effective pip configuration as one pip.conf text, and the (host, guest)
    paths to bind read-only: the local paths it names, at the same place, and the host's CA
    bundle at `ca_target` (elsewhere than the guest's own bundle when the guest may install
    ca-certificates, which replaces that file)."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=True).stdout
    parser = configparser.ConfigParser(interpolation=None)
    paths: set[str] = set()
    for line in listing.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        section = "global" if section in ("", ":env:") else section
        value = quoted.strip().strip("'\"")
        if not parser.has_section(section):
            parser.add_section(section)
        parser.set(section, name, " ".join(ca_target if token == CA_BUNDLE else token
                                           for token in value.split()))
        for token in value.split():
            path = token.removeprefix("file://")
            if token.startswith("file://"):  # an index tree: pages under simple/, files beside
                path = os.path.dirname(path.rstrip("/"))
            if path.startswith("/") and path != CA_BUNDLE and os.path.exists(path):
                paths.add(path)
    text = io.StringIO()
    parser.write(text)
    binds = [(path, path) for path in sorted(paths)]
    if os.path.exists(CA_BUNDLE):
        binds.append((CA_BUNDLE, ca_target))
    return text.getvalue(), binds


def proxy_environment() -> list[str]:
    return [f"{name}={os.environ[name]}" for name in PROXY_VARIABLES if name in os.environ]


class BootedMachine:
    """A Debian 12 tree booted with `systemd-nspawn --boot` on an overlay of a cached root
    (the cache stays pristine); commands run inside through nsenter."""

    def __init__(self, root: str, work: Path, binds_ro: list[tuple[str, str]]) -> None:
        self.work = work
        self.merged = work / "merged"
        for name in ("upper", "overlay-work", "merged"):
            (work / name).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={root},upperdir={work / 'upper'},"
                        f"workdir={work / 'overlay-work'}", str(self.merged)], check=True)
        self.log_path = work / "nspawn.log"
        self._log = open(self.log_path, "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.merged), "--boot", "--register=no",
             "--keep-unit", "--quiet", "--console=read-only",
             *(f"--bind-ro={host}:{guest}" for host, guest in binds_ro)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self._init_pid()

    def _init_pid(self, timeout: float = 60) -> int:
        """The container's PID 1 as the host sees it: nspawn's child that is pid 1 inside."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.nspawn.poll() is None, self.log()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":\t", 1) for line in status.splitlines()
                              if ":\t" in line)
                if (fields.get("PPid") == str(self.nspawn.pid)
                        and fields.get("NSpid", "").split()[-1:] == ["1"]):
                    return int(entry.name)
            time.sleep(0.1)
        raise AssertionError(f"no container init in {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            env: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """Run a command inside (all of the container's namespaces, a clean environment)."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "env", "-i", f"PATH={GUEST_PATH}",
             "LANG=C.UTF-8", *proxy_environment(), *env, *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, (argv, result.returncode, result.stdout[-3000:],
                                            result.stderr[-3000:])
        return result

    def wait_until_booted(self, timeout: float = 120) -> None:
        """Until `systemctl is-system-running --wait` answers running (or degraded: a unit
        irrelevant here may fail in a container)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False,
                             timeout=timeout).stdout.strip()
            if state in ("running", "degraded"):
                return
            assert time.monotonic() < deadline, (state, self.log())
            time.sleep(0.5)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in properties))
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def close(self) -> None:
        """Power off (nspawn turns SIGTERM into an orderly shutdown), unmount, remove."""
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        self._log.close()
        subprocess.run(["umount", str(self.merged)], check=False)
        if not os.path.ismount(self.merged):
            shutil.rmtree(self.work, ignore_errors=True)
