"""What resolve.dwarf reads: tsd_s's counters, the TSD variable's TLS offset and the arena
statistics' layout, exactly, from the real jemalloc debug build and from small objects gcc
and clang build here in jemalloc's shapes; the exact words of every refusal; and the fast
reader of unit names on every unit header and attribute form it skips.

The values expected of the jemalloc 5.3.0 build were checked against gdb
(`p &((struct arena_s *)0)->stats.internal` and the like) on the same library.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import pytest
from elftools.elf.elffile import ELFFile

from ctprofd.resolve import dwarf
from ctprofd.resolve.dwarf import DwarfError, TsdOffsets

T = TypeVar("T")
MANGLED = dwarf.MANGLE_PREFIX


def compile_c(directory: Path, name: str, source: str, *flags: str, cc: str = "gcc") -> Path:
    """`source`, saved as `name` (the unit's DW_AT_name), compiled with -c -g -fPIC and
    `flags` (which may override -g)."""
    c = directory / name
    c.write_text(source)
    out = directory / f"{name}.o"
    subprocess.run([cc, "-c", "-g", "-fPIC", "-o", out, c, *flags], cwd=directory, check=True,
                   capture_output=True)
    return out


def big_endian(source: Path) -> Path:
    """`source` built for 64-bit big-endian PowerPC by clang and linked by lld into a
    shared object: ctprofd reads linked objects, and pyelftools 0.29 (Debian 12's) cannot
    apply the relocations of a big-endian object file (lld 14 links no s390x)."""
    out = source.with_suffix(".so")
    subprocess.run(["clang", "--target=powerpc64-linux-gnu", "-fuse-ld=lld", "-nostdlib", "-shared",
                    "-fPIC", "-g", "-o", out, source], check=True, capture_output=True)
    return out


def link(directory: Path, name: str, *objects: Path, flags: tuple[str, ...] = ()) -> Path:
    """A shared object of `objects`, their units in this order."""
    out = directory / name
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", out, *objects, *flags], check=True,
                   capture_output=True)
    return out


def read(path: Path, query: Callable[[ELFFile], T]) -> T:
    with open(path, "rb") as stream:
        return query(ELFFile(stream))


def refusal(path: Path, query: Callable[[ELFFile], object]) -> str:
    with pytest.raises(DwarfError) as caught:
        read(path, query)
    return str(caught.value)


def tsd(path: Path) -> TsdOffsets:
    return read(path, dwarf.tsd_offsets)


def tsd_refusal(path: Path) -> str:
    return refusal(path, dwarf.tsd_offsets)


def tsd_source(*members: str, head: str = "#include <stdint.h>\n",
               tail: str = "struct tsd_s tsd;\n") -> str:
    return head + "struct tsd_s {\n" + "".join(f"  {m};\n" for m in members) + "};\n" + tail


# -- the real jemalloc build --

@pytest.fixture(scope="module")
def libjemalloc(jemalloc_dir: Path) -> Path:
    return jemalloc_dir / "lib/libjemalloc.so.2"


def test_jemalloc_tsd_counters(libjemalloc: Path):
    assert tsd(libjemalloc) == TsdOffsets(824, 840, MANGLED + "thread_allocated",
                                          MANGLED + "thread_deallocated", 2632)


def test_jemalloc_tsd_variable(libjemalloc: Path):
    assert read(libjemalloc, lambda e: dwarf.tls_variable_offset(
        e, ("tsd_tls", "je_tsd_tls"))) == ("je_tsd_tls", 0)


JEMALLOC_ARENA = {
    "arenas": 0xA6640, "narenas_total": 714632, "arena_bin_offsets": 714656,
    "bin_infos": 2812800, "sz_index2size_tab": 2817152, "tcache_bin_alloc_size": 2820872,
    "tcache_bin_alloc_alignment": 2820864, "nhbins": 2820688, "arenas_count": 4095,
    "nsizes": 232, "bin_info_size": 40, "bin_info_shards": 20, "bin_info_reg_size": 0,
    "bin_info_slab_size": 8, "bin_info_nregs": 16, "arena_ind": 78928, "arena_internal": 56,
    "arena_cache_locks": 10464, "arena_lstats": 976, "nlarge": 196, "lstat_size": 48,
    "lstat_nmalloc": 0, "lstat_ndalloc": 8, "lstat_nrequests": 16, "tsd_descriptor": 272,
    "arena_descriptors": 10400, "descriptor_next": 0, "descriptor_bins": 16,
    "cache_bin_size": 24, "cache_bin_head": 0, "cache_bin_nrequests": 8, "cache_bin_empty": 20,
    "arena_nactive": 10656, "arena_dirty_pages": 20480, "arena_dirty_guarded_pages": 30136,
    "arena_muzzy_pages": 39920, "arena_muzzy_guarded_pages": 49576,
    "arena_retained_pages": 59360, "arena_retained_guarded_pages": 69016,
    "arena_pac_mapped": 176, "arena_base": 78936, "base_allocated": 3880,
    "base_resident": 3888, "base_mapped": 3896, "bin_size": 224, "bin_nrequests": 128,
    "bin_curregs": 136,
}


def test_jemalloc_arena_layout(libjemalloc: Path):
    assert read(libjemalloc, dwarf.arena_offsets) == JEMALLOC_ARENA


RJEM = Path("/var/cache/ctprofd/jemalloc-5.3.0-rjem/lib/libjemalloc.so.2")


def test_rust_jemalloc_prefixes_its_variables():
    """tikv-jemallocator's build names them _rjem_je_arenas and so on: the same layout."""
    assert read(RJEM, dwarf.arena_offsets) == JEMALLOC_ARENA
    assert read(RJEM, lambda e: dwarf.tls_variable_offset(
        e, ("tsd_tls", "je_tsd_tls", "_rjem_je_tsd_tls"))) == ("_rjem_je_tsd_tls", 0)


# -- tsd_s on objects gcc and clang build --

def test_mangled_counters_read_through_the_typedef_chain(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "void *state", f"uint64_t {MANGLED}thread_allocated", "int other",
        f"uint64_t {MANGLED}thread_deallocated"), "-gdwarf-5")
    assert tsd(obj) == TsdOffsets(8, 24, MANGLED + "thread_allocated",
                                  MANGLED + "thread_deallocated", 32)


@pytest.mark.parametrize("how", ["zlib", "zlib-gnu"])
def test_compressed_sections_read_alike(tmp_path: Path, how: str):
    """The linker's SHF_COMPRESSED sections, and the older .zdebug_* ones."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "char pad[16]", f"uint64_t {MANGLED}thread_allocated",
        f"uint64_t {MANGLED}thread_deallocated"))
    lib = link(tmp_path, "lib.so", obj, flags=(f"-Wl,--compress-debug-sections={how}",))
    sections = read(lib, lambda e: {s.name: s["sh_flags"] for s in e.iter_sections()})
    assert (sections[".debug_info"] & 0x800 if how == "zlib" else ".zdebug_info" in sections)
    assert tsd(lib) == TsdOffsets(16, 24, MANGLED + "thread_allocated",
                                  MANGLED + "thread_deallocated", 32)
    assert unit_names(lib) == [(0, str(tmp_path / "tsd.c"))]


def test_plain_names_when_not_mangled(tmp_path: Path):
    """jemalloc before 5.1 did not mangle; the last counter may end the struct."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "unsigned long thread_allocated", "unsigned long thread_deallocated"), "-gdwarf-4")
    assert tsd(obj) == TsdOffsets(0, 8, "thread_allocated", "thread_deallocated", 16)


def test_mangled_name_wins_over_a_plain_one(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "uint64_t thread_allocated", "uint64_t thread_deallocated",
        f"uint64_t {MANGLED}thread_allocated", f"uint64_t {MANGLED}thread_deallocated"))
    assert tsd(obj) == TsdOffsets(16, 24, MANGLED + "thread_allocated",
                                  MANGLED + "thread_deallocated", 32)


