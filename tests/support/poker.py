"""The poker fixture program (tests/fixtures/poker.c), a jemalloc program that writes its
own memory on command, and the ways it rewrites its allocator's arena statistics against
their reader (issue 22, point 1): used by tests/test_arena_budget.py and
benchmarks/combined_attack.py. Each attack takes a Poker whose layout is ctprofd's of the
poker binary (`ctprofd offsets --json`)."""

from __future__ import annotations

import os


class Poker:
    """The attacker: a jemalloc program writing its own memory on command."""

    def __init__(self, proc, layout: dict) -> None:
        self.proc, self.arena = proc, layout["arena"]
        self.base = self._base()

    def _base(self) -> int:
        exe = os.stat(f"/proc/{self.proc.pid}/exe")
        with open(f"/proc/{self.proc.pid}/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and int(fields[2], 16) == 0 and int(fields[4]) == exe.st_ino:
                    return int(fields[0].split("-")[0], 16)
        raise AssertionError("the poker's executable is not mapped")

    def region(self, size: int) -> int:
        self.proc.send(f"REGION {size}")
        word, address = self.proc.readline().split()
        assert word == "REGION"
        return int(address, 16)

    def fill(self, wide: int, address: int, count: int, stride: int, value: int,
             step: int = 0) -> None:
        self.proc.send(f"FILL{wide} {address:#x} {count} {stride} {value:#x} {step}")
        assert self.proc.readline() == "DONE"

    def at(self, name: str) -> int:
        return self.base + self.arena[name]

    def peek(self, address: int, size: int) -> bytes:
        with open(f"/proc/{self.proc.pid}/mem", "rb") as mem:
            mem.seek(address)
            return mem.read(size)

    def arena0(self) -> int:
        """Where arenas[0] leads: the real arena 0."""
        return int.from_bytes(self.peek(self.at("arenas"), 8), "little")


def same_region_arenas(poker: Poker) -> None:
    """narenas 1024, every arenas[i] but the real first pointing at one zeroed 1 MiB region."""
    region = poker.region(1 << 20)
    poker.fill(64, poker.at("arenas") + 8, 1023, 8, region)
    poker.fill(32, poker.at("narenas_total"), 1, 4, 1024)


def distinct_overlapping_arenas(poker: Poker) -> None:
    """narenas 1024, each arenas[i] a distinct address 64 bytes apart in one region, with
    the index it must hold: they pass every check, and read what 1,024 real arenas would."""
    region = poker.region(1 << 20)
    poker.fill(64, poker.at("arenas") + 8, 1023, 8, region, 64)
    poker.fill(32, region + poker.arena["arena_ind"], 1023, 64, 1, 1)
    poker.fill(32, poker.at("narenas_total"), 1, 4, 1024)


def huge_shard_counts(poker: Poker) -> None:
    """Every bin declares 4096 shards."""
    nbins = poker.arena["nsizes"] - poker.arena["nlarge"]
    poker.fill(32, poker.at("bin_infos") + poker.arena["bin_info_shards"], nbins,
               poker.arena["bin_info_size"], 4096)


def sharded_bins_in_1024_arenas(poker: Poker) -> None:
    """Every bin 64-way sharded, as many as jemalloc allows, in 1,024 overlapping arenas:
    half a gigabyte of bins to read, each value plausible."""
    distinct_overlapping_arenas(poker)
    nbins = poker.arena["nsizes"] - poker.arena["nlarge"]
    poker.fill(32, poker.at("bin_infos") + poker.arena["bin_info_shards"], nbins,
               poker.arena["bin_info_size"], 64)
    first = int.from_bytes(poker.peek(poker.at("arena_bin_offsets"), 4), "little")
    poker.fill(32, poker.at("arena_bin_offsets"), nbins, 4, first,
               64 * poker.arena["bin_size"])  # the shards one after the other, as declared


def long_cache_ring(poker: Poker) -> None:
    """Arena 0's ring of thread caches made 65,535 descriptors long, each leading to
    another bin array (8 bytes apart, overlapping: the attacker's memory stays small)."""
    count, stride = 65535, 32
    ring = poker.region(count * stride + 64)
    arrays = poker.region(count * 8 + 8192)
    poker.fill(64, ring + poker.arena["descriptor_next"], count - 1, stride, ring + stride,
               stride)
    poker.fill(64, ring + poker.arena["descriptor_bins"], count, stride, arrays, 8)
    poker.fill(64, poker.arena0() + poker.arena["arena_descriptors"], 1, 8, ring)


def failing_last_field(poker: Poker) -> None:
    """The last field read (the thread caches' stack size) made implausible, so that every
    read fails at its very end."""
    poker.fill(64, poker.at("tcache_bin_alloc_size"), 1, 8, (1 << 64) - 4096)


ATTACKS = [same_region_arenas, distinct_overlapping_arenas, huge_shard_counts,
           sharded_bins_in_1024_arenas, long_cache_ring, failing_last_field]
