"""The Debian package (scripts/build-deb.sh), built here and installed as an operator would:
`apt-get install ./ctprofd_*.deb` into a fresh Debian 12 tree (debootstrap minbase with
systemd, no compiler, no Python, no pip) booted with systemd as PID 1, its dependencies from
the Debian archive only, and PyPI's hosts blocked in its /etc/hosts. The tests share one
machine and run in file order: the package's files and lintian, install and start, the
alerts' runbook links opening on the machine, a jemalloc service of another user read
exactly, an upgrade to a rebuilt package of a higher version, and purge leaving nothing
behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from ctprofd import __version__
from ctprofd.cli import build_parser
from support.guest import (TARGET_UNIT, assert_untraced, free_port, sample, start_target,
                           wait_for_metric)
from support.machines import REPO, REPO_IGNORE, BootedMachine, cached_roots
from support.promql import heading_anchors, iter_rules, load_rules

sys.path.insert(0, str(REPO / "scripts"))
import grafana_alerts  # noqa: E402
import mixin  # noqa: E402

CONFIG = "/etc/ctprofd/ctprofd.yaml"
DROPIN = "/etc/systemd/system/ctprofd.service.d"
NEWER = f"{__version__}+upgrade"
RUNBOOK = "/usr/share/doc/ctprofd/alerting.md"
# The packaged files with runbook links: the Prometheus rules and the Grafana-managed alerts.
RULES = "/usr/share/ctprofd/prometheus/ctprofd-rules.yml"
GRAFANA_ALERTS = "/usr/share/ctprofd/grafana/provisioning/alerting/ctprofd-alerts.yaml"
# PyPI's index and file hosts, which the guest resolves to an address that serves neither.
PYPI_HOSTS = ("pypi.org", "files.pythonhosted.org")
# What changes in any running Debian system whatever is installed: kernel and runtime file
# systems, logs, apt's and dpkg's own databases (dpkg -L is asked instead), caches of
# ld.so and debconf, and systemd's own bookkeeping of the boot.
VOLATILE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/lib/apt",
            "/var/cache/apt", "/var/lib/dpkg", "/var/cache/debconf", "/var/cache/ldconfig",
            "/var/lib/systemd/timers", "/var/lib/systemd/random-seed", "/etc/ld.so.cache",
            "/debs", "/fixtures")


def build(source: Path, outdir: Path) -> Path:
    """scripts/build-deb.sh of `source` (a checkout, or a copy of one with git pointed at this
    checkout's history), as CI would run it."""
    env = {**os.environ, "GIT_DIR": subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--absolute-git-dir"], capture_output=True,
        text=True, check=True).stdout.strip(), "GIT_WORK_TREE": str(source)}
    result = subprocess.run([str(source / "scripts" / "build-deb.sh"), str(outdir)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, Path]:
    """This checkout's package, and a rebuild of it whose version is higher."""
    out = tmp_path_factory.mktemp("debs")
    os.chmod(out, 0o755)
    newer_tree = tmp_path_factory.mktemp("newer") / "src"
    shutil.copytree(REPO, newer_tree, ignore=REPO_IGNORE, symlinks=True)
    init = newer_tree / "ctprofd" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"',
                                             f'__version__ = "{NEWER}"'))
    return {"current": build(REPO, out), "newer": build(newer_tree, out)}


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True,
                          check=True).stdout


def unit_settings(unit: str) -> list[str]:
    """A unit's lines that name no path of ctprofd's, comments left out."""
    return [line for line in unit.splitlines()
            if "ctprofd" not in line and not line.startswith("#")]