def test_dwarf2_locations_are_plus_uconst_expressions(tmp_path: Path):
    """gcc -gdwarf-2 -gstrict-dwarf writes DW_AT_data_member_location as a block."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "char pad[40]", "uint64_t thread_allocated", "uint64_t thread_deallocated"),
        "-gdwarf-2", "-gstrict-dwarf")
    assert tsd(obj) == TsdOffsets(40, 48, "thread_allocated", "thread_deallocated", 56)


def test_enum_counters_are_read_through_their_underlying_type(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "enum big { BIG = 0xffffffffffffffffUL } thread_allocated",
        "enum big thread_deallocated", head=""))
    assert tsd(obj) == TsdOffsets(0, 8, "thread_allocated", "thread_deallocated", 16)


def typedef_chain(depth: int) -> str:
    """t<depth> ... t1 typedefs, each of the one below, over unsigned long."""
    lines = ["typedef unsigned long t1;\n"]
    lines += [f"typedef t{i - 1} t{i};\n" for i in range(2, depth + 1)]
    return "".join(lines)


def test_a_chain_of_fifteen_typedefs_is_followed(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "t15 thread_allocated", "t15 thread_deallocated", head=typedef_chain(15)))
    assert tsd(obj) == TsdOffsets(0, 8, "thread_allocated", "thread_deallocated", 16)


def test_a_chain_of_sixteen_typedefs_is_refused(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "t16 thread_allocated", "t16 thread_deallocated", head=typedef_chain(16)))
    assert tsd_refusal(obj) == "type of long unsigned int is not a base type"


@pytest.mark.parametrize("members, words", [
    (("uint32_t thread_allocated", "uint64_t thread_deallocated"),
     "member thread_allocated is not an 8-byte unsigned integer"),
    (("uint64_t thread_allocated", "int64_t thread_deallocated"),
     "member thread_deallocated is not an 8-byte unsigned integer"),
    (("struct { uint64_t v; } thread_allocated", "uint64_t thread_deallocated"),
     "type of None is not a base type"),
    (("void *thread_allocated", "uint64_t thread_deallocated"),
     "type of None is not a base type"),
    (("uint64_t thread_allocated", "uint64_t *thread_deallocated"),  # 8 bytes, to unsigned
     "type of None is not a base type"),
    (("uint64_t thread_allocated[1]", "uint64_t thread_deallocated"),
     "type of None is not a base type"),
    (("uint64_t thread_allocated",), "tsd_s has no member thread_deallocated"),
    (("uint64_t allocated", "uint64_t thread_deallocated"),
     "tsd_s has no member thread_allocated"),
    (("uint64_t thread_deallocated", "uint64_t thread_allocated"),
     "implausible tsd_s layout: allocated at 8, deallocated at 0, size 16"),
])
def test_counters_of_the_wrong_shape_are_refused(tmp_path: Path, members: tuple[str, ...],
                                                 words: str):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(*members))
    assert tsd_refusal(obj) == words


def test_bitfield_counters_in_one_word_are_refused(tmp_path: Path):
    """gcc -gdwarf-4 gives both bitfields the location of their storage unit, 0."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "uint64_t thread_allocated : 32", "uint64_t thread_deallocated : 32"), "-gdwarf-4")
    assert tsd_refusal(obj) == "implausible tsd_s layout: allocated at 0, deallocated at 0, size 8"


def test_bitfield_counters_without_a_member_location_are_refused(tmp_path: Path):
    """gcc -gdwarf-5 describes bitfields by DW_AT_data_bit_offset alone."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "uint64_t thread_allocated : 32", "uint64_t thread_deallocated : 32"), "-gdwarf-5")
    assert tsd_refusal(obj) == "member thread_allocated has no DW_AT_data_member_location"


def test_a_counter_overrunning_the_struct_is_refused(tmp_path: Path):
    """Packed, the second counter's storage unit starts 6 bytes before the struct ends."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "char c", "uint64_t thread_allocated", "uint32_t x", "uint64_t thread_deallocated : 8",
        tail="struct tsd_s tsd __attribute__((packed));\n").replace(
            "struct tsd_s {", "struct __attribute__((packed)) tsd_s {"), "-gdwarf-4")
    assert tsd_refusal(obj) == "implausible tsd_s layout: allocated at 1, deallocated at 8, size 14"


def test_a_declaration_is_not_a_definition(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", "struct tsd_s; struct tsd_s *p;\n"
                    "struct tsd { unsigned long thread_allocated; } t;\n", "-g")
    assert tsd_refusal(obj) == "no definition of struct tsd_s"


