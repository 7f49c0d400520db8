"""Debian's redis-server on a unix socket in a test's directory, and redis-cli against it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

from support.procs import wait_until

HANG_GUARD = 60.0  # a bound on waiting for redis to answer, not a timing claim


class Redis:
    """A redis-server started with `spawn` (the spawn_process fixture: killed at teardown),
    persisting nothing, answering PING once constructed."""

    def __init__(self, spawn: Callable, directory: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.socket = directory / "redis.sock"
        self.process = spawn(["redis-server", "--port", "0", "--unixsocket", str(self.socket),
                              "--save", "", "--appendonly", "no", "--dir", str(directory),
                              *args], ready=None, **({"env": env} if env else {}))
        wait_until(lambda: self.cli("ping").strip() == "PONG", "redis-server answers PING",
                   HANG_GUARD, poll=0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def cli(self, *args: str) -> str:
        """redis-cli's output for one command."""
        return subprocess.run(["redis-cli", "-s", str(self.socket), *args],
                              capture_output=True, text=True, timeout=30).stdout
