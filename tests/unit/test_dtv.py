"""The DTV walk (probe/dtv.py) over a target's memory laid out by hand, as glibc 2.36 lays
it out, with the descriptors read from this host's own libc.so.6 and ld.so: the module
found along the link map, its block from the DTV, no block (zero) when the DTV is older
than the module or the slot unallocated, static TLS, and hostile memory refused; a module
not found is looked for once per process and then backed off, its threads failures and not
zeros."""

from __future__ import annotations

import logging
import struct
from collections import Counter

import pytest

from ctprofd.probe import dtv
from ctprofd.probe.ptrace import Tracer
from ctprofd.probe.threads import ProcessState, ThreadProber, ThreadState
from ctprofd.procfs.processes import ThreadInfo
from ctprofd.report import tags
from ctprofd.report.summary import Tally
from ctprofd.resolve.attach import Attachment
from ctprofd.resolve.layout import TsdLayout
from ctprofd.resolve.loader import LoaderLayout, loader_facts, place
from support.pythreads import hang_guard  # noqa: F401 (a fixture)

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LD_SO = "/lib64/ld-linux-x86-64.so.2"
LD_BASE, LIBC_BASE = 0x7F0000000000, 0x7F1000000000
LINK_MAPS = 0x10000      # two link maps, 0x1000 apart
SLOTINFO = 0x20000
TP, DTV = 0x30000, 0x40000
BIAS = 0x7F2000000000    # where the module is loaded
BLOCK = 0x50000


def host_loader() -> LoaderLayout:
    with open(LIBC, "rb") as libc, open(LD_SO, "rb") as ld:
        placed = place(loader_facts(libc), loader_facts(ld), LD_BASE)
    assert isinstance(placed, LoaderLayout), placed
    return placed


class Memory:
    """A sparse target address space of 64-bit words; unset words fault. `seen` counts
    the reads of each address."""

    def __init__(self) -> None:
        self.words: dict[int, int] = {}
        self.reads = 0
        self.seen: Counter[int] = Counter()
        self.pids: set[int] = set()

    def put(self, address: int, value: int) -> None:
        self.words[address] = value

    def read(self, pid: int, ranges: list[tuple[int, int]]) -> list[bytes | OSError]:
        self.reads += 1
        self.pids.add(pid)
        out: list[bytes | OSError] = []
        for address, size in ranges:
            self.seen[address] += 1
            words = range(address, address + size, 8)
            if size % 8 or not size or any(word not in self.words for word in words):
                out.append(OSError(14, "Bad address"))
            else:
                out.append(b"".join(struct.pack("<Q", self.words[word]) for word in words))
        return out


def layout_memory(loader: LoaderLayout, *, modid: int = 3, module_gen: int = 2,
                  dtv_gen: int = 2, slot: int = BLOCK, tls_offset: int = (1 << 64) - 1) -> Memory:
    f = loader.fields
    mem = Memory()
    first, second = LINK_MAPS, LINK_MAPS + 0x1000
    mem.put(loader.r_debug + dtv.R_DEBUG_MAP, first)
    mem.put(first, 0)                                   # the executable, l_addr 0
    mem.put(first + dtv.LINK_MAP_NEXT, second)
    mem.put(second, BIAS)
    mem.put(second + dtv.LINK_MAP_NEXT, 0)
    mem.put(f["link_map_l_tls_modid"].at(second), modid)
    mem.put(f["link_map_l_tls_offset"].at(second), tls_offset)
    mem.put(f["rtld_global__dl_tls_dtv_slotinfo_list"].at(loader.rtld_global), SLOTINFO)
    mem.put(f["dtv_slotinfo_list_len"].at(SLOTINFO), 64)
    mem.put(f["dtv_slotinfo_list_next"].at(SLOTINFO), 0)
    entry = SLOTINFO + f["dtv_slotinfo_list_slotinfo"].offset + modid * loader.slotinfo_size
    mem.put(f["dtv_slotinfo_gen"].at(entry), module_gen)
    mem.put(f["dtv_slotinfo_map"].at(entry), second)
    mem.put(f["pthread_dtvp"].at(TP), DTV)
    slots = f["dtv_dtv"]
    mem.put(f["dtv_t_counter"].at(slots.at(DTV, 0)), dtv_gen)
    mem.put(f["dtv_t_pointer_val"].at(slots.at(DTV, modid)), slot)
    return mem


