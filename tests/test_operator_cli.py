"""What an operator meets on the command line: one truth for the CLI and the checker, log
options before or after the subcommand, logs that say what changed, and failures that say
what to do (real processes, real ctprofd subprocesses)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report import tags
from ctprofd.resolve import offsets_file
from ctprofd.resolve.debughelp import how_to_get_debug_info
from ctprofd.resolve.parse_worker import WorkerLimits
from daemon_process import CTPROFD, REPO, DaemonProcess, clean_env, run_once, write_config
from support.procs import wait_until


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CTPROFD + list(args), capture_output=True, text=True, timeout=120,
                          cwd=REPO, stdin=subprocess.DEVNULL, env=clean_env(env))


# A %fs segment prefix a little before a displacement of one of jemalloc 5.3's four counter
# fields (0x338, 0x340, 0x348, 0x350): the accesses the machine-code route reads.
FS_COUNTER_ACCESS = re.compile(rb"\x64(?=.{1,4}[\x38\x40\x48\x50]\x03\x00\x00)", re.DOTALL)


def without_offsets(variant, directory) -> str:
    """A copy of a stripped jemalloc binary whose counters cannot be found at all: no DWARF,
    and its %fs accesses turned into %ds ones (same length), so the machine code shows no
    counters either. Only read, never run."""
    copy = directory / "no-offsets"
    shutil.copy(variant.binary, copy)
    data, count = FS_COUNTER_ACCESS.subn(b"\x3e", copy.read_bytes())
    assert count >= 4, count
    copy.write_bytes(data)
    return str(copy)


def one_line(result: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert result.returncode == status, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- logging -------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_before_or_after_the_subcommand(fixture_bins, spawn_fixture, where):
    fixture = spawn_fixture(fixture_bins["static"], 1)
    command = ["snapshot", "--cache-dir", "", "--pid", str(fixture.pid)]
    flag = ["--log-level", "info"]
    result = cli(*(flag + command if where == "before" else command + flag))
    assert result.returncode == 0, result.stderr
    assert "probe: 1 tgids walked, 1 jemalloc detected, 2 probed OK" in result.stderr
    quiet = cli(*command)
    assert "probe:" not in quiet.stderr  # warning is the one-shot commands' default


# Not UTC (India, no summer time; a POSIX rule, no tz database needed): a log time written
# in local time would be 5 h 30 min off.
NOT_UTC = {"TZ": "IST-05:30"}
RFC3339_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def log_time(line: str, fmt: str) -> str:
    """The timestamp a log line carries: first word (text), `time=` (logfmt), "time" (JSON)."""
    if fmt == "json":
        return json.loads(line)["time"]
    if fmt == "logfmt":
        assert line.startswith("time="), line
        return line.split()[0].removeprefix("time=")
    return line.split(" ", 1)[0]


def assert_utc_between(stamp: str, start: float, end: float) -> None:
    """RFC 3339 in UTC with milliseconds, and an instant between `start` and `end` (time.time()
    before and after the run; the stamp is truncated to the millisecond)."""
    assert RFC3339_UTC_MS.fullmatch(stamp), stamp
    when = datetime.fromisoformat(stamp)
    assert when.utcoffset() == timedelta(0), stamp
    assert start - 0.001 <= when.timestamp() <= end, (stamp, start, end)


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_log_format(fixture_bins, spawn_fixture, fmt):
    fixture = spawn_fixture(fixture_bins["static"], 1)
    start = time.time()
    result = cli("snapshot", "--log.level", "info", "--log.format", fmt, "--cache-dir", "",
                 "--pid", str(fixture.pid), env=NOT_UTC)
    end = time.time()
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        if fmt == "json":
            record = json.loads(line)
        else:
            assert line.startswith("time=") and " level=" in line and " msg=" in line, line
            record = {"level": line.split(" level=")[1].split()[0],
                      "msg": json.loads(line.split(" msg=", 1)[1])}
        assert record["level"] in ("debug", "info", "warning", "error")
        assert_utc_between(log_time(line, fmt), start, end)
    assert any("probe: 1 tgids walked" in line for line in lines)


@pytest.mark.parametrize("fmt", ["text", "logfmt", "json"])
def test_every_run_log_line_carries_its_utc_time(tmp_path, fmt):
    """The daemon's default text format starts each line with the time, logfmt and JSON carry
    it as `time`: RFC 3339 in UTC with milliseconds, whatever the local time zone."""
    flags = [] if fmt == "text" else ["--log.format", fmt]
    start = time.time()
    config = write_config(tmp_path, "selection: {include: {uid: [4294967294]}}\n")
    daemon = DaemonProcess("--config", str(config), *flags, env=NOT_UTC)
    try:
        daemon.started()
        daemon.stop()
    finally:
        daemon.kill()
    end = time.time()
    lines = daemon.lines + daemon.remaining_lines()
    assert any("listening on" in line for line in lines) and len(lines) >= 2, lines
    for line in lines:
        assert_utc_between(log_time(line, fmt), start, end)
    if fmt == "text":
        assert all(line.split(" ", 1)[1].startswith("ctprofd: ") for line in lines), lines


@pytest.mark.parametrize("where", ["before", "after"])
def test_run_log_level_flag_overrides_the_configuration(tmp_path, where):
    config = write_config(tmp_path, "log_level: error\nselection: {include: {uid: [4294967294]}}\n")
    run = ["run", "--config", str(config)]
    flag = ["--log-level", "debug"]
    daemon = subprocess.Popen(CTPROFD + (flag + run if where == "before" else run + flag),
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, text=True, env=clean_env(), cwd=REPO)
    bound = threading.Timer(60, daemon.kill)  # ends the read below if no line ever comes
    bound.start()
    try:
        # an unchanged summary line is logged at debug from the second snapshot on
        assert any("DEBUG: probe: 0 tgids walked" in line for line in daemon.stderr)
    finally:
        bound.cancel()
        daemon.kill()
        daemon.wait()


def test_summary_line_only_when_it_changes(fixture_bins, spawn_fixture, caplog):
    first = spawn_fixture(fixture_bins["static"], 1)
    second = spawn_fixture(fixture_bins["static"], 1)
    engine = Capturer(CaptureSettings(debug_dirs=(str(fixture_bins.debug_root),)))
    with caplog.at_level(logging.INFO, logger="ctprofd.probe.capture"):
        for _ in range(3):
            engine.capture(pids=[first.pid])
        engine.capture(pids=[first.pid, second.pid])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe:")]
    assert lines == ["probe: 1 tgids walked, 1 jemalloc detected, 2 probed OK, 0 failed",
                     "probe: 2 tgids walked, 2 jemalloc detected, 4 probed OK, 0 failed"]
    engine.close()


def test_each_binary_failure_reason_once_at_info(fixture_bins, spawn_fixture, caplog):
    """Two processes of one binary whose parse fails (the parser gets 1 MiB of address
    space): the reason is logged at info once, then at debug."""
    variant = fixture_bins["static"]
    fixtures = [spawn_fixture(variant, 1) for _ in range(2)]
    engine = Capturer(CaptureSettings(parser=WorkerLimits(memory_bytes=1 << 20)))
    with caplog.at_level(logging.INFO, logger="ctprofd.probe.capture"):
        for _ in range(2):
            snapshot = engine.capture(pids=[f.pid for f in fixtures])
    engine.close()
    assert snapshot.failures == {tags.DWARF_PARSE_FAILURE: 2}
    reasons = [r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO and "out of memory" in r.getMessage()]
    assert len(reasons) == 1, reasons
    assert str(variant.binary) in reasons[0] and tags.DWARF_PARSE_FAILURE in reasons[0]
    assert [(f.pid, f.tag) for f in snapshot.failed_pids] == \
        sorted((f.pid, tags.DWARF_PARSE_FAILURE) for f in fixtures)
    assert all("out of memory" in f.reason for f in snapshot.failed_pids)


# -- one truth for the CLI and the checker --------------------------------------------------

def test_check_config_refuses_a_missing_offsets_file(tmp_path):
    path = write_config(tmp_path, f"offsets_files: [{tmp_path / 'nonexistent.json'}]\n")
    one_line(run_once("check-config", str(path)), 78, "nonexistent.json: No such file")


@pytest.mark.parametrize("in_yaml, flag", [(".inf", "inf"), (".nan", "nan"),
                                           ("1.0e+10", "1e10"), ("86401", "86401")])
def test_intervals_are_finite_and_at_most_a_day(tmp_path, in_yaml, flag):
    path = tmp_path / "c.yaml"
    path.write_text(f"interval: {in_yaml}\n")
    one_line(run_once("check-config", str(path)), 78, f"{path}: interval: must be")
    good = write_config(tmp_path, name="good.yaml")
    one_line(run_once("run", "--config", str(good), "--interval", flag), 78,
             "--interval: must be")


def test_snapshot_of_a_missing_pid_is_one_line_and_fails():
    one_line(cli("snapshot", "--pid", "999999999"), 1, "no such process: 999999999")


def test_offsets_usage(tmp_path):
    result = cli("offsets", "import")
    assert result.returncode == 2
    assert "offsets import takes one FILE" in result.stderr
    assert "No such file" not in result.stderr  # "import" is not taken for a binary path
    usage = cli("offsets", "--help").stdout
    assert usage.count("ctprofd offsets [options] import FILE") == 1, usage
    assert usage.count("BINARY | export FILE") == 0, usage


def test_snapshot_offsets_and_import_share_the_configured_cache(fixture_bins, spawn_fixture,
                                                               tmp_path):
    """snapshot writes the layouts it resolves, and offsets import writes, into the cache
    of the configuration both read; `offsets BINARY` then finds an imported layout by
    build-id for a binary that has neither DWARF nor readable code."""
    variant = fixture_bins["static-stripped-buildid"]
    broken = without_offsets(variant, tmp_path)  # same build-id as the variant
    exported = tmp_path / "offsets.json"
    result = cli("offsets", "--debug-dir", str(fixture_bins.debug_root), "--cache-dir", "",
                 "export", str(exported), str(variant.binary))
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "cache"
    config = tmp_path / "ctprofd.yaml"
    config.write_text(f"cache_dir: {cache}\ndebug_dirs: [{tmp_path / 'empty'}]\n")
    fixture = spawn_fixture(fixture_bins["static"], 1)
    snapshot = cli("snapshot", "--config", str(config), "--pid", str(fixture.pid))
    assert snapshot.returncode == 0, snapshot.stderr
    assert any(cache.glob("layouts/build-id_*.json"))
    before = cli("offsets", "--config", str(config), broken)
    assert before.returncode == 1 and "dwarf-parse-failure" in before.stderr, before.stderr
    result = cli("offsets", "import", str(exported), "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert str(cache) in result.stdout
    after = cli("offsets", "--json", "--config", str(config), broken)
    assert after.returncode == 0, after.stderr
    layout = json.loads(after.stdout)
    assert (layout["allocated_offset"], layout["deallocated_offset"]) == (824, 840)


def test_offsets_failure_says_how_to_get_debug_info(fixture_bins, tmp_path):
    broken = without_offsets(fixture_bins["static-stripped-buildid"], tmp_path)
    result = cli("offsets", "--cache-dir", "", "--debug-dir", str(tmp_path / "empty"), broken)
    assert result.returncode == 1
    assert "dwarf-parse-failure" in result.stderr and "no DWARF" in result.stderr
    # a binary built here, that no package installed: no -dbgsym advice, what would help
    assert "no package of the distribution installed" in result.stderr
    for text in ("debug (unstripped) build of the same version", "ctprofd offsets export",
                 "ctprofd offsets import", "ctprofd offsets on an unstripped build"):
        assert text in result.stderr, result.stderr
    assert "-dbgsym" not in result.stderr and "DEBUGINFOD_URLS" not in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_info_advice_for_a_packaged_and_an_unpackaged_binary(tmp_path):
    """Debian's libjemalloc.so.2 (dpkg knows its package): its -dbgsym; the same bytes
    copied elsewhere (no package owns them): no package to install, what would help."""
    packaged = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    advice = how_to_get_debug_info(packaged)
    assert "libjemalloc2-dbgsym" in advice and "DEBUGINFOD_URLS=" in advice, advice
    copy = tmp_path / "libjemalloc.so.2"
    shutil.copy(packaged, copy)
    advice = how_to_get_debug_info(str(copy))
    assert advice.startswith(f"no package of the distribution installed {copy}"), advice
    assert "dbgsym" not in advice and "ctprofd offsets export" in advice


@pytest.mark.parametrize("release, expected", [
    ({"ID": "debian", "VERSION_CODENAME": "bookworm", "PRETTY_NAME": "Debian 12"},
     ["debian-debug/ bookworm-debug", "apt-get install libfoo1-dbgsym",
      "DEBUGINFOD_URLS=https://debuginfod.debian.net"]),
    ({"ID": "ubuntu", "ID_LIKE": "debian", "VERSION_CODENAME": "noble"},
     ["ddebs.ubuntu.com noble", "libfoo1-dbgsym", "https://debuginfod.ubuntu.com"]),
    ({"ID": "rocky", "ID_LIKE": "rhel centos fedora"},
     ["dnf debuginfo-install libfoo1", "https://debuginfod.fedoraproject.org"]),
    ({"ID": "gentoo"}, ["debug symbols package", "DEBUGINFOD_URLS"]),
])
def test_debug_info_advice_per_distribution(release, expected):
    advice = how_to_get_debug_info("/usr/lib/libfoo.so.1", release, package="libfoo1")
    for text in expected:
        assert text in advice, advice
    assert "\n" not in advice


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url, expected", [
    ("http://ctprofd-test.invalid", "cannot resolve the host name"),
    ("http://127.0.0.1:{port}", "cannot connect"),
])
def test_debuginfod_network_errors_are_named(fixture_bins, tmp_path, url, expected):
    binary = without_offsets(fixture_bins["static-stripped-buildid"], tmp_path)
    url = url.format(port=_free_port())
    result = cli("offsets", "--cache-dir", "", "--debug-dir", str(tmp_path / "empty"), binary,
                 env={"DEBUGINFOD_URLS": url})
    assert result.returncode == 1
    assert f"debuginfod: {url}: {expected}" in result.stderr, result.stderr
    assert "not on" not in result.stderr


# -- a cached failure names the path the process has the file at -----------------------------

MAP_EXECUTABLE = """
import mmap, os, sys
if len(sys.argv) > 2:
    with open("/proc/self/comm", "w") as comm:
        comm.write(sys.argv[2])
