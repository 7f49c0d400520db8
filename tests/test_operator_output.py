"""What the one-shot commands tell an operator: `snapshot --pid` fails when a process asked
for was not read, and says why; the table in human units, largest live bytes first;
`offsets PROGRAM` follows a program to the jemalloc it loads (real processes, real ctprofd
subprocesses)."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest

from ctprofd.cli import human_bytes
from daemon_process import CTPROFD, REPO, clean_env

SYSTEM_JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2


def cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *CTPROFD, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, stdin=subprocess.DEVNULL, env=clean_env())


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (1536, "1.5 KiB"), (5 << 30, "5.0 GiB"),
                                     (-(3 << 20), "-3.0 MiB"), (1 << 70, "1024.0 EiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def test_snapshot_of_a_process_without_jemalloc_fails_and_says_why(spawn_process):
    sleeper = spawn_process(["sleep", "600"], ready=None)
    result = cli("snapshot", "--cache-dir", "", "--pid", str(sleeper.proc.pid))
    assert result.returncode == 1, result.stderr
    assert (f"pid {sleeper.proc.pid} not read: not linked with a recognised jemalloc"
            in result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_snapshot_of_a_failed_process_fails_with_its_tag(fixture_bins, spawn_fixture):
    """One process read, one whose threads are refused (another tracer holds them; its
    totals may still come from its arenas): exit 1, naming the one."""
    good = spawn_fixture(fixture_bins["static"], 1)
    traced = spawn_fixture(fixture_bins["static"], 1, prefix=["strace", "-f", "-o", "/dev/null"])
    result = cli("snapshot", "--json", "--cache-dir", "", "--pid", str(good.pid),
                 "--pid", str(traced.pid))
    assert result.returncode == 1, result.stderr
    [failed] = json.loads(result.stdout)["failed_pids"]
    assert failed["pid"] == traced.pid
    lines = [line for line in result.stderr.splitlines() if line.startswith("ctprofd: pid ")]
    assert lines == [f"ctprofd: pid {traced.pid} read in part: {failed['tag']}: "
                     f"{failed['reason']}"], result.stderr
    assert f"pid {good.pid}" not in result.stderr
    ok = cli("snapshot", "--cache-dir", "", "--pid", str(good.pid))
    assert ok.returncode == 0, ok.stderr


def test_table_in_human_units_largest_live_first(fixture_bins, spawn_fixture):
    small = spawn_fixture(fixture_bins["static"], 1)
    large = spawn_fixture(fixture_bins["static"], 8)  # more workers, more live bytes
    pids = ["--pid", str(small.pid), "--pid", str(large.pid)]
    data = json.loads(cli("snapshot", "--json", "--cache-dir", "", *pids).stdout)
    live = {p["pid"]: p["allocated_bytes"] - p["deallocated_bytes"] for p in data["processes"]}
    assert live[large.pid] > live[small.pid]  # the fixture's own arithmetic, not ctprofd's
    table = cli("snapshot", "--cache-dir", "", *pids).stdout.splitlines()
    rows = [line.split() for line in table[1:3]]
    assert [int(r[0]) for r in rows] == [large.pid, small.pid], table
    assert " ".join(rows[0][7:9]) == human_bytes(live[large.pid]), rows[0]
    raw = cli("snapshot", "--bytes", "--cache-dir", "", *pids).stdout.splitlines()
    assert [int(r.split()[5]) for r in raw[1:3]] == [live[large.pid], live[small.pid]], raw


@pytest.mark.parametrize("program", ["/usr/bin/redis-server", "/usr/sbin/varnishd"])
def test_offsets_follows_a_program_to_the_jemalloc_it_loads(program):
    result = cli("offsets", "--cache-dir", "", program)
    assert result.returncode == 0, result.stderr
    assert f"object:              {SYSTEM_JEMALLOC}" in result.stdout
    assert "thread_allocated:    824" in result.stdout
    as_json = json.loads(cli("offsets", "--json", "--cache-dir", "", program).stdout)
    assert as_json["object"] == SYSTEM_JEMALLOC


def test_offsets_of_a_program_without_jemalloc_says_so_in_one_line():
    result = cli("offsets", "--cache-dir", "", "/bin/ls")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "not linked with jemalloc, in itself or in the shared objects it loads" \
        in result.stderr


def test_denied_warning_once_per_cause_however_processes_come_and_go(caplog):
    """The summary line changes with every process that comes or goes; the warning about
    processes ctprofd cannot see is about their cause, said again only after it cleared."""
    from ctprofd.probe.capture import Capturer, CaptureSettings
    from ctprofd.report.snapshot import Snapshot
    from ctprofd.report.summary import REFUSED_DESPITE_PRIVILEGE_HINT, ProbeSummary

    capturer = Capturer(CaptureSettings())
    try:
        def snapshot(walked: int, denied: int) -> None:
            capturer._log_snapshot(Snapshot(0.0, 0.0, ProbeSummary(tgids_walked=walked),
                                            denied_tgids=denied))
        with caplog.at_level(logging.INFO, logger="ctprofd.probe.capture"):
            for walked, denied in [(10, 1), (11, 2), (12, 1), (13, 3), (14, 0), (15, 1)]:
                snapshot(walked, denied)
    finally:
        capturer.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(" processes")[0] for w in warnings] == ["1", "1"], warnings
    assert all(w.endswith(REFUSED_DESPITE_PRIVILEGE_HINT) for w in warnings)  # we are root
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 6  # every summary line differed