def test_host_glibc_describes_what_the_walk_reads():
    loader = host_loader()
    assert loader.fields["dtv_dtv"].size == 16 and loader.slotinfo_size == 16
    assert loader.r_debug > LD_BASE and loader.rtld_global > LD_BASE


def test_module_and_block_are_found():
    loader = host_loader()
    mem = layout_memory(loader)
    module = dtv.find_module(mem.read, 1, loader, BIAS)
    assert module == dtv.Module(3, 2, (1 << 64) - 1)
    assert dtv.block_address(mem.read, 1, loader, module, TP) == BLOCK


@pytest.mark.parametrize("change", [{"dtv_gen": 1}, {"slot": (1 << 64) - 1}])
def test_no_block_yet_is_none(change):
    """A DTV older than the module, or its slot unallocated: the thread has no block."""
    loader = host_loader()
    mem = layout_memory(loader, **change)
    module = dtv.find_module(mem.read, 1, loader, BIAS)
    assert dtv.block_address(mem.read, 1, loader, module, TP) is None


def test_static_tls_module_is_below_the_thread_pointer():
    loader = host_loader()
    mem = layout_memory(loader, dtv_gen=1, tls_offset=0x2000)
    module = dtv.find_module(mem.read, 1, loader, BIAS)
    assert dtv.block_address(mem.read, 1, loader, module, TP) == TP - 0x2000


def test_hostile_memory_is_refused():
    loader = host_loader()
    looping = layout_memory(loader)
    looping.put(LINK_MAPS + 0x1000, 1)  # not our bias: follow l_next ...
    looping.put(LINK_MAPS + 0x1000 + dtv.LINK_MAP_NEXT, LINK_MAPS)  # ... back to the first
    with pytest.raises(dtv.DtvError, match="loops"):
        dtv.find_module(looping.read, 1, loader, BIAS)
    wild = layout_memory(loader, slot=1 << 60)
    module = dtv.find_module(wild.read, 1, loader, BIAS)
    with pytest.raises(dtv.DtvError, match="holds"):
        dtv.block_address(wild.read, 1, loader, module, TP)
    kernel = layout_memory(loader)
    kernel.put(loader.r_debug + dtv.R_DEBUG_MAP, 0xFFFF800000000000)
    with pytest.raises(dtv.DtvError, match="outside user space"):
        dtv.find_module(kernel.read, 1, loader, BIAS)
    absurd = layout_memory(loader, modid=1 << 40)
    with pytest.raises(dtv.DtvError, match="implausible"):
        dtv.find_module(absurd.read, 1, loader, BIAS)
    other = layout_memory(loader)
    f = loader.fields
    entry = SLOTINFO + f["dtv_slotinfo_list_slotinfo"].offset + 3 * loader.slotinfo_size
    other.put(f["dtv_slotinfo_map"].at(entry), 0x1234)
    with pytest.raises(dtv.DtvError, match="another link map"):
        dtv.find_module(other.read, 1, loader, BIAS)


def test_a_loader_that_does_not_describe_itself_is_named():
    with open(LIBC, "rb") as libc:
        facts = loader_facts(libc)
    placed = place(facts, facts, LIBC_BASE)  # libc has no _r_debug
    assert isinstance(placed, str) and "_r_debug" in placed