def test_no_dwarf(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source("uint64_t thread_allocated"), "-g0")
    assert tsd_refusal(obj) == "no DWARF"
    assert refusal(obj, lambda e: dwarf.tls_variable_offset(e, ("tsd_tls",))) == "no DWARF"
    assert refusal(obj, dwarf.arena_offsets) == "no DWARF"


def test_jemalloc_units_are_searched_before_the_others(tmp_path: Path):
    """A program's own tsd_s, in a unit before jemalloc's, is not the one read; without
    jemalloc's, it is."""
    mine = compile_c(tmp_path, "main.c", tsd_source(
        "uint64_t thread_allocated", "uint64_t thread_deallocated",
        tail="struct tsd_s mine;\n"))
    jemalloc = compile_c(tmp_path, "tsd.c", tsd_source(
        "char pad[64]", f"uint64_t {MANGLED}thread_allocated",
        f"uint64_t {MANGLED}thread_deallocated"), "-g")
    both = link(tmp_path, "both.so", mine, jemalloc)
    assert tsd(both).allocated == 64
    assert tsd(link(tmp_path, "mine.so", mine)).allocated == 0
    assert tsd(link(tmp_path, "two.so", mine, compile_c(
        tmp_path, "other.c", "int x;\n", "-g"))).allocated == 0


def test_clang_unit_names_are_read_by_pyelftools(tmp_path: Path):
    """clang -gdwarf-5 names units by DW_FORM_strx1, which the fast reader leaves alone."""
    mine = compile_c(tmp_path, "main.c", tsd_source(
        "uint64_t thread_allocated", "uint64_t thread_deallocated",
        tail="struct tsd_s mine;\n"), "-gdwarf-5", cc="clang")
    jemalloc = compile_c(tmp_path, "tsd.c", tsd_source(
        "char pad[64]", "uint64_t thread_allocated", "uint64_t thread_deallocated"),
        "-gdwarf-5", cc="clang")
    assert tsd(link(tmp_path, "both.so", mine, jemalloc)).allocated == 64


def test_big_endian_units_are_walked_by_pyelftools(tmp_path: Path):
    """A big-endian object: the fast reader declines, pyelftools orders the units."""
    source = tmp_path / "tsd.c"
    source.write_text(tsd_source("char pad[8]", "unsigned long thread_allocated",
                                 "unsigned long thread_deallocated", head=""))
    obj = big_endian(source)
    assert tsd(obj) == TsdOffsets(8, 16, "thread_allocated", "thread_deallocated", 24)


@pytest.mark.parametrize("expression", [
    "\t.byte\t0x2\n\t.byte\t0x10\n\t.uleb128 0x8\n",             # DW_OP_constu 8
    "\t.byte\t0x2\n\t.byte\t0x38\n\t.byte\t0x96\n",                # DW_OP_lit8; DW_OP_nop
])
def test_a_computed_member_location_is_refused(tmp_path: Path, expression: str):
    """Forged: gcc -gdwarf-2 writes each location as one DW_OP_plus_uconst; here the
    deallocated counter's is edited in gcc's assembly into an expression to compute, of
    the same length."""
    source = tmp_path / "tsd.c"
    source.write_text("struct tsd_s { unsigned long thread_allocated;"
                      " unsigned long thread_deallocated; } tsd;\n")
    assembly = tmp_path / "tsd.s"
    subprocess.run(["gcc", "-gdwarf-2", "-gstrict-dwarf", "-dA", "-S", "-o", assembly, source],
                   check=True)
    plus_8 = "\t.byte\t0x2\t# DW_AT_data_member_location\n\t.byte\t0x23\t# DW_OP_plus_uconst\n" \
             "\t.uleb128 0x8\n"
    text = assembly.read_text()
    assert text.count(plus_8) == 1
    assembly.write_text(text.replace(plus_8, expression))
    obj = tmp_path / "tsd.o"
    subprocess.run(["gcc", "-c", "-o", obj, assembly], check=True)
    assert tsd_refusal(obj) == "member thread_deallocated has a computed location"


# -- the TSD variable's TLS offset --

TLS_SOURCE = """extern __thread struct tsd_s { unsigned long a[4]; } je_tsd_tls;
__thread char other[40] = {1};
static char tsd_tls[8] = {1};
char *keep(void) { return tsd_tls; }
__thread struct tsd_s je_tsd_tls;
"""


def tls_offset(path: Path, *names: str) -> tuple[str, int]:
    return read(path, lambda e: dwarf.tls_variable_offset(e, names))


@pytest.mark.parametrize("cc, flags", [
    ("gcc", ("-gdwarf-5",)),      # DW_OP_form_tls_address; the definition's name is in the
    ("gcc", ("-gdwarf-2",)),      # declaration its DW_AT_specification points at
    ("clang", ("-gdwarf-4",)),    # DW_OP_GNU_push_tls_address
])
def test_tls_offset_of_the_tsd_variable(tmp_path: Path, cc: str, flags: tuple[str, ...]):
    lib = link(tmp_path, "lib.so", compile_c(tmp_path, "tsd.c", TLS_SOURCE, *flags, cc=cc))
    assert tls_offset(lib, "tsd_tls", "je_tsd_tls") == ("je_tsd_tls", 40)
    assert tls_offset(lib, "other") == ("other", 0)


ANONYMOUS_UNION = "static union { int a; float b; };\nint *keep_anonymous() { return &a; }\n"


def test_an_unnamed_variable_is_passed_over(tmp_path: Path):
    """g++ gives a namespace-scope anonymous union a DW_TAG_variable without a name."""
    lib = link(tmp_path, "lib.so", compile_c(tmp_path, "anon.cc", ANONYMOUS_UNION, cc="g++"),
               compile_c(tmp_path, "main.c", TLS_SOURCE))
    assert tls_offset(lib, "je_tsd_tls") == ("je_tsd_tls", 40)


def test_a_variable_not_thread_local_has_no_tls_offset(tmp_path: Path):
    """`tsd_tls` here is a static array: DW_OP_addr, not a TLS location."""
    lib = link(tmp_path, "lib.so", compile_c(tmp_path, "tsd.c", TLS_SOURCE))
    assert refusal(lib, lambda e: dwarf.tls_variable_offset(e, ("tsd_tls", "missing"))) == \
        "no TLS location for tsd_tls or missing"


