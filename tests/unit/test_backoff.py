"""The pauses between polls (ctprofd/backoff.py) that the ptrace waits and the HTTP
endpoint's drain use: they start short, double, and stop growing at the longest."""

from __future__ import annotations

from itertools import islice

from ctprofd.backoff import backoff


def test_pauses_double_from_the_first_and_stay_at_the_longest():
    assert list(islice(backoff(0.0001, 0.002), 8)) == [
        0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.002, 0.002, 0.002]


def test_a_first_pause_above_the_longest_is_kept_once_then_capped():
    assert list(islice(backoff(0.3, 0.2), 3)) == [0.3, 0.2, 0.2]