def test_a_module_not_found_is_one_failure_per_thread_and_looked_for_again_after_a_back_off():
    """A link map that does not lead to the module (here it loops) is walked once for all
    the threads of a process, not again for 1, then 3 snapshots; meanwhile each thread is
    a jemalloc-in-dso failure, never also read as zero. Once the walk finds the module
    the threads are read."""
    loader = host_loader()
    mem = layout_memory(loader)
    second = LINK_MAPS + 0x1000
    mem.put(second, 1)  # not our bias: follow l_next ...
    mem.put(second + dtv.LINK_MAP_NEXT, LINK_MAPS)  # ... back to the first
    layout = TsdLayout(None, "je_tsd_tls", 0x10, 824, 840, dynamic_tls=True)
    pointers = {11: TP, 12: TP + 0x100000}  # two threads sharing one DTV, so one block
    mem.put(loader.fields["pthread_dtvp"].at(pointers[12]), DTV)
    for offset, value in ((824, 5000), (832, 0), (840, 3000)):
        mem.put(BLOCK + 0x10 + offset, value)
    state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
    threads = [ThreadInfo(tid, 50, "worker") for tid in pointers]
    for tid, pointer in pointers.items():
        state.threads[tid] = ThreadState(50, 0, thread_pointer=pointer)
    prober = ThreadProber(Tracer(), read_ranges=mem.read,
                          thread_gone=lambda pid, thread: False)  # made-up tids, alive
    walks = mem.seen[loader.r_debug + dtv.R_DEBUG_MAP]
    for walked in [1, 0, 1, 0, 0, 0, 1]:
        tally = Tally()
        assert prober.probe(1, state, threads, tally) == []
        assert mem.seen[loader.r_debug + dtv.R_DEBUG_MAP] - walks == walked
        walks += walked
        assert tally.failures == {tags.JEMALLOC_IN_DSO: 2} and tally.probed_ok == 0
    mem.put(second, BIAS)
    mem.put(second + dtv.LINK_MAP_NEXT, 0)
    for _ in range(8):  # its back-off (7 snapshots) is over
        tally = Tally()
        samples = prober.probe(1, state, threads, tally)
        if samples:
            break
    assert tally.failures == {} and tally.probed_ok == 2
    assert {s.tid: (s.allocated_bytes, s.deallocated_bytes) for s in samples} == {
        11: (5000, 3000), 12: (5000, 3000)}


@pytest.mark.parametrize("exited", [True, False])
def test_a_dtv_unreadable_because_its_thread_exited_is_an_exit_race(exited):
    """A thread whose DTV cannot be read (here its thread pointer leads nowhere) is a
    jemalloc-in-dso failure while it lives, and an exit race, in no tag, once it exited;
    either way it is not read, nor reported as a thread without a block (a zero)."""
    loader = host_loader()
    mem = layout_memory(loader)
    layout = TsdLayout(None, "je_tsd_tls", 0x10, 824, 840, dynamic_tls=True)
    state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
    gone_tp = TP + 0x200000  # no pthread.dtvp there: the read faults
    state.threads[11] = ThreadState(50, 0, thread_pointer=gone_tp)
    prober = ThreadProber(Tracer(), read_ranges=mem.read, thread_gone=lambda *_: exited)
    tally = Tally()
    assert prober.probe(1, state, [ThreadInfo(11, 50, "worker")], tally) == []
    assert mem.seen[loader.fields["pthread_dtvp"].at(gone_tp)] == 1
    if exited:
        assert (tally.failures, prober.exit_races) == ({}, 1)
    else:
        assert (tally.failures, prober.exit_races) == ({tags.JEMALLOC_IN_DSO: 1}, 0)
    assert tally.probed_ok == 0


def walk(mem: Memory, loader: LoaderLayout, pid: int = 77) -> int | None:
    module = dtv.find_module(mem.read, pid, loader, BIAS)
    return dtv.block_address(mem.read, pid, loader, module, TP)


