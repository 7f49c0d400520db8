"""Attacks by an unprivileged user (uid 65534, through setpriv) on a root `ctprofd run`:
hostile file and cgroup names, idle and trickling connections, floods of short-lived and
self-renaming processes, the parser worker, and what already held (SIGHUP storms, user
namespaces, 50,000 mappings, a PTRACE_TRACEME child). For each, the daemon keeps its schedule
(snapshots keep being published), a root reference process's series keeps its exact values,
and a scraper polling once a second keeps succeeding. Everything waits for events; nothing
asserts on elapsed time."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon_process import DaemonProcess, write_config
from support.procs import wait_until

IDLE_CLIENTS = Path(__file__).resolve().parent / "support" / "idle_clients.py"
REQUEST_FLOOD = Path(__file__).resolve().parent / "support" / "request_flood.py"

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
          "--bounding-set=-all", "--")
SCRAPES_NEEDED = 0.99
HANG_GUARD = 120.0  # seconds: keeps a broken run from hanging, never a timing claim


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` in an exposition."""
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


class Scraper:
    """Scrapes /metrics once a second in a thread; counts what succeeded and keeps the last
    successful text."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.ok = 0
        self.failed: list[str] = []
        self.text = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                request = urllib.request.Request(self.url + "/metrics", headers=self.headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    text = response.read().decode()
                if response.status != 200 or "ctprofd_snapshots_total" not in text:
                    raise ValueError(f"status {response.status}, {len(text)} bytes")
                self.text, self.ok = text, self.ok + 1
            except Exception as exc:  # noqa: BLE001 - every failure is recorded
                self.failed.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_succeeded(self) -> None:
        total = self.ok + len(self.failed)
        assert total and self.ok >= SCRAPES_NEEDED * total, (self.ok, total, self.failed[:5])


class Harness:
    """A root daemon, a root reference process and a scraper."""

    def __init__(self, daemon: DaemonProcess, reference, scraper: Scraper) -> None:
        self.daemon = daemon
        self.reference = reference
        self.scraper = scraper

    def next_snapshot(self, count: int = 2) -> str:
        """A scrape after `count` more snapshots were published (the schedule holds)."""
        now = self.daemon.sample("ctprofd_snapshots_total") or 0
        return self.daemon.wait_for_sample("ctprofd_snapshots_total", now + count)

    def exporting(self, pids: set[int]) -> str:
        """A scrape after the next snapshot that exported every one of `pids`: their
        binaries are resolved beside the snapshots, in however many a busy host takes."""
        def exported() -> str | None:
            text = self.next_snapshot(1)
            found = {labels["pid"] for labels, _ in
                     samples(text, "ctprofd_allocated_bytes_total")}
            return text if {str(pid) for pid in pids} <= found else None
        return wait_until(exported, f"pids {sorted(pids)} exported", HANG_GUARD, poll=0)

    def assert_reference_exact(self, text: str) -> None:
        allocated = sum(t["allocated"] for t in self.reference.threads)
        deallocated = sum(t["deallocated"] for t in self.reference.threads)
        pid = str(self.reference.pid)
        found = [(n, v) for n in ("ctprofd_allocated_bytes_total",
                                  "ctprofd_deallocated_bytes_total")
                 for labels, v in samples(text, n) if labels.get("pid") == pid]
        assert found == [("ctprofd_allocated_bytes_total", allocated),
                         ("ctprofd_deallocated_bytes_total", deallocated)], found


@pytest.fixture
def attacked(tmp_path, fixture_bins, spawn_fixture):
    """start(extra_config, labels) -> Harness; stops everything at the end."""
    started: list[tuple[DaemonProcess, Scraper]] = []

    def start(extra: str = "", labels: str = "pid, comm") -> Harness:
        reference = spawn_fixture(fixture_bins["static"], 2)
        config = (f"labels: [{labels}]\nselection:\n  include:\n"
                  f"    exe: ['{fixture_bins.root}/*']\n{extra}")
        daemon = DaemonProcess("--config", str(write_config(tmp_path, config, interval=0.2)))
        daemon.started()
        scraper = Scraper(daemon.url)
        started.append((daemon, scraper))
        harness = Harness(daemon, reference, scraper)
        text = harness.next_snapshot()
        for _ in range(50):  # its binary is resolved beside the first snapshots
            if f'pid="{reference.pid}"' in text:
                break
            text = harness.next_snapshot(1)
        harness.assert_reference_exact(text)
        return harness

    yield start
    for daemon, scraper in started:
        scraper.stop()
        daemon.stop()


def lint(text: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                            capture_output=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


HOSTILE_NAMES = (b"bad\xff\xfename", b'quo"te\\n', b"new\nline", b"sep\xe2\x80\xa8\x1cx")


def test_hostile_file_names_cannot_break_the_endpoint(attacked, fixture_bins, spawn_fixture):
    harness = attacked(labels="pid, comm, exe")
    drop = Path(fixture_bins.root) / "attacker"
    drop.mkdir()
    shutil.chown(drop, 65534, 65534)
    attackers = []
    for name in HOSTILE_NAMES:
        path = os.fsdecode(bytes(drop) + b"/" + name)
        subprocess.run([*NOBODY, "cp", str(fixture_bins["static"].binary), path], check=True)
        attackers.append((spawn_fixture(path, 1, prefix=NOBODY), name))
    text = harness.exporting({fixture.pid for fixture, _ in attackers})
    exes = {labels["pid"]: labels["exe"] for labels, _ in
            samples(text, "ctprofd_allocated_bytes_total")}
    lint(text)
    for fixture, name in attackers:
        expected = (bytes(drop) + b"/" + name).decode("utf-8", "replace")
        assert exes[str(fixture.pid)] == expected
    harness.assert_reference_exact(text)
    harness.scraper.stop()
    harness.scraper.assert_succeeded()
    assert not [line for line in harness.daemon.lines if "ERROR" in line]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_idle_and_trickling_connections_cannot_crowd_out_scrapes(attacked, spawn_process):
    harness = attacked()
    daemon = harness.daemon
    port = daemon.url.rsplit(":", 1)[1]
    before = rss_kib(daemon.proc.pid)
    # 500 idle connections over 20 addresses (all held), 100 idle or trickling ones from the
    # scraper's own address (over its limit of 64: they keep pushing each other out)
    attacker = spawn_process(["/usr/bin/python3", "-c", IDLE_CLIENTS.read_text(), port, "500",
                              "20", "100"], prefix=NOBODY, timeout=60)
    # the first-byte deadline closes each idle one after 3 s, and the attacker reopens it
    held = daemon.wait_for_sample("ctprofd_http_connections", 400)
    harness.scraper.ok, harness.scraper.failed = 0, []  # count from here
    while harness.scraper.ok + len(harness.scraper.failed) < 12:
        text = harness.next_snapshot()
    harness.scraper.stop()
    attacker.send("")
    assert attacker.readline().startswith("connects=")
    connects = int(attacker.output[-1].split("=")[1])
    harness.scraper.assert_succeeded()
    assert samples(held, "ctprofd_http_connections")[0][1] >= 400
    evicted = samples(text, "ctprofd_http_connections_evicted_total")[0][1]
    assert evicted > 0 and connects > 600, (evicted, connects)  # the crowd kept reconnecting
    harness.assert_reference_exact(text)
    assert rss_kib(daemon.proc.pid) - before < 64 << 10


def test_idle_processes_of_one_user_cannot_push_out_another_users_service(
        attacked, fixture_bins, spawn_fixture):
    """20 idle jemalloc processes of uid 65534, all started before a root service restarts,
    against a cap of 6 series: each uid gets its share, so the restarted service (younger
    than every one of them) keeps a series, and the flood keeps the rest of the cap."""
    harness = attacked("max_series: 6\n")
    idle = [spawn_fixture(fixture_bins["static"], 1, prefix=NOBODY) for _ in range(20)]
    text = harness.next_snapshot(1)
    for _ in range(100):  # the idle processes are read (their binary is resolved already)
        if dict((l["reason"], v) for l, v in samples(text, "ctprofd_series_dropped"))["live"] >= 15:
            break
        text = harness.next_snapshot(1)
    service = spawn_fixture(fixture_bins["static"], 1)  # the service restarts: a new pid
    pid = str(service.pid)
    for _ in range(30):
        if pid in {l.get("pid") for l, _ in samples(text, "ctprofd_allocated_bytes_total")}:
            break
        text = harness.next_snapshot(1)
    for _ in range(3):  # it keeps its series, exact, and so does the reference
        exported = {l.get("pid"): v for l, v in samples(text, "ctprofd_allocated_bytes_total")}
        assert exported.get(pid) == sum(t["allocated"] for t in service.threads), exported
        harness.assert_reference_exact(text)
        flood = {str(p.pid) for p in idle} & set(exported)
        assert len(flood) == 4, exported  # the cap's other 4 series are the flood's
        text = harness.next_snapshot(1)
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


def test_a_flood_of_short_lived_processes_cannot_keep_a_service_out(
        attacked, fixture_bins, spawn_fixture, spawn_process):
    harness = attacked("max_series: 20\n")
    drop = Path(fixture_bins.root) / "flood"
    drop.mkdir()
    shutil.chown(drop, 65534, 65534)
    # 30 distinctly named jemalloc processes every half second, each living a second
    flood = (f"cd {drop} && for i in $(seq 30); do cp {fixture_bins['static'].binary} f$i; done"
             " && echo READY && while :; do for i in $(seq 30); do"
             " (sleep 1 | ./f$i 0 >/dev/null 2>&1 &); done; sleep 0.5; done")
    spawn_process(["sh", "-c", flood], prefix=NOBODY, timeout=60)
    for _ in range(100):  # the copies are resolved beside the snapshots, then series
        text = harness.next_snapshot(1)
        pressure = samples(text, "ctprofd_series_dropped")
        if dict((l["reason"], v) for l, v in pressure)["live"] > 0:
            break
    assert dict((l["reason"], v) for l, v in pressure)["live"] > 0, pressure
    service = spawn_fixture(fixture_bins["static"], 1)
    pid = str(service.pid)
    snapshots = 0
    while pid not in {l.get("pid") for l, _ in samples(text, "ctprofd_allocated_bytes_total")}:
        snapshots += 1
        assert snapshots < 30, "the service never got a series during the flood"
        text = harness.next_snapshot(1)
    # and it keeps it while the flood goes on, until the flood's exited series overflow the
    # table (twice max_series), which is capped: its users' share of the cap lets the
    # service in at once, maybe before the flood has filled the table
    for snapshot in range(100):
        text = harness.next_snapshot(1)
        exported = {l.get("pid"): v for l, v in samples(text, "ctprofd_allocated_bytes_total")}
        assert exported[pid] == sum(t["allocated"] for t in service.threads)
        harness.assert_reference_exact(text)
        if snapshot >= 5 and samples(text, "ctprofd_series_evicted_total")[0][1] > 0:
            break
    assert samples(text, "ctprofd_series_evicted_total")[0][1] > 0  # the table is capped
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


def test_a_process_renaming_itself_all_the_time_keeps_one_series(attacked, fixture_bins,
                                                                 spawn_fixture):
    harness = attacked()
    renamer = spawn_fixture(fixture_bins["static"], 0, prefix=NOBODY)
    pid = str(renamer.pid)
    first = [l for l, _ in samples(harness.next_snapshot(), "ctprofd_allocated_bytes_total")
             if l["pid"] == pid]
    assert first == [{"pid": pid, "comm": "alloc_threads"}]  # seen under its first name
    stop = threading.Event()

    def rename() -> None:
        i = 0
        while not stop.is_set():
            renamer.send(f"rename x{i}")
            i += 1

    thread = threading.Thread(target=rename, daemon=True)
    thread.start()
    try:
        for _ in range(5):
            text = harness.next_snapshot(1)
            series = [l for l, _ in samples(text, "ctprofd_allocated_bytes_total")
                      if l["pid"] == pid]
            assert series == [{"pid": pid, "comm": "alloc_threads"}]
            harness.assert_reference_exact(text)
        renamed = [l for l, _ in samples(text, "ctprofd_renamed_process_info")
                   if l["pid"] == pid]
        assert len(renamed) == 1 and renamed[0]["current_comm"].startswith("x"), renamed
    finally:
        stop.set()
        thread.join(10)
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


def parser_worker(daemon: DaemonProcess) -> int:
    """The pid of the daemon's parser worker (started with its first parse)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
        except OSError:
            continue
        if parent == daemon.proc.pid and b"parse_worker import zygote" in cmdline:
            return int(pid)
    raise AssertionError("the daemon has no parser worker")


