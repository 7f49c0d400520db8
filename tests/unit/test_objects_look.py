"""When the code objects of a process with no jemalloc are next looked at
(capture.next_look): on the process's own grid, whatever the snapshot's delay."""

from __future__ import annotations

import pytest

from ctprofd.probe.capture import next_look


@pytest.mark.parametrize(("due", "now", "expected"), [
    (100.0, 100.0, 160.0),    # on time
    (100.0, 103.5, 160.0),    # a snapshot that started late keeps the phase
    (100.0, 159.9, 160.0),
    (100.0, 160.0, 220.0),    # a whole period late: the next grid point after now
    (100.0, 1000.0, 1060.0),  # a daemon stopped for long: one look, not a pile of them
])
def test_the_next_look_is_on_the_grid_after_now(due: float, now: float, expected: float) -> None:
    assert next_look(due, now, 60.0) == pytest.approx(expected)


def looks_per_snapshot(after) -> list[int]:
    """Two processes whose looks fall in neighbouring snapshots (due at 59.5 s and 61 s),
    snapshots every 15 s, one in eight starting 0.9 s late: how many looks each snapshot
    makes when `after(due, now, period)` gives the next due time."""
    dues, looks = [59.5, 61.0], []
    for k in range(4, 40):
        start = 15.0 * k + (0.9 if k % 8 == 4 else 0.0)
        looked = [i for i, due in enumerate(dues) if start >= due]
        for i in looked:
            dues[i] = after(dues[i], start, 60.0)
        looks.append(len(looked))
    return looks


def test_looks_keep_their_phase_and_never_pile_up() -> None:
    assert looks_per_snapshot(next_look) == [1, 1, 0, 0] * 9
    # `now + period`: the late snapshot's look slides into its neighbour's snapshot for good
    assert max(looks_per_snapshot(lambda due, now, period: now + period)) == 2


def test_a_period_of_zero_looks_every_snapshot() -> None:
    assert next_look(100.0, 130.0, 0.0) == 130.0
