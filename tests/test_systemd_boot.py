"""The shipped unit under a real systemd as PID 1: a Debian 12 tree booted with systemd-nspawn,
ctprofd installed into it by scripts/install-service.sh, then driven with systemctl.

The tests share one booted machine, and each makes what it checks itself (the target service
of another user is a fixture of its own), so they pass in any order or alone: install and
start, read a service of another user, reload (good and bad), journal, security, stop, and
exit 78; the uninstall, which removes what the others use, stays last. The machine
shares the host's network (the metrics are scraped from here) but has its own PID namespace,
so ctprofd walks only the machine's processes.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from ctprofd import __version__
from support.guest import TARGET_UNIT, assert_untraced, free_port, sample, start_target
from support.guest import scrape as scrape_url
from support.guest import wait_for_metric as wait_for_url
from support.machines import REPO, REPO_IGNORE, BootedMachine, pip_config, cached_roots

CONFIG = "/etc/ctprofd/ctprofd.yaml"


def config_text(port: int, interval: float) -> str:
    return (f'listen: "127.0.0.1:{port}"\ninterval: {interval}\n'
            "labels: [pid, comm, unit, user]\n")


@pytest.fixture(scope="module")
def machine(fixture_bins):
    """Booted, ctprofd installed by the project's script and started (`enable --now` returns
    once the unit is active: for Type=notify, once READY=1 arrived)."""
    roots = cached_roots()
    pip_conf, pip_paths = pip_config()
    work = Path(tempfile.mkdtemp(prefix="ctprofd-nspawn-", dir="/var/tmp"))
    port = free_port()
    booted = BootedMachine(roots["SYSTEMD_ROOT"], work,
                           [*pip_paths, (str(fixture_bins.root), str(fixture_bins.root))])
    try:
        merged = booted.merged
        shutil.copytree(REPO, merged / "src", ignore=REPO_IGNORE)
        (merged / "etc" / "pip.conf").write_text(pip_conf)
        # An existing configuration is kept by the install: ours listens on a free port.
        (merged / "etc" / "ctprofd").mkdir()
        (merged / "etc" / "ctprofd" / "ctprofd.yaml").write_text(config_text(port, 1))
        # Pings every WatchdogSec/2: 300 s as shipped, 2 s here, so that the test sees them.
        dropin = merged / "etc" / "systemd" / "system" / "ctprofd.service.d"
        dropin.mkdir(parents=True)
        (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=4\n")
        booted.wait_until_booted()
        assert booted.run("test", "!", "-e", "/bin/kill", check=False).returncode == 0, \
            "the cached root must not have procps: the install has to bring it"
        booted.run("/src/scripts/install-service.sh", timeout=900)
        # an operator's first look, as root, before the service ever ran: the default cache
        # directory is made, root's, with a layout in it
        booted.run("/opt/ctprofd/bin/ctprofd", "offsets", str(fixture_bins["static"].binary))
        booted.root_layouts = booted.run("ls", "/var/cache/ctprofd/layouts").stdout.split()
        booted.run("systemctl", "enable", "--now", "ctprofd", timeout=300)
        booted.url = f"http://127.0.0.1:{port}"
        booted.port = port
        yield booted
    finally:
        booted.close()


def scrape(machine: BootedMachine) -> str:
    return scrape_url(machine.url)


def wait_for_metric(machine: BootedMachine, name: str, wanted, timeout: float = 60,
                    **labels: str) -> str:
    return wait_for_url(machine.url, name, wanted, timeout, **labels)


def journal(machine: BootedMachine, unit: str = "ctprofd") -> list[dict]:
    out = machine.run("journalctl", "--unit", unit, "--output", "json", "--no-pager").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_for_journal(machine: BootedMachine, pattern: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for entry in journal(machine):
            if re.search(pattern, str(entry.get("MESSAGE", ""))):
                return entry
        assert time.monotonic() < deadline, f"no journal line matching {pattern!r}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def target(machine, fixture_bins) -> tuple[str, list[dict]]:
    """A jemalloc service of user nobody in the machine: (its pid, its threads' counters)."""
    return start_target(machine, fixture_bins["static"].binary)


def bad_reload(machine: BootedMachine) -> None:
    """A reload with a broken configuration, seen refused in the journal; then the good
    configuration back in the file (not reloaded)."""
    config = machine.merged / CONFIG.lstrip("/")
    good = config.read_text()
    config.write_text(good + "labels: [\n")
    machine.run("systemctl", "reload", "ctprofd")
    wait_for_journal(machine, "reload failed, keeping the running configuration")
    config.write_text(good)


def test_the_install_brings_procps_and_the_unit_is_ready(machine):
    assert machine.run("dpkg-query", "-W", "-f=${Status}", "procps").stdout == \
        "install ok installed"
    state = machine.show("ctprofd", "ActiveState", "SubState", "Type", "StatusText",
                         "NRestarts", "User")
    assert state["Type"] == "notify"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert state["StatusText"].startswith("probe: "), state  # STATUS= of the first snapshot
    assert state["NRestarts"] == "0"
    with urllib.request.urlopen(machine.url + "/health", timeout=10) as response:
        assert response.read().decode().startswith("ok: ")


def test_a_root_cli_run_before_the_first_start_leaves_the_service_its_disk_cache(machine):
    """systemd hands the cache directory root's CLI made to the service's dynamic user: the
    daemon keeps its disk cache, and root's layout is the user's to read."""
    assert machine.root_layouts, "the root CLI cached nothing"
    assert not [e["MESSAGE"] for e in journal(machine)
                if "caching in memory only" in str(e.get("MESSAGE"))]
    pid = machine.show("ctprofd", "MainPID")["MainPID"]
    uid = machine.run("stat", "-c", "%u", f"/proc/{pid}").stdout.strip()
    owners = machine.run("find", "/var/cache/ctprofd/", "-printf", "%U %p\\n").stdout
    assert uid != "0" and {line.split()[0] for line in owners.splitlines()} == {uid}, owners
    listed = machine.run("ls", "/var/cache/ctprofd/layouts").stdout.split()
    assert set(machine.root_layouts) <= set(listed)


def test_the_watchdog_is_pinged(machine):
    """systemd stamps every WATCHDOG=1 it receives: the stamp moves on, twice."""
    stamps = {machine.show("ctprofd", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]}
    deadline = time.monotonic() + 30
    while len(stamps) < 3:
        assert time.monotonic() < deadline, stamps
        time.sleep(0.5)
        stamps.add(machine.show("ctprofd", "WatchdogTimestampMonotonic")
                   ["WatchdogTimestampMonotonic"])
    assert machine.show("ctprofd", "NRestarts")["NRestarts"] == "0"


def test_a_service_of_another_user_is_read_exactly(machine, target):
    pid, threads = target
    labels = {"pid": pid, "unit": TARGET_UNIT, "user": "nobody"}
    text = wait_for_metric(machine, "ctprofd_allocated_bytes_total", lambda v: v > 0, **labels)
    assert sample(text, "ctprofd_allocated_bytes_total", **labels) == \
        sum(t["allocated"] for t in threads)
    assert sample(text, "ctprofd_deallocated_bytes_total", **labels) == \
        sum(t["deallocated"] for t in threads)
    assert_untraced(machine, pid)


def test_reload_applies_and_a_bad_reload_keeps_the_running_config(machine):
    config = machine.merged / CONFIG.lstrip("/")
    config.write_text(config_text(machine.port, 0.5))
    machine.run("systemctl", "reload", "ctprofd")  # ExecReload=/bin/kill -HUP $MAINPID
    wait_for_journal(machine, "reloaded the configuration")
    wait_for_metric(machine, "ctprofd_snapshot_interval_seconds", lambda v: v == 0.5)
    bad_reload(machine)
    snapshots = sample(scrape(machine), "ctprofd_snapshots_total")
    text = wait_for_metric(machine, "ctprofd_snapshots_total", lambda v: v > snapshots + 1)
    assert sample(text, "ctprofd_snapshot_interval_seconds") == 0.5
    assert machine.show("ctprofd", "ActiveState")["ActiveState"] == "active"


def test_an_upgrade_keeps_the_configuration_and_the_series_counters(machine, target):
    """The README's upgrade: the install script again from a newer checkout, then a restart.
    The new version runs, the operator's configuration is kept, and the target's series
    goes on from its value (the state directory survives)."""
    labels = {"pid": target[0], "unit": TARGET_UNIT, "user": "nobody"}
    text = wait_for_metric(machine, "ctprofd_allocated_bytes_total", lambda v: v > 0, **labels)
    before = sample(text, "ctprofd_allocated_bytes_total", **labels)
    config = (machine.merged / CONFIG.lstrip("/")).read_text()
    init = machine.merged / "src" / "ctprofd" / "__init__.py"
    newer = f"{__version__}+upgrade"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"',
                                             f'__version__ = "{newer}"'))
    machine.run("/src/scripts/install-service.sh", timeout=900)
    machine.run("systemctl", "restart", "ctprofd", timeout=300)
    text = wait_for_metric(machine, "ctprofd_build_info", lambda v: v == 1, version=newer)
    text = wait_for_metric(machine, "ctprofd_allocated_bytes_total", lambda v: v is not None,
                           **labels)
    assert sample(text, "ctprofd_allocated_bytes_total", **labels) == before
    assert (machine.merged / CONFIG.lstrip("/")).read_text() == config
    assert machine.show("ctprofd", "ActiveState")["ActiveState"] == "active"
    assert_untraced(machine, target[0])


