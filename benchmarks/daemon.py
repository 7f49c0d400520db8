"""`ctprofd run` as the benchmarks run it: `Daemon` starts it on a free loopback port with
its own config, cache and state, scrapes it, waits for its snapshots, finds its parse
worker and stops it; `parse_metrics` reads a /metrics body.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from . import REPO
from .processes import Processes, children_of, kill


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """`python -m ctprofd run` on a loopback port with its own config, cache and state
    (emptied first unless `fresh` is false), behind `wrap` (a prefix that execs it)."""

    def __init__(self, procs: Processes, directory: Path, interval: float,
                 extra_config: str = "", log_level: str = "warning", fresh: bool = True,
                 wrap: Sequence[str] = ()) -> None:
        if fresh:  # no layout cache, no saved state: a first start
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        config = directory / "ctprofd.yaml"
        config.write_text(f'listen: "127.0.0.1:{self.port}"\ninterval: {interval}\n'
                          f"cache_dir: {directory / 'cache'}\nstate_dir: {directory / 'state'}\n"
                          f"log_level: {log_level}\n{extra_config}")
        if "labels:" not in extra_config:  # the figures were measured with a series per process
            config.write_text(config.read_text() + "labels: [pid, comm, unit]\n")
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                            "JOURNAL_STREAM")}
        self.log_path = directory / "ctprofd.log"
        self._log = open(self.log_path, "ab")
        self.proc = procs.popen([*wrap, sys.executable, "-m", "ctprofd", "run", "--config", config],
                                stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                cwd=REPO, env=env)
        self.pid = self.proc.pid

    def scrape(self, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url, timeout=timeout) as response:
            return response.read()

    def wait_for_snapshots(self, count: int = 1, timeout: float = 300) -> dict[str, float]:
        """Poll /metrics until `ctprofd_snapshots_total` >= count; the parsed samples."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctprofd run exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                samples = parse_metrics(self.scrape())
                if samples.get("ctprofd_snapshots_total", 0) >= count:
                    return samples
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ctprofd made no {count} snapshots in {timeout} s")
            time.sleep(0.1)

    def worker_pid(self) -> int | None:
        """The sandboxed parser's zygote, if it runs."""
        for child in children_of(self.pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    if b"parse_worker" in f.read():
                        return child
            except OSError:
                pass
        return None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill(self.proc)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        kill(self.proc)
        self._log.close()


_SAMPLE = re.compile(rb"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)", re.M)


def parse_metrics(body: bytes) -> dict[str, float]:
    """Prometheus text format: {'name{labels}': value} for every sample line."""
    return {m.group(1).decode(): float(m.group(2)) for m in _SAMPLE.finditer(body)}
