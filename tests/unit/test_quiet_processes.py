"""Which remembered processes a snapshot reads again (probe.quiet): once in `recheck`
snapshots with no process events, once in `recheck_heard` while they are heard (and at once
when they name one), and every one of them within `recheck` after a snapshot that could
not hear them."""

from __future__ import annotations

from ctprofd.probe.quiet import NOT_JEMALLOC, UNSELECTED, QuietProcesses

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
