"""jemalloc's own statistics read inside a target on Debian's stock libjemalloc.so.2 that
runs no code of ours: the LD_PRELOAD shim tests/fixtures/stats_shim.c, asked through a FIFO.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import TextIO

from support.procs import wait_until

STOCK = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
SOURCE = Path(__file__).resolve().parents[1] / "fixtures/stats_shim.c"


class StatsShim:
    """The shim built in `directory`; `env` preloads it into a target, `read` asks it."""

    def __init__(self, directory: Path) -> None:
        self.library = directory / "stats_shim.so"
        subprocess.run(["gcc", "-O1", "-Wall", "-shared", "-fPIC", "-pthread", "-o",
                        self.library, SOURCE, STOCK], check=True, timeout=120)
        self.fifo, self.out = directory / "stats.fifo", directory / "stats.out"
        os.mkfifo(self.fifo)
        self.env = {"LD_PRELOAD": str(self.library), "CTPROFD_STATS_FIFO": str(self.fifo),
                    "CTPROFD_STATS_OUT": str(self.out)}
        self._requests: TextIO | None = None
        self._answers = 0

    def read(self) -> dict[str, int]:
        """One answer, after an `epoch`: stats.allocated ("allocated"), the bytes thread
        caches hold ("tcache"), every byte jemalloc counted as requested ("requested").
        Only once the target has answered something: the shim opened its FIFO before the
        target's main() ran, so there is nothing to wait for."""
        if self._requests is None:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno != errno.ENXIO, f"no process has {self.library} loaded"
                raise
            os.set_blocking(fd, True)
            self._requests = open(fd, "w", buffering=1)
        self._requests.write("read\n")

        def answered() -> list[str] | None:  # whole lines only: one may be half written
            text = self.out.read_text() if self.out.exists() else ""
            lines = text.splitlines()[:text.count("\n")]
            return lines if len(lines) > self._answers else None

        lines = wait_until(answered, "the shim answers")
        self._answers = len(lines)
        answer = json.loads(lines[-1])
        assert None not in answer.values(), f"a mallctl failed in the shim: {answer}"
        return answer

    def close(self) -> None:
        if self._requests is not None:
            self._requests.close()
