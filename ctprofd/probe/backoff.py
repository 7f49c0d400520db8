"""Backing off: growing pauses between polls, for what no event tells (a stop, the kernel's
end of a thread), short at first so what comes at once is seen at once, then longer so a
long wait costs few wake-ups (the caller's deadline bounds the wait); and chances let pass
after failures in a row (a snapshot's arena read, its wait for the resolver)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


def backoff(first: float, longest: float) -> Iterator[float]:
    """Pauses in seconds: `first`, doubled each time up to `longest`, for ever."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, longest)


@dataclass
class Skips:
    """Chances let pass after failures in a row: 1, 2, 4 ... at most `longest` after the
    first, second, third ... failure, so a failure a target makes on purpose at every chance
    costs ever less; a success starts again from none."""

    longest: int
    failures: int = 0
    left: int = 0  # chances still to let pass

    def skip(self) -> bool:
        """Whether to let this chance pass (it is counted)."""
        if self.left:
            self.left -= 1
            return True
        return False

    def failed(self) -> None:
        """One failure more in a row: the next chances are let pass."""
        self.failures += 1
        self.left = min(1 << (self.failures - 1), self.longest)

    def succeeded(self) -> None:
        self.failures = self.left = 0