def test_the_package_has_what_an_operator_expects(debs):
    deb = debs["current"]
    assert deb.name == f"ctprofd_{__version__}_all.deb"
    files = {line.split()[-1].removeprefix(".") for line in dpkg_deb("-c", str(deb)).splitlines()}
    for path in ("/usr/bin/ctprofd", "/lib/systemd/system/ctprofd.service", CONFIG,
                 "/usr/share/man/man8/ctprofd.8.gz",
                 "/usr/share/bash-completion/completions/ctprofd",
                 "/usr/share/ctprofd/prometheus/ctprofd-rules.yml",
                 "/usr/share/ctprofd/grafana/ctprofd-dashboard.json",
                 "/usr/share/ctprofd/mixin/mixin.libsonnet",
                 "/usr/share/doc/ctprofd/copyright", "/usr/share/doc/ctprofd/changelog.gz",
                 "/usr/lib/python3/dist-packages/ctprofd/cli.py",
                 "/usr/lib/python3/dist-packages/ctprofd/config/default.yaml"):
        assert path in files, path
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert dpkg_deb("-f", str(deb), "Architecture").strip() == "all"
    depends = dpkg_deb("-f", str(deb), "Depends")
    assert "python3-systemd" in depends and "python3-capstone (>= 4.0.2)" in depends
    assert not [d for d in depends.split(", ") if d.split()[0].endswith("-dev")
                or d.split()[0] in ("gcc", "python3-pip", "build-essential")], depends
    with tempfile.TemporaryDirectory() as tree:
        subprocess.run(["dpkg-deb", "-R", str(deb), tree], check=True)
        assert Path(tree, "DEBIAN/conffiles").read_text().split() == [CONFIG]
        unit = Path(tree, "lib/systemd/system/ctprofd.service").read_text()
        shipped = (REPO / "packaging/systemd/ctprofd.service").read_text()
        # the hardening as the unit in the tree: only the paths (and a comment) differ
        assert unit_settings(unit) == unit_settings(shipped) and len(unit_settings(unit)) > 40
        assert "ExecStart=/usr/bin/ctprofd run --config /etc/ctprofd/ctprofd.yaml" in unit
        revision = Path(tree, "usr/lib/python3/dist-packages/ctprofd/export/REVISION")
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert revision.read_text().strip() == head


def test_the_man_page_and_completion_follow_the_parser(debs):
    """Generated from build_parser() at build time: every subcommand and every option is in
    both."""
    with tempfile.TemporaryDirectory() as tree:
        subprocess.run(["dpkg-deb", "-x", str(debs["current"]), tree], check=True)
        man = subprocess.run(["zcat", f"{tree}/usr/share/man/man8/ctprofd.8.gz"],
                             capture_output=True, text=True, check=True).stdout
        rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=man,
                                  capture_output=True, text=True)
        assert rendered.returncode == 0 and not rendered.stderr, rendered.stderr
        completion = Path(tree, "usr/share/bash-completion/completions/ctprofd").read_text()
    check = subprocess.run(["bash", "-n"], input=completion, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and a.dest == "command")
    for name, sub in subparsers.choices.items():
        assert f'.SS "{name.replace("-", chr(92) + "-")}"' in man, name
        assert f"{name})" in completion, name
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                assert option.replace("-", "\\-") in man, (name, option)
                assert option in completion, (name, option)


def runbook_urls(rules: dict) -> list[str]:
    """The runbook_url of every alert (every rule with annotations) in a Prometheus or
    Grafana-provisioning rule file; as many as the tree's rules have alerts."""
    urls = [rule["annotations"]["runbook_url"] for group in rules["groups"]
            for rule in group["rules"] if "annotations" in rule]
    assert len(urls) == sum("alert" in rule for rule in iter_rules(load_rules())) > 0, urls
    return urls


def test_the_packaged_rules_are_what_the_packaged_mixin_renders(debs, tmp_path):
    """The runbook links name the page the package installs, in the rules, the Grafana alerts
    and the mixin's default alike: the packaged mixin renders the packaged files."""
    subprocess.run(["dpkg-deb", "-x", str(debs["current"]), str(tmp_path)], check=True)
    rules = yaml.safe_load((tmp_path / RULES.lstrip("/")).read_text())
    alerts = yaml.safe_load((tmp_path / GRAFANA_ALERTS.lstrip("/")).read_text())
    rendered = mixin.evaluate(mixin_dir=tmp_path / "usr/share/ctprofd/mixin")["groups"]
    assert rules == {"groups": rendered}
    assert alerts == yaml.safe_load(grafana_alerts.render({"groups": rendered}))
    for urls in (runbook_urls(rules), runbook_urls(alerts)):
        assert all(url.startswith(f"file://{RUNBOOK}#") for url in urls), urls


