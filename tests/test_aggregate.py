"""Aggregate state across hand-built snapshots: counters never go backwards, live bytes do not
drift, pid reuse, transient misses, exec, renames, the series cap, retention and persistence."""

from __future__ import annotations

import json
from dataclasses import replace

from ctprofd.export.aggregate import Aggregator, AggregateView, SeriesValues
from ctprofd.export.labels import username
from ctprofd.report.snapshot import AllocatorHealth, ProcessSample, Snapshot, ThreadSample
from ctprofd.report.summary import ProbeSummary


def proc(pid: int, *threads: tuple[int, int], start: int = 1, comm: str = "app",
         unit: str = "app.service", uid: int = 0, retained: tuple[int, int] = (0, 0),
         exe: str = "/usr/bin/app") -> ProcessSample:
    return ProcessSample(
        pid=pid, start_time=start, comm=comm, exe=exe, build_id=None, uid=uid, unit=unit,
        threads=tuple(ThreadSample(pid + i, comm, a, d) for i, (a, d) in enumerate(threads)),
        retained_allocated_bytes=retained[0], retained_deallocated_bytes=retained[1])


def snap(t: float, *processes: ProcessSample) -> Snapshot:
    return Snapshot(timestamp=t, duration_seconds=0.01, summary=ProbeSummary(),
                    processes=processes)


def alive_set(*idents: tuple[int, int]):
    return lambda pid, start: (pid, start) in idents


NONE_ALIVE = alive_set()


def by_labels(view: AggregateView) -> dict[tuple[str, ...], SeriesValues]:
    return {s.labels: s for s in view.series}


def grouped(labels=("comm",), max_series=100, retention=300.0) -> Aggregator:
    return Aggregator(labels, max_series, retention, user_of=lambda uid: f"user{uid}")


def test_a_new_process_contributes_its_counters_since_its_start():
    view = grouped(("pid", "comm", "unit")).update(snap(0, proc(10, (100, 40), (50, 10))),
                                                   NONE_ALIVE)
    assert view.label_names == ("pid", "comm", "unit")
    assert view.series == (SeriesValues(("10", "app", "app.service"), 150, 50, 100, 1, 2),)
    assert view.dropped_total == 0


def test_label_values_include_exe_and_user_name():
    agg = Aggregator(("exe", "user"), 100, 300.0, user_of=lambda uid: {7: "seven"}[uid])
    view = agg.update(snap(0, proc(10, (1, 0), uid=7)), NONE_ALIVE)
    assert view.series[0].labels == ("/usr/bin/app", "seven")


def test_username_falls_back_to_the_number():
    assert username(0) == "root"
    assert username(2_000_000_000) == "2000000000"


def test_thread_exit_keeps_the_counters():
    agg = grouped()
    agg.update(snap(0, proc(10, (100, 40), (50, 10))), NONE_ALIVE)
    # the second thread ended: the capturer keeps its last values as retained bytes
    view = agg.update(snap(1, proc(10, (120, 60), retained=(50, 10))), NONE_ALIVE)
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 170, 70, 100, 1, 1)


def test_process_exit_keeps_counters_and_drops_live_bytes():
    agg = grouped()
    agg.update(snap(0, proc(10, (100, 40)), proc(11, (30, 0))), NONE_ALIVE)
    view = agg.update(snap(1, proc(11, (35, 5))), NONE_ALIVE)
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 135, 45, 30, 1, 1)
    view = agg.update(snap(2), NONE_ALIVE)
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 135, 45, 0, 0, 0)


def test_restart_under_the_same_comm_does_not_drift_live_bytes():
    agg = grouped()
    agg.update(snap(0, proc(10, (1000, 400))), NONE_ALIVE)
    view = agg.update(snap(1, proc(20, (300, 100))), NONE_ALIVE)  # 10 exited, 20 started
    series = by_labels(view)[("app",)]
    assert (series.allocated_bytes, series.deallocated_bytes) == (1300, 500)
    assert series.live_bytes == 200  # only the new process's, not 1300 - 500


def test_pid_reuse_is_a_new_process():
    agg = grouped(("pid",))
    agg.update(snap(0, proc(10, (1000, 400), start=5)), NONE_ALIVE)
    view = agg.update(snap(1, proc(10, (10, 0), start=9)), NONE_ALIVE)
    assert view.series == (SeriesValues(("10",), 1010, 400, 10, 1, 1),)