fd = os.open(sys.argv[1], os.O_RDONLY)
code = mmap.mmap(fd, 0, prot=mmap.PROT_READ | mmap.PROT_EXEC)  # offset 0, as a loader maps it
print("READY", flush=True)
sys.stdin.read()
"""


def test_a_cached_failure_names_the_path_the_process_maps_not_the_one_typed(
        fixture_bins, spawn_process, tmp_path):
    """`ctprofd offsets typed/libjemalloc.so.2` caches a failure for that file; a process
    that maps the same file through another hard link is told of under its own path."""
    library = fixture_bins["dynamic-stripped-buildid"].jemalloc_object
    data, count = FS_COUNTER_ACCESS.subn(b"\x3e", library.read_bytes())  # no counters in code
    assert count >= 4, count
    (tmp_path / "typed").mkdir()
    (tmp_path / "mapped").mkdir()
    typed = tmp_path / "typed" / "libjemalloc.so.2"
    typed.write_bytes(data)
    mapped = tmp_path / "mapped" / "libjemalloc.so.2"
    os.link(typed, mapped)  # the same file (same cache key), at another path
    config = tmp_path / "ctprofd.yaml"
    config.write_text(f"cache_dir: {tmp_path / 'cache'}\ndebug_dirs: [{tmp_path / 'empty'}]\n")
    offsets = subprocess.run([*CTPROFD, "offsets", "--config", str(config),
                              "typed/libjemalloc.so.2"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL,
                             env={**clean_env(), "PYTHONPATH": str(REPO)})
    assert offsets.returncode == 1, offsets.stderr
    assert f"dwarf-parse-failure: {typed}: no DWARF" in offsets.stderr, offsets.stderr
    assert any((tmp_path / "cache").rglob("file_*.json"))  # the failure is cached
    user = spawn_process([sys.executable, "-c", MAP_EXECUTABLE, str(mapped)])
    snapshot = cli("snapshot", "--config", str(config), "--pid", str(user.proc.pid))
    assert snapshot.returncode == 1, snapshot.stderr
    assert (f"pid {user.proc.pid} not read: dwarf-parse-failure: {mapped}: no DWARF"
            in snapshot.stderr), snapshot.stderr
    assert str(typed) not in snapshot.stderr


def broken_library(fixture_bins, directory) -> tuple[str, str]:
    """A copy of a stripped libjemalloc.so.2 whose counters cannot be found (no DWARF, no
    %fs accesses), and the offsets file exported from the original (same build-id)."""
    variant = fixture_bins["dynamic-stripped-buildid"]
    data, count = FS_COUNTER_ACCESS.subn(b"\x3e", variant.jemalloc_object.read_bytes())
    assert count >= 4, count
    broken = directory / "libjemalloc.so.2"
    broken.write_bytes(data)
    exported = directory / "offsets.json"
    result = cli("offsets", "--debug-dir", str(fixture_bins.debug_root), "--cache-dir", "",
                 "export", str(exported), str(variant.jemalloc_object))
    assert result.returncode == 0, result.stderr
    return str(broken), str(exported)


def failures(daemon: DaemonProcess, tag: str) -> float:
    match = re.search(rf'^ctprofd_probe_failures{{tag="{tag}"}} (\S+)$', daemon.get(), re.M)
    return float(match.group(1)) if match else 0.0


def test_an_import_takes_effect_in_a_running_daemon_and_remove_undoes_it(
        fixture_bins, spawn_process, tmp_path):
    """A daemon that cached a dwarf-parse-failure reads an `offsets import` at its next
    snapshot and tries the binary again at once (it kept the failure for its 600 s before);
    `offsets list` shows the import as such; `offsets remove` unpins it, and a process
    started from the binary then fails again. The CLI writes only the imported layouts
    beside the daemon."""
    broken, exported = broken_library(fixture_bins, tmp_path)
    config = write_config(tmp_path, "selection:\n  include:\n    comm: ['^ctprofd-mapper$']\n"
                          f"debug_dirs: [{tmp_path / 'empty'}]\n")
    user = spawn_process([sys.executable, "-c", MAP_EXECUTABLE, broken, "ctprofd-mapper"])
    daemon = DaemonProcess("--config", str(config), "--log-level", "info")
    try:
        daemon.started()
        wait_until(lambda: failures(daemon, "dwarf-parse-failure") == 1,
                   "the daemon caches the failure", poll=0.1)
        result = cli("offsets", "import", exported, "--config", str(config))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: (failures(daemon, "dwarf-parse-failure") == 0
                            and daemon.sample("ctprofd_probe_jemalloc_detected") == 1),
                   "the import is used at the next snapshots", poll=0.1)
        daemon.wait_for("imported layouts changed: 1 held")
        listed = cli("offsets", "list", "--json", "--config", str(config))
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        build_id = json.loads(Path(exported).read_text())["layouts"].popitem()[0]
        assert {"build_id": build_id, "kind": "imported", "owner": None,
                "allocated_offset": 824, "deallocated_offset": 840} in [
                    {k: v for k, v in row.items() if k != "source"} for row in rows]
        table = cli("offsets", "list", "--config", str(config))
        assert any(line.startswith(build_id) and " imported " in line
                   for line in table.stdout.splitlines()), table.stdout
        removed = cli("offsets", "remove", build_id, "--config", str(config))
        assert removed.returncode == 0, removed.stderr
        daemon.wait_for("imported layouts changed: 0 held")
        # a process attached through the import stays attached; one started now is not
        spawn_process([sys.executable, "-c", MAP_EXECUTABLE, broken, "ctprofd-mapper"])
        wait_until(lambda: failures(daemon, "dwarf-parse-failure") == 1,
                   "the binary fails again once its import is removed", poll=0.1)
        assert daemon.sample("ctprofd_probe_jemalloc_detected") == 1
        again = cli("offsets", "remove", build_id, "--config", str(config))
        assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
        assert f"not imported in {tmp_path / 'cache' / 'imported.json'}: {build_id}" in \
            again.stderr
    finally:
        assert daemon.stop() == 0


def test_offsets_list_writes_nothing_to_the_cache(tmp_path):
    """`offsets list` only reads: it makes no directory and removes no file of an older
    ctprofd (opened writable, the cache would do both)."""
    cache = tmp_path / "cache"
    (cache / "layouts").mkdir(parents=True)
    (cache / "layouts" / "file_1_2_3_4.json").write_text("{}")  # an older ctprofd's name
    result = cli("offsets", "list", "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == [
        "layouts", "layouts/file_1_2_3_4.json"]


@pytest.mark.parametrize("action", ["import", "remove"])
def test_a_cache_dir_that_is_not_a_directory_is_named(tmp_path, action):
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("")
    exported = tmp_path / "offsets.json"
    offsets_file.dump([], str(exported))
    argument = str(exported) if action == "import" else "ab" * 20
    result = cli("offsets", action, argument, "--cache-dir", str(not_a_directory))
    one_line(result, 1, f"cache_dir {not_a_directory} is not a directory")


def test_sighup_reads_an_import_without_waiting_for_a_snapshot(fixture_bins, tmp_path):
    _, exported = broken_library(fixture_bins, tmp_path)
    config = write_config(tmp_path, "selection:\n  include:\n    comm: ['^ctprofd-none$']\n",
                          interval=3600)
    daemon = DaemonProcess("--config", str(config), "--log-level", "info")
    try:
        daemon.started()
        daemon.wait_for("probe: ")  # the first snapshot is done; the next is in an hour
        result = cli("offsets", "import", exported, "--config", str(config))
        assert result.returncode == 0, result.stderr
        daemon.signal(signal.SIGHUP)
        daemon.wait_for(f"imported layouts changed: 1 held in {tmp_path / 'cache'}")
    finally:
        assert daemon.stop() == 0