def test_the_completion_completes(debs, tmp_path):
    """The packaged completion under bash-completion, as a shell calls it: a command, a
    command's options, an option's choices, a file argument."""
    subprocess.run(["dpkg-deb", "-x", str(debs["current"]), str(tmp_path)], check=True)
    script = tmp_path / "usr/share/bash-completion/completions/ctprofd"
    (tmp_path / "check-me.yaml").write_text("")

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        shell = ("source /usr/share/bash-completion/bash_completion; source \"$1\"; shift; "
                 "COMP_WORDS=(\"$@\"); COMP_CWORD=$(($# - 1)); COMP_LINE=\"$*\"; "
                 "COMP_POINT=${#COMP_LINE}; _ctprofd; printf '%s\\n' \"${COMPREPLY[@]}\"")
        result = subprocess.run(["bash", "-c", shell, "bash", str(script), *words],
                                capture_output=True, text=True, cwd=tmp_path, timeout=30)
        assert result.returncode == 0, (line, result.stderr)
        return sorted(result.stdout.split())

    assert complete("ctprofd", "sn") == ["snapshot"]
    assert complete("ctprofd", "run", "--l") == ["--listen", "--log-level", "--log.format",
                                                 "--log.level"]
    assert complete("ctprofd", "snapshot", "--log-level", "w") == ["warn", "warning"]
    assert complete("ctprofd", "--log.format", "j") == ["json"]
    assert complete("ctprofd", "check-config", "check-") == ["check-me.yaml"]


