"""Health for orchestrators (GET /health): is the snapshot loop still completing snapshots?"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

STALE_INTERVALS = 3  # a completed snapshot older than this many intervals is stale


class Health:
    """Remembers when the last snapshot completed; `check()` says whether that is recent.
    Not healthy before the first snapshot: the first one may fetch DWARF for minutes
    (systemd's TimeoutStartSec and a Kubernetes startupProbe allow for it)."""

    def __init__(self, interval: Callable[[], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval  # read at each check: a reload may change it
        self._clock = clock
        self._completed: float | None = None
        self._lock = threading.Lock()

    def completed(self) -> None:
        """A snapshot was just published."""
        with self._lock:
            self._completed = self._clock()

    def check(self) -> tuple[bool, str]:
        """(healthy, one line saying why)."""
        with self._lock:
            completed = self._completed
        if completed is None:
            return False, "starting: no snapshot completed yet"
        age = self._clock() - completed
        limit = STALE_INTERVALS * self._interval()
        if age > limit:
            return False, (f"stale: last snapshot completed {age:.1f} s ago, more than "
                           f"{STALE_INTERVALS} intervals ({limit:g} s)")
        return True, f"ok: last snapshot completed {age:.1f} s ago"