def copy_as(prefix: tuple[str, ...], source: Path, target: Path) -> None:
    subprocess.run([*prefix, "cp", str(source), str(target)], check=True)


def test_nobody_cannot_stop_the_parser_worker(attacked, fixture_bins, spawn_fixture):
    harness = attacked()
    worker = parser_worker(harness.daemon)
    stopped = subprocess.run([*NOBODY, "kill", "-STOP", str(worker)], capture_output=True,
                             text=True)
    assert stopped.returncode != 0 and "not permitted" in stopped.stderr
    # a binary first seen now (nobody's own copy, so parsed afresh) is read once resolved
    drop = Path(fixture_bins.root) / "fresh"
    drop.mkdir()
    shutil.chown(drop, 65534, 65534)
    copy_as(NOBODY, fixture_bins["static"].binary, drop / "fresh")
    fresh = spawn_fixture(drop / "fresh", 1, prefix=NOBODY)
    text = harness.exporting({fresh.pid})
    exported = {l["pid"]: v for l, v in samples(text, "ctprofd_allocated_bytes_total")}
    assert exported[str(fresh.pid)] == sum(t["allocated"] for t in fresh.threads)
    harness.assert_reference_exact(text)
    assert parser_worker(harness.daemon) == worker  # never lost
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


def test_a_binary_whose_parse_lost_the_worker_is_retried_not_filed(attacked, fixture_bins,
                                                                    spawn_fixture):
    # 3 s: the new worker must parse `later` within it (0.12 to 0.32 s beside two CPU hogs),
    # or it is filed as timed out; 1 s was a claim on a busy host's speed
    harness = attacked("parser:\n  timeout: 3\n")
    worker = parser_worker(harness.daemon)
    os.kill(worker, signal.SIGSTOP)  # as root: what a uid sharing the worker's could do
    drop = Path(fixture_bins.root) / "later"
    drop.mkdir()
    copy_as((), fixture_bins["static"].binary, drop / "later")
    later = spawn_fixture(drop / "later", 1)
    line = harness.daemon.wait_for(r"parser worker lost while parsing (\S+): .*unresponsive")
    assert line.group(1) == str(drop / "later")
    assert "parsing it again in 1 s" in line.string
    text = harness.exporting({later.pid})  # after the backoff a new worker parses it
    exported = {l["pid"]: v for l, v in samples(text, "ctprofd_allocated_bytes_total")}
    assert exported[str(later.pid)] == sum(t["allocated"] for t in later.threads)
    harness.assert_reference_exact(text)
    assert parser_worker(harness.daemon) != worker
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