def test_the_journal_has_the_lines_at_their_priorities(machine):
    """Through the journal handler (its LOGGER and CODE_* fields), not stderr: info 6,
    warning 4, error 3."""
    bad_reload(machine)
    entries = journal(machine)
    by_message = {}
    for entry in entries:
        if entry.get("SYSLOG_IDENTIFIER") == "ctprofd":
            by_message.setdefault(str(entry.get("MESSAGE")).split(":")[0], entry)
    probe = by_message["probe"]
    assert probe["PRIORITY"] == "6" and probe["LOGGER"].startswith("ctprofd")
    assert "CODE_FUNC" in probe
    assert by_message["reload failed, keeping the running configuration"]["PRIORITY"] == "3"
    assert not [e for e in entries if e.get("_TRANSPORT") == "stdout"
                and "probe:" in str(e.get("MESSAGE"))], "probe lines went to stderr too"


def test_the_unit_says_it_hears_no_process_events(machine):
    """The unit's RestrictAddressFamilies= has no AF_NETLINK (nor does it grant
    CAP_NET_ADMIN): the daemon says so at start, once, and reads unchanged processes again
    once in four snapshots (docs/daemon.md, "Process events")."""
    entry = wait_for_journal(machine, r"^no proc connector: .*: unchanged processes are read "
                                      r"again once in 4 snapshots$")
    assert entry["PRIORITY"] == "6"


