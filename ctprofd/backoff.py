"""Growing pauses between polls, for what no event tells (a stop, a kernel's end of a
thread, a socket's queue drained): short at first, so what comes at once is seen at once,
then longer, so a long wait costs few wake-ups. The caller's deadline bounds the wait."""

from __future__ import annotations

from collections.abc import Iterator


def backoff(first: float, longest: float) -> Iterator[float]:
    """Pauses in seconds: `first`, doubled each time up to `longest`, for ever."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, longest)
