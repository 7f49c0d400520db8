"""`ctprofd run` and `ctprofd check-config` as real subprocesses: exit statuses, reloads,
signals, systemd notifications over a real datagram socket, and promtool on a real scrape."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from ctprofd import __version__
from daemon_process import CTPROFD, REPO, DaemonProcess, clean_env, run_once, write_config
from support.procs import end_vfork

STUCK = 8
HANG_GUARD = 120  # seconds: keeps a broken run from hanging, never a timing claim
QUIET = "selection:\n  include:\n    comm: ['^ctprofd-test-none$']\n"  # walks, reads nobody


@pytest.fixture
def daemons():
    started: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProcess:
        daemon = DaemonProcess(*args, env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, *parts: str):
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.mark.parametrize("text, expected", [
    ("colour: red\n", "colour: unknown key"),
    ("series_retention: soon\n", "series_retention: expected a number, got a string"),
    ("selection:\n  exclude:\n    comm: ['foo(']\n",
     "selection.exclude.comm[0]: invalid regex 'foo(': missing ), unterminated subpattern"),
    ("labels: {pid: 1}\n", "labels: expected a list, got a mapping"),
])
def test_bad_config_exits_78_with_one_line(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    assert_one_line_error(run_once("run", "--config", str(path)), 78, f"{path}: {expected}")


def test_unreadable_config_exits_78(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert_one_line_error(run_once("run", "--config", str(missing)), 78,
                          f"{missing}: cannot read: No such file or directory")


def test_bad_flags_and_web_config_exit_78(tmp_path):
    path = str(write_config(tmp_path))
    assert_one_line_error(run_once("run", "--config", path, "--interval", "0"), 78,
                          "--interval: must be > 0")
    assert_one_line_error(run_once("run", "--config", path, "--listen", "nowhere"), 78,
                          "--web.listen-address: 'nowhere' is not HOST:PORT")
    assert_one_line_error(run_once("run", "--config", path, "--listen", "127.0.0.1:0",
                                   "--listen", "127.0.0.1:0"), 78,
                          "--web.listen-address: [1]: duplicate listen address '127.0.0.1:0'")
    web = tmp_path / "web.yaml"
    web.write_text("basic_auth_users:\n  alice: secret\n")
    assert_one_line_error(run_once("run", "--config", path, "--web.config.file", str(web)), 78,
                          f"{web}: basic_auth_users.alice: not a bcrypt hash")


def test_bad_offsets_file_exits_78(tmp_path):
    offsets = tmp_path / "offsets.json"
    offsets.write_text("{not json")
    path = str(write_config(tmp_path, f"offsets_files: [{offsets}]\n"))
    result = run_once("run", "--config", path)
    assert_one_line_error(result, 78, str(offsets))


def test_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_once("run", "--config", str(write_config(tmp_path)),
                          "--listen", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}: "
                                     "Address already in use")


def test_of_several_listen_addresses_the_one_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_once("run", "--config", str(write_config(tmp_path)),
                          "--listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}: "
                                     "Address already in use")


def test_check_config(tmp_path):
    good = write_config(tmp_path)
    result = run_once("check-config", str(good))
    assert result.returncode == 0 and result.stdout == f"{good}: OK\n"
    bad = write_config(tmp_path, "max_series: many\n", name="bad.yaml")
    assert_one_line_error(run_once("check-config", str(bad)), 78,
                          f"{bad}: max_series: expected an integer, got a string")


def test_check_config_refuses_a_header_value_that_cannot_be_sent(tmp_path):
    """Every answer's headers are encoded as latin-1: a value outside it failed every one."""
    web = tmp_path / "web.yaml"
    web.write_text('http_server_config:\n  headers:\n    X-XSS-Protection: "\u20ac"\n',
                   encoding="utf-8")
    config = write_config(tmp_path, f"web_config_file: {web}\n")
    assert_one_line_error(run_once("check-config", str(config)), 78,
                          f"{web}: http_server_config.headers.X-XSS-Protection: '\u20ac' "
                          "cannot be sent")