def test_every_word_the_walk_reads_is_named_when_it_faults_and_read_from_that_pid():
    """The slotinfo entry is in the second list (the first holds 2), so every kind of word
    is read: each one unreadable in turn gives the line naming it and its address."""
    loader = host_loader()
    f = loader.fields
    second_map, second_list = LINK_MAPS + 0x1000, SLOTINFO + 0x4000
    entry = second_list + f["dtv_slotinfo_list_slotinfo"].offset + 1 * loader.slotinfo_size

    def memory() -> Memory:
        mem = layout_memory(loader)
        mem.put(f["dtv_slotinfo_list_len"].at(SLOTINFO), 2)
        mem.put(f["dtv_slotinfo_list_next"].at(SLOTINFO), second_list)
        mem.put(f["dtv_slotinfo_list_len"].at(second_list), 8)
        mem.put(f["dtv_slotinfo_gen"].at(entry), 2)
        mem.put(f["dtv_slotinfo_map"].at(entry), second_map)
        return mem
    mem = memory()
    assert walk(mem, loader) == BLOCK
    assert mem.pids == {77}
    named = {
        loader.r_debug + dtv.R_DEBUG_MAP: "_r_debug.r_map",
        LINK_MAPS: "link_map.l_addr",
        LINK_MAPS + dtv.LINK_MAP_NEXT: "link_map.l_next",
        f["link_map_l_tls_modid"].at(second_map): "l_tls_modid",
        f["link_map_l_tls_offset"].at(second_map): "l_tls_offset",
        f["rtld_global__dl_tls_dtv_slotinfo_list"].at(loader.rtld_global):
            "_dl_tls_dtv_slotinfo_list",
        f["dtv_slotinfo_list_len"].at(SLOTINFO): "slotinfo len",
        f["dtv_slotinfo_list_next"].at(SLOTINFO): "slotinfo next",
        f["dtv_slotinfo_map"].at(entry): "slotinfo map",
        f["dtv_slotinfo_gen"].at(entry): "slotinfo gen",
        f["pthread_dtvp"].at(TP): "pthread.dtvp",
        f["dtv_t_counter"].at(f["dtv_dtv"].at(DTV, 0)): "dtv[0]",
        f["dtv_t_pointer_val"].at(f["dtv_dtv"].at(DTV, 3)): "dtv[3]",
    }
    for address, what in named.items():
        mem = memory()
        del mem.words[address]
        with pytest.raises(dtv.DtvError) as error:
            walk(mem, loader)
        assert str(error.value) == f"{what} at {address:#x}: Bad address"
    mem = memory()
    mem.put(f["dtv_slotinfo_list_next"].at(second_list), 0)
    mem.put(f["dtv_slotinfo_list_len"].at(second_list), 1)  # index 1 is past both lists
    with pytest.raises(dtv.DtvError) as error:
        walk(mem, loader)
    assert str(error.value) == "no slotinfo entry for module 3"


def test_addresses_and_values_at_the_edges_of_user_space():
    loader = host_loader()
    for modid, plausible in ((0, False), (1, True)):
        mem = layout_memory(loader, modid=modid)
        if plausible:
            assert dtv.find_module(mem.read, 1, loader, BIAS).modid == 1
        else:
            with pytest.raises(dtv.DtvError, match=f"^l_tls_modid {modid} is implausible$"):
                dtv.find_module(mem.read, 1, loader, BIAS)
    mem = layout_memory(loader, slot=dtv.USER_TOP)
    with pytest.raises(dtv.DtvError, match=f"^dtv\\[3\\] holds {dtv.USER_TOP:#x}$"):
        walk(mem, loader)
    mem = layout_memory(loader, slot=dtv.USER_TOP - 16)
    assert walk(mem, loader) == dtv.USER_TOP - 16
    mem = layout_memory(loader, slot=2)  # bit 0 clear: a block, however low
    assert walk(mem, loader) == 2
    mem = layout_memory(loader)
    mem.put(loader.r_debug + dtv.R_DEBUG_MAP, dtv.USER_TOP)
    with pytest.raises(dtv.DtvError) as error:
        walk(mem, loader)
    assert str(error.value) == f"link_map.l_addr: address {dtv.USER_TOP:#x} outside user space"
    mem.put(loader.r_debug + dtv.R_DEBUG_MAP, 0)  # an empty chain: nothing loaded
    with pytest.raises(dtv.DtvError) as error:
        walk(mem, loader)
    assert str(error.value) == f"no link map loaded at {BIAS:#x}"