# -- arena statistics on a small jemalloc built here --
#
# arena.c and jemalloc.c below declare jemalloc 5.3's structs, reduced to the members the
# search reads and with padding where jemalloc has other members: mutexes whose statistics
# sit in an anonymous struct inside an anonymous union, a flexible bins[] and qualifiers
# on members' types. main.c, not one of jemalloc's units, has decoys.

ARENA_C = """typedef unsigned long size_t;
typedef unsigned long uint64_t;
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef struct { uint64_t n_wait; union { uint64_t n_lock_ops; char c; }; } mutex_prof_data_t;
typedef struct { union { struct { char lock[40]; mutex_prof_data_t prof_data; };
                         char witness[8]; }; } malloc_mutex_t;
typedef struct { uint64_t nmalloc, ndalloc, nrequests, abandoned; } arena_stats_large_t;
typedef struct { size_t npages; } eset_t;
typedef struct { char mtx[8]; eset_t eset; eset_t guarded_eset; } ecache_t;
typedef struct { char pad[8]; ecache_t ecache_dirty, ecache_muzzy, ecache_retained; } pac_t;
typedef struct { char pad[16]; size_t nactive; pac_t pac; } pa_shard_t;
typedef struct { size_t pac_mapped; } pac_stats_t;
typedef struct { size_t abandoned; pac_stats_t pac_stats; } pa_shard_stats_t;
typedef struct { size_t mapped; size_t internal; pa_shard_stats_t pa_shard_stats;
                 arena_stats_large_t lstats[5]; } arena_stats_t;
typedef struct { size_t reg_size; size_t slab_size; uint32_t nregs; uint32_t n_shards;
                 char bitmap[16]; } bin_info_t;
typedef struct { uint64_t nmalloc; uint64_t nrequests; size_t curregs; } bin_stats_t;
typedef struct bin_s { char lock[24]; bin_stats_t stats; } bin_t;
typedef struct { uint64_t nrequests; } cache_bin_stats_t;
typedef struct cache_bin_s { void **stack_head; cache_bin_stats_t tstats;
                             uint16_t low_bits_low_water, low_bits_full, low_bits_empty;
} cache_bin_t;
typedef struct cache_bin_array_descriptor_s cache_bin_array_descriptor_t;
struct cache_bin_array_descriptor_s {
    struct { cache_bin_array_descriptor_t *qre_next, *qre_prev; } link;
    cache_bin_t *bins;
};
typedef struct { char pad[32]; size_t allocated, resident, mapped; } base_t;
typedef struct arena_s {
    unsigned nthreads[2];
    const arena_stats_t stats;
    volatile struct { cache_bin_array_descriptor_t *qlh_first; } cache_bin_array_descriptor_ql;
    malloc_mutex_t tcache_ql_mtx;
    pa_shard_t pa_shard;
    volatile unsigned ind;
    base_t *base;
    bin_t bins[];
} arena_t;
extern arena_t *je_arenas[7];
arena_t *je_arenas[7];
unsigned je_narenas_total;
unsigned nhbins;
size_t je_sz_index2size_tab[10];
uint32_t je_arena_bin_offsets[3];
const bin_info_t je_bin_infos[3];
size_t je_tcache_bin_alloc_size;
"""

JEMALLOC_C = """typedef unsigned long uint64_t;
struct arena_s { char other[8]; unsigned ind; } decoy;
typedef struct { char pad[24]; struct { char pad[8]; } cache_bin_array_descriptor;
} tcache_slow_t;
struct tsd_s { uint64_t thread_allocated; struct { char pad[40];
    tcache_slow_t cant_access_tsd_items_directly_use_a_getter_or_setter_tcache_slow; }; } tsd;
static unsigned je_narenas_total = 1;
unsigned *keep(void) { return &je_narenas_total; }
extern unsigned long je_tcache_bin_alloc_size;
unsigned long je_tcache_bin_alloc_alignment;
"""

MAIN_C = """struct arena_s { char mine[3]; } mine;
struct tsd_s { char mine[3]; } my_tsd;
static unsigned je_narenas_total = 2, je_nhbins = 3;
unsigned *keep_main(void) { return je_nhbins ? &je_narenas_total : 0; }
"""

SMALL_ARENA = {
    "arenas_count": 7, "nsizes": 10, "bin_info_size": 40, "bin_info_shards": 20,
    "bin_info_reg_size": 0, "bin_info_slab_size": 8, "bin_info_nregs": 16, "arena_ind": 368,
    "arena_internal": 16, "arena_cache_locks": 256, "arena_lstats": 40, "nlarge": 5,
    "lstat_size": 32, "lstat_nmalloc": 0, "lstat_ndalloc": 8, "lstat_nrequests": 16,
    "tsd_descriptor": 72, "arena_descriptors": 200, "descriptor_next": 0,
    "descriptor_bins": 16, "cache_bin_size": 24, "cache_bin_head": 0,
    "cache_bin_nrequests": 8, "cache_bin_empty": 20, "bin_size": 48, "bin_nrequests": 32,
    "bin_curregs": 40,
}
SMALL_HEALTH = {
    "arena_nactive": 280, "arena_dirty_pages": 304, "arena_dirty_guarded_pages": 312,
    "arena_muzzy_pages": 328, "arena_muzzy_guarded_pages": 336, "arena_retained_pages": 352,
    "arena_retained_guarded_pages": 360, "arena_pac_mapped": 32, "arena_base": 376,
    "base_allocated": 32, "base_resident": 40, "base_mapped": 48,
}
SYMBOLS = {"arenas": "je_arenas", "narenas_total": "je_narenas_total", "nhbins": "nhbins",
           "sz_index2size_tab": "je_sz_index2size_tab",
           "arena_bin_offsets": "je_arena_bin_offsets", "bin_infos": "je_bin_infos",
           "tcache_bin_alloc_size": "je_tcache_bin_alloc_size",
           "tcache_bin_alloc_alignment": "je_tcache_bin_alloc_alignment"}


