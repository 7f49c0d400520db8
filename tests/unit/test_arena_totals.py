"""How a process's totals combine its arena statistics with its per-thread sums, and how
they are read from a (made-up) jemalloc's memory."""

import dataclasses
import struct

import pytest

from ctprofd.probe import arena_stats
from ctprofd.probe.arena_stats import (BUDGET_RANGES, MAX_ARENAS, MAX_SHARDS_PER_BIN,
                                       ArenaReadError, ArenaTotals, Budget, OverBudget,
                                       process_totals, read_totals, unchanged)
from ctprofd.report.snapshot import ARENA, THREADS, AllocatorHealth
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
    # never below the last reported, each total its own floor
    assert process_totals((500, 200), None, (700, 300)) == (700, 300, THREADS)
    assert process_totals((500, 200), None, (100, 50)) == (500, 200, THREADS)
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
# Made up so that a wrong stride, sign, offset or `=` for `+=` changes a figure: the object
# is not loaded at 0, no field sits at offset 0, three arenas (one arenas[] slot empty)
# hold different counts, the bins have 2, 1 and 3 shards, the class sizes are not powers of
# two, and the thread caches' stacks need the alignment round-up to find their class.

PID = 4242
BASE = 0x7F00_0040_0000  # the object's first loaded page
LAYOUT = ArenaLayout(
    arenas=0x2040, arenas_count=6, narenas_total=0x1104, nhbins=0x1118,
    sz_index2size_tab=0x1200, nsizes=5, arena_bin_offsets=0x1300, bin_infos=0x1400,
    bin_info_size=32, bin_info_shards=28, tcache_bin_alloc_size=0x1500,
    tcache_bin_alloc_alignment=0x1510, arena_internal=0x18, arena_cache_locks=0x28,
    arena_lstats=0x1000, nlarge=2, lstat_size=0x28, lstat_nmalloc=0x8, lstat_ndalloc=0x10,
    lstat_nrequests=0x18, arena_descriptors=0x40, tsd_descriptor=0x30, descriptor_next=0x8,
    descriptor_bins=0x18, cache_bin_size=0x20, cache_bin_head=0x8, cache_bin_nrequests=0x10,
    cache_bin_empty=0x1A, bin_size=0x30, bin_nrequests=0x8, bin_curregs=0x20, arena_ind=0x4C,
    bin_info_reg_size=0x8, bin_info_slab_size=0x10, bin_info_nregs=0x18)
SIZES = (16, 48, 112, 16384, 81920)  # three bins, two large classes (4 pages of 4 KiB first)
SHARDS = (2, 1, 3)
BIN_INFOS = ((16, 4096, 256), (48, 12288, 256), (112, 8192, 73))  # region, slab, regions
NHBINS = 4  # the bins and the first large class are cached
STACKS = (40, 32)  # the caches' stacks: 40 bytes aligned to 32 = 64 bytes: class 112
SLOTS = (0x10000, 0, 0x30000, 0x50000, 0, 0)  # arenas[]; 4 created, slot 1 empty
ARENAS = {  # internal, ring locks, shards' (requests, in use), large (nmalloc, ndalloc, nreq)
    0x10000: (1000, 9, ((7, 3), (11, 5), (13, 2), (17, 1), (19, 4), (23, 6)),
              ((5, 2, 40), (3, 1, 9))),
    0x30000: (300, 4, ((29, 8), (31, 7), (37, 9), (41, 10), (43, 12), (47, 11)),
              ((2, 0, 6), (4, 3, 1))),
    0x50000: (70, 2, ((53, 14), (59, 13), (61, 15), (67, 16), (71, 18), (73, 17)),
              ((1, 1, 2), (0, 0, 0))),
}
RINGS = {0x10000: [0x60000, 0x61000], 0x30000: [0x62000], 0x50000: []}
CACHES = {  # ring entry -> (bin array, its bins' (head, pending requests, empty))
    0x60000: (0x70000, ((0x7FFF_FFF0, 3, 0x0010), (0x20, 5, 0x38), (0x100, 0, 0x108),
                        (0x40, 7, 0x40))),
    0x61000: (0x71000, ((0x10, 2, 0x18), (0x30, 1, 0x30), (0x0, 4, 0x28), (0x8, 0, 0x10))),
    0x62000: (0x72000, ((0x18, 6, 0x20), (0xFFF8, 9, 0x10), (0x50, 1, 0x58),
                        (0x60, 2, 0x70))),
}


