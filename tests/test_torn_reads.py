"""A counter copied while the target wrote it: read again, count it, never go backwards.
Real process and real process_vm_readv, with chosen values served for one thread."""

from __future__ import annotations

import errno
import struct

from ctprofd.probe import memory
from ctprofd.probe.capture import Capturer, CaptureSettings

_COUNTERS = struct.Struct("<QQQ")  # thread_allocated, the word between, thread_deallocated


class ServingReader:
    """process_vm_readv, except that a read of a range whose address has values queued in
    `serve` is answered with the next of them (bytes, or an OSError)."""

    def __init__(self) -> None:
        self.serve: dict[int, list[bytes | OSError]] = {}
        self.calls: list[list[tuple[int, int]]] = []
        self.seen: dict[int, bytes] = {}  # address -> what the target really held there

    def __call__(self, pid: int, ranges: list[tuple[int, int]]) -> list[bytes | OSError]:
        self.calls.append(list(ranges))
        real = memory.read_ranges(pid, ranges)
        for (address, _), data in zip(ranges, real):
            if isinstance(data, bytes):
                self.seen[address] = data
        return [self.serve[address].pop(0) if self.serve.get(address) else data
                for (address, _), data in zip(ranges, real)]


def counters(snapshot, pid: int) -> dict[int, tuple[int, int]]:
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return {t.tid: (t.allocated_bytes, t.deallocated_bytes) for t in process.threads}


def totals(snapshot, pid: int) -> tuple[int, int]:
    [process] = [p for p in snapshot.processes if p.pid == pid]
    return process.allocated_bytes, process.deallocated_bytes


def test_torn_value_is_read_again_counted_and_never_reported(fixture_bins, spawn_fixture):
    fixture = spawn_fixture(fixture_bins["static"], 2)
    truth = {t["tid"]: (t["allocated"], t["deallocated"]) for t in fixture.threads}
    reader = ServingReader()
    engine = Capturer(CaptureSettings())
    engine.prober.read_ranges = reader
    history = [engine.capture(pids=[fixture.pid])]
    assert counters(history[0], fixture.pid) == truth
    assert engine.stats.torn_reads == 0

    # the last worker's counters, found by what the target really holds there
    victim = fixture.threads[-1]["tid"]
    [address] = [a for a, data in reader.seen.items()  # other reads have other sizes
                 if len(data) == _COUNTERS.size and _COUNTERS.unpack(data)[::2] == truth[victim]]
    allocated, between, deallocated = _COUNTERS.unpack(reader.seen[address])

    def value(a: int, d: int) -> bytes:
        return _COUNTERS.pack(a, between, d)

    # torn (the allocated word half-written), then good: the counters moved on meanwhile
    moved_on = (allocated + 4096, deallocated + 1024)
    reader.serve[address] = [value(allocated - 4096, deallocated), value(*moved_on)]
    reader.calls.clear()
    history.append(engine.capture(pids=[fixture.pid]))
    assert counters(history[-1], fixture.pid) == {**truth, victim: moved_on}
    assert engine.stats.torn_reads == 1
    assert [(address, _COUNTERS.size)] in reader.calls  # the second read, of that thread only

    # torn, and the second read fails: the thread keeps what it was last read at
    reader.serve[address] = [value(allocated, deallocated - 8),
                             OSError(errno.EFAULT, "range not readable")]
    history.append(engine.capture(pids=[fixture.pid]))
    assert counters(history[-1], fixture.pid) == {**truth, victim: moved_on}
    assert engine.stats.torn_reads == 2

    # the real memory (still the truth) is now behind what was reported: read twice,
    # and still never reported backwards
    history.append(engine.capture(pids=[fixture.pid]))
    assert counters(history[-1], fixture.pid) == {**truth, victim: moved_on}
    assert engine.stats.torn_reads == 3
    assert history[-1].summary.failed == 0

    for before, after in zip(history, history[1:]):
        now = counters(after, fixture.pid)
        for tid, (a, d) in counters(before, fixture.pid).items():
            assert now[tid][0] >= a and now[tid][1] >= d
        assert all(x <= y for x, y in zip(totals(before, fixture.pid), totals(after, fixture.pid)))