def test_an_encrypted_key_is_refused_in_one_line_without_a_prompt(tmp_path):
    """OpenSSL's default is to ask for the pass phrase on the terminal: check-config hung
    under a tty (and a changed key file would have been read on the event loop)."""
    key, cert = tmp_path / "enc.key", tmp_path / "enc.crt"
    subprocess.run(["openssl", "genrsa", "-aes256", "-passout", "pass:x", "-out", str(key),
                    "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-key", str(key), "-passin", "pass:x", "-days",
                    "1", "-subj", "/CN=x", "-out", str(cert)], check=True, capture_output=True)
    web = tmp_path / "web.yaml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n")
    config = write_config(tmp_path, f"web_config_file: {web}\n")
    expected = (f"{web}: tls_server_config.key_file: {key} is encrypted: encrypted private "
                "keys are not supported")
    assert_one_line_error(run_once("check-config", str(config)), 78, expected)
    # with a terminal (script gives it a pty): no prompt, the same line, no wait for input
    command = shlex.join([*CTPROFD, "check-config", str(config)])
    result = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, env=clean_env(), cwd=REPO,
                            timeout=HANG_GUARD)
    assert result.returncode == 78, result.stdout
    assert "Enter PEM" not in result.stdout
    assert result.stdout.strip().splitlines() == [expected]


def test_the_shipped_default_config_is_valid():
    result = run_once("check-config", "config/ctprofd.yaml")
    assert result.returncode == 0, result.stderr


def test_serves_metrics_landing_page_and_a_lint_clean_scrape(tmp_path, daemons, fixture_bins,
                                                             spawn_fixture):
    spawn_fixture(fixture_bins["static"], 2)  # of this session's build: nobody else runs it
    only = f"selection:\n  include:\n    exe: ['{fixture_bins['static'].binary}']\n"
    daemon = daemons("--config", str(write_config(tmp_path, only))).started()
    assert '<a href="/metrics">' in daemon.get("/")
    text = daemon.wait_for_sample("ctprofd_probe_jemalloc_detected", 1)  # maybe pending first
    assert daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.5
    assert [daemon.sample(f"ctprofd_probe_{name}", text) for name in (
        "tgids_walked", "jemalloc_detected", "probed_ok", "failed")] == [1, 1, 3, 0]
    assert daemon.sample("ctprofd_snapshot_failures_total", text) == 0
    build = re.search(r'^ctprofd_build_info\{(.*)\} 1\.0$', text, re.M).group(1)
    assert f'python_version="{platform.python_version()}"' in build
    assert f'version="{__version__}"' in build and 'revision="' in build
    # client_python's process collector: ctprofd's own resources
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds"):
        assert daemon.sample(name, text) > 0, name
    lint = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                          capture_output=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint


def test_each_web_listen_address_serves_the_metrics(tmp_path, daemons, fixture_bins,
                                                   spawn_fixture):
    """--web.listen-address given twice, as the exporter toolkit spells it: a socket on the
    IPv4 and one on the IPv6 loopback (ports the kernel picks), each serving the fixture's
    exact counters."""
    fixture = spawn_fixture(fixture_bins["static"], 2)
    only = (f"labels: [pid]\nselection:\n  include:\n"
            f"    exe: ['{fixture_bins['static'].binary}']\n")
    daemon = daemons("--config", str(write_config(tmp_path, only)),
                     "--web.listen-address", "127.0.0.1:0", "--web.listen-address", "[::1]:0")
    urls = [daemon.wait_for(r"listening on (http://\S+)").group(1) for _ in range(2)]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", urls[0]), urls
    assert re.fullmatch(r"http://\[::1\]:\d+", urls[1]), urls
    series = f'{{pid="{fixture.pid}"}}'
    for url in urls:
        daemon.url = url
        text = daemon.wait_for_sample("ctprofd_probe_probed_ok", 3)  # main thread and two
        assert daemon.sample(f"ctprofd_allocated_bytes_total{series}", text) == \
            sum(thread["allocated"] for thread in fixture.threads), url
        assert daemon.sample(f"ctprofd_deallocated_bytes_total{series}", text) == \
            sum(thread["deallocated"] for thread in fixture.threads), url