def test_the_bounds_of_module_ids_slots_and_chains():
    """Each bound on both sides: a slot holding 0 is no block; module ids below 2**20 are
    looked for, 2**20 is not; a chain of MAX_LINK_MAPS maps is followed to its end, one
    more map is not; a map met twice is a loop."""
    loader = host_loader()
    with pytest.raises(dtv.DtvError, match=r"^dtv\[3\] holds 0x0$"):
        walk(layout_memory(loader, slot=0), loader)
    with pytest.raises(dtv.DtvError, match=f"^l_tls_modid {dtv.MAX_MODULES} is implausible$"):
        walk(layout_memory(loader, modid=dtv.MAX_MODULES), loader)
    with pytest.raises(dtv.DtvError,  # plausible: looked for, past the 64-entry list
                       match=f"^no slotinfo entry for module {dtv.MAX_MODULES - 1}$"):
        walk(layout_memory(loader, modid=dtv.MAX_MODULES - 1), loader)
    looping = layout_memory(loader)
    looping.put(LINK_MAPS + 0x1000, 1)
    looping.put(LINK_MAPS + 0x1000 + dtv.LINK_MAP_NEXT, LINK_MAPS)
    with pytest.raises(dtv.DtvError, match="^the link map chain loops$"):
        walk(looping, loader)
    for maps, found in ((dtv.MAX_LINK_MAPS, True), (dtv.MAX_LINK_MAPS + 1, False)):
        mem = layout_memory(loader)  # its second map, ours, moved to the chain's end
        ours = LINK_MAPS + 0x1000
        node = mem.words[loader.r_debug + dtv.R_DEBUG_MAP] = 0x1000000
        for i in range(maps - 1):
            mem.put(node, 0x1000 + i)  # l_addr: not our bias
            mem.put(node + dtv.LINK_MAP_NEXT, node + 0x100 if i < maps - 2 else ours)
            node += 0x100
        if found:
            assert walk(mem, loader) == BLOCK
        else:
            with pytest.raises(dtv.DtvError, match=f"^no link map loaded at {BIAS:#x}$"):
                walk(mem, loader)


def test_a_general_dynamic_thread_is_stopped_once_and_placed_from_its_real_thread_pointer(
        hang_guard):
    """The DTV walk after a real stop (a python3 target, real ptrace): the block is looked
    for from the thread pointer the stop gave; a thread with no block yet counts zero, is
    not stopped again, and is placed from memory once its DTV has the block; what it was
    restored at stays its floor."""
    from support.procs import assert_no_thread_stopped_or_traced
    from support.pythreads import PyThreads
    from ctprofd.procfs.processes import read_stat

    loader = host_loader()
    target = PyThreads(2)
    tracer = Tracer(stop_timeout=60, wait_budget=60)  # a hang guard
    try:
        tid, fresh = target.workers  # the second not restored: no floor
        tp = target.fs_base[tid]
        mem = layout_memory(loader, dtv_gen=1)  # the DTV is older than the module: no block
        mem.put(loader.fields["pthread_dtvp"].at(tp), DTV)
        mem.put(loader.fields["pthread_dtvp"].at(target.fs_base[fresh]), DTV)  # shared here
        for offset, value in ((824, 5000), (832, 0), (840, 3000)):
            mem.put(BLOCK + 0x10 + offset, value)
        layout = TsdLayout(None, "je_tsd_tls", 0x10, 824, 840, dynamic_tls=True)
        state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
        stats = {t: read_stat(f"/proc/{target.pid}/task/{t}/stat") for t in (tid, fresh)}
        threads = [ThreadInfo(t, st.start_time, st.comm, st.state) for t, st in stats.items()]
        state.threads[tid] = ThreadState(stats[tid].start_time, 0, 100, 4000)  # restored
        prober = ThreadProber(tracer, read_ranges=mem.read)
        for _ in range(2):
            tally = Tally()
            samples = prober.probe(target.pid, state, threads, tally)
            tracer.end()
            assert [(s.tid, s.comm, s.allocated_bytes, s.deallocated_bytes)
                    for s in samples] == [(tid, stats[tid].comm, 100, 4000),
                                          (fresh, stats[fresh].comm, 0, 0)]
            assert tally.probed_ok == 2 and not tally.failures and tracer.stops == 2
            assert state.threads[tid].thread_pointer == tp
        mem.put(loader.fields["dtv_t_counter"].at(loader.fields["dtv_dtv"].at(DTV, 0)), 2)
        tally = Tally()
        samples = prober.probe(target.pid, state, threads, tally)
        assert [(s.allocated_bytes, s.deallocated_bytes) for s in samples] == [(5000, 4000),
                                                                               (5000, 3000)]
        assert state.threads[tid].counters_at == BLOCK + 0x10 + 824 and tracer.stops == 2
        samples = prober.probe(target.pid, state, threads, Tally())  # placed: memory only
        assert len(samples) == 2 and tracer.stops == 2 and state.retained_allocated == 0
        assert mem.pids == {tid}  # the leader not listed: read through the first thread
        assert_no_thread_stopped_or_traced(target.pid)
    finally:
        tracer.end()
        target.kill()


