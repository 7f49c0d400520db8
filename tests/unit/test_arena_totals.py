"""How a process's totals combine its arena statistics with its per-thread sums, and how
they are read from a (made-up) jemalloc's memory."""

import struct

import pytest

from ctprofd.probe.arena_stats import ArenaReadError, ArenaTotals, process_totals, read_totals
from ctprofd.report.snapshot import ARENA, THREADS
from ctprofd.resolve.layout import ArenaLayout, TsdLayout, resolution_from_dict


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


# --- reading: a made-up jemalloc in a byte buffer -----------------------------------------

# globals at 0x1000.., one arena at 0x8000, thread caches' bins at 0x9000.., ring at 0xA000..
LAYOUT = ArenaLayout(
    arenas=0x1000, arenas_count=4, narenas_total=0x1100, nhbins=0x1110,
    sz_index2size_tab=0x1200, nsizes=4, arena_bin_offsets=0x1300, bin_infos=0x1400,
    bin_info_size=8, bin_info_shards=4, tcache_bin_alloc_size=0x1500,
    tcache_bin_alloc_alignment=0x1508, arena_internal=0, arena_cache_locks=8,
    arena_lstats=16, nlarge=2, lstat_size=24, lstat_nmalloc=0, lstat_ndalloc=8,
    lstat_nrequests=16, arena_descriptors=64, tsd_descriptor=0, descriptor_next=0,
    descriptor_bins=8, cache_bin_size=24, cache_bin_head=0, cache_bin_nrequests=8,
    cache_bin_empty=16, bin_size=16, bin_nrequests=0, bin_curregs=8)
SIZES = (8, 16, 4096, 8192)  # two bins, two large classes


class Memory:
    """A target's memory as {address: bytes}; a read outside it fails like EFAULT."""

    def __init__(self) -> None:
        self.words: dict[int, bytes] = {}
        self.reads = 0

    def put(self, address: int, fmt: str, *values: int) -> None:
        for i, byte in enumerate(struct.pack("<" + fmt, *values)):
            self.words[address + i] = bytes([byte])

    def __call__(self, pid: int, ranges: list[tuple[int, int]]) -> list:
        self.reads += 1
        out = []
        for address, length in ranges:
            try:
                out.append(b"".join(self.words[address + i] for i in range(length)))
            except KeyError:
                out.append(OSError(14, "Bad address"))
        return out


def process(ring: list[int], cache_locks: int) -> Memory:
    m = Memory()
    m.put(0x1000, "4Q", 0x8000, 0, 0, 0)
    m.put(0x1100, "I", 1)
    m.put(0x1110, "I", 3)  # the bins and the first large class are cached
    m.put(0x1200, "4Q", *SIZES)
    m.put(0x1300, "2I", 0x100, 0x110)  # bin shards right after each other
    m.put(0x1400, "4I", 0, 1, 0, 1)  # one shard each
    m.put(0x1500, "2Q", 40, 8)  # thread-cache stacks: 40 bytes -> the 4096 class
    m.put(0x8000, "2Q", 100, cache_locks)  # internal, ring locks
    m.put(0x8000 + 16, "6Q", 3, 1, 2, 0, 0, 0)  # large: 4096 x (3, 1, 2); 8192 none
    m.put(0x8000 + 64, "Q", ring[0] if ring else 0)
    m.put(0x8100, "4Q", 10, 4, 5, 2)  # bins: 8 x (10 requests, 4 in use), 16 x (5, 2)
    for i, node in enumerate(ring):
        m.put(node, "2Q", ring[(i + 1) % len(ring)], 0x9000 + 0x100 * i)
        for j in range(3):  # each bin: head low bits 0x10, empty 0x20 (2 cached), 1 pending
            m.put(0x9000 + 0x100 * i + 24 * j, "QQH6x", 0x10, 1, 0x20)
    return m


def test_the_figures_of_a_made_up_process():
    memory = process([0xA000, 0xA100], cache_locks=6)
    totals = read_totals(1, LAYOUT, 0, memory, tsds=[0xA000])
    pending = 2 * (8 + 16 + 4096)
    assert totals.requested == 10 * 8 + 5 * 16 + (3 + 2) * 4096 + pending
    assert totals.cached == 2 * 2 * (8 + 16 + 4096)
    assert totals.in_use == 4 * 8 + 2 * 16 + (3 - 1) * 4096
    assert (totals.internal, totals.caches, totals.unlinked, totals.cache_stacks) == (
        100, 2, 2, 4096)
    assert memory.reads == 5  # one ring entry was known from its tsd, one walked


def test_a_ring_that_loops_short_of_its_head_ends():
    memory = process([0xA000, 0xA100, 0xA200], cache_locks=6)
    memory.put(0xA200, "Q", 0xA100)  # the last entry points back into the ring
    assert read_totals(1, LAYOUT, 0, memory).caches == 3


def test_implausible_counts_are_refused():
    memory = process([], cache_locks=0)
    memory.put(0x1100, "I", 5000)
    with pytest.raises(ArenaReadError, match="implausible"):
        read_totals(1, LAYOUT, 0, memory)


def test_unreadable_arenas_are_refused():
    memory = process([], cache_locks=0)
    memory.put(0x1000, "Q", 0x7000)  # an arena pointer to nothing
    with pytest.raises(ArenaReadError, match="arenas"):
        read_totals(1, LAYOUT, 0, memory)


def test_a_layout_says_why_it_has_no_arena_statistics():
    layout = TsdLayout("ab" * 20, "je_tsd_tls", 0, 824, 840, static_block_offset=2632,
                       arena_missing="jemalloc's units lack narenas_total")
    assert resolution_from_dict(layout.to_dict()) == layout  # through caches and files
    with pytest.raises(ValueError, match="arena_missing"):
        resolution_from_dict({**layout.to_dict(), "arena_missing": "x" * 501})