def cached_regions(head: int, empty: int) -> int:
    return ((empty - head) % 0x10000) // 8  # the stack's low 16 bits, 8-byte pointers


def expected() -> dict[str, int]:
    """The made-up process's figures, summed straight from the tables above."""
    shard_sizes = [size for size, count in zip(SIZES, SHARDS) for _ in range(count)]
    large_sizes = SIZES[len(SHARDS):]
    requested = in_use = cached = 0
    for _, _, shards, large in ARENAS.values():
        requested += sum(n * s for (n, _), s in zip(shards, shard_sizes))
        in_use += sum(c * s for (_, c), s in zip(shards, shard_sizes))
        requested += sum((m + r) * s for (m, _, r), s in zip(large, large_sizes))
        in_use += sum((m - d) * s for (m, d, _), s in zip(large, large_sizes))
    for _, bins in CACHES.values():
        requested += sum(r * s for (_, r, _), s in zip(bins, SIZES))
        cached += sum(cached_regions(h, e) * s for (h, _, e), s in zip(bins, SIZES))
    return {"requested": requested, "in_use": in_use, "cached": cached,
            "internal": sum(a[0] for a in ARENAS.values()),
            "cache_locks": sum(a[1] for a in ARENAS.values())}


class Memory:
    """A target's memory as {address: bytes}; a read outside it fails like EFAULT."""

    def __init__(self) -> None:
        self.words: dict[int, bytes] = {}
        self.reads = 0

    def put(self, address: int, fmt: str, *values: int) -> None:
        for i, byte in enumerate(struct.pack("<" + fmt, *values)):
            self.words[address + i] = bytes([byte])

    def __call__(self, pid: int, ranges: list[tuple[int, int]]) -> list:
        assert pid == PID, f"read pid {pid}, not the target's"
        self.reads += 1
        out = []
        for address, length in ranges:
            try:
                out.append(b"".join(self.words[address + i] for i in range(length)))
            except KeyError:
                out.append(OSError(14, "Bad address"))
        return out


def process(layout: ArenaLayout = LAYOUT, narenas: int = 4, shards=SHARDS) -> Memory:
    """The made-up process's memory, as LAYOUT reads it."""
    m = Memory()
    m.put(BASE + layout.arenas, f"{len(SLOTS)}Q", *SLOTS)
    m.put(BASE + layout.narenas_total, "I", narenas)
    m.put(BASE + layout.nhbins, "I", NHBINS)
    m.put(BASE + layout.sz_index2size_tab, f"{len(SIZES)}Q", *SIZES)
    first = 0x100
    offsets = [first + sum(shards[:i]) * layout.bin_size for i in range(len(shards))]
    m.put(BASE + layout.arena_bin_offsets, f"{len(shards)}I", *offsets)
    for i, ((reg, slab, nregs), count) in enumerate(zip(BIN_INFOS, shards)):
        at = BASE + layout.bin_infos + layout.bin_info_size * i
        m.put(at, f"{layout.bin_info_size}x")
        m.put(at + 8, "Q", reg)  # bin_info_reg_size
        m.put(at + 16, "Q", slab)  # bin_info_slab_size
        m.put(at + 24, "II", nregs, count)  # bin_info_nregs, bin_info_shards
    m.put(BASE + layout.tcache_bin_alloc_size, "Q", STACKS[0])
    m.put(BASE + layout.tcache_bin_alloc_alignment, "Q", STACKS[1])
    for slot, arena in enumerate(SLOTS):
        if not arena:
            continue
        internal, locks, bins, large = ARENAS[arena]
        m.put(arena + layout.arena_internal, "Q", internal)
        m.put(arena + layout.arena_cache_locks, "Q", locks)
        m.put(arena + layout.arena_ind, "I", slot)
        ring = RINGS[arena]
        m.put(arena + layout.arena_descriptors, "Q", ring[0] if ring else 0)
        m.put(arena + first, f"{sum(shards) * layout.bin_size}x")  # shards beyond the data
        for k, (nrequests, curregs) in enumerate(bins):
            m.put(arena + first + k * layout.bin_size + layout.bin_nrequests, "Q", nrequests)
            m.put(arena + first + k * layout.bin_size + layout.bin_curregs, "Q", curregs)
        m.put(arena + layout.arena_lstats, f"{layout.nlarge * layout.lstat_size}x")
        for k, (nmalloc, ndalloc, nrequests) in enumerate(large):
            at = arena + layout.arena_lstats + k * layout.lstat_size
            m.put(at + layout.lstat_nmalloc, "Q", nmalloc)
            m.put(at + layout.lstat_ndalloc, "Q", ndalloc)
            m.put(at + layout.lstat_nrequests, "Q", nrequests)
        for i, node in enumerate(ring):
            m.put(node + layout.descriptor_next, "Q", ring[(i + 1) % len(ring)])
            array, cache_bins = CACHES[node]
            m.put(node + layout.descriptor_bins, "Q", array)
            m.put(array, f"{NHBINS * layout.cache_bin_size}x")
            for k, (head, nrequests, empty) in enumerate(cache_bins):
                at = array + k * layout.cache_bin_size
                m.put(at + layout.cache_bin_head, "Q", head)
                m.put(at + layout.cache_bin_nrequests, "Q", nrequests)
                m.put(at + layout.cache_bin_empty, "H", empty)
    return m