def test_a_process_missing_while_alive_is_neither_lost_nor_counted_twice():
    agg = grouped()
    agg.update(snap(0, proc(10, (100, 40)), proc(11, (10, 0))), NONE_ALIVE)
    view = agg.update(snap(1, proc(11, (10, 0))), alive_set((10, 1)))
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 110, 40, 10, 1, 1)
    view = agg.update(snap(2, proc(10, (150, 50)), proc(11, (10, 0))), NONE_ALIVE)
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 160, 50, 110, 2, 2)


def test_exec_restarts_the_counters_without_going_backwards():
    agg = grouped(("pid",))
    agg.update(snap(0, proc(10, (1000, 400), comm="sh")), NONE_ALIVE)
    view = agg.update(snap(1, proc(10, (20, 5), comm="app")), NONE_ALIVE)
    assert view.series == (SeriesValues(("10",), 1020, 405, 15, 1, 1),)


def test_a_rename_keeps_the_first_name_and_reports_the_current_one():
    agg = grouped(("pid", "comm"))
    agg.update(snap(0, proc(10, (100, 40), comm="old")), NONE_ALIVE)
    for i in range(50):  # renaming itself all the time mints no series
        view = agg.update(snap(1 + i, proc(10, (130 + i, 45), comm=f"new{i}")), NONE_ALIVE)
    assert view.series == (SeriesValues(("10", "old"), 179, 45, 134, 1, 1),)
    assert view.renamed == ((("10", "old"), 10, "new49"),)
    view = agg.update(snap(60, proc(10, (5, 0), comm="execd")), NONE_ALIVE)  # an exec
    assert [s.labels for s in view.series] == [("10", "execd"), ("10", "old")]
    assert view.renamed == ()
    unnamed = grouped(("pid",))  # without a comm label there is no name to differ from
    unnamed.update(snap(0, proc(10, (1, 0), comm="old")), NONE_ALIVE)
    assert unnamed.update(snap(1, proc(10, (2, 0), comm="new")), NONE_ALIVE).renamed == ()


def test_counters_never_go_backwards_over_a_mixed_history():
    agg = grouped(("unit",))
    history = [
        snap(0, proc(1, (10, 0)), proc(2, (20, 5), (7, 7))),
        snap(1, proc(1, (15, 5)), proc(2, (25, 6), retained=(7, 7))),
        snap(2, proc(2, (30, 9), retained=(7, 7)), proc(3, (1, 1), start=4)),
        snap(3, proc(1, (90, 80), start=8), proc(3, (1, 1), start=4)),
        snap(4),
    ]
    last = (0, 0)
    for s in history:
        view = agg.update(s, NONE_ALIVE)
        series = by_labels(view)[("app.service",)]
        now = (series.allocated_bytes, series.deallocated_bytes)
        assert now >= last and now[1] >= last[1]
        last = now
    assert last == (15 + 30 + 7 + 1 + 90, 5 + 9 + 7 + 1 + 80)


def test_the_cap_prefers_live_long_running_large_series_and_says_why_others_are_out():
    agg = grouped(("comm",), max_series=3)
    agg.update(snap(0, proc(1, (10, 0), comm="small-old", start=5),
                    proc(2, (10, 0), comm="gone", start=6)), NONE_ALIVE)
    view = agg.update(snap(1, proc(1, (10, 0), comm="small-old", start=5),
                           proc(3, (9000, 0), comm="big-new", start=50),
                           proc(4, (10, 0), comm="small-new", start=50)), NONE_ALIVE)
    assert [s.labels for s in view.series] == [("small-old",), ("big-new",), ("small-new",)]
    assert view.dropped == {"live": 0, "exited": 1}  # "gone" exited: it goes first
    view = agg.update(snap(2, proc(1, (10, 0), comm="small-old", start=5),
                           proc(3, (9000, 0), comm="big-new", start=50),
                           proc(4, (10, 0), comm="small-new", start=50),
                           proc(5, (10, 0), comm="newest", start=60)), NONE_ALIVE)
    assert [s.labels for s in view.series] == [("small-old",), ("big-new",), ("small-new",)]
    assert view.dropped == {"live": 1, "exited": 1}


def test_a_flood_of_short_lived_processes_cannot_keep_a_service_out():
    agg = grouped(("comm",), max_series=10)
    for i in range(500):  # each flood process lives for one snapshot
        flood = [proc(1000 + 3 * i + j, (1, 0), comm=f"f{i}-{j}", start=10 * i) for j in range(3)]
        service = [proc(7, (100 + i, 0), comm="service", start=2000)] if i >= 200 else []
        view = agg.update(snap(i, *flood, *service), NONE_ALIVE)
        if i >= 200:
            assert ("service",) in by_labels(view)
    state = agg.to_state()
    assert len(state["series"]) <= 20  # the table is capped too
    assert view.evicted > 1000 and view.dropped["exited"] > 0


