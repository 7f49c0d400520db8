"""Fuzzing the sandboxed parser: thousands of mutated ELF/DWARF files (byte flips,
overwrites, insertions, truncations, splices; in the ELF and program headers, the section
headers, symbol tables, notes and the DWARF sections, in particular the unit that defines
tsd_s) each come back as a Resolution, never an exception, and the daemon's own memory
and file descriptors stay bounded."""

from __future__ import annotations

import os
import resource
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings, strategies as st

from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import LayoutFailure, NotJemalloc, TsdLayout, resolve
from ctprofd.resolve.parse_worker import ParseWorker, WorkerLimits

# A jemalloc look-alike small enough to parse in milliseconds: a TLS tsd_s with the
# mangled counters, in a unit named like one of jemalloc's; as executable and as library,
# without libc (fewer sections: faster to parse, never run).
MIMIC = r"""
#include <stdint.h>
#define M(n) cant_access_tsd_items_directly_use_a_getter_or_setter_##n
struct tsd_s {
    uint8_t M(state);
    uint64_t M(thread_allocated);
    uint64_t M(thread_allocated_next_event_fast);
    uint64_t M(thread_deallocated);
    uint64_t M(thread_deallocated_next_event_fast);
};
__thread struct tsd_s je_tsd_tls __attribute__((tls_model("initial-exec")));
int mallctl(const char *name, void *a, void *b, void *c, unsigned long d) {
    return (int)je_tsd_tls.M(thread_allocated) + (name != 0);
}
#ifdef MAIN
int main(void) { return mallctl(0, 0, 0, 0, 0); }
#endif
"""
SECTIONS = (".debug_info", ".debug_abbrev", ".debug_str", ".debug_line_str", ".symtab",
            ".strtab", ".dynsym", ".dynstr", ".rela.dyn", ".note.gnu.build-id",
            ".gnu_debuglink")
BATCH = 25
RSS_GROWTH_LIMIT = 100 << 20


@dataclass(frozen=True)
class Target:
    name: str
    data: bytes
    shared: bool
    regions: tuple[tuple[int, int], ...]  # [start, end) of the parts worth mutating


def tsd_unit(image: ELFFile) -> tuple[int, int] | None:
    """File range of the DWARF unit that defines tsd_s."""
    info = image.get_section_by_name(".debug_info")
    for unit in image.get_dwarf_info().iter_CUs():
        for die in unit.get_top_DIE().iter_children():
            if die.tag == "DW_TAG_structure_type" and die.attributes.get(
                    "DW_AT_name") and die.attributes["DW_AT_name"].value == b"tsd_s":
                start = info["sh_offset"] + unit.cu_offset
                return start, start + unit.size
    return None


def target(name: str, path: Path, shared: bool) -> Target:
    with open(path, "rb") as f:
        image = ELFFile(f)
        regions = [(0, 64),
                   (image["e_phoff"], image["e_phoff"] + image["e_phnum"] * image["e_phentsize"]),
                   (image["e_shoff"], image["e_shoff"] + image["e_shnum"] * image["e_shentsize"])]
        for section in image.iter_sections():
            if section.name in SECTIONS and section["sh_size"]:
                regions.append((section["sh_offset"], section["sh_offset"] + section["sh_size"]))
        unit = tsd_unit(image)
        assert unit is not None, f"{path}: no tsd_s"
        regions.append(unit)
    return Target(name, path.read_bytes(), shared, tuple(regions))


@pytest.fixture(scope="module")
def targets(fixture_bins, tmp_path_factory) -> dict[str, Target]:
    build = tmp_path_factory.mktemp("mimic")
    (build / "tsd.c").write_text(MIMIC)
    for out, flags in (("mimic", ["-DMAIN", "-static", "-e", "main"]),
                       ("libmimic.so", ["-shared", "-fPIC"])):
        subprocess.run(["gcc", "-g", "-O0", "-nostdlib", "-Wl,--build-id", *flags, "tsd.c",
                        "-o", out], cwd=build, check=True)
    return {"mimic": target("mimic", build / "mimic", False),
            "libmimic": target("libmimic", build / "libmimic.so", True),
            "static": target("static", fixture_bins["static"].binary, False),
            "libjemalloc": target("libjemalloc", fixture_bins["dynamic"].jemalloc_object, True)}


@pytest.fixture(scope="module")
def workers():
    """Two workers, one per core, each fed half of every batch."""
    parsers = [ParseWorker(WorkerLimits(memory_bytes=256 << 20, timeout=2)) for _ in range(2)]
    yield parsers
    for parser in parsers:
        parser.close()


# truncations are rarer: one in a file's list of mutations ends most of the parse early
KINDS = ("flip",) * 3 + ("overwrite",) * 3 + ("insert", "splice", "splice", "truncate")
mutation = st.tuples(st.sampled_from(KINDS), st.integers(0, 1 << 16), st.integers(0, 1 << 32),
                     st.integers(0, 1 << 32), st.binary(min_size=1, max_size=16))


def mutate(t: Target, mutations: list[tuple]) -> bytes:
    data = bytearray(t.data)
    for kind, region, where, source, payload in mutations:
        if not data:
            break
        start, end = t.regions[region % len(t.regions)]
        at = min(start + where % max(end - start, 1), len(data) - 1)
        if kind == "flip":
            data[at] ^= 1 << (source % 8)
        elif kind == "overwrite":
            data[at:at + len(payload)] = payload
        elif kind == "insert":
            data[at:at] = payload
        elif kind == "splice":  # bytes from elsewhere in the file, e.g. a header over DWARF
            other = source % len(data)
            data[at:at + len(payload) * 4] = data[other:other + len(payload) * 4]
        else:
            del data[at:]
    return bytes(data)


def resolve_bytes(parser: ParseWorker, data: bytes, t: Target):
    fd = os.memfd_create(f"fuzz-{t.name}")
    with open(fd, "w+b") as stream:
        stream.write(data)
        stream.flush()
        return resolve(parser, stream, t.name, [], DebugSearch(()), t.shared)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


@pytest.mark.parametrize("name, examples", [("mimic", 44), ("libmimic", 32),
                                            ("static", 4), ("libjemalloc", 4)])
def test_mutated_files_always_resolve(targets, workers, name, examples):
    t = targets[name]
    for parser in workers:  # the unmutated file goes all the way through
        assert isinstance(resolve_bytes(parser, t.data, t), TsdLayout)
    outcomes: Counter[str] = Counter()
    fds, rss = len(os.listdir("/proc/self/fd")), peak_rss()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(st.lists(mutation, min_size=1, max_size=6), min_size=BATCH, max_size=BATCH))
    def batch(mutations: list[list[tuple]]) -> None:
        halves = [mutations[i::len(workers)] for i in range(len(workers))]
        with ThreadPoolExecutor(len(workers)) as pool:  # one mutated file at a time per worker
            results = [r for half in pool.map(
                lambda job: [resolve_bytes(job[0], mutate(t, m), t) for m in job[1]],
                zip(workers, halves)) for r in half]
        for result in results:
            assert isinstance(result, (TsdLayout, NotJemalloc, LayoutFailure)), result
            outcomes[type(result).__name__ if not isinstance(result, LayoutFailure)
                     else f"{result.tag}: {result.message.partition(': ')[2][:40]}"] += 1

    batch()
    print(f"\n{name}: {sum(outcomes.values())} files: {dict(outcomes.most_common(12))}")
    assert sum(outcomes.values()) >= examples * BATCH
    assert len(os.listdir("/proc/self/fd")) <= fds  # no descriptor leaked
    assert peak_rss() - rss < RSS_GROWTH_LIMIT
