"""When to parse a binary again after the parser worker was lost on it (died, stopped
answering, could not start): that is not the binary's doing, so it is retried with
exponential backoff instead of being filed as its failure."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

FIRST_DELAY = 1.0
MAX_DELAY = 60.0
MAX_ENTRIES = 4096


class RetrySchedule:
    """Per binary key: how many parses were lost in a row and when to try again."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (at, lost)

    def postponed(self, key: str) -> str | None:
        """Why `key` must not be parsed now, or None when it may be."""
        entry = self._due.get(key)
        if entry is None or self._clock() >= entry[0]:
            return None
        at, lost = entry
        return (f"parse postponed for {at - self._clock():.1f} s: the parser worker was lost "
                f"on it {lost} time(s) in a row")

    def failed(self, key: str) -> float:
        """Record a lost parse of `key`; the delay before the next attempt."""
        lost = self._due.pop(key, (0.0, 0))[1] + 1
        delay = min(FIRST_DELAY * 2 ** (lost - 1), MAX_DELAY)
        self._due[key] = (self._clock() + delay, lost)
        while len(self._due) > MAX_ENTRIES:  # the oldest entries go: they retry at once
            self._due.popitem(last=False)
        return delay

    def succeeded(self, key: str) -> None:
        """`key` was parsed (whatever the outcome): forget its lost attempts."""
        self._due.pop(key, None)