def test_online_security_exposure_is_at_most_3(machine):
    out = machine.run("systemd-analyze", "security", "ctprofd.service", "--no-pager").stdout
    match = re.search(r"Overall exposure level for ctprofd\.service: (\d+\.\d)", out)
    assert match, out[-2000:]
    assert float(match.group(1)) <= 3.0, out[-2000:]


def test_stop_finishes_within_timeout_stop_sec(machine, target):
    """A stop that overran TimeoutStopSec would end in SIGKILL and Result=timeout."""
    machine.run("systemctl", "start", "ctprofd", timeout=300)  # running, whatever ran before
    wait_for_metric(machine, "ctprofd_allocated_bytes_total", lambda v: v > 0,
                    pid=target[0])  # it has read (stopped) the target's threads
    machine.run("systemctl", "stop", "ctprofd", timeout=120)
    state = machine.show("ctprofd", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                     "ExecMainStatus": "0"}, state  # CLD_EXITED, status 0
    assert_untraced(machine, target[0])


def test_exit_78_is_not_restarted(machine):
    machine.run("systemctl", "stop", "ctprofd", timeout=120)  # a start of a running unit is a no-op
    config = machine.merged / CONFIG.lstrip("/")
    good = config.read_text()
    config.write_text("colour: red\n")
    try:
        assert machine.run("systemctl", "start", "ctprofd", check=False,
                           timeout=120).returncode != 0
        state = machine.show("ctprofd", "ActiveState", "SubState", "Result", "ExecMainStatus",
                             "NRestarts")
        assert state == {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code",
                         "ExecMainStatus": "78", "NRestarts": "0"}, state
    finally:  # what a later test starts is the good configuration again
        config.write_text(good)
        machine.run("systemctl", "reset-failed", "ctprofd", check=False)


def test_uninstall_keeps_the_configuration_and_purge_removes_it(machine):
    machine.run("/src/scripts/install-service.sh", "--uninstall")
    assert machine.show("ctprofd", "LoadState")["LoadState"] == "not-found"
    assert not (machine.merged / "opt/ctprofd").exists()
    assert (machine.merged / CONFIG.lstrip("/")).exists()
    assert machine.run("getent", "passwd", "ctprofd-parser", check=False).returncode == 2
    machine.run("/src/scripts/install-service.sh", "--purge")
    assert not (machine.merged / "etc/ctprofd").exists()
    assert not (machine.merged / "var/lib/private/ctprofd").exists()