def read(memory: Memory, layout: ArenaLayout = LAYOUT, tsds=()) -> ArenaTotals:
    return read_totals(PID, layout, BASE, memory, tsds=tsds)


# the allocator's health: 8 words per arena, as _health_words orders them, and a base_t
HEALTH_WORDS = (0x5A0, 0x508, 0x580, 0x510, 0x578, 0x518, 0x570, 0x528)  # not in order
HEALTH = dataclasses.replace(
    LAYOUT, arena_nactive=HEALTH_WORDS[0], arena_dirty_pages=HEALTH_WORDS[1],
    arena_dirty_guarded_pages=HEALTH_WORDS[2], arena_muzzy_pages=HEALTH_WORDS[3],
    arena_muzzy_guarded_pages=HEALTH_WORDS[4], arena_retained_pages=HEALTH_WORDS[5],
    arena_retained_guarded_pages=HEALTH_WORDS[6], arena_pac_mapped=HEALTH_WORDS[7],
    arena_base=0x600, base_allocated=0x10, base_resident=0x18, base_mapped=0x20)
PAGE = SIZES[len(SHARDS)] // 4
WORDS = {0x10000: (40, 3, 1, 5, 2, 7, 0, 9 << 20), 0x30000: (11, 0, 4, 1, 0, 2, 3, 5 << 20),
         0x50000: (2, 6, 0, 0, 1, 0, 1, 1 << 20)}
BASES = {0x10000: (0x7000_0000, (1000, 4096, 2 << 20)), 0x30000: (0x7100_0000, (300, 8192, 1 << 21)),
         0x50000: (0x7200_0000, (70, 4096, 3 << 20))}  # base_t address; allocated, resident, mapped


def with_health(memory: Memory) -> Memory:
    for arena, words in WORDS.items():
        for offset, value in zip(HEALTH_WORDS, words):
            memory.put(arena + offset, "Q", value)
        base, (allocated, resident, mapped) = BASES[arena]
        memory.put(arena + HEALTH.arena_base, "Q", base)
        memory.put(base + HEALTH.base_allocated, "3Q", allocated, resident, mapped)
    return memory


def expected_health() -> AllocatorHealth:
    column = [sum(w[i] for w in WORDS.values()) for i in range(8)]
    bases = [sum(b[1][i] for b in BASES.values()) for i in range(3)]
    active, dirty = column[0] * PAGE, (column[1] + column[2]) * PAGE
    return AllocatorHealth(
        allocated=expected()["in_use"], active=active, resident=bases[1] + active + dirty,
        mapped=bases[2] + column[7], retained=(column[5] + column[6]) * PAGE,
        metadata=bases[0] + expected()["internal"], dirty=dirty,
        muzzy=(column[3] + column[4]) * PAGE)


class Torn(Memory):
    """Memory whose word at each address of `torn` reads its values in turn, one per copy
    taken, the last for good (an OSError: that read fails)."""

    def __init__(self, memory: Memory, torn: dict[int, list[int | OSError]]) -> None:
        super().__init__()
        self.words, self.torn = memory.words, {a: list(v) for a, v in torn.items()}

    def __call__(self, pid: int, ranges: list[tuple[int, int]]) -> list:
        out = super().__call__(pid, ranges)
        for i, (address, _) in enumerate(ranges):
            if values := self.torn.get(address):
                value = values.pop(0) if len(values) > 1 else values[0]
                out[i] = value if isinstance(value, OSError) else struct.pack("<Q", value)
        return out


