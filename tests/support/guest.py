"""Talking to a ctprofd running in a booted machine (support/machines.py): free ports, scrapes,
samples, waits for a metric, a jemalloc target service, and the check that a target was left
running untraced."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from typing import Callable

from support.machines import BootedMachine

TARGET_UNIT = "alloc-target.service"
TARGET_OUTPUT = "/var/tmp/alloc-target.out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> str:
    """The exposition at `url`/metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match and not labels else None


def wait_for_metric(url: str, name: str, wanted: Callable[[float], bool],
                    timeout: float = 60, **labels: str) -> str:
    """The first scrape in which `name`{labels} exists and satisfies `wanted`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = scrape(url)
        except OSError:  # not listening yet (a restart)
            text = ""
        value = sample(text, name, **labels)
        if value is not None and wanted(value):
            return text
        assert time.monotonic() < deadline, f"{name}{labels} stayed {value}"
        time.sleep(0.2)


def assert_untraced(machine: BootedMachine, pid: str, threads: int = 5,
                    hang_guard: float = 60) -> None:
    """Every thread of `pid` (a pid inside the machine) runs untraced and not stopped. A
    ctprofd (the service, or one on the host: its TracerPid shows as 0 in here) holds a
    thread for a moment now and then; a thread left stopped or traced stays so, which is
    what this waits out: `hang_guard` is a guard against a hang, never a timing claim."""
    deadline = time.monotonic() + hang_guard
    while True:
        out = machine.run("sh", "-c",
                          f"grep -h -e ^State -e ^TracerPid /proc/{pid}/task/*/status")
        lines = out.stdout.splitlines()
        assert len(lines) == 2 * threads, lines
        if all(line == "TracerPid:\t0" or line.split()[1] in "SR" for line in lines):
            return
        assert time.monotonic() < deadline, lines
        time.sleep(0.2)


def start_target(machine: BootedMachine, binary: object,
                 hang_guard: float = 30) -> tuple[str, list[dict]]:
    """alloc_threads `binary` with 4 workers, run in the machine as TARGET_UNIT of user
    nobody: (its pid in the machine, its threads' counters as it printed them, main first)."""
    # stdin a pipe that never closes: the fixture exits at end of file
    machine.run("systemd-run", f"--unit={TARGET_UNIT}", "--property=User=nobody",
                f"--property=StandardOutput=file:{TARGET_OUTPUT}", "sh", "-c",
                f"sleep infinity | exec {binary} 4")
    output = machine.merged / TARGET_OUTPUT.lstrip("/")
    deadline = time.monotonic() + hang_guard
    while "READY" not in (output.read_text() if output.exists() else ""):
        assert time.monotonic() < deadline, "the target never printed READY"
        time.sleep(0.1)
    threads = [json.loads(line) for line in output.read_text().splitlines()[:-1]]
    assert len(threads) == 5
    return str(threads[0]["tid"]), threads