def small_jemalloc(directory: Path, arena: str = ARENA_C, jemalloc: str = JEMALLOC_C,
                   *flags: str, cc: str = "gcc") -> Path:
    units = [compile_c(directory, name, source, *flags, cc=cc) for name, source in
             (("main.c", MAIN_C), ("arena.c", arena), ("jemalloc.c", jemalloc))]
    return link(directory, "libjemalloc.so", *units)


def global_addresses(path: Path) -> dict[str, int]:
    """The addresses of SYMBOLS' global definitions, from the symbol table."""
    def read_symbols(elf: ELFFile) -> dict[str, int]:
        values = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").
                  iter_symbols() if s["st_info"]["bind"] == "STB_GLOBAL"}
        return {name: values[symbol] for name, symbol in SYMBOLS.items()}
    return read(path, read_symbols)


@pytest.mark.parametrize("cc, flags", [("gcc", ("-gdwarf-5",)), ("gcc", ("-gdwarf-4",)),
                                       ("clang", ("-gdwarf-4",))])  # clang: DW_AT_count
def test_small_jemalloc_arena_layout(tmp_path: Path, cc: str, flags: tuple[str, ...]):
    """Variables and structs are each the first definition in jemalloc's units: a static
    variable of the same name, an arena_s in a later unit and main.c's are not read."""
    lib = small_jemalloc(tmp_path, ARENA_C, JEMALLOC_C, *flags, cc=cc)
    assert read(lib, dwarf.arena_offsets) == {**global_addresses(lib), **SMALL_ARENA,
                                              **SMALL_HEALTH}


def test_arena_search_passes_over_unnamed_variables_and_declarations(tmp_path: Path):
    """A unit searched first declares arena_s and tsd_s without defining them."""
    declarations = "struct arena_s *arena_p;\nstruct tsd_s *tsd_p;\n"
    units = [compile_c(tmp_path, name, source) for name, source in
             (("main.c", MAIN_C), ("bin_info.c", declarations), ("arena.c", ARENA_C),
              ("jemalloc.c", JEMALLOC_C))]
    units.insert(1, compile_c(tmp_path, "sz.c", ANONYMOUS_UNION, cc="g++"))  # C++
    lib = link(tmp_path, "libjemalloc.so", *units)
    assert read(lib, dwarf.arena_offsets) == {**global_addresses(lib), **SMALL_ARENA,
                                              **SMALL_HEALTH}


def test_variables_by_address_index_are_not_read(tmp_path: Path):
    """clang -gdwarf-5 locates variables by DW_OP_addrx, an index into .debug_addr, which
    the search does not follow: none is found, and no index is taken for an address."""
    lib = small_jemalloc(tmp_path, ARENA_C, JEMALLOC_C, "-gdwarf-5", cc="clang")
    assert refusal(lib, dwarf.arena_offsets) == (
        "jemalloc's units lack arena_bin_offsets, arenas, bin_infos, narenas_total, nhbins, "
        "sz_index2size_tab, tcache_bin_alloc_alignment, tcache_bin_alloc_size")


@pytest.mark.parametrize("old, new", [
    ("base_t *base;", "void *base;"),
    ("size_t nactive;", "size_t active;"),
    ("size_t allocated,", "size_t allocating,"),
])
def test_health_offsets_are_left_out_when_a_member_is_missing(tmp_path: Path, old: str,
                                                              new: str):
    lib = small_jemalloc(tmp_path, ARENA_C.replace(old, new))
    assert read(lib, dwarf.arena_offsets) == {**global_addresses(lib), **SMALL_ARENA}


@pytest.mark.parametrize("old, new, words", [
    ("volatile unsigned ind;", "unsigned index;", "struct arena_s has no member ind"),
    ("volatile unsigned ind;", "struct { unsigned ind; } named;",  # not in a named one
     "struct arena_s has no member ind"),
    ("low_bits_full, low_bits_empty;", "low_bits_full, low_bits_empty : 15;",  # DWARF 5
     "member low_bits_empty has no DW_AT_data_member_location"),
    ("extern arena_t *je_arenas[7];\narena_t *je_arenas[7];", "arena_t *je_arenas;",
     "DW_TAG_pointer_type is not an array"),
    ("cache_bin_t *bins;", "struct missing_s *bins;", "missing_s has no size"),
    ("cache_bin_t *bins;", "void *bins;", "None has no type"),
    ("cache_bin_array_descriptor_t *qlh_first;", "cache_bin_array_descriptor_t qlh_first[1];",
     "DW_TAG_array_type is not a pointer"),
])
def test_arena_layouts_missing_what_is_read_are_refused(tmp_path: Path, old: str, new: str,
                                                        words: str):
    assert old in ARENA_C
    lib = small_jemalloc(tmp_path, ARENA_C.replace(old, new))
    assert refusal(lib, dwarf.arena_offsets) == words


def test_an_array_without_a_subrange_is_refused(tmp_path: Path):
    """Forged: arena.c's assembly from gcc -dA with each subrange's abbreviation given
    the tag DW_TAG_enumerator (same length), so no array type has a subrange."""
    source = tmp_path / "arena.c"
    source.write_text(ARENA_C)
    assembly = tmp_path / "arena.s"
    subprocess.run(["gcc", "-g", "-fPIC", "-dA", "-S", "-o", assembly, source], check=True)
    tag = "\t.uleb128 0x21\t# (TAG: DW_TAG_subrange_type)\n"
    text = assembly.read_text()
    assert text.count(tag) == 2
    assembly.write_text(text.replace(tag, "\t.uleb128 0x28\n"))
    arena = tmp_path / "arena.o"
    subprocess.run(["gcc", "-c", "-o", arena, assembly], check=True)
    lib = link(tmp_path, "libjemalloc.so", arena, compile_c(tmp_path, "jemalloc.c", JEMALLOC_C))
    assert refusal(lib, dwarf.arena_offsets) == "array without a subrange"


def test_tcache_slow_by_its_plain_name_or_none(tmp_path: Path):
    plain = JEMALLOC_C.replace(MANGLED + "tcache_slow", "tcache_slow")
    lib = small_jemalloc(tmp_path, ARENA_C, plain)
    assert read(lib, dwarf.arena_offsets)["tsd_descriptor"] == 72
    lib = small_jemalloc(tmp_path, ARENA_C, plain.replace("tcache_slow;", "slow;"))
    assert refusal(lib, dwarf.arena_offsets) == "tsd_s has no member tcache_slow"