@pytest.mark.parametrize("address", [0, 1])
def test_a_block_that_puts_the_counters_at_address_zero_is_refused(address):
    """The counters must start above address 0: at 1 they are read (the read fails)."""
    loader = host_loader()
    mem = layout_memory(loader)
    layout = TsdLayout(None, "je_tsd_tls", address - BLOCK - 824, 824, 840, dynamic_tls=True)
    state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
    state.threads[11] = ThreadState(50, 0, thread_pointer=TP)
    prober = ThreadProber(Tracer(), read_ranges=mem.read, thread_gone=lambda *_: False)
    tally = Tally()
    assert prober.probe(1, state, [ThreadInfo(11, 50, "worker")], tally) == []
    assert tally.failures == {tags.PROCESS_VM_READV if address else tags.TLS_ARITHMETIC: 1}


@pytest.mark.parametrize("past", [0, 1])
def test_a_block_that_puts_the_counters_past_the_address_space_is_refused(past):
    """A TLS block plus the TSD's offset that ends the counters past the top of the address
    space: tls-arithmetic, never read, nor counted as a thread without a block; ending at
    the top exactly, they are read (and here the read fails)."""
    loader = host_loader()
    mem = layout_memory(loader)
    symbol_offset = (1 << 64) - BLOCK - 840 - 8 + past  # the counters end at 2**64 + past
    layout = TsdLayout(None, "je_tsd_tls", symbol_offset, 824, 840, dynamic_tls=True)
    state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
    state.threads[11] = ThreadState(50, 0, thread_pointer=TP)
    prober = ThreadProber(Tracer(), read_ranges=mem.read, thread_gone=lambda *_: False)
    tally = Tally()
    tally.begin(1, "target")
    assert prober.probe(1, state, [ThreadInfo(11, 50, "worker")], tally) == []
    assert tally.probed_ok == 0
    if not past:
        assert tally.failures == {tags.PROCESS_VM_READV: 1}
        assert state.threads[11].counters_at == BLOCK + symbol_offset + 824
        return
    assert tally.failures == {tags.TLS_ARITHMETIC: 1}
    assert tally.failed_pids[1].reason == (f"tid 11: TLS block {BLOCK:#x} gives counters "
                                           "outside the address space")
    assert state.threads[11].unplaced and not state.threads[11].counters_at