def test_one_users_many_older_series_cannot_push_out_another_users_service():
    """Each uid gets an equal share of the cap: 20 idle processes of uid 65534, all older,
    leave room for root's two series, and the flood still fills what root leaves."""
    agg = grouped(("pid",), max_series=6)
    idle = [proc(100 + i, (1, 0), uid=65534, start=i) for i in range(20)]
    root = [proc(7, (5, 0), start=50), proc(8, (9, 0), start=90)]  # the service restarted
    view = agg.update(snap(0, *idle, *root), NONE_ALIVE)
    kept = [s.labels[0] for s in view.series]
    assert kept == ["100", "101", "102", "103", "7", "8"]  # still best-first
    assert view.dropped == {"live": 16, "exited": 0}
    state = agg.to_state()  # the owner of a series survives a restart
    again = grouped(("pid",), max_series=6)
    assert again.restore(json.loads(json.dumps(state)), same_boot=False)
    view = again.update(snap(1), NONE_ALIVE)  # all exited now: by owner and recency
    assert {"7", "8"} <= {s.labels[0] for s in view.series}
    old = {**state, "series": [entry[:4] for entry in state["series"]]}  # saved before owners
    assert grouped(("pid",), max_series=6).restore(old, same_boot=False)


def test_a_users_exited_series_never_push_out_another_users_live_ones():
    """The share per user applies among live series and among exited ones, never across:
    10 exited series of uid 65534 leave all four of root's live series under a cap of 4."""
    agg = grouped(("pid",), max_series=4)
    agg.update(snap(0, *(proc(100 + i, (1, 0), uid=65534, start=i) for i in range(10))),
               NONE_ALIVE)
    root = [proc(7 + i, (5, 0), start=50 + i) for i in range(4)]
    view = agg.update(snap(1, *root), NONE_ALIVE)
    assert [s.labels[0] for s in view.series] == ["7", "8", "9", "10"]
    assert view.dropped == {"live": 0, "exited": 4}  # the table holds twice the cap


def test_empty_series_are_kept_for_the_retention_then_forgotten():
    agg = grouped(("pid",), retention=10)
    agg.update(snap(0, proc(10, (5, 1))), NONE_ALIVE)
    assert by_labels(agg.update(snap(9, proc(20, (1, 0))), NONE_ALIVE))[("10",)].allocated_bytes == 5
    view = agg.update(snap(11, proc(20, (1, 0))), NONE_ALIVE)
    assert [s.labels for s in view.series] == [("20",)]


def test_memory_is_bounded_by_live_processes_and_retained_series():
    agg = grouped(("comm",), retention=5)
    for i in range(1000):
        agg.update(snap(i, proc(1000 + i, (i, 0), comm=f"c{i % 3}")), NONE_ALIVE)
    state = agg.to_state()
    assert len(state["processes"]) == 1 and len(state["series"]) == 3


def test_state_round_trip_continues_the_counters():
    agg = grouped()
    agg.update(snap(0, proc(10, (100, 40)), proc(11, (7, 1))), NONE_ALIVE)
    agg.update(snap(1, proc(11, (8, 1))), NONE_ALIVE)
    state = json.loads(json.dumps(agg.to_state()))
    again = grouped()
    assert again.restore(state, same_boot=True)
    view = again.update(snap(2, proc(11, (9, 2))), NONE_ALIVE)
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 109, 42, 7, 1, 1)


def test_state_from_another_boot_folds_every_process():
    agg = grouped()
    agg.update(snap(0, proc(1, (100, 40))), NONE_ALIVE)
    again = grouped()
    assert again.restore(agg.to_state(), same_boot=False)
    view = again.update(snap(1, proc(1, (500, 100))), alive_set((1, 1)))  # same pid and start
    assert by_labels(view)[("app",)] == SeriesValues(("app",), 600, 140, 400, 1, 1)


def test_state_with_other_labels_is_not_restored():
    agg = grouped(("comm",))
    assert not grouped(("pid",)).restore(agg.to_state(), same_boot=True)
    assert not grouped().restore({"version": 99}, same_boot=True)