def test_the_allocator_health_of_a_made_up_process():
    HEALTH.check()
    totals = read(with_health(process()), HEALTH)
    assert totals.health == expected_health()
    assert (totals.page, totals.bases) == (PAGE, tuple(b[0] for b in BASES.values()))
    assert read(process()).health is None  # a layout without the members: no figures
    # the figures come with the totals, not instead of them
    assert dataclasses.replace(totals, health=None, page=0, bases=(),
                               health_words=b"") == read(process())


def test_a_health_word_torn_then_settled_is_read_again_and_kept():
    address = 0x30000 + HEALTH_WORDS[1]  # arena 2's dirty pages, 0 then 5 then 5 for good
    memory = Torn(with_health(process()), {address: [0, 5, 5, 5, 5]})
    health = read(memory, HEALTH).health
    assert health is not None and health.dirty == expected_health().dirty + 5 * PAGE


def test_words_torn_in_several_arenas_each_settle_to_their_own_value():
    """Three words of three arenas torn at once, settling after one and two rereads: each
    range is paired with its own copies, and its own reread; the figures are those of
    memory that held the final values all along."""
    torn = {0x30000 + HEALTH_WORDS[1]: [0, 5, 5, 5], 0x50000 + HEALTH_WORDS[3]: [1, 7, 7, 7],
            0x10000 + HEALTH_WORDS[0]: [2, 3, 4, 9, 9, 9]}
    settled = {address: [values[-1]] for address, values in torn.items()}
    health = read(Torn(with_health(process()), torn), HEALTH).health
    assert health is not None
    assert health == read(Torn(with_health(process()), settled), HEALTH).health


def test_a_torn_word_that_cannot_be_read_again_is_refused_naming_what():
    memory = Torn(with_health(process()),
                  {0x30000 + HEALTH_WORDS[1]: [0, 5, OSError(14, "Bad address")]})
    with pytest.raises(ArenaReadError, match="^allocator statistics: Bad address$"):
        read(memory, HEALTH)


@pytest.mark.parametrize("values", [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 6]])
def test_a_health_word_still_changing_after_two_more_reads_leaves_the_figures_out(values):
    """The figures are left out for this read (and the next is a full one); the totals,
    which need none of those words, stand."""
    address = 0x50000 + HEALTH_WORDS[0]  # 2 copies, then 2 rereads of 2 copies each
    memory = Torn(with_health(process()), {address: values})
    totals = read(memory, HEALTH)
    whole = read(with_health(process()), HEALTH)
    assert totals.health is None and totals == dataclasses.replace(whole, health=None,
                                                                   health_words=b"")
    assert not unchanged(PID, HEALTH, BASE, totals, with_health(process()))


@pytest.mark.parametrize("sizes", [(300, 8192, 4096), (8193, 8192, 1 << 21)])
def test_a_base_out_of_order_leaves_the_figures_out(sizes):
    """jemalloc keeps a base's allocated <= resident <= mapped: a base that says otherwise
    (mapped under resident, or allocated over it) was forged or caught mid-update."""
    memory = with_health(process())
    memory.put(0x7100_0000 + HEALTH.base_allocated, "3Q", *sizes)
    totals = read(memory, HEALTH)
    assert totals.health is None and totals.in_use == expected()["in_use"]
    assert totals.health_words == b""
    assert not unchanged(PID, HEALTH, BASE, totals, memory)


def test_a_base_whose_sizes_are_all_equal_is_in_order():
    memory = with_health(process())
    memory.put(0x7100_0000 + HEALTH.base_allocated, "3Q", 8192, 8192, 8192)
    assert read(memory, HEALTH).health is not None


@pytest.mark.parametrize("smallest", [20480, 8192, 4 << 17])  # 5 pages; 2 KiB, 128 KiB ones
def test_a_smallest_large_class_not_four_pages_is_refused(smallest):
    memory = with_health(process())
    memory.put(BASE + LAYOUT.sz_index2size_tab + 8 * len(SHARDS), "2Q", smallest, 8 << 17)
    with pytest.raises(ArenaReadError, match=f"^the smallest large class \\({smallest} bytes\\) "
                                             "is not four pages$"):
        read(memory, HEALTH)


def test_the_largest_page_jemalloc_builds_with_is_read():
    memory = with_health(process())
    memory.put(BASE + LAYOUT.sz_index2size_tab + 8 * len(SHARDS), "2Q", 4 << 16, 8 << 17)
    assert read(memory, HEALTH).page == 1 << 16