def test_flags_override_the_config(tmp_path, daemons):
    daemon = daemons("--config", str(write_config(tmp_path, QUIET)), "--interval", "0.25",
                     "--listen", "127.0.0.1:0").started()
    text = daemon.wait_for_sample("ctprofd_snapshots_total", 1)
    assert daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.25


def test_a_request_target_that_cannot_be_parsed_gets_400_without_a_traceback(tmp_path, daemons):
    """It was logged at error level with a traceback and left unanswered: any client could
    fill the log."""
    daemon = daemons("--config", str(write_config(tmp_path, QUIET))).started()
    port = int(daemon.url.rsplit(":", 1)[1])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET http://[::1/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 400 Bad Request\r\n"), reply
    assert daemon.get("/")  # still serving
    assert daemon.stop() == 0
    lines = daemon.lines + daemon.remaining_lines()
    assert not [line for line in lines if "Traceback" in line or "ERROR" in line], lines


def test_sigterm_exits_mid_snapshot_without_finishing_it(tmp_path, daemons, fixture_bins,
                                                        spawn_fixture):
    """The only target's workers wait for their vfork children, which no PTRACE_INTERRUPT
    can stop: each costs the snapshot a 250 ms wait (a `waitpid` failure). SIGTERM arrives
    while the daemon waits for one: it exits 0 and stops no thread after that one."""
    target = spawn_fixture(fixture_bins.hostile_threads, STUCK)
    for worker in range(STUCK):
        target.send(f"vfork {worker} 20000")
        assert target.readline().split()[0] == "VFORKING"
    selection = f"selection:\n  include:\n    exe: ['{fixture_bins.hostile_threads}']\n"
    daemon = daemons("--config", str(write_config(tmp_path, selection, interval=3600)))
    daemon.started()

    def tracer_of(tid: int) -> str:
        with open(f"/proc/{target.pid}/task/{tid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("TracerPid:"))

    def seized() -> int | None:  # the stuck worker the daemon waits for, if any
        return next((i for i, tid in enumerate(target.worker_tids) if os.path.exists(
            f"/proc/{daemon.proc.pid}/task/{tracer_of(tid)}")), None)
    guard = time.monotonic() + HANG_GUARD
    while (caught := seized()) is None:
        assert time.monotonic() < guard and daemon.proc.poll() is None, daemon.lines
        time.sleep(0.001)
    daemon_threads = set(os.listdir(f"/proc/{daemon.proc.pid}/task"))  # its tracer among them
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(HANG_GUARD) == 0
    logged = [int(n) for line in daemon.lines + daemon.remaining_lines()
              for n in re.findall(r"probe: .* (\d+) failed", line)]
    assert all(n <= caught + 1 for n in logged), (caught, logged)  # none stopped after it
    # (another session's ctprofd walking the whole host may trace a thread for a moment)
    tracers = {tid: tracer_of(tid) for tid in target.tids}
    assert not daemon_threads & set(tracers.values()), tracers


def test_sigint_exits_zero_and_saves_the_series_state(tmp_path, daemons):
    daemon = daemons("--config", str(write_config(tmp_path, QUIET))).started()
    daemon.wait_for_sample("ctprofd_snapshots_total", 1)
    daemon.signal(signal.SIGINT)
    assert daemon.proc.wait(HANG_GUARD) == 0
    state = json.loads((tmp_path / "state" / "aggregate.json").read_text())
    assert state["labels"] == ["comm", "unit"] and "boot_id" in state


def test_sighup_applies_a_valid_config(tmp_path, daemons):
    path = write_config(tmp_path, QUIET, name="hup.yaml", interval=3600)
    daemon = daemons("--config", str(path)).started()
    daemon.wait_for("probe: ")
    path.write_text(path.read_text().replace("interval: 3600", "interval: 0.2")
                    .replace('"127.0.0.1:0"', '"127.0.0.1:1"'))
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("a change of listen takes effect only after a restart")
    daemon.wait_for("reloaded the configuration")
    # the shorter interval applies at once, without waiting out the old one
    text = daemon.wait_for_sample("ctprofd_snapshots_total", 3)
    assert daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.2
    assert daemon.get("/")  # still on the old address


def test_flags_still_win_over_the_file_after_a_reload(tmp_path, daemons):
    path = write_config(tmp_path, QUIET, name="hup.yaml", interval=3600)
    daemon = daemons("--config", str(path), "--interval", "0.3", "--log-level", "info").started()
    daemon.wait_for("probe: ")
    path.write_text(path.read_text().replace("interval: 3600", "interval: 7200")
                    + "log_level: error\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("reloaded the configuration")  # an info line: --log-level info still holds
    text = daemon.wait_for_sample("ctprofd_snapshots_total",
                                  daemon.sample("ctprofd_snapshots_total") + 2)
    assert daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.3


def test_sighup_keeps_the_old_config_when_the_new_one_is_invalid(tmp_path, daemons):
    path = write_config(tmp_path, QUIET, name="hup.yaml")
    daemon = daemons("--config", str(path)).started()
    daemon.wait_for("probe: ")
    path.write_text(path.read_text() + "labels: [\n")
    daemon.signal(signal.SIGHUP)
    line = daemon.wait_for("reload failed, keeping the running configuration: (.*)").string
    assert f"{path}: invalid YAML at line" in line
    text = daemon.wait_for_sample("ctprofd_snapshots_total", 2)
    assert daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.5
    assert daemon.proc.poll() is None


def test_sighup_refuses_a_fifo_a_device_or_a_huge_file_and_keeps_running(tmp_path, daemons):
    path = write_config(tmp_path, QUIET, name="hup.yaml")
    good = path.read_text()
    daemon = daemons("--config", str(path)).started()
    daemon.wait_for("probe: ")

    def huge() -> None:
        path.write_text(good)
        os.truncate(path, 1 << 30)  # sparse

    for make, kind in ((lambda: os.mkfifo(path), "a FIFO"),
                       (lambda: path.symlink_to("/dev/zero"), "a character device"),
                       (huge, "too large")):
        path.unlink()
        make()
        daemon.signal(signal.SIGHUP)
        line = daemon.wait_for("reload failed, keeping the running configuration: (.*)").string
        assert f"{path}: cannot read: " in line and kind in line, line
    text = daemon.wait_for_sample("ctprofd_snapshots_total",
                                  daemon.sample("ctprofd_snapshots_total") + 1)
    assert daemon.sample("ctprofd_snapshot_interval_seconds", text) == 0.5
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        rss_kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
    assert rss_kib < 256 << 10, "a refused file was read anyway"
    assert not [line for line in daemon.lines if "Traceback" in line]


def test_overrunning_snapshots_are_counted(tmp_path, daemons):
    daemon = daemons("--config", str(write_config(tmp_path, QUIET, interval=0.001)))
    daemon.started()
    daemon.wait_for_sample("ctprofd_snapshot_overruns_total", 1)


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notifications_without_systemd_python(tmp_path, daemons, abstract):
    """The datagrams reach a socket bound at a path or at an abstract address (NOTIFY_SOCKET
    `@name`), with systemd-python made unimportable."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "systemd.py").write_text("raise ImportError('systemd-python hidden by the test')\n")
    name = f"ctprofd-test-notify-{os.getpid()}-{tmp_path.name}"
    address = "\0" + name if abstract else str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        daemon = daemons("--config", str(write_config(tmp_path, QUIET)),
                         env={"NOTIFY_SOCKET": "@" + name if abstract else address,
                              "WATCHDOG_USEC": "200000", "PYTHONPATH": str(hidden)}).started()

        def receive_until(wanted: str) -> list[str]:
            seen: list[str] = []
            while not any(wanted in m for m in seen):
                seen.append(sock.recv(4096).decode())
            return seen

        first = receive_until("READY=1")
        ready = next(m for m in first if "READY=1" in m)
        assert "STATUS=probe: " in ready
        receive_until("WATCHDOG=1")
        daemon.signal(signal.SIGHUP)
        reload_messages = receive_until("RELOADING=1")
        assert "MONOTONIC_USEC=" in reload_messages[-1]
        receive_until("READY=1")
        daemon.signal(signal.SIGTERM)
        receive_until("STOPPING=1")
        assert daemon.proc.wait(HANG_GUARD) == 0


def test_without_ptrace_capability_it_says_so_once(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test drops CAP_SYS_PTRACE with setpriv and needs root")
    result = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", "timeout", "--preserve-status", "-s", "INT",
         "3", *CTPROFD,
         "run", "--config", str(write_config(tmp_path, QUIET))],
        capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "CAP_SYS_PTRACE" in line]
    assert len(warnings) == 1, result.stderr



def test_health_goes_stale_while_a_snapshot_hangs_over_tls_without_credentials(
        tmp_path, daemons, fixture_bins, spawn_fixture):
    """/health with TLS and basic auth on: answered without credentials (/metrics is not),
    503 until the first snapshot, 200 while snapshots complete, 503 once the last completed
    one is older than 3 intervals, 200 again after. The stall: a new process whose workers
    are stuck in vfork, which no PTRACE_INTERRUPT can stop, costs a snapshot a 250 ms wait
    (then they are backed off, and waited for again after 1, 2, 4 ... snapshots), more
    than the 3 intervals of 50 ms; /health is asked until one such wait is caught."""
    from test_web import openssl_cert
    cert, key = openssl_cert(tmp_path, "server")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    web = tmp_path / "web.yaml"
    web.write_text(f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                   f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    config = write_config(tmp_path, (
        f"selection:\n  include:\n    exe: ['{fixture_bins.hostile_threads}']\n"
        f"web_config_file: {web}\n"), interval=0.05)
    # stuck before the daemon first sees them: a thread read once is never stopped again
    target = spawn_fixture(fixture_bins.hostile_threads, STUCK)
    for worker in range(STUCK):  # each child sleeps until the test kills it
        target.send(f"vfork {worker} 600000")
        assert target.readline().split()[0] == "VFORKING"
    daemon = daemons("--config", str(config)).started()
    client = ssl.create_default_context(cafile=str(cert))

    def health() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(daemon.url + "/health", timeout=10,
                                        context=client) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def wait_health(status: int, prefix: str) -> str:
        deadline = time.monotonic() + HANG_GUARD
        while (seen := health())[0] != status:
            assert time.monotonic() < deadline, seen
            time.sleep(0.005)
        assert seen[1].startswith(prefix), seen
        return seen[1]

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(daemon.url + "/metrics", timeout=10, context=client)
    assert refused.value.code == 401
    wait_health(200, "ok: last snapshot completed ")
    daemon.wait_for(r"failed \(dominant: waitpid\)")  # a wait for the stuck workers
    assert "more than 3 intervals (0.15 s)" in wait_health(503, "stale: last snapshot completed ")
    for tid in target.worker_tids:
        end_vfork(target.pid, tid)
    wait_health(200, "ok: ")


def test_as_root_it_listens_to_the_kernels_process_events(tmp_path, daemons):
    """Root in the host's namespaces: the daemon hears the process events, and says so at
    start (the one-shot commands never listen: test_process_events covers the refusals)."""
    daemon = daemons("--config", str(write_config(tmp_path, QUIET)))
    line = daemon.wait_for(r"listening to the kernel's process events: .*once in (\d+) snapshots")
    assert line.group(1) == "32"
    daemon.started()
