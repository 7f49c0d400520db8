"""probe.quiet: which remembered processes a snapshot counts without reading them, and when
one is read again (another inode, its recheck turn, its code objects due; with the kernel's
process events, once in `recheck_heard` and at once when they name it, and every one within
`recheck` after a snapshot that could not hear them)."""

from __future__ import annotations

from dataclasses import dataclass

from ctprofd.probe.quiet import (KERNEL_THREAD, NOT_JEMALLOC, REFUSED, UNSELECTED,
                                 QuietProcesses)


@dataclass
class Tracked:
    objects_due: float


def snapshot(quiet: QuietProcesses, number: int, now: float = 0.0) -> set:
    seen: set = set()
    quiet.begin(number, now, seen)
    return seen


def test_the_outcomes_are_four_distinct_indexes():
    assert sorted((KERNEL_THREAD, NOT_JEMALLOC, REFUSED, UNSELECTED)) == [0, 1, 2, 3]


def test_a_remembered_process_is_counted_unread_per_outcome_until_its_recheck_turn():
    quiet = QuietProcesses(recheck=5)
    snapshot(quiet, 1)
    quiet.remember(11, 7001, NOT_JEMALLOC)
    quiet.remember(12, 7002, KERNEL_THREAD)
    quiet.remember(16, 7006, UNSELECTED)
    quiet.remember(17, 7007, REFUSED)
    assert len(quiet) == 4
    seen = snapshot(quiet, 2)
    assert [quiet.skip(pid, 7000 + pid - 10) for pid in (11, 12, 16, 17)] == [True] * 4
    assert quiet.counts == [1, 1, 1, 1]
    assert seen == set()  # none is tracked
    snapshot(quiet, 3)
    assert quiet.counts == [0, 0, 0, 0]
    # (pid + snapshot) % recheck == 0: pid 12 at snapshot 3 and pid 17 too are read again
    assert [quiet.skip(pid, 7000 + pid - 10) for pid in (11, 12, 16, 17)] == [
        True, False, True, False]
    assert quiet.counts == [0, 1, 0, 1]


def test_a_new_set_counts_nothing_and_each_process_adds_one():
    quiet = QuietProcesses(recheck=1000)
    assert quiet.counts == [0, 0, 0, 0] and len(quiet) == 0
    snapshot(quiet, 1)
    for pid in (40, 41, 42):
        quiet.remember(pid, 9000 + pid, REFUSED)
    snapshot(quiet, 2)
    assert all(quiet.skip(pid, 9000 + pid) for pid in (40, 41, 42))
    assert quiet.counts == [0, 0, 3, 0]


def test_another_inode_is_another_process_read_at_once():
    quiet = QuietProcesses(recheck=1000)
    snapshot(quiet, 1)
    quiet.remember(40, 9000, NOT_JEMALLOC)
    snapshot(quiet, 2)
    assert not quiet.skip(40, 9001)
    assert not quiet.skip(41, 9000)  # never remembered
    assert quiet.skip(40, 9000)
    assert quiet.counts == [0, 1, 0, 0]


def test_a_tracked_process_is_read_once_its_objects_are_due_and_its_key_is_seen():
    quiet = QuietProcesses(recheck=1000)
    tracked = Tracked(objects_due=50.0)
    snapshot(quiet, 1, now=10.0)
    quiet.remember(40, 9000, NOT_JEMALLOC, key=(40, 123), tracked=tracked)
    seen = snapshot(quiet, 2, now=49.5)
    assert quiet.skip(40, 9000)
    assert seen == {(40, 123)}
    seen = snapshot(quiet, 3, now=50.0)  # due exactly now: read
    assert not quiet.skip(40, 9000)
    assert seen == set() and quiet.counts == [0, 0, 0, 0]
    tracked.objects_due = 80.0  # the read put it off
    snapshot(quiet, 4, now=50.0)
    assert quiet.skip(40, 9000)