def test_lintian_reports_nothing(debs):
    """No error, no warning, not even pedantic or experimental tags; what is justified is
    in packaging/debian/lintian-overrides, with the reason."""
    result = subprocess.run(["lintian", "--pedantic", "-I", "-E", "--fail-on", "error,warning,"
                             "info,pedantic,experimental", str(debs["current"])],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def copy_host_apt_sources(merged: Path) -> None:
    """The guest fetches from the host's Debian mirror, with the host's acquire settings (a
    snapshot mirror needs Check-Valid-Until off): its sources and Acquire:: settings."""
    apt = Path("/etc/apt")
    sources = [apt / "sources.list", *apt.glob("sources.list.d/*")]
    for source in sources:
        if source.is_file() and source.read_text().strip() and "deb-src" not in source.read_text():
            shutil.copy(source, merged / source.relative_to("/"))
    for conf in apt.glob("apt.conf.d/*"):
        if conf.is_file() and "Acquire::" in conf.read_text() and "proxy" not in conf.name:
            shutil.copy(conf, merged / conf.relative_to("/"))
    if any(s.name != "sources.list" for s in sources if s.exists()):
        (merged / "etc/apt/sources.list").write_text("")  # the host's entries replace it


def tree_listing(machine: BootedMachine) -> set[str]:
    prune = " -o ".join(f"-path {p}" for p in VOLATILE)
    out = machine.run("sh", "-c", f"find / -xdev \\( {prune} \\) -prune -o -print", timeout=300)
    return set(out.stdout.splitlines())


def accounts(machine: BootedMachine) -> str:
    return machine.run("cat", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow").stdout


@pytest.fixture(scope="module")
def machine(debs, fixture_bins):
    """A fresh Debian 12 tree booted; the package's dependencies installed from the archive,
    then the package with `apt-get install ./ctprofd_*.deb` (its postinst enables and starts
    the service), with PyPI's hosts resolving to 0.0.0.0 from before the first apt-get. A
    drop-in set up beforehand makes it listen on a free port here."""
    roots = cached_roots()
    work = Path(tempfile.mkdtemp(prefix="ctprofd-deb-", dir="/var/tmp"))
    port = free_port()
    booted = BootedMachine(roots["FRESH_ROOT"], work,
                           [(str(debs["current"].parent), "/debs"),
                            (str(fixture_bins.root), str(fixture_bins.root))])
    try:
        merged = booted.merged
        copy_host_apt_sources(merged)
        hosts = merged / "etc/hosts"
        hosts.write_text((hosts.read_text() if hosts.exists() else "")
                         + f"0.0.0.0 {' '.join(PYPI_HOSTS)}\n")
        dropin = merged / DROPIN.lstrip("/")
        dropin.mkdir(parents=True)
        (dropin / "listen.conf").write_text(
            "[Service]\nExecStart=\nExecStart=/usr/bin/ctprofd run --config "
            f"{CONFIG} --listen 127.0.0.1:{port}\n")
        booted.wait_until_booted()
        booted.run("apt-get", "update", timeout=600)
        booted.before = tree_listing(booted)
        booted.accounts = accounts(booted)
        depends = dpkg_deb("-f", str(debs["current"]), "Depends").strip()
        booted.run("apt-get", "satisfy", "-y", "--no-install-recommends", depends, timeout=900)
        booted.with_dependencies = tree_listing(booted)
        booted.install = booted.run("apt-get", "install", "-y",
                                    f"/debs/{debs['current'].name}", timeout=600)
        booted.url = f"http://127.0.0.1:{port}"
        yield booted
    finally:
        booted.close()


def test_pypi_was_unreachable_from_the_machine(machine):
    """Its names resolve to 0.0.0.0 alone, and an HTTPS connection to either fails (refused,
    or no certificate for the name if something listens there)."""
    for host in PYPI_HOSTS:
        resolved = machine.run("getent", "ahosts", host).stdout
        assert {line.split()[0] for line in resolved.splitlines()} == {"0.0.0.0"}, resolved
    attempt = machine.run("python3", "-c", """
import socket, ssl, sys
for host in sys.argv[1:]:
    try:
        with socket.create_connection((host, 443), timeout=10) as sock:
            ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        print(host, "reachable")
    except OSError as err:
        print(host, "unreachable:", err)
""", *PYPI_HOSTS)
    assert [line.split()[:2] for line in attempt.stdout.splitlines()] == \
        [[host, "unreachable:"] for host in PYPI_HOSTS], attempt.stdout


def test_dependencies_come_from_debian_with_no_compiler_and_no_pip(machine):
    packages = machine.run("dpkg-query", "-W", "-f=${Package}\\n").stdout.split()
    assert "ctprofd" in packages
    assert not [p for p in packages if p.endswith("-dev") or p in
                ("gcc", "cpp", "python3-pip", "python3-venv", "build-essential")], packages
    assert machine.run("python3", "-m", "pip", "--version", check=False).returncode != 0
    # every Python module on the machine is some Debian package's (none came from an index)
    assert not machine.run("sh", "-c", "ls /usr/local/lib/python3*/dist-packages 2>/dev/null",
                           check=False).stdout.strip()
    modules = machine.run("ls", "/usr/lib/python3/dist-packages").stdout.split()
    for module in modules:
        if module != "__pycache__":
            machine.run("dpkg", "-S", f"/usr/lib/python3/dist-packages/{module}")


def test_the_service_is_enabled_started_and_ready(machine):
    state = machine.show("ctprofd", "ActiveState", "SubState", "UnitFileState", "FragmentPath",
                         "StatusText", "NRestarts")
    assert state["FragmentPath"] == "/lib/systemd/system/ctprofd.service"
    assert state["UnitFileState"] == "enabled"
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    wait_for_metric(machine.url, "ctprofd_snapshots_total", lambda v: v >= 1)
    text = wait_for_metric(machine.url, "ctprofd_build_info", lambda v: v == 1,
                           version=__version__)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert sample(text, "ctprofd_build_info", revision=head) == 1
    assert machine.run("ctprofd", "check-config", CONFIG).stdout.strip() == f"{CONFIG}: OK"
    assert machine.run("getent", "passwd", "ctprofd-parser", check=False).returncode == 0


def test_the_alerts_runbook_links_open_on_the_machine(machine):
    """Every runbook_url of the installed rules and Grafana alerts names a file on the machine,
    and its #anchor a heading in that file."""
    pages: dict[str, set[str]] = {}
    for path in (RULES, GRAFANA_ALERTS):
        for url in runbook_urls(yaml.safe_load(machine.run("cat", path).stdout)):
            parts = urlsplit(url)
            assert parts.scheme == "file" and parts.netloc == "", url
            if parts.path not in pages:
                page = machine.run("cat", parts.path, check=False)
                assert page.returncode == 0, (url, page.stderr)
                pages[parts.path] = heading_anchors(page.stdout)
            assert parts.fragment in pages[parts.path], url


@pytest.fixture(scope="module")
def target(machine, fixture_bins) -> tuple[str, list[dict]]:
    """A jemalloc service of user nobody in the machine: (its pid, its threads' counters)."""
    return start_target(machine, fixture_bins["static"].binary)


def test_a_service_of_another_user_is_read_exactly(machine, target):
    pid, threads = target
    labels = {"unit": TARGET_UNIT}  # the shipped labels: comm, unit
    text = wait_for_metric(machine.url, "ctprofd_allocated_bytes_total", lambda v: v > 0,
                           **labels)
    assert sample(text, "ctprofd_allocated_bytes_total", **labels) == \
        sum(t["allocated"] for t in threads)
    assert sample(text, "ctprofd_deallocated_bytes_total", **labels) == \
        sum(t["deallocated"] for t in threads)
    assert_untraced(machine, pid)


def test_an_upgrade_restarts_it_and_keeps_the_configuration_and_series(machine, debs, target):
    """The operator edited the conffile; `apt-get install` of a rebuilt package of a higher
    version keeps the edit without asking, restarts the service on the new code, and the
    target's series goes on from its value (the state directory survives)."""
    config = machine.merged / CONFIG.lstrip("/")
    edited = config.read_text().replace("\ninterval: 15\n", "\ninterval: 1\n")
    assert edited != config.read_text()
    config.write_text(edited)
    machine.run("systemctl", "restart", "ctprofd", timeout=300)
    wait_for_metric(machine.url, "ctprofd_snapshot_interval_seconds", lambda v: v == 1)
    labels = {"unit": TARGET_UNIT}
    before = sample(wait_for_metric(machine.url, "ctprofd_allocated_bytes_total",
                                    lambda v: v > 0, **labels),
                    "ctprofd_allocated_bytes_total", **labels)
    old_pid = machine.show("ctprofd", "MainPID")["MainPID"]
    machine.run("apt-get", "install", "-y", f"/debs/{debs['newer'].name}", timeout=600)
    assert machine.run("dpkg-query", "-W", "-f=${Version}", "ctprofd").stdout == NEWER
    text = wait_for_metric(machine.url, "ctprofd_build_info", lambda v: v == 1, version=NEWER)
    assert machine.show("ctprofd", "MainPID")["MainPID"] != old_pid
    text = wait_for_metric(machine.url, "ctprofd_allocated_bytes_total",
                           lambda v: v is not None, **labels)
    assert sample(text, "ctprofd_allocated_bytes_total", **labels) == before
    assert sample(text, "ctprofd_snapshot_interval_seconds") == 1
    assert config.read_text() == edited
    assert not list(config.parent.glob("ctprofd.yaml.dpkg-*"))
    assert machine.show("ctprofd", "ActiveState")["ActiveState"] == "active"
    assert_untraced(machine, target[0])


def test_remove_stops_it_and_keeps_the_configuration(machine):
    machine.run("apt-get", "remove", "-y", "ctprofd", timeout=300)
    assert machine.show("ctprofd", "ActiveState")["ActiveState"] == "inactive"
    assert machine.run("pgrep", "-f", "/usr/bin/ctprofd", check=False).returncode == 1
    assert not (machine.merged / "usr/bin/ctprofd").exists()
    assert (machine.merged / CONFIG.lstrip("/")).exists()
    assert machine.run("ls", "/var/lib/private/ctprofd").returncode == 0  # the state stays


def test_purge_leaves_nothing(machine):
    """Unit gone, and of the tree only what was there with the dependencies alone: no file,
    no user or group, no cache or state (the operator removes their own drop-in)."""
    machine.run("systemctl", "stop", TARGET_UNIT)
    machine.run("rm", "-r", DROPIN)
    machine.run("apt-get", "purge", "-y", "ctprofd", timeout=300)
    assert machine.show("ctprofd", "LoadState")["LoadState"] == "not-found"
    assert machine.run("pgrep", "-f", "ctprofd", check=False).returncode == 1
    left = tree_listing(machine) - machine.with_dependencies
    assert not left, sorted(left)
    assert accounts(machine) == machine.accounts
