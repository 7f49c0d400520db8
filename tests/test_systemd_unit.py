"""The systemd unit: `systemd-analyze verify` passes and `systemd-analyze security` rates its
exposure exactly as the README and docs/daemon.md say, with the directives the daemon
depends on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging" / "systemd" / "ctprofd.service"
INSTALLED_BINARY = "/opt/ctprofd/bin/ctprofd"


def service_section() -> dict[str, list[str]]:
    """[Service] keys to all their values (repeated keys are meaningful: keep them all)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_verify(tmp_path):
    """`verify` checks that ExecStart's program exists on this machine. /opt/ctprofd is where
    scripts/install-service.sh puts the venv, which a test machine does not have, so a temporary
    copy points ExecStart at the interpreter running these tests (`python -m ctprofd`, the same
    program); every other line is verified as shipped."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} run " in text
    copy = tmp_path / "ctprofd.service"
    copy.write_text(text.replace(INSTALLED_BINARY, f"{sys.executable} -m ctprofd"))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                            text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def claimed_exposure(path: Path) -> str:
    """The figure a document gives for `systemd-analyze security`: "rates it **2.4…**"."""
    match = re.search(r"rates it\s+\*\*(\d+\.\d)\b", path.read_text())
    assert match, f"{path} names no exposure level"
    return match.group(1)


def test_security_exposure_is_what_the_docs_claim():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=30",
                             str(UNIT)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for ctprofd\.service: (\d+\.\d)", output)
    assert match, output
    assert match.group(1) == claimed_exposure(REPO / "README.md"), output
    assert match.group(1) == claimed_exposure(REPO / "docs" / "daemon.md"), output
    assert result.returncode == 0, output


def test_the_install_script_puts_the_binary_where_execstart_looks():
    script = (REPO / "scripts" / "install-service.sh").read_text()
    assert "prefix=" + INSTALLED_BINARY.removesuffix("/bin/ctprofd") in script


def test_directives_the_daemon_relies_on():
    service = service_section()
    single = {k: v[-1] for k, v in service.items()}
    assert single["Type"] == "notify" and single["NotifyAccess"] == "main"
    assert single["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(single["WatchdogSec"]) > 0
    assert single["RestartPreventExitStatus"] == "78"
    assert single["DynamicUser"] == "yes"
    assert single["CacheDirectory"] == single["StateDirectory"] == "ctprofd"
    caps = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
    assert set(single["AmbientCapabilities"].split()) == caps
    assert set(single["CapabilityBoundingSet"].split()) == caps
    assert single["NoNewPrivileges"] == "yes" and single["ProtectSystem"] == "strict"
    assert single["SystemCallArchitectures"] == "native"
    assert service["SystemCallFilter"][0].split() == ["@system-service", "ptrace"]
    for hiding in ("ProtectProc", "ProcSubset", "PrivatePIDs", "PrivateUsers"):
        assert hiding not in service, f"{hiding}= would hide the processes to read"


def syscalls(group: str) -> set[str]:
    """The system calls of a systemd syscall group, nested groups expanded."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter", group],
                             capture_output=True, text=True, check=True).stdout
    names = re.findall(r"^\s+(@?[a-z_0-9-]+)$", listing, re.M)
    calls = {n for n in names if not n.startswith("@")}
    for nested in {n for n in names if n.startswith("@")}:
        calls |= syscalls(nested)
    return calls


def test_the_filter_allows_ptrace_and_process_vm_readv():
    """@system-service has process_vm_readv (through @ipc) but not ptrace, which the unit adds;
    the groups it denies afterwards take neither away."""
    allowed = syscalls("@system-service")
    assert "ptrace" not in allowed and "process_vm_readv" in allowed
    assert "read" in allowed and "ptrace" in syscalls("@debug")
    denied = service_section()["SystemCallFilter"][1].removeprefix("~").split()
    assert not {"ptrace", "process_vm_readv"} & set().union(*map(syscalls, denied))


def test_memory_max_is_the_daemonsets_limit_and_holds_the_parser_budget():
    """One memory budget for both deployments, sized on the default parser budget."""
    from ctprofd.config.settings import ParserLimits

    daemonset = REPO / "packaging" / "kubernetes" / "ctprofd-daemonset.yaml"
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(daemonset.read_text())}
    (container,) = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    limit = container["resources"]["limits"]["memory"]
    (memory_max,) = service_section()["MemoryMax"]
    assert memory_max.removesuffix("M") == limit.removesuffix("Mi")
    assert int(memory_max.removesuffix("M")) >= ParserLimits().memory_limit_mib + 96