def cgroup_root() -> str:
    """Where a hierarchy that ctprofd reads units from is mounted: the unified (cgroup2)
    one, else the named systemd one of cgroup v1."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1]
            if fstype == "cgroup2":
                found.setdefault("unified", fields[4])
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                found.setdefault("systemd", fields[4])
    assert found, "no cgroup2 or name=systemd hierarchy is mounted"
    return found.get("unified") or found["systemd"]


def test_crafted_cgroup_names_cannot_choose_or_break_the_unit_label(attacked, fixture_bins,
                                                                    spawn_fixture):
    harness = attacked(labels="pid, unit")
    root = Path(cgroup_root())
    # splitlines() would read the name as the lines "…/a", "0::/x.service", "/real.scope"
    forged = root / "ctprofd-test-a\u20280::" / "x.service\u2028" / "real.scope"
    undecodable = Path(os.fsdecode(bytes(root) + b"/ctprofd-test-bad\xff.service"))
    made, attackers = [], {}
    try:
        for directory in (forged, undecodable):
            directory.mkdir(parents=True)
            made.append(directory)
        for directory, unit in ((forged, "real.scope"), (undecodable, "ctprofd-test-bad\ufffd.service")):
            fixture = spawn_fixture(fixture_bins["static"], 1, prefix=NOBODY)
            (directory / "cgroup.procs").write_text(f"{fixture.pid}\n")  # as a delegation would
            attackers[str(fixture.pid)] = (unit, fixture)
        text = harness.next_snapshot()
        lint(text)
        units = {l["pid"]: l["unit"] for l, _ in samples(text, "ctprofd_allocated_bytes_total")}
        for pid, (unit, _) in attackers.items():
            assert units[pid] == unit
        harness.assert_reference_exact(text)
        harness.scraper.stop()
        harness.scraper.assert_succeeded()
    finally:
        for _, fixture in attackers.values():
            fixture.kill()
        for directory in made:
            while directory != root:
                try:
                    directory.rmdir()
                except OSError:
                    break
                directory = directory.parent


def test_a_sighup_storm_keeps_the_configuration_schedule_and_values(attacked):
    harness = attacked()
    for _ in range(200):
        harness.daemon.signal(signal.SIGHUP)
    harness.daemon.wait_for("reloaded the configuration")
    text = harness.next_snapshot(3)
    assert harness.daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.2
    harness.assert_reference_exact(text)
    assert harness.daemon.proc.poll() is None
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


MAPPINGS = """
import ctypes, os, sys
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
for _ in range(50000):  # PROT_READ, MAP_PRIVATE; offset 0 each time: no two can merge
    assert libc.mmap(None, 4096, 1, 2, fd, 0) not in (None, ctypes.c_void_p(-1).value)