def test_a_moved_process_that_exits_leaves_each_series_its_own_part():
    agg = grouped(("unit",))
    agg.update(snap(0, proc(10, (100, 40), unit="old")), NONE_ALIVE)
    agg.update(snap(1, proc(10, (130, 45), unit="new")), NONE_ALIVE)
    view = agg.update(snap(2), NONE_ALIVE)  # exited: the new series' part is folded
    series = by_labels(view)
    assert series[("old",)] == SeriesValues(("old",), 100, 40, 0, 0, 0)
    assert series[("new",)] == SeriesValues(("new",), 30, 5, 0, 0, 0)


def test_exec_is_seen_when_only_one_counter_went_backwards():
    agg = grouped(("pid",))
    agg.update(snap(0, proc(10, (1000, 400))), NONE_ALIVE)
    view = agg.update(snap(1, proc(10, (20, 500))), NONE_ALIVE)  # allocated restarted
    assert view.series == (SeriesValues(("10",), 1020, 900, -480, 1, 1),)
    agg = grouped(("pid",))
    agg.update(snap(0, proc(10, (1000, 400))), NONE_ALIVE)
    view = agg.update(snap(1, proc(10, (2000, 5))), NONE_ALIVE)  # deallocated restarted
    assert view.series == (SeriesValues(("10",), 3000, 405, 1995, 1, 1),)


def test_a_series_is_kept_until_exactly_its_retention():
    agg = grouped(("pid",), retention=10)
    agg.update(snap(0, proc(10, (5, 1))), NONE_ALIVE)
    assert [s.labels for s in agg.update(snap(10), NONE_ALIVE).series] == [("10",)]
    assert agg.update(snap(10.5), NONE_ALIVE).series == ()


def test_restored_state_keeps_retention_clocks_and_moved_bases():
    agg = grouped(("unit",), retention=10)
    agg.update(snap(1000, proc(10, (100, 40), unit="gone")), NONE_ALIVE)
    agg.update(snap(1001, proc(11, (50, 20), unit="old")), NONE_ALIVE)  # 10 exited
    agg.update(snap(1002, proc(11, (80, 30), unit="new")), NONE_ALIVE)  # 11 moved
    again = grouped(("unit",), retention=10)
    assert again.restore(json.loads(json.dumps(agg.to_state())), same_boot=True)
    view = again.update(snap(1005, proc(11, (90, 35), unit="new")), NONE_ALIVE)
    series = by_labels(view)
    assert series[("gone",)] == SeriesValues(("gone",), 100, 40, 0, 0, 0)  # active at 1001
    assert series[("old",)] == SeriesValues(("old",), 50, 20, 0, 0, 0)
    assert series[("new",)] == SeriesValues(("new",), 40, 15, 55, 1, 1)  # since the move


def test_state_without_labels_is_not_restored():
    assert not grouped().restore({"version": 1, "series": [], "processes": []},
                                 same_boot=True)


def test_a_restored_process_keeps_its_first_name():
    agg = grouped()
    agg.update(snap(0, proc(10, (100, 40), comm="old")), NONE_ALIVE)
    again = grouped()
    assert again.restore(json.loads(json.dumps(agg.to_state())), same_boot=True)
    view = again.update(snap(1, proc(10, (130, 45), comm="new")), NONE_ALIVE)
    assert view.series == (SeriesValues(("old",), 130, 45, 85, 1, 1),)
    assert view.renamed == ((("old",), 10, "new"),)


def test_state_naming_a_series_it_does_not_list_still_restores():
    """A state file edited by hand, or cut short: folding a process creates its series."""
    agg = grouped()
    agg.update(snap(0, proc(1, (100, 40))), NONE_ALIVE)
    state = agg.to_state()
    state["series"] = []
    again = grouped()
    assert again.restore(state, same_boot=False)
    assert by_labels(again.update(snap(1), NONE_ALIVE))[("app",)] == SeriesValues(
        ("app",), 100, 40, 0, 0, 0)


def test_the_table_forgets_the_least_recently_active_exited_series_first():
    agg = grouped(("pid",), max_series=1, retention=1000)  # a table of 2 x max_series
    agg.update(snap(0, proc(30, (1, 0))), NONE_ALIVE)
    agg.update(snap(1, proc(20, (1, 0))), NONE_ALIVE)
    assert (len(agg.to_state()["series"]), agg.evicted) == (2, 0)  # at the bound: kept
    agg.update(snap(2, proc(10, (1, 0))), NONE_ALIVE)  # 30 (active at 0) goes, not 20
    assert sorted(labels for labels, *_ in agg.to_state()["series"]) == [["10"], ["20"]]
    assert agg.evicted == 1