def test_unreadable_health_words_and_bases_are_refused_naming_what():
    memory = with_health(process())
    del memory.words[0x30000 + HEALTH.arena_base]
    with pytest.raises(ArenaReadError, match="^arena bases: Bad address$"):
        read(memory, HEALTH)
    memory = with_health(process())
    del memory.words[0x50000 + HEALTH_WORDS[7]]
    with pytest.raises(ArenaReadError, match="^allocator statistics: Bad address$"):
        read(memory, HEALTH)
    memory = with_health(process())
    del memory.words[0x7200_0000 + HEALTH.base_mapped]
    with pytest.raises(ArenaReadError, match="^base allocators: Bad address$"):
        read(memory, HEALTH)


def test_unchanged_only_while_no_health_word_moved():
    memory = with_health(process())
    last = read(memory, HEALTH)
    reads = memory.reads
    assert unchanged(PID, HEALTH, BASE, last, memory)
    assert memory.reads == reads + 1  # one small read
    for address in (0x10000 + HEALTH_WORDS[3],  # decay: arena 0's muzzy pages
                    0x50000 + HEALTH_WORDS[7],  # arena 3's mapped bytes
                    0x7100_0000 + HEALTH.base_mapped):  # arena 2's base
        moved = with_health(process())
        moved.put(address, "Q", 12345)
        assert not unchanged(PID, HEALTH, BASE, last, moved)
    gone = with_health(process())
    del gone.words[0x7200_0000 + HEALTH.base_resident]
    assert not unchanged(PID, HEALTH, BASE, last, gone)


def test_the_made_up_layout_is_plausible_and_its_data_distinguishes():
    LAYOUT.check()
    figures = expected()
    # the data is not degenerate: arenas and caches differ, wrapped stacks, no round sums
    assert len({a[0] for a in ARENAS.values()}) == len(ARENAS) and len(set(SHARDS)) == 3
    assert cached_regions(0x7FFF_FFF0, 0x10) == 4 and figures["cached"] > 0


def test_the_figures_of_a_made_up_process():
    memory = process()
    totals = read(memory, tsds=[0x60000 - LAYOUT.tsd_descriptor])
    figures = expected()
    assert (totals.requested, totals.in_use, totals.cached, totals.internal,
            totals.cache_locks) == (figures["requested"], figures["in_use"],
                                    figures["cached"], figures["internal"],
                                    figures["cache_locks"])
    # 3 caches linked now, (15 - 3) / 2 = 6 unlinked; 40 bytes aligned to 32: class 112
    assert (totals.caches, totals.unlinked, totals.cache_stacks) == (3, 6, 112)
    assert (totals.narenas, totals.arenas) == (4, (0x10000, 0x30000, 0x50000))
    # globals, the arena array, arenas + the known entry, 2 entries walked, the caches
    assert memory.reads == 6


def test_the_ring_is_walked_alike_with_or_without_known_entries():
    known = read(process(), tsds=[n - LAYOUT.tsd_descriptor for n in CACHES])
    walked = read(process())
    assert known == walked
    # an entry whose tsd is unreadable (its thread gone) is walked instead
    assert read(process(), tsds=[0x90000]) == walked


def test_a_ring_that_loops_short_of_its_head_ends():
    memory = process()
    memory.put(0x61000 + LAYOUT.descriptor_next, "Q", 0x61000)  # points at itself
    assert read(memory).caches == 3


def test_a_bin_array_two_ring_entries_lead_to_is_read_once():
    memory = process()
    memory.put(0x61000 + LAYOUT.descriptor_bins, "Q", 0x70000)
    totals = read(memory)
    assert totals.caches == 2
    assert totals.requested == expected()["requested"] - sum(
        r * s for (_, r, _), s in zip(CACHES[0x61000][1], SIZES))


def test_a_ring_entry_freed_meanwhile_keeps_what_was_walked():
    memory = process()
    memory.put(0x60000 + LAYOUT.descriptor_next, "Q", 0x88000)  # unlinked and freed
    assert read(memory).caches == 2  # 0x60000 and arena 2's 0x62000; not 0x61000


def test_a_cache_freed_since_its_ring_was_walked_is_left_out():
    memory = process()
    for i in range(LAYOUT.cache_bin_size * NHBINS):
        del memory.words[0x71000 + i]
    totals = read(memory)
    assert totals.caches == 3  # it was linked when the ring was walked
    assert totals.cached == expected()["cached"] - sum(
        cached_regions(h, e) * s for (h, _, e), s in zip(CACHES[0x61000][1], SIZES))


