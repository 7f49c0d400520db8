"""How a process's totals combine its arena statistics with its per-thread sums."""

from ctprofd.arena_stats import ArenaTotals, process_totals
from ctprofd.snapshot import ARENA, THREADS


def arena(requested: int, in_use: int, cached: int = 0, internal: int = 0,
          cache_locks: int = 0, caches: int = 0) -> ArenaTotals:
    return ArenaTotals(requested, in_use, cached, internal, cache_locks, caches, 1000)


def test_jemalloc_own_allocations_are_taken_out():
    # 3 caches linked now, 4 linked and unlinked (2 locks each): 4 stacks of 1000 bytes gone
    totals = arena(requested=50_000, in_use=9_000, cached=2_000, internal=3_000,
                   cache_locks=11, caches=3)
    assert totals.unlinked == 4
    assert totals.allocated == 50_000 - 3_000 - 4 * 1000
    assert totals.live == 9_000 - 2_000 - 3_000


def test_without_statistics_the_per_thread_sums_stand():
    assert process_totals((500, 200), None, (0, 0)) == (500, 200, THREADS)
    # jemalloc built --disable-stats: the arena counts stay zero
    assert process_totals((500, 200), arena(0, 0), (0, 0)) == (500, 200, THREADS)


def test_arena_statistics_count_what_threads_never_read_did():
    allocated, deallocated, source = process_totals((500, 200), arena(10_000, 700), (0, 0))
    assert (allocated, deallocated, source) == (10_000, 9_300, ARENA)


def test_totals_never_go_backwards_nor_below_the_thread_sums():
    floor = (10_000, 9_300)
    # a read that raced a cache flush: fewer requests and more live bytes than before
    assert process_totals((500, 200), arena(9_000, 2_000), floor) == (10_000, 9_300, ARENA)
    # the arena under the per-thread sums (jemalloc's own allocations over-subtracted)
    assert process_totals((20_000, 12_000), arena(19_000, 7_000), floor) == (
        20_000, 13_000, ARENA)
    # live read as negative mid-flush: freed never exceeds allocated
    assert process_totals((0, 0), arena(30_000, 100, cached=500), floor) == (
        30_000, 30_000, ARENA)