def test_a_sweep_forgets_what_the_walk_did_not_list():
    quiet = QuietProcesses(recheck=1000)
    snapshot(quiet, 1)
    quiet.remember(40, 9000, NOT_JEMALLOC)
    quiet.remember(41, 9001, NOT_JEMALLOC)
    quiet.remember(42, 9002, REFUSED)
    quiet.sweep()  # all were listed (remembered) in this walk
    assert len(quiet) == 3
    snapshot(quiet, 2)
    assert quiet.skip(40, 9000)
    quiet.remember(42, 9002, REFUSED)  # read again this walk: listed too
    quiet.sweep()
    assert len(quiet) == 2
    snapshot(quiet, 3)
    assert quiet.skip(40, 9000) and quiet.skip(42, 9002)
    assert not quiet.skip(41, 9001)


def test_forget_and_clear():
    quiet = QuietProcesses(recheck=1000)
    snapshot(quiet, 1)
    quiet.remember(40, 9000, NOT_JEMALLOC)
    quiet.remember(41, 9001, NOT_JEMALLOC)
    quiet.forget(40)
    quiet.forget(99)  # not remembered: nothing to do
    snapshot(quiet, 2)
    assert not quiet.skip(40, 9000) and quiet.skip(41, 9001)
    quiet.clear()
    assert len(quiet) == 0 and not quiet.skip(41, 9001)


# -- with the kernel's process events ------------------------------------------------------

PIDS = range(100, 164)


def reads(quiet: QuietProcesses, snapshots: range, heard: dict[int, set[int] | None],
          outcome: int = NOT_JEMALLOC) -> dict[int, list[int]]:
    """The pids each snapshot reads (not skipped); `heard[n]` is snapshot n's events (an
    empty set when missing from it)."""
    read: dict[int, list[int]] = {}
    for snapshot in snapshots:
        quiet.begin(snapshot, float(snapshot), set(), heard.get(snapshot, set()))
        read[snapshot] = [pid for pid in PIDS if not quiet.skip(pid, pid * 10)]
        for pid in read[snapshot]:
            quiet.remember(pid, pid * 10, outcome)
        quiet.sweep()
    return read


def test_without_events_each_process_is_read_once_in_recheck() -> None:
    quiet = QuietProcesses(4, 32)
    read = reads(quiet, range(1, 10), {n: None for n in range(1, 10)})
    assert read[1] == list(PIDS)  # first sight
    for snapshot in range(2, 10):
        assert read[snapshot] == [pid for pid in PIDS if (pid + snapshot) % 4 == 0]


def test_while_heard_a_named_process_is_read_at_once_the_others_once_in_recheck_heard() -> None:
    quiet = QuietProcesses(4, 32)
    read = reads(quiet, range(1, 70), {40: {101, 150}})
    for snapshot in range(2, 70):
        expected = {pid for pid in PIDS if (pid + snapshot) % 32 == 0}
        if snapshot == 40:
            expected |= {101, 150}
        assert set(read[snapshot]) == expected, snapshot


def test_after_a_snapshot_that_could_not_hear_every_process_is_read_within_recheck() -> None:
    quiet = QuietProcesses(4, 32)
    read = reads(quiet, range(1, 20), {10: None})
    after = [pid for snapshot in range(10, 14) for pid in read[snapshot]]
    assert sorted(after) == sorted(set(after)) and set(after) == set(PIDS)
    for snapshot in range(14, 20):  # trusted again
        assert read[snapshot] == [pid for pid in PIDS if (pid + snapshot) % 32 == 0]


def test_processes_the_selection_left_out_keep_recheck_while_heard() -> None:
    """A unit the selection looks at can change with no event."""
    quiet = QuietProcesses(4, 32)
    read = reads(quiet, range(1, 10), {}, outcome=UNSELECTED)
    for snapshot in range(2, 10):
        assert read[snapshot] == [pid for pid in PIDS if (pid + snapshot) % 4 == 0]
