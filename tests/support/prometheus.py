"""A real Prometheus and real `ctprofd run` daemons as subprocesses, for end-to-end tests.

    Daemon(config, log_path, *, prefix=(), interval=1.0)
        `python -m ctprofd run --listen 127.0.0.1:0 --interval I --config CONFIG`, behind an
        optional command prefix (e.g. setpriv), stderr to `log_path`. wait_listening() reads
        the bound address from its log; address is "127.0.0.1:PORT", url its http:// URL.
    Prometheus(directory, scrape_configs, rule_files)
        /usr/bin/prometheus on a free loopback port with 1 s scrape and evaluation intervals,
        its TSDB, config and log in `directory`; query()/api() call its HTTP API and fail
        the test on an API error.
    poll(fetch, done, timeout, what) -> value
        Bounded polling: call fetch() until done(value), else AssertionError naming `what`
        and the last value.

Both kinds of process run in their own session; stop() sends SIGTERM, then SIGKILLs the
session after a grace period. Neither skips: a missing prometheus binary fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on http://(\S+)")
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                     "JOURNAL_STREAM")  # set, they would send ctprofd's log to the journal
POLL_SECONDS = 0.1

T = TypeVar("T")


def poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    """fetch() until done(result) holds; AssertionError with the last result after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout:g} s; last: {value!r}")
        time.sleep(POLL_SECONDS)


def http_get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _stop_session(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process, then SIGKILL its whole session (it was started with its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also children it left behind
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Daemon:
    """A running `ctprofd run` listening on an ephemeral loopback port."""

    def __init__(self, config: Path, log_path: Path, *, prefix: Sequence[str] = (),
                 interval: float = 1.0) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        self.log_path = log_path
        self.argv = [*prefix, sys.executable, "-m", "ctprofd", "run", "--listen",
                     "127.0.0.1:0", "--interval", f"{interval:g}", "--config", str(config)]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log, env=env,
                                         cwd=REPO, start_new_session=True)
        self.address = ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30) -> Daemon:
        def fetch() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv} exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            return LISTENING.search(self.log())

        self.address = poll(fetch, bool, timeout, f"{self.argv} listening").group(1)
        return self

    def scrape(self) -> str:
        return http_get(self.url + "/metrics").decode()

    def stop(self) -> None:
        _stop_session(self.proc, grace=5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusError(AssertionError):
    """The Prometheus HTTP API answered with an error."""


class Prometheus:
    """Debian's /usr/bin/prometheus on loopback, scraping and evaluating every second."""

    def __init__(self, directory: Path, scrape_configs: Sequence[Mapping[str, Any]],
                 rule_files: Sequence[Path] = (), start_timeout: float = 30) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            raise AssertionError("prometheus not found on PATH: apt-get install prometheus "
                                 "(scripts/setup.sh --test installs it)")
        self.directory = directory
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": list(scrape_configs),
        }, sort_keys=False))
        self.log_path = directory / "prometheus.log"
        for attempt in range(3):  # the free port may be taken before Prometheus binds it
            self.address = f"127.0.0.1:{free_port()}"
            self._start(exe)
            try:
                self._wait_ready(start_timeout)
                return
            except AssertionError:
                self.stop()
                if attempt == 2 or "address already in use" not in self.log():
                    raise

    def _start(self, exe: str) -> None:
        self.argv = [exe, f"--config.file={self.config_path}",
                     f"--storage.tsdb.path={self.directory / 'data'}",
                     f"--web.listen-address={self.address}", "--web.enable-lifecycle",
                     "--log.level=info"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            try:
                http_get(f"{self.url}/-/ready", timeout=2)
                return True
            except (OSError, urllib.error.URLError):
                return False

        poll(ready, bool, timeout, "prometheus ready")

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, params: Sequence[tuple[str, str]] | Mapping[str, str] = ()) -> Any:
        """GET /api/v1/<path>; the `data` of a success, PrometheusError otherwise."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            body = http_get(url)
        except urllib.error.HTTPError as err:  # 4xx/5xx carry a JSON error body
            body = err.read()
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise PrometheusError(f"{url}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at the current time; the result as a list of samples (a scalar
        or string result becomes one sample without labels)."""
        data = self.api("query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r}: unexpected result type {data['resultType']}")
        return data["result"]

    def values(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """{labels: value} of an instant query."""
        return {frozenset(sample["metric"].items()): float(sample["value"][1])
                for sample in self.query(expr)}

    def label_values(self, label: str, selector: str = "") -> list[str]:
        params = [("match[]", selector)] if selector else []
        return self.api(f"label/{label}/values", params)

    def stop(self) -> None:
        _stop_session(self.proc, grace=10)
