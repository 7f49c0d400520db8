"""Process-wide totals from jemalloc's arena statistics, read from outside.

A thread's own counters die with it; the arenas' statistics (compiled in by default) do
not. What this reads, with process_vm_readv only, through the `arenas` array:

- per small size class (bin): cumulative requests (`nrequests`) and regions handed out
  now (`curregs`); per large class: `nmalloc`, `ndalloc` and the requests served from
  thread caches (`nrequests`), as jemalloc's own arena_stats_merge (ctl.c) adds them;
- `stats.internal`: bytes jemalloc allocated for itself;
- every thread cache, through each arena's ring of cache-bin arrays: the requests it
  counted and has not flushed to its arena yet, and the regions it holds.

allocated = Σ requests × class size + requests pending in thread caches
            − internal − stacks of the thread caches unlinked so far
live      = Σ (curregs + large extents) × class size − cached bytes − internal

(docs/totals.md says why and how exact.)

The same reads carry the allocator's health figures, what mallctl("stats.<name>") gives
after `epoch` (AllocatorHealth, docs/allocator.md): each arena's active, dirty, muzzy and
retained pages and the bytes its extents map, and its base allocator's bytes, summed as
jemalloc 5.3.0's ctl_refresh sums them. jemalloc writes the page counts and pac_mapped as
atomics (nactive by fetch-add, the extent sets' npages under their mutex), the base's bytes
under its mutex: each word is copied twice side by side in the same process_vm_readv call,
and a word whose two copies differ (written meanwhile: a copy may be torn) is read again.

The target keeps running while it is read: a flush between two reads moves counts from
a cache to its arena, so a figure may be off by what one flush carries, in either
direction, until the next read. Callers keep totals from going backwards.
"""

from __future__ import annotations

import bisect
import operator
import struct
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from ..report.snapshot import ARENA, THREADS, AllocatorHealth
from ..resolve.layout import HEALTH_ARENA_WORDS, ArenaLayout
from . import memory

MAX_ARENAS = 1024    # jemalloc's default is 4 per CPU
MAX_SHARDS_PER_BIN = 64  # jemalloc's BIN_SHARDS_MAX
MAX_CACHES = 65536   # thread caches in one process
# What one read of one process's arena statistics may cost in a snapshot. A process with
# 1,024 arenas in use, 36 bins each, reads 18 MiB in 5.3.0 x86_64; a few dozen arenas and
# thousands of threads read well under 1 MiB. Nothing is read beyond it, so ctprofd's
# memory does not grow with what a target declares.
BUDGET_BYTES = 32 << 20
BUDGET_RANGES = 1 << 17   # the ring walk reads 2 per thread cache it was not told of
BUDGET_SECONDS = 2.0
HEALTH_REREADS = 2  # further calls for words still changing between their two copies
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BASE = struct.Struct("<QQQ")  # base_t's allocated, resident, mapped
Reader = Callable[[int, list[tuple[int, int]]], list[bytes | OSError]]


class ArenaReadError(Exception):
    """The statistics could not be read, or are not plausible: the message says which."""


class OverBudget(ArenaReadError):
    """Reading the statistics would pass the process's budget for a snapshot."""


class Budget:
    """A reader charging one process's reads in one snapshot against its budget: bytes,
    ranges and time. Raises OverBudget before a read that would pass it."""

    def __init__(self, reader: Reader, max_bytes: int = BUDGET_BYTES,
                 max_ranges: int = BUDGET_RANGES, seconds: float = BUDGET_SECONDS) -> None:
        self.reader, self.max_bytes, self.max_ranges = reader, max_bytes, max_ranges
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.bytes = self.ranges = 0

    def __call__(self, pid: int, ranges: list[tuple[int, int]]) -> list[bytes | OSError]:
        self.bytes += sum(length for _, length in ranges)
        self.ranges += len(ranges)
        if self.bytes > self.max_bytes:
            raise OverBudget(f"reading {self.bytes:,} bytes passes the budget of "
                             f"{self.max_bytes:,} per snapshot")
        if self.ranges > self.max_ranges:
            raise OverBudget(f"reading {self.ranges:,} ranges passes the budget of "
                             f"{self.max_ranges:,} per snapshot")
        if time.monotonic() > self.deadline:
            raise OverBudget(f"still reading after the budget of {self.seconds:g} s "
                             "per snapshot")
        return self.reader(pid, ranges)