print("READY", flush=True)
sys.stdin.read()
"""


def test_user_namespaces_and_50000_mappings_are_read_or_passed_over(attacked, fixture_bins,
                                                                   spawn_fixture,
                                                                   spawn_process, tmp_path):
    harness = attacked()
    # nobody's jemalloc process as root of a user namespace of its own: read exactly
    inside = spawn_fixture(fixture_bins["static"], 2,
                           prefix=(*NOBODY, "unshare", "--user", "--map-root-user"))
    # nobody's process with 50,000 file mappings, selected (its exe is under the fixtures)
    drop = Path(fixture_bins.root) / "maps"
    drop.mkdir()
    shutil.chown(drop, 65534, 65534)
    copy_as(NOBODY, Path(os.path.realpath("/usr/bin/python3")), drop / "python3")
    page = drop / "page"
    subprocess.run([*NOBODY, "dd", "if=/dev/zero", f"of={page}", "bs=4096", "count=1"],
                   check=True, capture_output=True)
    mapped = spawn_process([drop / "python3", "-c", MAPPINGS, page], prefix=NOBODY, timeout=60)
    with open(f"/proc/{mapped.pid}/maps") as f:
        assert sum(1 for _ in f) > 50000
    text = harness.next_snapshot(3)
    exported = {l["pid"]: v for l, v in samples(text, "ctprofd_allocated_bytes_total")}
    assert exported[str(inside.pid)] == sum(t["allocated"] for t in inside.threads)
    assert str(mapped.pid) not in exported  # walked, not jemalloc
    assert dict((l["tag"], v) for l, v in samples(text, "ctprofd_probe_failures")).get(
        "jemalloc-not-found", 0) >= 1
    harness.assert_reference_exact(text)
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


TRACEME = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME: the parent is its tracer
    os.execv(sys.argv[1], sys.argv[1:])
os.waitpid(pid, 0)  # the exec's SIGTRAP stop
print(f"CHILD {pid}", flush=True)
signal = 0
while True:  # pass every signal on, as a debugger would
    libc.ptrace(7, pid, None, signal)  # PTRACE_CONT
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        break
    signal = os.WSTOPSIG(status) if os.WSTOPSIG(status) != 5 else 0
"""


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