def test_a_ring_longer_than_the_cache_bound_is_refused(monkeypatch):
    # the bound is 65,536 caches; the read budget (2 ranges a ring entry) stops a ring
    # that long first, so the bound itself is tested lowered to the ring's length
    monkeypatch.setattr(arena_stats, "MAX_CACHES", 3)
    assert read(process()).caches == 3
    monkeypatch.setattr(arena_stats, "MAX_CACHES", 2)
    with pytest.raises(ArenaReadError, match="^more than 2 thread caches$"):
        read(process())


@pytest.mark.parametrize("narenas", [6, 0, 7])
def test_the_arena_count_is_bounded_by_the_array(narenas):
    memory = process(narenas=narenas)
    if narenas == 6:  # as many as arenas[] holds: read
        assert read(memory).narenas == 6
    elif narenas == 0:
        with pytest.raises(ArenaReadError, match="no arena 0"):
            read(memory)
    else:
        with pytest.raises(ArenaReadError, match="^implausible counts: 7 arenas, 4 cached classes$"):
            read(memory)


def test_the_arena_count_is_bounded_by_max_arenas_whatever_the_array_says():
    layout = dataclasses.replace(LAYOUT, arenas_count=4096)
    memory = process(layout)
    memory.put(BASE + layout.arenas + 8 * len(SLOTS), f"{1024 - len(SLOTS)}Q",
               *[0] * (1024 - len(SLOTS)))
    memory.put(BASE + layout.narenas_total, "I", MAX_ARENAS)
    assert read(memory, layout).narenas == MAX_ARENAS
    memory.put(BASE + layout.narenas_total, "I", MAX_ARENAS + 1)
    with pytest.raises(ArenaReadError, match="^implausible counts: 1025 arenas, 4 cached classes$"):
        read(memory, layout)


@pytest.mark.parametrize("nhbins,refused", [(0, True), (1, False), (len(SIZES), False),
                                            (len(SIZES) + 1, True)])
def test_the_cached_classes_are_bounded_by_the_size_classes(nhbins, refused):
    memory = process()
    memory.put(BASE + LAYOUT.nhbins, "I", nhbins)
    if refused:
        with pytest.raises(ArenaReadError, match=f"^implausible counts: 4 arenas, {nhbins} cached classes$"):
            read(memory)
    else:  # every class cached: the second large class's pending requests count too
        for _, bins in CACHES.values():
            for k in range(NHBINS, nhbins):
                assert bins is not None and k < len(SIZES)
        assert read(memory).requested > 0


def test_bin_shards_must_follow_each_other():
    memory = process()
    memory.put(BASE + LAYOUT.arena_bin_offsets + 4, "I", 0x100 + 3 * LAYOUT.bin_size)
    with pytest.raises(ArenaReadError, match="^bin shards not laid out one after the other$"):
        read(memory)
    memory = process()
    memory.put(BASE + LAYOUT.arena_bin_offsets + 8, "I", 0x100 + 2 * LAYOUT.bin_size)
    with pytest.raises(ArenaReadError, match="^bin shards not laid out one after the other$"):
        read(memory)


@pytest.mark.parametrize("count", [0, MAX_SHARDS_PER_BIN, MAX_SHARDS_PER_BIN + 1])
def test_shards_per_bin_are_bounded(count):
    shards = (SHARDS[0], SHARDS[1], count)
    memory = process(shards=shards)
    if count == MAX_SHARDS_PER_BIN:  # the last bin's shards beyond 3 hold nothing
        assert read(memory).requested == expected()["requested"]
    else:
        with pytest.raises(ArenaReadError, match=f"^bin 2 has {count} shards; jemalloc makes 1 to 64$"):
            read(memory)


def test_no_arena_0_two_slots_to_one_arena_and_a_wrong_index_are_refused():
    memory = process()
    memory.put(BASE + LAYOUT.arenas, "Q", 0)
    with pytest.raises(ArenaReadError, match=r"^no arena 0 \(4 arenas\)$"):
        read(memory)
    memory = process()
    memory.put(BASE + LAYOUT.arenas + 8 * 3, "Q", 0x30000)
    with pytest.raises(ArenaReadError, match=r"^two arenas\[\] slots lead to the same arena$"):
        read(memory)
    for layout, memory in ((LAYOUT, process()), (HEALTH, with_health(process()))):
        memory.put(0x50000 + LAYOUT.arena_ind, "I", 2)
        with pytest.raises(ArenaReadError, match=r"arenas\[3\] leads to an arena whose own "
                                                 "index is 2"):
            read(memory, layout)