def test_a_module_not_found_is_looked_for_again_after_at_most_64_snapshots():
    """The snapshots between two walks that miss the module double, and stop at 64; each
    thread's failure says why, in its words."""
    loader = host_loader()
    mem = layout_memory(loader)
    mem.put(LINK_MAPS + 0x1000, 1)  # not our bias: the walk misses the module
    mem.put(LINK_MAPS + 0x1000 + dtv.LINK_MAP_NEXT, 0)
    layout = TsdLayout(None, "je_tsd_tls", 0x10, 824, 840, dynamic_tls=True)
    state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
    state.threads[11] = ThreadState(50, 0, thread_pointer=TP)
    prober = ThreadProber(Tracer(), read_ranges=mem.read, thread_gone=lambda *_: False)
    skips = []
    for _ in range(1000):  # a guard against a back-off that never grows
        if len(skips) == 8:
            break
        tally = Tally()
        tally.begin(1, "target")
        prober.probe(1, state, [ThreadInfo(11, 50, "worker")], tally)
        assert tally.failed_pids[1].reason == (
            f"tid 11: general-dynamic TLS: no link map loaded at {BIAS:#x}")
        why, misses, skip = state.module_failure
        if misses > len(skips):
            skips.append(skip)
    assert skips == [2, 4, 8, 16, 32, 64, 64, 64]


def test_a_dtv_gone_with_its_thread_is_said_at_debug_level(caplog):
    loader = host_loader()
    mem = layout_memory(loader)
    layout = TsdLayout(None, "je_tsd_tls", 0x10, 824, 840, dynamic_tls=True)
    state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
    state.threads[11] = ThreadState(50, 0, thread_pointer=TP + 0x200000)  # nothing there
    prober = ThreadProber(Tracer(), read_ranges=mem.read, thread_gone=lambda *_: True)
    caplog.set_level(logging.DEBUG, logger="ctprofd.probe.threads")
    assert prober.probe(1, state, [ThreadInfo(11, 50, "worker")], Tally()) == []
    dtvp = loader.fields["pthread_dtvp"].at(TP + 0x200000)
    assert caplog.messages == [  # pid 1, not listed, is read through its thread 11
        f"pid 11: tid 11 exited while its DTV was read: pthread.dtvp at {dtvp:#x}: Bad address"]


def test_a_real_threads_dtv_unreadable_is_a_failure_while_it_lives_then_an_exit_race(
        hang_guard):
    """After a real stop, a thread whose DTV cannot be read is a jemalloc-in-dso failure
    while /proc shows it alive; once its process is killed, each later look at it is an
    exit race."""
    from support.procs import assert_no_thread_stopped_or_traced
    from support.pythreads import PyThreads
    from ctprofd.procfs.processes import read_stat

    loader = host_loader()
    target = PyThreads(1)
    tracer = Tracer(stop_timeout=60, wait_budget=60)  # a hang guard
    try:
        [tid] = target.workers
        mem = layout_memory(loader)  # nothing at this thread's pthread.dtvp
        layout = TsdLayout(None, "je_tsd_tls", 0x10, 824, 840, dynamic_tls=True)
        state = ProcessState(Attachment(layout, base=BIAS, loader=loader))
        stat = read_stat(f"/proc/{target.pid}/task/{tid}/stat")
        threads = [ThreadInfo(tid, stat.start_time, stat.comm, stat.state)]
        prober = ThreadProber(tracer, read_ranges=mem.read)  # /proc says who is gone
        tally = Tally()
        assert prober.probe(target.pid, state, threads, tally) == []
        tracer.end()
        assert (tally.failures, prober.exit_races) == ({tags.JEMALLOC_IN_DSO: 1}, 0)
        assert state.threads[tid].thread_pointer == target.fs_base[tid]
        assert_no_thread_stopped_or_traced(target.pid)  # before it is killed
        target.kill()
        for races in (1, 2):
            tally = Tally()
            assert prober.probe(target.pid, state, threads, tally) == []
            assert (tally.failures, prober.exit_races) == ({}, races)
    finally:
        tracer.end()
        target.kill()