def test_arena_search_reads_only_jemallocs_arena_units(tmp_path: Path, libjemalloc: Path):
    """tsd.c is not one of the units the arena search reads, so its tsd_s is not found;
    nothing of the rest is either."""
    lib = link(tmp_path, "lib.so", compile_c(tmp_path, "tsd.c", tsd_source(
        "uint64_t thread_allocated", "uint64_t thread_deallocated")), compile_c(
            tmp_path, "arena.c", "struct arena_s { int ind; } a;\n"
            "struct arena_s *je_arenas[4];\nunsigned je_narenas_total;\n"))
    assert refusal(lib, dwarf.arena_offsets) == (
        "jemalloc's units lack arena_bin_offsets, bin_infos, nhbins, sz_index2size_tab, "
        "tcache_bin_alloc_alignment, tcache_bin_alloc_size, tsd_s")


def test_flexible_large_statistics_and_an_atomic_base_pointer(tmp_path: Path):
    """A flexible lstats[] counts 0 large classes; `base_t *_Atomic` is read through."""
    arena = ARENA_C.replace("arena_stats_large_t lstats[5];", "arena_stats_large_t lstats[];")
    arena = arena.replace("base_t *base;", "base_t *_Atomic base;")
    found = read(small_jemalloc(tmp_path, arena), dwarf.arena_offsets)
    assert (found["nlarge"], found["arena_lstats"], found["arena_ind"], found["arena_base"],
            found["base_mapped"]) == (0, 40, 208, 216, 48)


@pytest.mark.parametrize("depth, words", [(13, None), (14, "type chain too deep")])
def test_type_chain_limit(tmp_path: Path, depth: int, words: str | None):
    """bin_infos' element type through const, `depth` typedefs of ours and bin_info_t:
    up to 15 qualifiers and typedefs are stripped, 16 are too many."""
    chain = "typedef bin_info_t chain1_t;\n" + "".join(
        f"typedef chain{i - 1}_t chain{i}_t;\n" for i in range(2, depth + 1))
    arena = ARENA_C.replace("extern arena_t", chain + "extern arena_t").replace(
        "const bin_info_t je_bin_infos[3];", f"const chain{depth}_t je_bin_infos[3];")
    lib = small_jemalloc(tmp_path, arena)
    if words is None:
        assert read(lib, dwarf.arena_offsets)["bin_info_nregs"] == 16
    else:
        assert refusal(lib, dwarf.arena_offsets) == words


# -- the order units are searched in --

def unit_order(path: Path, *args: object) -> list[str]:
    """The basenames of the units _ordered_units yields, in order."""
    return read(path, lambda e: [os.path.basename(dwarf._name(cu.get_top_DIE()) or "")
                                 for cu in dwarf._ordered_units(e.get_dwarf_info(), *args)])


@pytest.mark.parametrize("cc, flags", [("gcc", ("-gdwarf-5",)), ("gcc", ("-gdwarf-4",)),
                                       ("clang", ("-gdwarf-5",))])  # clang: names by strx1
def test_units_of_the_sources_first_then_the_rest_in_order(tmp_path: Path, cc: str,
                                                            flags: tuple[str, ...]):
    names = ("main.c", "ctl.c", "util.c", "sz.c", "tsd.c", "bin_info.c", "arena.c",
             "tcache.c", "jemalloc.c")
    units = [compile_c(tmp_path, name, f"int v_{name[:-2]};\n", *flags, cc=cc)
             for name in names]
    lib = link(tmp_path, "lib.so", *units)
    assert unit_order(lib) == ["ctl.c", "tsd.c", "arena.c", "tcache.c", "jemalloc.c",
                               "main.c", "util.c", "sz.c", "bin_info.c"]
    assert unit_order(lib, dwarf.ARENA_SOURCES, False) == [
        "sz.c", "bin_info.c", "arena.c", "tcache.c", "jemalloc.c"]
    assert unit_order(lib, frozenset({"util.c", "main.c"})) == [
        "main.c", "util.c", "ctl.c", "sz.c", "tsd.c", "bin_info.c", "arena.c", "tcache.c",
        "jemalloc.c"]


@pytest.mark.parametrize("name, rest, order", [
    ("tsd.c", True, ["tsd.c"]), ("tsd.c", False, ["tsd.c"]),
    ("main.c", True, ["main.c"]), ("main.c", False, []),
])
def test_big_endian_unit_order(tmp_path: Path, name: str, rest: bool, order: list[str]):
    (tmp_path / name).write_text("int v;\n")
    assert unit_order(big_endian(tmp_path / name), dwarf.JEMALLOC_SOURCES, rest) == order


def test_units_the_fast_reader_refuses_are_ordered_by_pyelftools(tmp_path: Path):
    """Forged: the last unit's length runs 64 bytes past the section, which the fast
    reader refuses; pyelftools still reads each unit's top DIE."""
    table = abbrev(1, [(DW_AT_NAME, STRING)]) + b"\0"
    units = [unit(uleb(1) + name + b"\0") for name in (b"main.c", b"tsd.c", b"util.c")]
    units.append(unit(uleb(1) + b"ctl.c\0"))
    units[-1] = struct.pack("<I", struct.unpack_from("<I", units[-1])[0] + 64) + units[-1][4:]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units), ".debug_abbrev": table})
    with pytest.raises(ValueError):
        unit_names(obj)
    assert unit_order(obj) == ["tsd.c", "ctl.c", "main.c", "util.c"]
    assert unit_order(obj, dwarf.JEMALLOC_SOURCES, False) == ["tsd.c", "ctl.c"]


def test_a_name_of_a_constant_form_is_its_value(tmp_path: Path):
    """Forged: DW_AT_name as DW_FORM_data1. The fast reader leaves it to pyelftools,
    which gives the number; the unit is searched after jemalloc's."""
    table = abbrev(1, [(DW_AT_NAME, 0x0B)]) + abbrev(2, [(DW_AT_NAME, STRING)]) + b"\0"
    units = [unit(uleb(1) + b"\7"), unit(uleb(2) + b"tcache.c\0")]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units), ".debug_abbrev": table})
    assert unit_order(obj) == ["tcache.c", "7"]