@pytest.mark.parametrize("sizes", [(0, 48, 112, 20480, 81920), (16, 48, 48, 20480, 81920),
                                   (16, 112, 48, 20480, 81920)])
def test_size_classes_must_grow(sizes):
    memory = process()
    memory.put(BASE + LAYOUT.sz_index2size_tab, "5Q", *sizes)
    with pytest.raises(ArenaReadError, match="^sz_index2size_tab does not hold growing size classes$"):
        read(memory)


@pytest.mark.parametrize("field,value", [
    (8, 17), (24, 0), (24, 257), (16, 4097), (16, 1 << 32)])  # reg, nregs, nregs, slab, slab
def test_bin_infos_must_match_their_classes(field, value):
    memory = process()
    fmt = "I" if field == 24 else "Q"
    memory.put(BASE + LAYOUT.bin_infos + field, fmt, value)  # bin 0: 16 x 256 in 4096
    with pytest.raises(ArenaReadError, match=r"^bin_infos\[0\] holds \d+ regions of \d+ "
                                             r"bytes in \d+-byte slabs; the size class is 16 "
                                             "bytes$"):
        read(memory)


def test_the_smallest_plausible_classes_and_slabs_are_read():
    memory = process()
    memory.put(BASE + LAYOUT.sz_index2size_tab, "Q", 1)  # a 1-byte class of 256 regions
    memory.put(BASE + LAYOUT.bin_infos + 8, "Q", 1)
    memory.put(BASE + LAYOUT.bin_infos + LAYOUT.bin_info_size + 24, "I", 1)  # 1 region
    assert read(memory).requested < expected()["requested"]


def test_counters_with_the_top_bit_set_are_unsigned():
    # a forged counter; read as signed it would make the totals negative
    for address in (0x10000 + 0x100 + LAYOUT.bin_nrequests,
                    0x10000 + LAYOUT.arena_lstats + LAYOUT.lstat_nmalloc,
                    0x70000 + LAYOUT.cache_bin_nrequests):
        memory = process()
        memory.put(address, "Q", 1 << 63)
        assert read(memory).requested > 1 << 63


def test_a_layout_without_arena_indexes_reads_the_same_without_checking_them():
    layout = dataclasses.replace(LAYOUT, arena_ind=None)
    memory = process()
    memory.put(0x50000 + LAYOUT.arena_ind, "I", 2)  # a wrong index, not read
    assert read(memory, layout) == read(process())


def test_a_known_ring_entry_half_unreadable_is_walked_instead():
    memory = process()
    tsd = 0x90000  # its next pointer readable, its bins pointer not
    memory.put(tsd + LAYOUT.tsd_descriptor + LAYOUT.descriptor_next, "Q", 0x60000)
    assert read(memory, tsds=[tsd]) == read(process())


def test_bin_infos_are_not_checked_by_a_layout_without_their_offsets():
    layout = dataclasses.replace(LAYOUT, bin_info_reg_size=None, bin_info_slab_size=None,
                                 bin_info_nregs=None)
    memory = process()
    memory.put(BASE + LAYOUT.bin_infos + 8, "Q", 17)
    assert read(memory, layout).in_use == expected()["in_use"]


@pytest.mark.parametrize("stacks,size", [((40, 0), 48), ((40, 1), 48), ((48, 16), 48),
                                         ((49, 1), 112), ((20481, 1 << 16), 81920)])
def test_thread_cache_stacks_take_the_aligned_class(stacks, size):
    memory = process()
    memory.put(BASE + LAYOUT.tcache_bin_alloc_size, "Q", stacks[0])
    memory.put(BASE + LAYOUT.tcache_bin_alloc_alignment, "Q", stacks[1])
    assert read(memory).cache_stacks == size


@pytest.mark.parametrize("stacks,what", [((40, 24), "alignment 24"),
                                         ((40, 1 << 17), "alignment"),
                                         ((81921, 1), "size 81921")])
def test_implausible_thread_cache_stacks_are_refused(stacks, what):
    memory = process()
    memory.put(BASE + LAYOUT.tcache_bin_alloc_size, "Q", stacks[0])
    memory.put(BASE + LAYOUT.tcache_bin_alloc_alignment, "Q", stacks[1])
    with pytest.raises(ArenaReadError, match=what):
        read(memory)


