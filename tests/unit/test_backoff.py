"""Backing off (ctprofd/probe/backoff.py): the pauses between the ptrace waits' polls start
short, double, and stop growing at the longest; the chances let pass after failures in a
row (the arena read, the resolver wait) grow 1, 2, 4 ... and start again after a success."""

from __future__ import annotations

from itertools import islice

from ctprofd.probe.backoff import Skips, backoff


def test_pauses_double_from_the_first_and_stay_at_the_longest():
    assert list(islice(backoff(0.0001, 0.002), 8)) == [
        0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.002, 0.002, 0.002]


def test_a_first_pause_above_the_longest_is_kept_once_then_capped():
    assert list(islice(backoff(0.3, 0.2), 3)) == [0.3, 0.2, 0.2]



def test_after_each_failure_in_a_row_the_next_try_comes_twice_as_late_up_to_the_longest():
    """Tries (True) and chances let pass (False) when every try fails: the n-th failure
    lets 2**(n-1) chances pass, never more than `longest`."""
    skips = Skips(8)
    tried = []
    for _ in range(30):
        if skips.skip():
            tried.append(False)
        else:
            tried.append(True)
            skips.failed()
    assert [i for i, t in enumerate(tried) if t] == [0, 2, 5, 10, 19, 28]
    assert (skips.failures, skips.left) == (6, 7)  # 29 let pass, 7 more to come


def test_a_success_lets_the_next_chance_be_tried():
    skips = Skips(64)
    skips.failed()
    skips.failed()
    assert (skips.failures, skips.left) == (2, 2)
    assert skips.skip() and (skips.failures, skips.left) == (2, 1)
    skips.succeeded()
    assert (skips.failures, skips.left) == (0, 0)
    assert not skips.skip() and not skips.skip()
    skips.failed()
    assert skips.skip() and not skips.skip()
