"""`ctprofd run` as a real subprocess, for the daemon tests: its log lines, its port, scrapes."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

CTPROFD = [sys.executable, "-m", "ctprofd"]
# Waits below are bounded by hang guards (120 s), never by timing claims.
REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"listening on (https?://\S+)")


def write_config(directory: Path, extra: str = "", name: str = "ctprofd.yaml",
                 interval: float = 0.5) -> Path:
    """A config listening on an ephemeral loopback port with caches under `directory`."""
    path = directory / name
    path.write_text(f'listen: "127.0.0.1:0"\ninterval: {interval}\n'
                    f"cache_dir: {directory / 'cache'}\nstate_dir: {directory / 'state'}\n"
                    f"{extra}")
    return path


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without systemd's variables (so logs go to stderr), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                        "JOURNAL_STREAM")}
    env.update(extra or {})
    return env


def run_once(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ctprofd to completion (for commands expected to exit by themselves)."""
    return subprocess.run(CTPROFD + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL, env=clean_env())


class DaemonProcess:
    """A running `ctprofd run`; stderr lines are collected as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(CTPROFD + ["run", *args], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     text=True, env=clean_env(env), cwd=REPO)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first new stderr line matching `pattern` (regex); AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s: "
                                     f"{self.lines[-20:]}") from None
            if line is None:
                raise AssertionError(f"ctprofd exited ({self.proc.wait()}) before a line "
                                     f"matching {pattern!r}: {self.lines[-20:]}")
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def remaining_lines(self, timeout: float = 10) -> list[str]:
        """Every stderr line not read yet, up to the end of the output (after exit)."""
        rest = []
        while (line := self._queue.get(timeout=timeout)) is not None:
            rest.append(line)
        self._queue.put(None)
        return rest

    def started(self, timeout: float = 120) -> DaemonProcess:
        """Wait for the listening line; remember the URL."""
        self.url = self.wait_for(LISTENING.pattern, timeout).group(1)
        return self

    def get(self, path: str = "/metrics", timeout: float = 10) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read().decode()

    def sample(self, name: str, text: str | None = None) -> float | None:
        """The value of an unlabelled sample in a scrape (None when absent)."""
        match = re.search(rf"^{re.escape(name)} (\S+)$", text or self.get(), re.M)
        return float(match.group(1)) if match else None

    def wait_for_sample(self, name: str, minimum: float, timeout: float = 120) -> str:
        """Scrape until the unlabelled sample `name` reaches `minimum`; the scrape's text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.get()
            value = self.sample(name, text)
            if value is not None and value >= minimum:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed at {value} for {timeout} s")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM, and the exit status; `timeout` is a hang guard, never a timing claim
        (a busy host may take seconds to end a snapshot in flight and exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
