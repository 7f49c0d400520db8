"""`ctprofd run` against real jemalloc fixtures: the exported series equal what the fixtures'
own mallctl calls reported, per process and summed without pid, across thread exit, process
exit and restart."""

from __future__ import annotations

import json
import re
import signal

import pytest

from daemon_process import DaemonProcess, write_config
from support.procs import wait_until

HANG_GUARD = 120.0  # seconds: keeps a broken run from hanging, never a timing claim


def truth(fixture) -> tuple[int, int]:
    """(allocated, deallocated) of a fixture, from its threads' own mallctl reports."""
    return (sum(t["allocated"] for t in fixture.threads),
            sum(t["deallocated"] for t in fixture.threads))


class Scrapes:
    """Reads labelled samples from a running daemon's /metrics."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.text = ""

    def after_next_snapshot(self) -> Scrapes:
        """Wait until a snapshot that started after this call, and had no process pending
        (binaries are resolved beside the snapshots, however many snapshots that takes on a
        busy host), has been published."""
        def resolved() -> bool:
            now = self.daemon.sample("ctprofd_snapshots_total") or 0
            self.text = self.daemon.wait_for_sample("ctprofd_snapshots_total", now + 2)
            return not self.daemon.sample("ctprofd_probe_pending", self.text)
        wait_until(resolved, "no process pending in a snapshot", HANG_GUARD, poll=0)
        return self

    def value(self, name: str, **labels: str) -> float | None:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        match = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$", self.text, re.M)
        return float(match.group(1)) if match else None

    def series(self, **labels: str) -> tuple[float | None, ...]:
        """allocated, deallocated, live bytes, processes and threads of one series."""
        return tuple(self.value(f"ctprofd_{name}", **labels) for name in
                     ("allocated_bytes_total", "deallocated_bytes_total", "live_bytes",
                      "processes", "threads"))


@pytest.fixture
def run_daemon(tmp_path, fixture_bins):
    started: list[DaemonProcess] = []

    def start(labels: str) -> Scrapes:
        extra = (f"labels: [{labels}]\nselection:\n  include:\n"
                 f"    exe: ['{fixture_bins.root}/*']\n")
        daemon = DaemonProcess("--config", str(write_config(tmp_path, extra, interval=0.2)))
        started.append(daemon)
        daemon.started()
        return Scrapes(daemon)

    yield start
    for daemon in started:
        daemon.stop()


def test_per_process_values_equal_the_fixtures_own_reports(fixture_bins, spawn_fixture,
                                                          run_daemon):
    static = spawn_fixture(fixture_bins["static"], 4)
    dynamic = spawn_fixture(fixture_bins["dynamic"], 2)
    scrapes = run_daemon("pid, comm").after_next_snapshot()
    for fixture, nthreads in ((static, 5), (dynamic, 3)):
        allocated, deallocated = truth(fixture)
        assert scrapes.series(pid=str(fixture.pid), comm="alloc_threads") == (
            allocated, deallocated, allocated - deallocated, 1, nthreads)
    assert scrapes.daemon.sample("ctprofd_probe_failed", scrapes.text) == 0


def test_aggregated_without_pid_is_the_sum(fixture_bins, spawn_fixture, run_daemon):
    fixtures = [spawn_fixture(fixture_bins["static"], 3), spawn_fixture(fixture_bins["dynamic"], 1)]
    scrapes = run_daemon("comm").after_next_snapshot()
    allocated = sum(truth(f)[0] for f in fixtures)
    deallocated = sum(truth(f)[1] for f in fixtures)
    assert scrapes.series(comm="alloc_threads") == (
        allocated, deallocated, allocated - deallocated, 2, 4 + 2)


def test_a_thread_ending_keeps_the_counters(fixture_bins, spawn_fixture, run_daemon):
    fixture = spawn_fixture(fixture_bins["static"], 3)
    before = truth(fixture)
    scrapes = run_daemon("pid").after_next_snapshot()
    assert scrapes.series(pid=str(fixture.pid))[:2] == before
    fixture.exit_thread(1)
    scrapes.after_next_snapshot()
    allocated, deallocated, live, processes, threads = scrapes.series(pid=str(fixture.pid))
    assert (allocated, deallocated) == before
    assert (processes, threads) == (1, 3)


def test_a_process_stopping_leaves_the_group_while_the_counters_hold(fixture_bins,
                                                                    spawn_fixture, run_daemon):
    staying = spawn_fixture(fixture_bins["static"], 2)
    leaving = spawn_fixture(fixture_bins["static"], 5)
    scrapes = run_daemon("comm").after_next_snapshot()
    total = tuple(a + b for a, b in zip(truth(staying), truth(leaving)))
    assert scrapes.series(comm="alloc_threads")[:2] == total
    leaving.quit()
    scrapes.after_next_snapshot()
    staying_live = truth(staying)[0] - truth(staying)[1]
    assert scrapes.series(comm="alloc_threads") == (*total, staying_live, 1, 3)


def test_a_restart_under_the_same_comm_does_not_drift_live_bytes(fixture_bins, spawn_fixture,
                                                                 run_daemon):
    first = spawn_fixture(fixture_bins["static"], 2)
    scrapes = run_daemon("comm").after_next_snapshot()
    assert scrapes.series(comm="alloc_threads")[:2] == truth(first)
    first_truth = truth(first)
    first.quit()
    second = spawn_fixture(fixture_bins["static"], 2)
    scrapes.after_next_snapshot()
    allocated, deallocated = (a + b for a, b in zip(first_truth, truth(second)))
    live = truth(second)[0] - truth(second)[1]
    assert scrapes.series(comm="alloc_threads") == (allocated, deallocated, live, 1, 3)


def test_sighup_applies_new_labels_and_selection(fixture_bins, spawn_fixture, run_daemon,
                                                 tmp_path):
    static = spawn_fixture(fixture_bins["static"], 1)
    dynamic = spawn_fixture(fixture_bins["dynamic"], 1)
    scrapes = run_daemon("pid").after_next_snapshot()
    assert scrapes.series(pid=str(static.pid))[:2] == truth(static)
    path = tmp_path / "ctprofd.yaml"
    path.write_text(path.read_text().replace("labels: [pid]", "labels: [comm]")
                    .replace(f"{fixture_bins.root}/*", f"{fixture_bins['dynamic'].binary}"))
    scrapes.daemon.signal(signal.SIGHUP)
    scrapes.daemon.wait_for("reloaded the configuration")
    scrapes.after_next_snapshot()
    assert scrapes.value("ctprofd_allocated_bytes_total", pid=str(static.pid)) is None
    allocated, deallocated = truth(dynamic)
    assert scrapes.series(comm="alloc_threads") == (
        allocated, deallocated, allocated - deallocated, 1, 2)


def test_sighup_reads_at_once_a_process_the_old_selection_left_out(fixture_bins, spawn_fixture,
                                                                   run_daemon, tmp_path):
    """A process the selection leaves out is remembered as such and not read again for a
    few snapshots; a reload that selects it has it read in the first snapshot after."""
    static = spawn_fixture(fixture_bins["static"], 1)
    dynamic = spawn_fixture(fixture_bins["dynamic"], 2)
    scrapes = run_daemon("pid")
    path = tmp_path / "ctprofd.yaml"
    path.write_text(path.read_text().replace(f"{fixture_bins.root}/*",
                                             f"{fixture_bins['static'].binary}"))
    scrapes.daemon.signal(signal.SIGHUP)
    scrapes.daemon.wait_for("reloaded the configuration")
    for _ in range(3):
        scrapes.after_next_snapshot()
        assert scrapes.value("ctprofd_allocated_bytes_total", pid=str(dynamic.pid)) is None
    path.write_text(path.read_text().replace(f"{fixture_bins['static'].binary}",
                                             f"{fixture_bins.root}/*"))
    scrapes.daemon.signal(signal.SIGHUP)
    scrapes.daemon.wait_for("reloaded the configuration")
    scrapes.after_next_snapshot()
    assert scrapes.series(pid=str(dynamic.pid))[:2] == truth(dynamic)
    assert scrapes.series(pid=str(static.pid))[:2] == truth(static)


def test_series_of_exited_processes_survive_a_sigkill(fixture_bins, spawn_fixture, run_daemon):
    """An aggregated series (no pid label) holds what exited processes counted; a SIGKILL
    right after one exited must not take that away from the restarted daemon."""
    staying = spawn_fixture(fixture_bins["static"], 2)
    leaving = spawn_fixture(fixture_bins["static"], 3)
    scrapes = run_daemon("comm").after_next_snapshot()
    total = tuple(a + b for a, b in zip(truth(staying), truth(leaving)))
    assert scrapes.series(comm="alloc_threads")[:2] == total
    leaving.quit()
    scrapes.after_next_snapshot()
    assert scrapes.series(comm="alloc_threads")[:2] == total
    assert scrapes.series(comm="alloc_threads")[3] == 1  # processes
    scrapes.daemon.signal(signal.SIGKILL)
    scrapes.daemon.proc.wait()
    scrapes = run_daemon("comm").after_next_snapshot()
    assert scrapes.series(comm="alloc_threads")[:2] == total


def test_thread_churn_is_counted_whole_and_is_no_privilege_problem(fixture_bins,
                                                                   spawn_process, run_daemon):
    """Threads living well under a millisecond, thousands a second: the exported totals
    count every thread that ever ran (the truth: each thread's own mallctl report, summed
    by the fixture), and their exit races never turn the privilege gate on."""
    churn = spawn_process([fixture_bins.churn, "4", "200"])
    scrapes = run_daemon("pid")
    for _ in range(5):
        scrapes.after_next_snapshot()
        assert scrapes.daemon.sample("ctprofd_probe_privilege_dominant", scrapes.text) == 0
        assert scrapes.daemon.sample("ctprofd_probe_failed", scrapes.text) == 0
    churn.send("pause")
    truth = json.loads(churn.readline())
    scrapes.after_next_snapshot()
    allocated, deallocated, live, processes, _ = scrapes.series(pid=str(churn.pid))
    assert truth["threads"] > 100
    assert abs(allocated - truth["allocated"]) <= 0.02 * truth["allocated"]
    assert abs(deallocated - truth["deallocated"]) <= 0.02 * truth["deallocated"]
    assert abs(live - (truth["allocated"] - truth["deallocated"])) <= 1 << 20
    assert scrapes.value("ctprofd_arena_processes", pid=str(churn.pid)) == processes == 1


def test_a_reload_that_leaves_a_read_process_out_drops_its_series(fixture_bins, spawn_fixture,
                                                                  run_daemon, tmp_path):
    """A process read before a reload that leaves it out is forgotten, not held as live
    (frozen) for as long as it runs: its series goes in the first snapshot after."""
    static = spawn_fixture(fixture_bins["static"], 1)
    dynamic = spawn_fixture(fixture_bins["dynamic"], 1)
    scrapes = run_daemon("pid").after_next_snapshot()
    assert scrapes.series(pid=str(dynamic.pid))[:2] == truth(dynamic)
    path = tmp_path / "ctprofd.yaml"
    path.write_text(path.read_text().replace(f"{fixture_bins.root}/*",
                                             f"{fixture_bins['static'].binary}"))
    scrapes.daemon.signal(signal.SIGHUP)
    scrapes.daemon.wait_for("reloaded the configuration")
    scrapes.after_next_snapshot()
    assert scrapes.value("ctprofd_allocated_bytes_total", pid=str(dynamic.pid)) is None
    assert scrapes.series(pid=str(static.pid))[:2] == truth(static)
