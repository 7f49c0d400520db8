"""What resolve.dwarf reads: tsd_s's counters, the TSD variable's TLS offset and the arena
statistics' layout, exactly, from the real jemalloc debug build and from small objects gcc
and clang build here in jemalloc's shapes; the exact words of every refusal; and the fast
reader of unit names on every unit header and attribute form it skips.

The values expected of the jemalloc 5.3.0 build were checked against gdb
(`p &((struct arena_s *)0)->stats.internal` and the like) on the same library.
"""

from __future__ import annotations

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


# -- tsd_s on objects gcc builds --

def test_mangled_counters_read_through_the_typedef_chain(tmp_path: Path):
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "void *state", f"uint64_t {MANGLED}thread_allocated", "int other",
        f"uint64_t {MANGLED}thread_deallocated"), "-gdwarf-5")
    assert tsd(obj) == TsdOffsets(8, 24, MANGLED + "thread_allocated",
                                  MANGLED + "thread_deallocated", 32)


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
    """s390x is big-endian: the fast reader declines, pyelftools orders the units."""
    obj = compile_c(tmp_path, "tsd.c", tsd_source(
        "char pad[8]", "unsigned long thread_allocated", "unsigned long thread_deallocated",
        head=""), "-g", "--target=s390x-linux-gnu", cc="clang")
    assert tsd(obj) == TsdOffsets(8, 16, "thread_allocated", "thread_deallocated", 24)


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


def test_a_variable_not_thread_local_has_no_tls_offset(tmp_path: Path):
    """`tsd_tls` here is a static array: DW_OP_addr, not a TLS location."""
    lib = link(tmp_path, "lib.so", compile_c(tmp_path, "tsd.c", TLS_SOURCE))
    assert refusal(lib, lambda e: dwarf.tls_variable_offset(e, ("tsd_tls", "missing"))) == \
        "no TLS location for tsd_tls or missing"


# -- arena statistics --

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


RJEM = Path("/var/cache/ctprofd/jemalloc-5.3.0-rjem/lib/libjemalloc.so.2")


def test_rust_jemalloc_prefixes_its_variables():
    """tikv-jemallocator's build names them _rjem_je_arenas and so on: the same layout."""
    assert read(RJEM, dwarf.arena_offsets) == JEMALLOC_ARENA
    assert read(RJEM, lambda e: dwarf.tls_variable_offset(
        e, ("tsd_tls", "je_tsd_tls", "_rjem_je_tsd_tls"))) == ("_rjem_je_tsd_tls", 0)


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


LEB_VALUE = bytes([0x80 | FILLER, FILLER])  # two bytes
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