# -- the fast reader of unit names, on units assembled here --
#
# gcc and clang put only a producer and a language before a unit's name. To see the reader
# step over every other form it knows, these tests write valid units by hand: a top DIE
# with one attribute of the form, then DW_AT_name as DW_FORM_string. objcopy adds the
# sections to an object gcc built without debug info.

DW_AT_PRODUCER, DW_AT_NAME = 0x25, 0x03
STRING, STRP, LINE_STRP = 0x08, 0x0E, 0x1F
FILLER = 0x58  # "X": a step one byte short reads it into the name


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def abbrev(code: int, specs: list[tuple[int, int]], implicit: int | None = None) -> bytes:
    """An abbreviation of a DW_TAG_compile_unit without children."""
    out = uleb(code) + uleb(0x11) + b"\0"
    for attribute, form in specs:
        out += uleb(attribute) + uleb(form)
        if form == 0x21:
            out += uleb(implicit or 0)
    return out + b"\0\0"


def unit(die: bytes, version: int = 4, offset_size: int = 4, unit_type: int = 1,
         address_size: int = 8, abbrev_offset: int = 0) -> bytes:
    """A unit header of `version` (and of `unit_type` from version 5) before `die`."""
    pack = "<I" if offset_size == 4 else "<Q"
    if version >= 5:
        header = struct.pack("<HBB", version, unit_type, address_size) + struct.pack(
            pack, abbrev_offset)
        header += {2: b"T" * 8 + struct.pack(pack, 0), 4: b"D" * 8, 5: b"D" * 8,
                   6: b"T" * 8 + struct.pack(pack, 0)}.get(unit_type, b"")
    else:
        header = struct.pack("<H", version) + struct.pack(pack, abbrev_offset) + bytes(
            [address_size])
    body = header + die
    if offset_size == 4:
        return struct.pack("<I", len(body)) + body
    return struct.pack("<IQ", 0xFFFFFFFF, len(body)) + body


def with_sections(directory: Path, sections: dict[str, bytes]) -> Path:
    """An object gcc built without debug info, plus `sections`."""
    obj = compile_c(directory, "empty.c", "int x;\n", "-g0")
    args = []
    for name, data in sections.items():
        path = directory / name.lstrip(".")
        path.write_bytes(data)
        args.append(f"--add-section={name}={path}")
    subprocess.run(["objcopy", *args, obj], check=True, capture_output=True)
    return obj


def unit_names(path: Path) -> list[tuple[int, object]] | None:
    return read(path, lambda e: dwarf._unit_names(e.get_dwarf_info()))


def named(units: list[bytes], names: list[object]) -> list[tuple[int, object]]:
    """(offset, name) of `units` laid end to end."""
    offsets = [sum(len(u) for u in units[:i]) for i in range(len(units))]
    return list(zip(offsets, names))


LEB_VALUE = bytes([0x80 | FILLER, FILLER | 1])  # two bytes, the last odd
STEPPED = [(form, bytes([FILLER]) * size) for form, size in dwarf._FIXED_SIZE.items()
           if form != 0x21] + [(form, LEB_VALUE) for form in dwarf._LEB] + [
    (0x01, bytes([FILLER]) * 8), (STRING, b"producer\0"), (0x21, b"")]


@pytest.mark.parametrize("form, value", STEPPED, ids=[f"form{f:#04x}" for f, _ in STEPPED])
def test_each_fixed_size_form_is_stepped_over(tmp_path: Path, form: int, value: bytes):
    specs = [(DW_AT_PRODUCER, form), (DW_AT_NAME, STRING)]
    units = [unit(uleb(1) + value + b"tsd.c\0"),
             unit(uleb(1) + value + b"arena.c\0", version=5, offset_size=8)]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units),
                                   ".debug_abbrev": abbrev(1, specs, implicit=300) + b"\0"})
    assert unit_names(obj) == named(units, ["tsd.c", "arena.c"])


@pytest.mark.parametrize("version, offset_size, address_size, width", [
    (2, 4, 8, 8),   # DWARF 2's ref_addr is address-sized
    (3, 4, 8, 4),   # from DWARF 3 offset-sized
    (4, 8, 4, 8),
])
def test_offset_sized_forms_are_stepped_over(tmp_path: Path, version: int, offset_size: int,
                                             address_size: int, width: int):
    units = [unit(uleb(code) + bytes([FILLER]) * (width if form == 0x10 else offset_size)
                  + b"tsd.c\0", version, offset_size, address_size=address_size)
             for code, form in enumerate(dwarf._OFFSET_SIZED, 1)]
    table = b"".join(abbrev(code, [(DW_AT_PRODUCER, form), (DW_AT_NAME, STRING)])
                     for code, form in enumerate(dwarf._OFFSET_SIZED, 1)) + b"\0"
    obj = with_sections(tmp_path, {".debug_info": b"".join(units), ".debug_abbrev": table})
    assert unit_names(obj) == named(units, ["tsd.c"] * 4)


@pytest.mark.parametrize("unit_type", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("offset_size", [4, 8])
def test_each_dwarf5_unit_header_is_read(tmp_path: Path, unit_type: int, offset_size: int):
    units = [unit(uleb(1) + b"tcache.c\0", 5, offset_size, unit_type) for _ in range(2)]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units),
                                   ".debug_abbrev": abbrev(1, [(DW_AT_NAME, STRING)]) + b"\0"})
    assert unit_names(obj) == named(units, ["tcache.c", "tcache.c"])