def test_series_key_takes_the_comm_it_is_given():
    agg = grouped(("pid", "comm"))
    assert agg.series_key(proc(10, (1, 0), comm="now")) == ("10", "now")
    assert agg.series_key(proc(10, (1, 0), comm="now"), comm="first") == ("10", "first")


def order(view: AggregateView) -> list[str]:
    return [s.labels[0] for s in view.series]


def test_live_series_come_first_the_longest_running_then_the_larger():
    agg = grouped(("comm",))
    view = agg.update(snap(0, proc(1, (1, 0), start=5, comm="a"),
                           proc(2, (1, 0), start=50, comm="a"),  # a's earliest start is 5
                           proc(3, (1, 0), start=20, comm="b"),
                           proc(4, (100, 90), start=30, comm="c"),
                           proc(5, (50, 95), start=30, comm="d")), NONE_ALIVE)
    assert order(view) == ["a", "b", "c", "d"]  # c and d started together: c allocated more


def test_exited_series_follow_the_most_recently_active_then_the_larger():
    agg = grouped(("comm",))
    agg.update(snap(0, proc(1, (1, 0), comm="x"), proc(2, (1, 0), comm="y"),
                    proc(3, (100, 90), comm="p"), proc(4, (50, 95), comm="q")), NONE_ALIVE)
    agg.update(snap(1, proc(2, (1, 0), comm="y"), proc(9, (1, 0), start=7, comm="live")),
               NONE_ALIVE)  # x, p and q exited, active last at 0
    view = agg.update(snap(2, proc(9, (1, 0), start=7, comm="live")), NONE_ALIVE)  # y at 1
    assert order(view) == ["live", "y", "p", "q", "x"]


def test_allocator_figures_are_summed_only_when_every_process_has_them():
    """A series' allocator figures are the sum over its live processes when each one's were
    read; one process without them leaves the series without (absent, never a partial sum
    passing for the whole), and the next snapshot that reads them all brings them back."""
    one = AllocatorHealth(100, 120, 200, 300, 50, 10, 70, 0)
    two = AllocatorHealth(1000, 1100, 1500, 2000, 400, 20, 300, 100)
    aggregator = grouped(("comm",))
    both = snap(0, replace(proc(10, (100, 0)), allocator=one),
                replace(proc(11, (100, 0)), allocator=two),
                replace(proc(12, (5, 0), comm="other"), allocator=None))
    view = by_labels(aggregator.update(both, alive_set((10, 1), (11, 1), (12, 1))))
    assert view[("app",)].allocator == AllocatorHealth(1100, 1220, 1700, 2300, 450, 30, 370, 100)
    assert view[("other",)].allocator is None
    partial = snap(15, replace(proc(10, (100, 0)), allocator=one),
                   replace(proc(11, (100, 0)), allocator=None))
    assert by_labels(aggregator.update(partial, alive_set((10, 1), (11, 1))))[
        ("app",)].allocator is None
    assert by_labels(aggregator.update(snap(30, replace(proc(10, (100, 0)), allocator=one)),
                                       alive_set((10, 1))))[("app",)].allocator == one


def test_a_process_the_selection_leaves_out_is_forgotten_though_alive():
    """After a reload that leaves a running process out: its own series goes at once, a
    series it shares loses its counts; selected again, it counts from its counters, once."""
    agg = grouped(("pid",), retention=10)
    agg.update(snap(0, proc(10, (100, 40)), proc(11, (5, 0))), NONE_ALIVE)
    both_alive = alive_set((10, 1), (11, 1))
    view = agg.update(replace(snap(1, proc(11, (6, 0))), unselected=((10, 1),)), both_alive)
    assert [s.labels for s in view.series] == [("11",)]
    view = agg.update(snap(2, proc(10, (120, 50)), proc(11, (7, 0))), NONE_ALIVE)
    assert by_labels(view)[("10",)] == SeriesValues(("10",), 120, 50, 70, 1, 1)
    shared = grouped(("comm",))
    shared.update(snap(0, proc(10, (100, 40)), proc(11, (5, 0))), NONE_ALIVE)
    view = shared.update(replace(snap(1, proc(11, (6, 0))), unselected=((10, 1),)), both_alive)
    assert view.series == (SeriesValues(("app",), 6, 0, 6, 1, 1),)