@pytest.mark.parametrize("address,what", [
    (BASE + LAYOUT.nhbins, "size-class tables"), (BASE + LAYOUT.arenas, "arena array"),
    (0x30000 + LAYOUT.arena_lstats, "arenas"), (0x50000 + LAYOUT.arena_ind, "arena indexes")])
def test_unreadable_statistics_are_refused_naming_what(address, what):
    memory = process()
    del memory.words[address]
    with pytest.raises(ArenaReadError, match=f"^{what}: Bad address"):
        read(memory)


def test_the_budget_refuses_a_read_that_would_pass_it_before_reading():
    memory = process()
    budget = Budget(memory, max_bytes=16, max_ranges=3, seconds=3600)
    assert budget(PID, [(BASE + LAYOUT.arenas, 8), (BASE + LAYOUT.arenas + 8, 8)])
    with pytest.raises(OverBudget, match="^reading 17 bytes passes the budget of 16 per snapshot$"):
        budget(PID, [(BASE + LAYOUT.arenas, 1)])
    assert memory.reads == 1
    budget = Budget(memory, max_bytes=1 << 20, max_ranges=3, seconds=3600)
    assert budget(PID, [(BASE + LAYOUT.arenas, 8)] * 3)
    with pytest.raises(OverBudget, match="^reading 4 ranges passes the budget of 3 per snapshot$"):
        budget(PID, [(BASE + LAYOUT.arenas, 8)])
    with pytest.raises(OverBudget, match="^still reading after the budget of -2 s per snapshot$"):
        Budget(memory, seconds=-2)(PID, [(BASE + LAYOUT.arenas, 8)])
    assert memory.reads == 2


def test_a_layout_that_would_read_past_the_byte_budget_reads_nothing():
    # bin_infos of 1023 bins of 33 KiB each: 33 MiB, a layout a hostile binary's DWARF
    # could declare
    layout = dataclasses.replace(LAYOUT, nsizes=1024, nlarge=1, bin_info_size=33 << 10)
    memory = process()
    with pytest.raises(OverBudget, match="passes the budget of 33,554,432"):
        read(memory, layout)
    assert memory.reads == 0


def test_thread_caches_declared_past_the_range_budget_are_not_read():
    memory = process()
    tsds = range(0x100000, 0x100000 + 16 * (BUDGET_RANGES // 2), 16)  # 2 ranges each
    with pytest.raises(OverBudget, match=f"passes the budget of {BUDGET_RANGES:,}"):
        read(memory, tsds=tsds)
    assert memory.reads == 2  # the globals and the arena array, not the arenas


def test_a_read_still_going_after_the_time_budget_stops(monkeypatch):
    clock = [0.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

    monkeypatch.setattr(arena_stats, "time", Clock)
    memory = process()

    def slow(pid, ranges):  # every read takes a second of the target's (made-up) time
        clock[0] += 1.0
        return memory(pid, ranges)

    with pytest.raises(OverBudget, match="^still reading after the budget of 2 s per snapshot$"):
        read_totals(PID, LAYOUT, BASE, slow)
    assert memory.reads == 3  # the third read started within 2 s, the fourth after


def test_unchanged_only_until_a_cache_is_linked_or_an_arena_created():
    memory = process()
    last = read(memory)
    assert unchanged(PID, LAYOUT, BASE, last, memory)  # no health layout: the counts alone
    memory.put(0x50000 + LAYOUT.arena_cache_locks, "Q", 3)  # a cache linked in arena 3
    assert not unchanged(PID, LAYOUT, BASE, last, memory)
    memory = process(narenas=5)
    assert not unchanged(PID, LAYOUT, BASE, last, memory)
    memory = process()
    del memory.words[0x30000 + LAYOUT.arena_cache_locks]
    assert not unchanged(PID, LAYOUT, BASE, last, memory)


def test_a_layout_says_why_it_has_no_arena_statistics():
    layout = TsdLayout("ab" * 20, "je_tsd_tls", 0, 824, 840, static_block_offset=2632,
                       arena_missing="jemalloc's units lack narenas_total")
    assert resolution_from_dict(layout.to_dict()) == layout  # through caches and files
    with pytest.raises(ValueError, match="arena_missing"):
        resolution_from_dict({**layout.to_dict(), "arena_missing": "x" * 501})