def test_a_child_traced_by_its_parent_is_a_counted_failure_and_left_alone(
        attacked, fixture_bins, spawn_process):
    harness = attacked()
    tracer = spawn_process(["/usr/bin/python3", "-c", TRACEME, fixture_bins["static"].binary,
                            "1"], prefix=NOBODY)
    child = int(next(line for line in tracer.output if line.startswith("CHILD ")).split()[1])
    threads = [json.loads(line) for line in tracer.output if line.startswith("{")]
    assert tracer_of(child) == tracer.pid
    text = harness.next_snapshot(3)
    failures = dict((l["tag"], v) for l, v in samples(text, "ctprofd_probe_failures"))
    assert failures.get("ptrace-traced", 0) >= 1, failures  # its traced main thread
    assert "ptrace-seize" not in failures, failures  # not a privilege failure
    # its worker thread, started after the exec, is not traced (no PTRACE_O_TRACECLONE)
    # and is read exactly; the main thread's counters are not made up
    exported = {l["pid"]: v for l, v in samples(text, "ctprofd_allocated_bytes_total")}
    assert exported[str(child)] == threads[1]["allocated"]
    assert tracer_of(child) == tracer.pid  # its own tracer still, and it still answers
    tracer.send("exit 0")
    assert tracer.readline().startswith("EXITED ")
    harness.assert_reference_exact(text)
    harness.scraper.stop()
    harness.scraper.assert_succeeded()


