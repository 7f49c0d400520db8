"""The /health verdict on a controlled clock: starting, fresh, stale, and a reloaded interval."""

from ctprofd.service.health import STALE_INTERVALS, Health
from support.clock import Clock


def test_starting_fresh_stale_and_a_changed_interval():
    clock, interval = Clock(), [15.0]
    health = Health(lambda: interval[0], clock)
    assert health.check() == (False, "starting: no snapshot completed yet")
    clock.now += 600  # however long the first snapshot takes, it is "starting", not "stale"
    assert not health.check()[0]
    health.completed()
    clock.now += STALE_INTERVALS * 15
    assert health.check() == (True, "ok: last snapshot completed 45.0 s ago")
    clock.now += 0.5
    assert health.check() == (False, "stale: last snapshot completed 45.5 s ago, more than "
                                     "3 intervals (45 s)")
    interval[0] = 60.0  # a reload to a longer interval
    assert health.check()[0]
    health.completed()
    assert health.check() == (True, "ok: last snapshot completed 0.0 s ago")
