"""The retry schedule of binaries whose parse was lost with the worker."""

from __future__ import annotations

from ctprofd.resolve import retry
from ctprofd.resolve.retry import RetrySchedule
from support.clock import Clock


def test_backoff_doubles_up_to_the_cap_and_a_parse_clears_it():
    clock = Clock()
    schedule = RetrySchedule(clock)
    assert schedule.postponed("k") is None
    delays = [schedule.failed("k") for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert "lost on it 9 time(s) in a row" in schedule.postponed("k")
    clock.now += 59.9
    assert schedule.postponed("k") is not None
    clock.now += 0.1
    assert schedule.postponed("k") is None  # due: may be parsed again
    schedule.succeeded("k")
    assert schedule.failed("k") == 1  # counting starts over


def test_the_table_is_bounded(monkeypatch):
    monkeypatch.setattr(retry, "MAX_ENTRIES", 3)
    schedule = RetrySchedule(Clock())
    for key in "abcd":
        schedule.failed(key)
    assert schedule.postponed("a") is None  # the oldest went first
    assert all(schedule.postponed(k) for k in "bcd")


def test_the_reason_says_how_long_is_left_and_an_unknown_key_succeeds_quietly():
    clock = Clock()
    clock.now = 1000.0
    schedule = RetrySchedule(clock)
    schedule.succeeded("never lost")  # nothing recorded: nothing to forget, no error
    assert schedule.failed("k") == 1.0
    assert schedule.failed("k") == 2.0
    clock.now += 0.5
    assert schedule.postponed("k") == ("parse postponed for 1.5 s: the parser worker was "
                                       "lost on it 2 time(s) in a row")