def test_names_from_the_string_tables(tmp_path: Path):
    """strp into .debug_str and line_strp into .debug_line_str, 4 and 8 bytes wide; the
    abbreviation is found past others in its table, and past another unit's table."""
    table = abbrev(1, [(DW_AT_NAME, STRING)]) + abbrev(2, [(DW_AT_NAME, STRP)]) + abbrev(
        3, [(DW_AT_NAME, LINE_STRP)]) + b"\0"
    other = abbrev(1, [(DW_AT_NAME, LINE_STRP)]) + b"\0"
    units = [unit(uleb(2) + struct.pack("<I", 4)), unit(uleb(3) + struct.pack("<Q", 6), 5, 8),
             unit(uleb(1) + struct.pack("<I", 0), abbrev_offset=len(table))]
    obj = with_sections(tmp_path, {
        ".debug_info": b"".join(units), ".debug_abbrev": table + other,
        ".debug_str": b"abc\0tsd.c\0", ".debug_line_str": b"xyz\0\0\0ctl.c\0"})
    assert unit_names(obj) == named(units, ["tsd.c", "ctl.c", "xyz"])


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("string_offset, abbrev_offset", [((1 << 32) + 4, 0), (4, 1 << 32)])
def test_offsets_past_4_gib_are_not_cut_to_32_bits(tmp_path: Path, version: int,
                                                   string_offset: int, abbrev_offset: int):
    """Forged: a 64-bit unit whose strp name is 4 GiB + 4 into a .debug_str of 10 bytes,
    or whose abbreviations are 4 GiB into a .debug_abbrev of a few."""
    units = [unit(uleb(1) + struct.pack("<Q", string_offset), version, 8,
                  abbrev_offset=abbrev_offset)]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units),
                                   ".debug_abbrev": abbrev(1, [(DW_AT_NAME, STRP)]) + b"\0",
                                   ".debug_str": b"abc\0tsd.c\0"})
    with pytest.raises(IndexError):
        unit_names(obj)


def test_what_the_reader_leaves_to_pyelftools(tmp_path: Path):
    """A name by strx1, a block before the name, strp and line_strp names without their
    tables, an abbreviation the table lacks, a null top DIE: unknown. No name: None."""
    table = b"".join([
        abbrev(1, [(DW_AT_NAME, 0x25)]),
        abbrev(2, [(DW_AT_PRODUCER, 0x0A), (DW_AT_NAME, STRING)]),
        abbrev(3, [(DW_AT_NAME, STRP)]),
        abbrev(4, [(DW_AT_NAME, LINE_STRP)]),
        abbrev(5, [(DW_AT_PRODUCER, STRING)]),
        b"\0"])
    units = [unit(uleb(1) + b"\0"), unit(uleb(2) + b"\1Xtsd.c\0"),
             unit(uleb(3) + bytes(4)), unit(uleb(4) + bytes(4)),
             unit(uleb(9)), unit(uleb(0)), unit(uleb(5) + b"gcc\0")]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units), ".debug_abbrev": table})
    unknown = dwarf._UNKNOWN
    assert unit_names(obj) == named(units, [unknown] * 6 + [None])


def test_a_unit_too_short_or_too_long_or_of_version_one_is_refused(tmp_path: Path):
    table = abbrev(1, [(DW_AT_NAME, STRING)]) + b"\0"
    good = unit(uleb(1) + b"tsd.c\0")
    cases = {
        good + struct.pack("<IH", 6, 4) + bytes(6): "unit overruns .debug_info",
        good[:-1]: "unit overruns .debug_info",
        unit(uleb(1) + b"tsd.c\0", version=1): "DWARF version 1",
    }
    for info, words in cases.items():
        obj = with_sections(tmp_path, {".debug_info": info, ".debug_abbrev": table})
        with pytest.raises(ValueError) as caught:
            unit_names(obj)
        assert str(caught.value) == words


def test_a_tail_shorter_than_a_header_is_not_a_unit(tmp_path: Path):
    table = abbrev(1, [(DW_AT_NAME, STRING)]) + b"\0"
    good = unit(uleb(1) + b"tsd.c\0")
    obj = with_sections(tmp_path, {".debug_info": good + bytes(10), ".debug_abbrev": table})
    assert unit_names(obj) == [(0, "tsd.c")]
    obj = with_sections(tmp_path, {".debug_info": good + struct.pack("<IHIB", 7, 4, 0, 8),
                                   ".debug_abbrev": table})
    with pytest.raises(IndexError):  # 11 bytes: a header, its DIE past the end
        unit_names(obj)


def test_names_not_utf8_are_read_with_replacement(tmp_path: Path):
    """A file name is bytes; a unit named by one that is not UTF-8 still has a name."""
    table = abbrev(1, [(DW_AT_NAME, STRING)]) + b"\0"
    units = [unit(uleb(1) + b"ts\xffd.c\0")]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units), ".debug_abbrev": table})
    assert unit_names(obj) == named(units, ["ts\ufffdd.c"])
    source = tmp_path / os.fsdecode(b"m\xffin.c")
    source.write_text(tsd_source("unsigned long thread_allocated",
                                 "unsigned long thread_deallocated", head=""))
    obj = big_endian(source)
    assert tsd(obj).allocated_member == "thread_allocated"
    assert read(obj, lambda e: [dwarf._name(cu.get_top_DIE())
                                       for cu in dwarf._ordered_units(e.get_dwarf_info())]) \
        == [os.fsencode(source).decode("utf-8", "replace")]


def test_multibyte_abbreviation_codes_and_attributes(tmp_path: Path):
    """Codes of two and three bytes; 256 and 3744, listed first, are what 300 and 20000
    would read as if a byte's bits replaced the others or every shift were 7."""
    specs = [(0x2001, 0x0B), (DW_AT_NAME, STRING)]  # DW_AT_lo_user + 1, data1
    table = abbrev(256, [(DW_AT_NAME, STRING)]) + abbrev(3744, [(DW_AT_NAME, STRING)]) + \
        abbrev(1, [(DW_AT_NAME, STRING)]) + abbrev(300, specs) + abbrev(20000, specs) + \
        abbrev(128, specs)
    units = [unit(uleb(300) + b"Xtsd.c\0"), unit(uleb(20000) + b"Xctl.c\0"),
             unit(uleb(128) + b"Xsz.c\0")]
    obj = with_sections(tmp_path, {".debug_info": b"".join(units),
                                   ".debug_abbrev": table + b"\0"})
    assert unit_names(obj) == named(units, ["tsd.c", "ctl.c", "sz.c"])


def test_without_abbreviations_the_reader_declines(tmp_path: Path):
    obj = with_sections(tmp_path, {".debug_info": unit(uleb(1) + b"tsd.c\0")})
    assert unit_names(obj) is None