@dataclass(frozen=True)
class ArenaTotals:
    """One read of a process's arena statistics (bytes, unless said otherwise)."""

    requested: int    # Σ requests × class size, pending ones in thread caches included
    in_use: int       # Σ regions and large extents handed out × class size
    cached: int       # held in thread caches
    internal: int     # jemalloc's own allocations, now
    cache_locks: int  # locks of the arenas' thread-cache rings (count)
    caches: int       # thread caches linked now (count)
    cache_stacks: int  # usable size of one thread cache's stacks
    narenas: int = 0   # arenas created when read
    arenas: tuple[int, ...] = ()  # their addresses
    bases: tuple[int, ...] = ()   # their base allocators' (with a health layout)
    page: int = 0                 # jemalloc's page size
    health: AllocatorHealth | None = None  # None: the layout has no health members
    health_words: bytes = b""  # the words and base spans `health` was made from, as read

    @property
    def unlinked(self) -> int:
        """Thread caches unlinked so far: each is linked once and unlinked once."""
        return max(0, (self.cache_locks - self.caches) // 2)

    @property
    def allocated(self) -> int:
        """What the threads asked for: the requests less jemalloc's own allocations, those
        alive now (`internal`) and the stacks of the thread caches gone (which `internal`
        no longer holds)."""
        return self.requested - self.internal - self.unlinked * self.cache_stacks

    @property
    def live(self) -> int:
        """Handed out to the program and not freed."""
        return self.in_use - self.cached - self.internal


@lru_cache(maxsize=64)
def _records(size: int, offsets: tuple[int, ...], kinds: str, count: int) -> struct.Struct:
    """A Struct unpacking `count` records of `size` bytes: at each offset (ascending) one
    field of the matching kind (struct format letter)."""
    record, at = "", 0
    for offset, kind in zip(offsets, kinds):
        record += f"{offset - at}x{kind}"
        at = offset + struct.calcsize(kind)
    return struct.Struct("<" + (record + f"{size - at}x") * count)


def _checked(data: list[bytes | OSError], what: str) -> list[bytes]:
    for item in data:
        if isinstance(item, OSError):
            raise ArenaReadError(f"{what}: {item.strerror or item}")
    return data  # type: ignore[return-value]


def _read(reader: Reader, pid: int, ranges: list[tuple[int, int]], what: str) -> list[bytes]:
    return _checked(reader(pid, ranges), what)


def read_totals(pid: int, layout: ArenaLayout, base: int,
                reader: Reader = memory.read_ranges, tsds: Sequence[int] = ()) -> ArenaTotals:
    """Read the arena statistics of `pid`, whose jemalloc object is loaded at `base`.
    `tsds`, the addresses of threads' tsd_s where known, save walking their caches' ring
    entries one read at a time. Every read is charged to a Budget. Raises ArenaReadError
    (OverBudget when the budget would be passed)."""
    reader = Budget(reader)
    nbins = layout.nbins
    narenas, nhbins, sizes, offsets, infos, stack, align = _read(reader, pid, [
        (base + layout.narenas_total, 4), (base + layout.nhbins, 4),
        (base + layout.sz_index2size_tab, 8 * layout.nsizes),
        (base + layout.arena_bin_offsets, 4 * nbins),
        (base + layout.bin_infos, layout.bin_info_size * nbins),
        (base + layout.tcache_bin_alloc_size, 8),
        (base + layout.tcache_bin_alloc_alignment, 8)], "size-class tables")
    narenas, nhbins = _U32.unpack(narenas)[0], _U32.unpack(nhbins)[0]
    if narenas > min(layout.arenas_count, MAX_ARENAS) or not 0 < nhbins <= layout.nsizes:
        raise ArenaReadError(f"implausible counts: {narenas} arenas, {nhbins} cached classes")
    size = struct.unpack(f"<{layout.nsizes}Q", sizes)
    _check_classes(layout, size, infos)
    first_bin = _U32.unpack_from(offsets, 0)[0]
    shard_sizes = []  # the class size of every bin shard, in memory order
    for i in range(nbins):
        count = _U32.unpack_from(infos, layout.bin_info_size * i + layout.bin_info_shards)[0]
        if _U32.unpack_from(offsets, 4 * i)[0] != first_bin + len(shard_sizes) * layout.bin_size:
            raise ArenaReadError("bin shards not laid out one after the other")
        if not 0 < count <= MAX_SHARDS_PER_BIN:
            raise ArenaReadError(f"bin {i} has {count} shards; jemalloc makes 1 to "
                                 f"{MAX_SHARDS_PER_BIN}")
        shard_sizes += [size[i]] * count
    slots = struct.unpack(f"<{narenas}Q", _read(
        reader, pid, [(base + layout.arenas, 8 * narenas)], "arena array")[0])
    if not slots or not slots[0]:
        raise ArenaReadError(f"no arena 0 ({narenas} arenas)")
    arenas = [a for a in slots if a]
    if len(set(arenas)) < len(arenas):  # each arena is read once, and jemalloc has no alias
        raise ArenaReadError("two arenas[] slots lead to the same arena")

    # the arenas: bins, large classes, internal bytes, the head of their caches' ring
    bins = _records(layout.bin_size, (layout.bin_nrequests, layout.bin_curregs), "QQ",
                    len(shard_sizes))
    large = _records(layout.lstat_size, (layout.lstat_nmalloc, layout.lstat_ndalloc,
                                         layout.lstat_nrequests), "QQQ", layout.nlarge)
    ranges = []
    for arena in arenas:
        ranges += [(arena + layout.arena_internal, 8), (arena + layout.arena_descriptors, 8),
                   (arena + layout.arena_cache_locks, 8), (arena + first_bin, bins.size),
                   (arena + layout.arena_lstats, large.size)]
    per_arena = len(ranges)
    words = _health_words(layout, arenas)
    if words:  # each arena's base pointer, and its words ctl.c merges
        ranges += [(arena + layout.arena_base, 8) for arena in arenas]  # type: ignore[operator]
        ranges += _twice(words)
    indexes = [] if layout.arena_ind is None else [(a + layout.arena_ind, 4) for a in arenas]
    known = [tsd + layout.tsd_descriptor for tsd in tsds]
    ranges += indexes + [r for node in known for r in _ring_entry(layout, node)]
    found = reader(pid, ranges)
    data = iter(_checked(found[:per_arena], "arenas"))
    at = per_arena + (len(arenas) if words else 0)
    bases = [_U64.unpack(b)[0] for b in _checked(found[per_arena:at], "arena bases")]
    word_copies = _checked(found[at:at + 2 * len(words)], "allocator statistics")
    at += 2 * len(words)
    _check_indexes(slots, _checked(found[at:at + len(indexes)], "arena indexes"))
    pointers = found[at + len(indexes):]
    entries = {node: (_U64.unpack(a)[0], _U64.unpack(b)[0])  # type: ignore[arg-type]
               for node, a, b in zip(known, pointers[0::2], pointers[1::2])
               if not isinstance(a, OSError) and not isinstance(b, OSError)}
    large_sizes = size[nbins:]
    requested = in_use = cached = internal = locks = 0
    heads = []
    for _ in arenas:
        internal += _U64.unpack(next(data))[0]
        heads.append(_U64.unpack(next(data))[0])
        locks += _U64.unpack(next(data))[0]
        fields = bins.unpack(next(data))
        requested += _dot(fields[0::2], shard_sizes)
        in_use += _dot(fields[1::2], shard_sizes)
        fields = large.unpack(next(data))
        nmalloc = _dot(fields[0::3], large_sizes)
        requested += nmalloc + _dot(fields[2::3], large_sizes)
        in_use += nmalloc - _dot(fields[1::3], large_sizes)

    # the thread caches: requests not flushed yet, regions held; the arenas' bases
    arrays = _cache_bins(reader, pid, layout, heads, entries)
    cache = _records(layout.cache_bin_size, (layout.cache_bin_head, layout.cache_bin_nrequests,
                                             layout.cache_bin_empty), "QQH", nhbins)
    cached_sizes = size[:nhbins]
    spans = _base_spans(layout, bases)
    found = reader(pid, [(a, cache.size) for a in arrays] + _twice(spans))
    for data_or_error in found[:len(arrays)]:
        if isinstance(data_or_error, OSError):
            continue  # a cache freed since its ring was walked: its thread has exited
        fields = cache.unpack(data_or_error)
        requested += _dot(fields[1::3], cached_sizes)
        cached += _dot([((empty - head) & 0xFFFF) >> 3 for head, empty
                        in zip(fields[0::3], fields[2::3])], cached_sizes)
    health, page, words_read = None, 0, b""
    if words:
        page = _page_size(size, nbins)
        values = _settle(reader, pid, words + spans, word_copies + _checked(
            found[len(arrays):], "base allocators"))
        # words still changing under a busy target: no figures this time (absent, and read
        # in full again next snapshot), the totals, which need none of them, kept
        if values is not None:
            health = _health(page, values[:len(words)], values[len(words):], internal, in_use)
            words_read = b"".join(values) if health is not None else b""
    return ArenaTotals(requested, in_use, cached, internal, locks, len(arrays),
                       _class_size(size, _U64.unpack(stack)[0], _U64.unpack(align)[0]),
                       narenas, tuple(arenas), tuple(bases), page, health, words_read)


def _health_words(layout: ArenaLayout, arenas: list[int]) -> list[tuple[int, int]]:
    """The ranges of each arena's words that ctl.c merges (HEALTH_ARENA_WORDS, in that
    order), none without a health layout."""
    if not layout.has_health:
        return []
    offsets = [getattr(layout, name) for name in HEALTH_ARENA_WORDS]
    return [(arena + offset, 8) for arena in arenas for offset in offsets]


def _base_spans(layout: ArenaLayout, bases: list[int]) -> list[tuple[int, int]]:
    """The range of each base_t's allocated .. mapped."""
    if not bases:
        return []
    return [(base + layout.base_allocated, _BASE.size) for base in bases]  # type: ignore[operator]


def _twice(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each range twice, side by side: two copies taken a moment apart in one call."""
    return [r for r in ranges for r in (r, r)]


def _settle(reader: Reader, pid: int, ranges: list[tuple[int, int]],
            copies: list[bytes]) -> list[bytes] | None:
    """The value of each range from its two copies (`copies`, as `_twice` ordered them).
    Copies that differ were taken while the target wrote the range (either may be torn):
    those ranges are read twice again, in one call, at most HEALTH_REREADS times. None when
    some still differ."""
    values = copies[0::2]
    moving = [i for i, (a, b) in enumerate(zip(copies[0::2], copies[1::2])) if a != b]
    for _ in range(HEALTH_REREADS):
        if not moving:
            break
        again = _read(reader, pid, _twice([ranges[i] for i in moving]), "allocator statistics")
        still = []
        for i, a, b in zip(moving, again[0::2], again[1::2]):
            if a == b:
                values[i] = a
            else:
                still.append(i)
        moving = still
    return None if moving else values


def _page_size(size: tuple[int, ...], nbins: int) -> int:
    """jemalloc's page: its smallest large class is four pages (SC_LARGE_MINCLASS). A
    checked layout has at least one large class (`ArenaLayout.check`)."""
    page = size[nbins] >> 2
    if page & (page - 1) or not 4096 <= page <= 1 << 16:
        raise ArenaReadError(f"the smallest large class ({size[nbins]} bytes) "
                             "is not four pages")
    return page


def _health(page: int, words: list[bytes], spans: list[bytes], internal: int,
            allocated: int) -> AllocatorHealth | None:
    """The figures ctl_refresh makes: arena_stats_merge and pa_shard_stats_merge per arena
    (`words`: 8 per arena, as _health_words orders them), base_stats_get per base
    (`spans`), summed. None when a base's sizes are out of order (jemalloc asserts
    allocated <= resident <= mapped): forged or caught mid-update, the figures are left
    out, not the totals, which need none of them."""
    value = [_U64.unpack(w)[0] for w in words]
    active, dirty, muzzy, retained = (sum(value[i::8]) for i in (0, 1, 3, 5))
    dirty += sum(value[2::8])
    muzzy += sum(value[4::8])
    retained += sum(value[6::8])
    base_allocated = base_resident = base_mapped = 0
    for span in spans:
        fields = _BASE.unpack(span)
        if not fields[0] <= fields[1] <= fields[2]:
            return None
        base_allocated += fields[0]
        base_resident += fields[1]
        base_mapped += fields[2]
    return AllocatorHealth(allocated=allocated, active=active * page,
                           resident=base_resident + (active + dirty) * page,
                           mapped=base_mapped + sum(value[7::8]),
                           retained=retained * page, metadata=base_allocated + internal,
                           dirty=dirty * page, muzzy=muzzy * page)


def unchanged(pid: int, layout: ArenaLayout, base: int, last: ArenaTotals,
              reader: Reader = memory.read_ranges) -> bool:
    """Whether no thread cache was linked or unlinked, no arena created and none of the
    allocator's health words changed since `last` was read (one small read). With every
    live thread's counters unmoved too, nothing was allocated or freed: a thread that
    allocates gets a cache, linked when it starts to allocate and unlinked when it exits.
    Pages still move without that (decay threads purge dirty pages into muzzy and
    retained ones), hence the health words, copied once here: each equal to what it was
    when last read twice over is a value the word held, so `last` stands as it is."""
    if layout.has_health and last.health is None:
        return False  # its figures were not read last time (still moving): read in full
    words = _health_words(layout, list(last.arenas)) if last.health is not None else []
    spans = _base_spans(layout, list(last.bases)) if words else []
    found = reader(pid, [(base + layout.narenas_total, 4)] + [
        (arena + layout.arena_cache_locks, 8) for arena in last.arenas] + words + spans)
    if any(isinstance(f, OSError) for f in found):
        return False
    locks = sum(_U64.unpack(f)[0] for f in found[1:1 + len(last.arenas)])  # type: ignore[arg-type]
    return (_U32.unpack(found[0])[0] == last.narenas and locks == last.cache_locks  # type: ignore[arg-type]
            and b"".join(found[1 + len(last.arenas):]) == last.health_words)  # type: ignore[arg-type]


def _check_classes(layout: ArenaLayout, size: tuple[int, ...], infos: bytes) -> None:
    """The size classes and the bins' region counts must be what jemalloc makes: growing
    sizes, each bin's regions of its class's size, whole regions in a slab of pages."""
    if size[0] <= 0 or any(a >= b for a, b in zip(size, size[1:])):
        raise ArenaReadError("sz_index2size_tab does not hold growing size classes")
    if layout.bin_info_reg_size is None:
        return
    for i in range(layout.nbins):
        at = layout.bin_info_size * i
        reg = _U64.unpack_from(infos, at + layout.bin_info_reg_size)[0]
        slab = _U64.unpack_from(infos, at + layout.bin_info_slab_size)[0]  # type: ignore[operator]
        nregs = _U32.unpack_from(infos, at + layout.bin_info_nregs)[0]  # type: ignore[operator]
        if reg != size[i] or not (0 < nregs and nregs * reg <= slab < 1 << 32) or slab % 4096:
            raise ArenaReadError(f"bin_infos[{i}] holds {nregs} regions of {reg} bytes in "
                                 f"{slab}-byte slabs; the size class is {size[i]} bytes")


def _check_indexes(slots: tuple[int, ...], found: list[bytes]) -> None:
    """Each arenas[i] must lead to an arena whose own index is i (`found`: the indexes
    read, in the order of the arenas)."""
    for i, data in zip([i for i, a in enumerate(slots) if a], found):
        if _U32.unpack(data)[0] != i:
            raise ArenaReadError(f"arenas[{i}] leads to an arena whose own index is "
                                 f"{_U32.unpack(data)[0]}")


def _dot(counts, sizes) -> int:
    return sum(map(operator.mul, counts, sizes))


def _class_size(size: tuple[int, ...], request: int, alignment: int) -> int:
    """The usable size jemalloc gives an aligned request (sz_sa2u, for alignments up to a
    page): the smallest class that holds it rounded up to the alignment."""
    if alignment & (alignment - 1) or alignment > 1 << 16:
        raise ArenaReadError(f"implausible thread-cache alignment {alignment}")
    wanted = -(-request // max(alignment, 1)) * max(alignment, 1)
    index = bisect.bisect_left(size, wanted)
    if index == len(size):
        raise ArenaReadError(f"implausible thread-cache size {request}")
    return size[index]


def _ring_entry(layout: ArenaLayout, node: int) -> list[tuple[int, int]]:
    """The ranges of a ring entry's next pointer and bin-array pointer."""
    return [(node + layout.descriptor_next, 8), (node + layout.descriptor_bins, 8)]


def _cache_bins(reader: Reader, pid: int, layout: ArenaLayout, heads: list[int],
                entries: dict[int, tuple[int, int]]) -> list[int]:
    """The bin arrays of every thread cache, walking each arena's ring of descriptors;
    `entries` holds (next, bins) of the entries already read."""
    arrays: list[int] = []
    seen: set[int] = set()
    for head in heads:
        node = head
        while node and node not in seen:
            if len(seen) >= MAX_CACHES:
                raise ArenaReadError(f"more than {MAX_CACHES} thread caches")
            seen.add(node)
            entry = entries.get(node)
            if entry is None:
                found = reader(pid, _ring_entry(layout, node))
                if any(isinstance(f, OSError) for f in found):
                    break  # unlinked and freed meanwhile: what was walked is kept
                entry = _U64.unpack(found[0])[0], _U64.unpack(found[1])[0]  # type: ignore[arg-type]
            node, array = entry
            if array:
                arrays.append(array)
    return list(dict.fromkeys(arrays))  # a bin array two entries lead to is read once


def process_totals(threads: tuple[int, int], arena: ArenaTotals | None,
                   floor: tuple[int, int]) -> tuple[int, int, str]:
    """(allocated, deallocated, source) of one process. `threads` is the per-thread sum
    (threads read now plus what exited ones were last read at): exact where it reaches,
    blind to threads never read and to frees made after a thread's last read. `arena` is
    the arena statistics' view, None when they cannot be read. Neither total goes below
    `floor` (the last reported), allocated not below the per-thread sum either;
    deallocated never exceeds allocated (a thread may free what another allocated, but a
    process cannot free more than it allocated: more is a thread not read or a forged
    counter), so live bytes are never negative."""
    if arena is None or arena.requested == 0:  # none, or jemalloc built --disable-stats
        allocated = max(floor[0], threads[0])
        return allocated, min(max(floor[1], threads[1]), allocated), THREADS
    allocated = max(floor[0], threads[0], arena.allocated)
    # not the threads' deallocated: the arenas know what is live, a thread's counter is the
    # thread's to write (a process can forge it, thread.deallocatedp)
    deallocated = max(floor[1], allocated - max(arena.live, 0))
    return allocated, min(deallocated, allocated), ARENA