def flood_connects(attacker) -> int:
    attacker.send("")
    assert attacker.readline().startswith("connects=")
    return int(attacker.output[-1].split("=")[1])


def test_whole_requests_never_read_from_64_addresses_cannot_crowd_out_scrapes(
        attacked, spawn_process):
    """Issue 22: 64 loopback addresses x 64 connections that send a whole request and never
    read the answer, reconnecting whenever closed; the scraper (127.0.0.1) shares their /24."""
    harness = attacked()
    port = harness.daemon.url.rsplit(":", 1)[1]
    attacker = spawn_process(["/usr/bin/python3", "-c", REQUEST_FLOOD.read_text(), port,
                              "unread", "64", "64"], prefix=NOBODY, timeout=120)
    started = flood_connects(attacker)
    harness.scraper.ok, harness.scraper.failed = 0, []  # count from here
    guard = time.monotonic() + 300  # a hang guard, never a timing claim
    # at least 12 scrapes, and for as long as it takes the flood to connect again (the
    # server closing some of its connections): on a starved host that may take longer
    while (harness.scraper.ok + len(harness.scraper.failed) < 12
           or flood_connects(attacker) <= started):
        assert time.monotonic() < guard, "the flood never connected again"
        text = harness.next_snapshot()
    harness.scraper.stop()
    harness.scraper.assert_succeeded()  # within the scraper's 5 s timeout each
    harness.assert_reference_exact(text)


def test_wrong_passwords_from_64_connections_cannot_crowd_out_scrapes(tmp_path, spawn_process):
    """Issue 22: 64 connections from one address sending wrong basic-auth passwords (bcrypt
    cost 10) while a scraper with the right one polls."""
    web = tmp_path / "web.yaml"
    web.write_text("basic_auth_users:\n  prometheus: "
                   f"'{bcrypt.hashpw(b'right', bcrypt.gensalt(10)).decode()}'\n")
    daemon = DaemonProcess("--config", str(write_config(
        tmp_path, f"web_config_file: {web}\n", interval=0.2)))
    scraper = None
    try:
        daemon.started()
        token = base64.b64encode(b"prometheus:right").decode()
        scraper = Scraper(daemon.url, {"Authorization": f"Basic {token}"})
        port = daemon.url.rsplit(":", 1)[1]
        wrong = "Basic " + base64.b64encode(b"prometheus:wrong").decode()
        attacker = spawn_process(["/usr/bin/python3", "-c", REQUEST_FLOOD.read_text(), port,
                                  "bad-auth", "1", "64", wrong], prefix=NOBODY, timeout=120)
        started = flood_connects(attacker)
        scraper.ok, scraper.failed = 0, []  # count from here
        while scraper.ok + len(scraper.failed) < 12:  # each ends within its 5 s timeout
            time.sleep(0.1)
        scraper.stop()
        scraper.assert_succeeded()  # within the scraper's 5 s timeout each
        assert flood_connects(attacker) > started + 64  # the flood went on all along
        limited = [v for labels, v in samples(scraper.text,
                                              "ctprofd_http_requests_limited_total")
                   if labels["reason"] == "auth"]
        assert limited and limited[0] > 0  # most wrong passwords never reached bcrypt
    finally:
        if scraper is not None:
            scraper.stop()
        daemon.stop()
