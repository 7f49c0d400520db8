"""The two phases of resolve.layout and `resolve` around them, on real ELF objects gcc, as
and objcopy build here from a small jemalloc look-alike (a tsd_s with jemalloc's mangled
counters, its TSD variable, a mallctl), on the debug jemalloc build and on Debian's stock
stripped libjemalloc.so.2: what phase 1 reads of executables and shared objects (each TLS
model), what is refused and in which words, the layout from embedded DWARF, from a debug
file found by build-id or debuglink (and the ones refused), and from machine code."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from ctprofd.report import tags
from ctprofd.resolve import elf, machine_code
from ctprofd.resolve.debuginfo import DebugSearch, ObjectDir
from ctprofd.resolve.layout import (InProcess, LayoutFailure, NotJemalloc, ObjectFacts,
                                    TsdLayout, debug_identity, inspect_object,
                                    layout_from_code, layout_from_dwarf, object_dirs_for,
                                    resolve, resolve_object, resolve_path)

BUILD_ID = "0123456789abcdef0123456789abcdef01234567"
OTHER_ID = "76543210fedcba9876543210fedcba9876543210"
STOCK = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")

# jemalloc's TSD in miniature: the counters 16 bytes apart at 24 and 40, behind a 40-byte
# thread-local placed first, so that no offset is 0
SOURCE = r"""
#include <stdint.h>
struct tsd_s {
    char before[24];
    uint64_t cant_access_tsd_items_directly_use_a_getter_or_setter_thread_allocated;
    uint64_t between;
    uint64_t cant_access_tsd_items_directly_use_a_getter_or_setter_thread_deallocated;
    char after[16];
};
#ifdef TSD_STATIC
static
#endif
__thread struct tsd_s je_tsd_tls __attribute__((used, tls_model(TSD_MODEL)));
__thread char pad_tls[40] __attribute__((used, tls_model(PAD_MODEL)));
uint64_t get(void) { return je_tsd_tls.between + pad_tls[1]; }
int je_mallctl(void) { return 0; }
#ifdef MAIN
int main(void) { return (int)get(); }
#endif
"""
NO_ARENA = ("jemalloc's units lack arena_bin_offsets, arenas, bin_infos, narenas_total, "
            "nhbins, sz_index2size_tab, tcache_bin_alloc_alignment, tcache_bin_alloc_size, "
            "arena_s, tsd_s")


def build(directory: Path, name: str, *flags: str, source: str = SOURCE,
          tsd: str = "initial-exec", pad: str = "global-dynamic",
          build_id: str = BUILD_ID) -> Path:
    """`source` compiled by gcc -O1 into `directory/name` with `flags` (the TLS models of
    the TSD and of the pad given)."""
    c = directory / f"{name}.c"
    c.write_text(source)
    out = directory / name
    ident = "-Wl,--build-id=none" if build_id == "none" else f"-Wl,--build-id=0x{build_id}"
    subprocess.run(["gcc", "-O1", ident, f'-DTSD_MODEL="{tsd}"', f'-DPAD_MODEL="{pad}"',
                    "-o", out, c, *flags], check=True, capture_output=True)
    return out


def executable(directory: Path, name: str = "prog", *flags: str, **kw) -> Path:
    return build(directory, name, "-DMAIN", "-g", *flags, tsd="local-exec",
                 pad="local-exec", **kw)


def library(directory: Path, name: str = "libj.so", *flags: str, **kw) -> Path:
    return build(directory, name, "-shared", "-fPIC", *flags, **kw)


def inspect(path: Path, shared: bool, what: str = "X"):
    with open(path, "rb") as stream:
        return inspect_object(stream, what, shared)


def from_dwarf(path: Path, facts: ObjectFacts, what: str = "X", source: str = "embedded"):
    with open(path, "rb") as stream:
        return layout_from_dwarf(stream, facts, what, source)


def from_code(path: Path, facts: ObjectFacts, what: str = "X"):
    with open(path, "rb") as stream:
        return layout_from_code(stream, facts, what)


def relocations(path: Path, kind: str) -> list[tuple[int, str | None, int]]:
    """(r_offset, symbol or None, addend) of each relocation of `kind`, read by readelf."""
    out = subprocess.run(["readelf", "-rW", str(path)], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2] == kind:
            symbol = words[4] if len(words) >= 7 else None
            found.append((int(words[0], 16), symbol, int(words[-1], 16)))
    return found


def tls_symbol_value(path: Path, name: str) -> int:
    out = subprocess.run(["readelf", "-sW", str(path)], capture_output=True, text=True,
                         check=True).stdout
    [value] = {int(line.split()[1], 16) for line in out.splitlines()
               if line.split()[-1:] == [name]}
    return value


def strip_symbol(path: Path, name: str) -> Path:
    out = path.with_name(path.name + ".nosym")
    subprocess.run(["objcopy", f"--strip-symbol={name}", path, out], check=True)
    return out


def split_debug(path: Path, debug: Path) -> Path:
    """`path` stripped of its DWARF and linked to `debug` (its --only-keep-debug part)."""
    subprocess.run(["objcopy", "--only-keep-debug", path, debug], check=True)
    stripped = path.with_name(path.name + ".stripped")
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={debug}", path,
                    stripped], check=True)
    return stripped


def crc_of(path: Path) -> int:
    return zlib.crc32(path.read_bytes())


# --- phase 1: executables ----------------------------------------------------------------

def test_an_executables_facts(tmp_path: Path):
    program = executable(tmp_path)
    facts = inspect(program, shared=False)
    assert facts == ObjectFacts(BUILD_ID, elf.Symbol("je_tsd_tls", 40, 64), True,
                                static_block_offset=112, load_page=0)
    # a non-PIE executable: its first loaded page is 0x400000; no build-id
    fixed = executable(tmp_path, "fixed", "-no-pie", build_id="none")
    assert inspect(fixed, shared=False) == ObjectFacts(None, elf.Symbol("je_tsd_tls", 40, 64),
                                                       True, static_block_offset=112,
                                                       load_page=0x400000)


def test_debuglinks_and_build_ids_that_are_not_plausible_are_left_out(tmp_path: Path):
    program = executable(tmp_path)
    debug = tmp_path / "prog.debug"
    stripped = split_debug(program, debug)
    assert inspect(stripped, shared=False) == ObjectFacts(
        BUILD_ID, elf.Symbol("je_tsd_tls", 40, 64), False, ("prog.debug", crc_of(debug)),
        static_block_offset=112)
    # forged: a debuglink naming the parent directory, as no objcopy writes one
    link = tmp_path / "link"
    link.write_bytes(b"..\0\0" + struct.pack("<I", 7))
    forged = tmp_path / "forged"
    subprocess.run(["objcopy", "--strip-debug", f"--add-section=.gnu_debuglink={link}",
                    program, forged], check=True)
    assert inspect(forged, shared=False).debuglink is None
    # a build-id of 65 bytes: 130 hex digits, more than any build-id has
    long_id = executable(tmp_path, "long", build_id="ab" * 65)
    assert inspect(long_id, shared=False).build_id is None
    shortest = executable(tmp_path, "short", build_id="ab")
    assert inspect(shortest, shared=False).build_id == "ab"


def test_a_program_without_jemalloc_is_not_jemalloc(tmp_path: Path):
    plain = tmp_path / "plain.c"
    plain.write_text('const char *s = "<jemalloc>: ";\nint main(void) { return *s; }\n')
    program = tmp_path / "plain"
    subprocess.run(["gcc", "-O1", "-o", program, plain], check=True)
    # its symbols name no TSD nor mallctl: the marker string is not looked at
    assert inspect(program, shared=False) == NotJemalloc()
    assert inspect(program, shared=False).reason == "no jemalloc TSD symbol"
    # stripped of its symbols, the message prefix counts for an executable...
    stripped = tmp_path / "plain.stripped"
    subprocess.run(["strip", "-o", stripped, program], check=True)
    assert inspect(stripped, shared=False, what="P") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE, "P: jemalloc, but no PT_TLS segment holds its thread data")
    assert resolve_path(str(stripped), DebugSearch(())) == LayoutFailure(
        tags.JEMALLOC_UNREADABLE,
        f"{stripped}: jemalloc, but no PT_TLS segment holds its thread data")
    # ...not for a shared object, which needs jemalloc's version string too
    assert inspect(stripped, shared=True) == NotJemalloc()
    versioned = tmp_path / "versioned.c"
    versioned.write_text('const char *s = "<jemalloc>: 5.3.0-0-g'
                         '54eaed1d8b56b1aa528be3bdd1877e59c56fa90c";\n'
                         'int f(void) { return *s; }\n')
    lib = tmp_path / "libv.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", lib, versioned], check=True)
    assert inspect(lib, shared=True, what="V") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE, "V: jemalloc, but no PT_TLS segment holds its thread data")
    assert inspect(lib, shared=False) == NotJemalloc()  # it has symbols


def test_a_mallctl_alone_makes_it_jemalloc(tmp_path: Path):
    source = tmp_path / "m.c"
    source.write_text("int je_mallctl(void) { return 1; }\n"
                      "int main(void) { return je_mallctl(); }\n")
    program = tmp_path / "m"
    subprocess.run(["gcc", "-O1", "-o", program, source], check=True)
    assert inspect(program, shared=False, what="M") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE, "M: jemalloc, but no PT_TLS segment holds its thread data")


def assemble(directory: Path, flag: str, name: str = "je_tsd_tls") -> Path:
    """A relocatable object holding a thread-local `name` (jemalloc's TSD by default),
    assembled by `as` with `flag`: no DWARF, no .eh_frame."""
    source = directory / "tls.s"
    source.write_text(f'\t.section .tbss,"awT",@nobits\n\t.globl {name}\n'
                      f"\t.type {name}, @object\n\t.size {name}, 64\n"
                      f"{name}:\n\t.zero 64\n")
    out = directory / f"{name}{flag}.o"
    subprocess.run(["as", *([flag] if flag else []), "-o", out, source], check=True)
    return out


def test_other_architectures_are_refused_by_name(tmp_path: Path):
    assert inspect(assemble(tmp_path, "--32"), shared=False, what="O") == LayoutFailure(
        tags.ARCH_MISMATCH, "O: EM_386 ELFCLASS32, only x86_64 is supported")
    assert inspect(assemble(tmp_path, "--x32"), shared=True, what="O") == LayoutFailure(
        tags.ARCH_MISMATCH, "O: EM_X86_64 ELFCLASS32, only x86_64 is supported")
    # x86_64 but unlinked: no PT_TLS segment places anything
    assert inspect(assemble(tmp_path, ""), shared=False, what="O") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE, "O: jemalloc, but no PT_TLS segment holds its thread data")


def test_a_file_that_is_no_elf_is_malformed(tmp_path: Path):
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"garbage that is no ELF file at all")
    assert inspect(garbage, shared=False, what="G") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "G: malformed ELF: Magic number does not match")


# --- phase 1: shared objects, each TLS model ---------------------------------------------

def test_initial_exec_against_the_symbol(tmp_path: Path):
    lib = library(tmp_path, pad="initial-exec")
    [(slot, symbol, addend)] = [r for r in relocations(lib, "R_X86_64_TPOFF64")
                                if r[1] == "je_tsd_tls"]
    assert addend == 0
    facts = inspect(lib, shared=True)
    assert facts == ObjectFacts(BUILD_ID, elf.Symbol("je_tsd_tls", 40, 64), False,
                                tpoff_got=slot, tpoff_addend=0, tpoff_symbolic=True)


def test_initial_exec_against_the_module_and_a_load_page_above_zero(tmp_path: Path):
    lib = library(tmp_path, "libj.so", "-DTSD_STATIC", "-Wl,-Ttext-segment=0x200000")
    [(slot, symbol, addend)] = relocations(lib, "R_X86_64_TPOFF64")
    assert (symbol, addend) == (None, 40)
    assert inspect(lib, shared=True) == ObjectFacts(
        BUILD_ID, elf.Symbol("je_tsd_tls", 40, 64), False, tpoff_got=slot - 0x200000,
        tpoff_addend=40, tpoff_symbolic=False, load_page=0x200000)


def test_general_dynamic_is_behind_the_dtv(tmp_path: Path):
    for flags in ((), ("-DTSD_STATIC",)):  # a DTPOFF64 relocation, or the offset in the file
        lib = library(tmp_path, "libgd.so", *flags, tsd="global-dynamic")
        facts = inspect(lib, shared=True)
        assert facts == ObjectFacts(BUILD_ID, elf.Symbol("je_tsd_tls", 40, 64), False,
                                    dynamic_tls=True)


def test_the_tsds_own_pair_wins_over_another_variables_initial_exec_slot(tmp_path: Path):
    lib = library(tmp_path, tsd="global-dynamic", pad="initial-exec")
    assert relocations(lib, "R_X86_64_TPOFF64")  # the pad's, against its own symbol
    assert inspect(lib, shared=True).placement() == {
        "static_block_offset": None, "tpoff_got": None, "tpoff_addend": 0,
        "tpoff_symbolic": False, "dynamic_tls": True}


def test_an_initial_exec_slot_wins_over_another_variables_pair(tmp_path: Path):
    lib = library(tmp_path, "libj.so", "-DTSD_STATIC")  # the TSD initial-exec, the pad's pair
    [(slot, _, _)] = relocations(lib, "R_X86_64_TPOFF64")
    assert relocations(lib, "R_X86_64_DTPMOD64")
    facts = inspect(lib, shared=True)
    assert (facts.tpoff_got, facts.tpoff_addend, facts.tpoff_symbolic, facts.dynamic_tls) == (
        slot, 40, False, False)


def test_a_stripped_library_takes_the_slot_against_the_module(tmp_path: Path):
    """No symbol names the TSD: an anonymous initial-exec slot is taken even beside a
    pair of the module (a local variable's, its offset in the file)."""
    lib = library(tmp_path, "libj.so", "-DTSD_STATIC", "-s", tsd="initial-exec",
                  pad="global-dynamic",
                  source=SOURCE.replace("__thread char pad_tls", "static __thread char pad_tls"))
    [(slot, _, addend)] = relocations(lib, "R_X86_64_TPOFF64")
    facts = inspect(lib, shared=True)
    assert facts.symbol is None
    assert (facts.tpoff_got, facts.tpoff_addend, facts.tpoff_symbolic, facts.dynamic_tls) == (
        slot, addend, False, False)


def test_libraries_that_place_no_tsd_are_refused(tmp_path: Path):
    silent = library(tmp_path, "libsilent.so",
                     source=SOURCE.replace("uint64_t get(void) { return je_tsd_tls.between "
                                           "+ pad_tls[1]; }", ""))
    assert inspect(silent, shared=True, what="S") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE,
        "S: jemalloc, but no TLS relocation of its own places its thread data")
    other = tmp_path / "other.c"
    other.write_text("extern __thread long other_tls;\n__thread char je_tsd_tls[64];\n"
                     "long get(void) { return other_tls; }\n")
    lib = tmp_path / "libother.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-ftls-model=initial-exec", "-o", lib,
                    other], check=True)
    assert inspect(lib, shared=True, what="S") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE,
        "S: jemalloc, but TLS relocations name other symbols of its own places its thread data")


def test_a_slot_below_the_first_loaded_page_is_malformed(tmp_path: Path):
    """Forged: the first PT_LOAD moved above the GOT slot, as no linker places it."""
    lib = library(tmp_path, pad="initial-exec")
    with open(lib, "rb") as stream:
        image = elf.open_elf(stream)
        index = next(i for i, s in enumerate(image.iter_segments()) if s["p_type"] == "PT_LOAD")
        at = image["e_phoff"] + index * image["e_phentsize"] + 16  # p_vaddr
    data = bytearray(lib.read_bytes())
    struct.pack_into("<Q", data, at, 0x10000)
    lib.write_bytes(bytes(data))
    assert inspect(lib, shared=True, what="F") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "F: malformed ELF: tpoff_got must be a non-negative integer")


# --- phase 2: DWARF ----------------------------------------------------------------------

def test_the_layout_from_embedded_dwarf(tmp_path: Path):
    program = executable(tmp_path)
    facts = inspect(program, shared=False)
    expected = TsdLayout(BUILD_ID, "je_tsd_tls", 40, 24, 40, static_block_offset=112,
                         dwarf_source="embedded", arena_missing=NO_ARENA)
    assert from_dwarf(program, facts) == expected
    assert resolve_path(str(program), DebugSearch(())) == expected


def test_the_tsd_from_the_dwarf_when_no_symbol_names_it(tmp_path: Path):
    program = strip_symbol(executable(tmp_path, "prog", "-DTSD_STATIC"), "je_tsd_tls")
    facts = inspect(program, shared=False)
    assert facts.symbol is None and facts.embedded_dwarf
    layout = from_dwarf(program, facts)
    assert (layout.symbol, layout.symbol_offset, layout.allocated_offset,
            layout.deallocated_offset) == ("je_tsd_tls", 40, 24, 40)
    assert from_dwarf(program, facts, "P", "debuglink /d/x.debug").dwarf_source == (
        "debuglink /d/x.debug")


def test_what_dwarf_lacks_is_said_with_where_it_was_read(tmp_path: Path):
    plain = tmp_path / "plain.c"
    plain.write_text("int main(void) { return 0; }\n")
    program = tmp_path / "plain"
    subprocess.run(["gcc", "-O1", "-g", "-o", program, plain], check=True)
    facts = ObjectFacts(None, elf.Symbol("je_tsd_tls", 0, 64), True, static_block_offset=64)
    assert from_dwarf(program, facts, "P") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "P: no definition of struct tsd_s")
    assert from_dwarf(program, facts, "P", "build-id /d/x.debug") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "P (build-id /d/x.debug): no definition of struct tsd_s")
    nameless = dataclasses.replace(facts, symbol=None)
    assert from_dwarf(program, nameless, "P", "build-id /d/x.debug") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE,
        "P (build-id /d/x.debug): no TSD symbol: no TLS location for je_tsd_tls or tsd_tls "
        "or _rjem_je_tsd_tls")
    assert from_dwarf(assemble(tmp_path, "", "other_tls"), nameless, "P") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "P: no TSD symbol: no DWARF")
    assert from_dwarf(assemble(tmp_path, ""), facts, "P") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "P: no DWARF")
    # the object's own symbol table names the TSD: the DWARF is not asked for it
    assert from_dwarf(assemble(tmp_path, ""), nameless, "P") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "P: no DWARF")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF and then nothing an ELF file has")
    assert from_dwarf(garbage, facts, "P", "debuglink /g") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "P (debuglink /g): malformed ELF: Invalid EI_CLASS b' '")


def test_offsets_dwarf_gives_out_of_bounds_are_refused(tmp_path: Path):
    """A tsd_s whose counters lie past 1 MiB: the DWARF is read, the layout refused."""
    source = SOURCE.replace("char before[24];", "char before[1 << 20];")
    program = executable(tmp_path, "huge", source=source)
    facts = inspect(program, shared=False)
    assert from_dwarf(program, facts, "H") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "H: malformed ELF: offsets must be integers in [0, 1 MiB)")


def test_the_arena_layout_of_the_debug_build(jemalloc_dir: Path):
    lib = jemalloc_dir / "lib/libjemalloc.so.2"
    facts = inspect(lib, shared=True)
    layout = from_dwarf(lib, facts)
    assert layout.arena is not None and layout.arena_missing == ""
    assert (layout.arena.arenas, layout.arena.narenas_total, layout.arena.bin_size) == (
        681536, 714632, 224)
    assert layout.arena.table == ""
    # the variables' addresses are offsets from the first loaded page, never below it
    moved = from_dwarf(lib, dataclasses.replace(facts, load_page=681536))
    assert moved.arena == dataclasses.replace(
        layout.arena, arenas=0, narenas_total=714632 - 681536, nhbins=2820688 - 681536,
        sz_index2size_tab=2817152 - 681536, arena_bin_offsets=714656 - 681536,
        bin_infos=2812800 - 681536, tcache_bin_alloc_size=2820872 - 681536,
        tcache_bin_alloc_alignment=2820864 - 681536)
    below = from_dwarf(lib, dataclasses.replace(facts, load_page=681537))
    assert below.arena is None
    assert below.arena_missing == "arenas lies below the first loaded page"
    assert (below.allocated_offset, below.deallocated_offset) == (824, 840)


# --- machine code ------------------------------------------------------------------------

STOCK_FACTS = ObjectFacts(None, None, False, tpoff_got=0)


def test_the_stock_library_from_its_code():
    facts = inspect(STOCK, shared=True)
    layout = from_code(STOCK, facts)
    [(slot, _, _)] = relocations(STOCK, "R_X86_64_TPOFF64")
    assert dataclasses.replace(layout, arena=None) == TsdLayout(
        facts.build_id, "(stripped)", 0, 824, 840, None, slot, 0, False, False,
        dwarf_source="none", code_source="malloc/free fast paths")
    assert layout.arena.table == "debian-12-libjemalloc2"
    assert layout.arena.arenas == 841408
    # the table's variables are taken as offsets from the first loaded page
    moved = from_code(STOCK, dataclasses.replace(facts, load_page=0x1000))
    assert moved.arena.arenas == 841408 - 0x1000
    assert from_code(STOCK, dataclasses.replace(facts, load_page=1 << 40)).arena_missing == (
        "table debian-12-libjemalloc2: variables below the first loaded page")


def test_a_code_layout_names_the_symbol_the_facts_have(jemalloc_dir: Path):
    lib = jemalloc_dir / "lib/libjemalloc.so.2"
    facts = inspect(lib, shared=True)
    layout = from_code(lib, facts)
    assert (layout.symbol, layout.symbol_offset, layout.build_id) == ("je_tsd_tls", 0,
                                                                      facts.build_id)
    assert layout.arena is None
    assert layout.arena_missing.startswith("table debian-12-libjemalloc2: its data is placed "
                                           "otherwise (")


def test_code_that_places_the_tsd_elsewhere_than_its_symbol_is_refused():
    facts = dataclasses.replace(STOCK_FACTS, symbol=elf.Symbol("je_tsd_tls", 8, 2632))
    assert from_code(STOCK, facts) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "machine code: the fast paths place the TSD at TLS offset "
        "0, je_tsd_tls is at 8")
    same = dataclasses.replace(STOCK_FACTS, symbol=elf.Symbol("je_tsd_tls", 0, 2632))
    assert from_code(STOCK, same).symbol == "je_tsd_tls"


def test_code_that_shows_nothing_is_said(tmp_path: Path):
    program = executable(tmp_path)
    facts = inspect(program, shared=False)
    assert from_code(program, facts) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "machine code: no allocation entry point exported and no "
        "jemalloc 5.3 version string to trust a scan of the code")
    assert from_code(assemble(tmp_path, "--32"), facts) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "machine code: the code route reads x86_64 only")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"garbage that is no ELF file at all")
    assert from_code(garbage, facts) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "machine code: malformed ELF: Magic number does not match")


# --- both phases: resolve ----------------------------------------------------------------

def resolved(path: Path, search: DebugSearch = DebugSearch(()), shared: bool = False,
             view: str = "", **kw):
    with open(path, "rb") as stream:
        return resolve(InProcess(), stream, str(path),
                       [ObjectDir("/", str(path.parent), view)], search, shared, **kw)


def test_a_known_layout_is_taken_without_reading_dwarf(tmp_path: Path):
    program = executable(tmp_path)
    known = TsdLayout(BUILD_ID, "je_tsd_tls", 40, 8, 16, static_block_offset=112)
    asked: list[ObjectFacts] = []
    assert resolved(program, known=lambda f: (asked.append(f), known)[1]) == known
    assert asked == [inspect(program, shared=False)]
    own = resolved(program, known=lambda f: None)
    assert (own.allocated_offset, own.dwarf_source) == (24, "embedded")
    # no build-id: nothing is known of it
    anonymous = executable(tmp_path, "anon", build_id="none")
    assert resolved(anonymous, known=lambda f: known).allocated_offset == 24
    assert resolved(tmp_path / "prog.c") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, f"{tmp_path / 'prog.c'}: malformed ELF: Magic number does "
        "not match")


def test_a_debug_file_found_by_its_debuglink(tmp_path: Path):
    program = executable(tmp_path)
    debug = tmp_path / "prog.debug"
    stripped = split_debug(program, debug)
    layout = resolved(stripped, view="mnt:[4026532000]")
    assert layout == TsdLayout(BUILD_ID, "je_tsd_tls", 40, 24, 40, static_block_offset=112,
                               dwarf_source=f"debuglink {debug}", arena_missing=NO_ARENA,
                               view="mnt:[4026532000]")
    assert resolved(stripped).view == ""
    # a path on disk: the debug file is looked for beside it, in ctprofd's own view
    assert resolve_path(str(stripped), DebugSearch(())) == dataclasses.replace(layout,
                                                                                view="")


def test_a_debug_file_found_by_build_id(tmp_path: Path):
    program = executable(tmp_path)
    debug_dir = tmp_path / "debug"
    path = debug_dir / ".build-id" / BUILD_ID[:2] / f"{BUILD_ID[2:]}.debug"
    path.parent.mkdir(parents=True)
    subprocess.run(["objcopy", "--only-keep-debug", program, path], check=True)
    stripped = tmp_path / "bare"
    subprocess.run(["objcopy", "--strip-debug", program, stripped], check=True)
    layout = resolved(stripped, DebugSearch((str(debug_dir),)), view="mnt:[1]")
    assert (layout.dwarf_source, layout.view) == (f"build-id {path}", "")


def code_words(path: Path) -> str:
    with open(path, "rb") as stream:
        with pytest.raises(machine_code.CodeError) as info:
            machine_code.counter_layout(stream, shared=False)
    return str(info.value)


def test_debug_files_that_are_not_the_objects_are_refused_then_the_code_read(tmp_path: Path):
    program = executable(tmp_path)
    debug = tmp_path / "prog.debug"
    stripped = split_debug(program, debug)
    code = code_words(stripped)
    debug.write_bytes(debug.read_bytes() + b"\0")  # another CRC
    assert resolved(stripped) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE,
        f"{stripped}: no DWARF: no .build-id/01/23456789abcdef0123456789abcdef01234567.debug; "
        f"debuglink {debug}: CRC mismatch; machine code: {code}")
    # another build's debug file, linked by its CRC: its build-id is not the object's
    (tmp_path / "o").mkdir()
    other = executable(tmp_path / "o", "prog", build_id=OTHER_ID)
    other_debug = tmp_path / "o" / "other.debug"
    subprocess.run(["objcopy", "--only-keep-debug", other, other_debug], check=True)
    linked = tmp_path / "linked"
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={other_debug}", program,
                    linked], check=True)
    shutil.copy(other_debug, tmp_path / "other.debug")
    assert resolved(linked).message == (
        f"{linked}: no DWARF: no .build-id/01/23456789abcdef0123456789abcdef01234567.debug; "
        f"debuglink {tmp_path / 'other.debug'}: refused: its build-id {OTHER_ID} is not "
        f"{linked}'s {BUILD_ID}; machine code: {code}")
    # neither has a build-id: none vouches for the other either way
    nameless = executable(tmp_path, "nameless", build_id="none")
    nameless_linked = tmp_path / "nameless.linked"
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={other_debug}",
                    nameless, nameless_linked], check=True)
    assert resolved(nameless_linked).message == (
        f"{nameless_linked}: no DWARF: debuglink {tmp_path / 'other.debug'}: refused: its "
        f"build-id {OTHER_ID} is not {nameless_linked}'s (none); machine code: {code}")
    debug_of_nameless = tmp_path / "n.debug"
    subprocess.run(["objcopy", "--only-keep-debug", nameless, debug_of_nameless], check=True)
    linked_to_nameless = tmp_path / "to-nameless"
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={debug_of_nameless}",
                    program, linked_to_nameless], check=True)
    assert resolved(linked_to_nameless).message == (
        f"{linked_to_nameless}: no DWARF: no .build-id/01/23456789abcdef0123456789abcdef01234567"
        f".debug; debuglink {debug_of_nameless}: refused: its build-id (none) is not "
        f"{linked_to_nameless}'s {BUILD_ID}; machine code: {code}")


def test_a_debug_file_beside_the_object_is_its_owners(tmp_path: Path):
    program = executable(tmp_path)
    debug = tmp_path / "prog.debug"
    stripped = split_debug(program, debug)
    os.chown(stripped, 65534, 65534)
    os.chown(debug, 65534, 65534)
    assert resolved(stripped).dwarf_source == f"debuglink {debug}"
    os.chown(debug, 65533, 65533)
    assert f"debuglink {debug}: refused: owned by uid 65533, neither the object's owner " \
           "(uid 65534) nor root" in resolved(stripped).message


def test_no_debug_file_then_the_stock_code(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="ctprofd.resolve.layout")
    layout = resolved(STOCK, shared=True)
    assert layout.source == "code: malloc/free fast paths"
    facts = inspect(STOCK, shared=True)
    link = facts.debuglink[0]
    assert [r.getMessage() for r in caplog.records if r.name == "ctprofd.resolve.layout"] == [
        f"{STOCK}: no DWARF: no .build-id/{facts.build_id[:2]}/{facts.build_id[2:]}.debug; "
        f"debuglink {link} not found; offsets from code: malloc/free fast paths"]


def test_a_not_jemalloc_answer_is_returned_as_it_is(tmp_path: Path):
    plain = tmp_path / "plain.c"
    plain.write_text("int main(void) { return 0; }\n")
    program = tmp_path / "plain"
    subprocess.run(["gcc", "-O1", "-o", program, plain], check=True)
    assert resolved(program, known=lambda f: pytest.fail("asked")) == NotJemalloc()
    with open(program, "rb") as stream:
        assert resolve_object(stream, "P", [], DebugSearch(())) == NotJemalloc()
    with open(tmp_path / "plain.c", "rb") as stream:
        assert resolve_object(stream, "P", [], DebugSearch(())) == LayoutFailure(
            tags.DWARF_PARSE_FAILURE, "P: malformed ELF: Magic number does not match")


def test_resolve_object_takes_an_executable_by_default(tmp_path: Path):
    program = executable(tmp_path)
    with open(program, "rb") as stream:
        layout = resolve_object(stream, "P", [], DebugSearch(()))
    assert (layout.static_block_offset, layout.tpoff_got, layout.allocated_offset) == (
        112, None, 24)


def test_resolve_path_reads_a_library_as_shared(tmp_path: Path):
    lib = library(tmp_path, "libj.so", "-g", pad="initial-exec")
    layout = resolve_path(str(lib), DebugSearch(()))
    assert (layout.tpoff_symbolic, layout.static_block_offset, layout.allocated_offset) == (
        True, None, 24)
    text = tmp_path / "text"
    text.write_text("not an ELF file")
    assert resolve_path(str(text), DebugSearch(())) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, f"{text}: not an ELF file: Magic number does not match")


def test_debug_identity(tmp_path: Path):
    program = executable(tmp_path)
    with open(program, "rb") as stream:
        assert debug_identity(stream, crc=True) == (crc_of(program), BUILD_ID)
        assert debug_identity(stream, crc=False) == (None, BUILD_ID)
    long_id = executable(tmp_path, "long", build_id="ab" * 65)
    with open(long_id, "rb") as stream:
        assert debug_identity(stream, crc=False) == (None, None)
    with open(tmp_path / "prog.c", "rb") as stream:
        assert debug_identity(stream, crc=False) == (None, None)


def test_object_dirs_for_a_deleted_executable():
    assert object_dirs_for("/opt/app/bin/server (deleted)", "/proc/7/root", "mnt:[1]") == [
        ObjectDir("/proc/7/root", "/opt/app/bin", "mnt:[1]")]
    assert object_dirs_for("/usr/bin/server", "/") == [ObjectDir("/", "/usr/bin", "")]


FAST_PATHS = """
    .section .tbss,"awT",@nobits
    .globl tsd
    .type tsd, @object
    .size tsd, 2632
tsd: .zero 2632
    .section .rodata
    .ascii "5.3.0-0-g54eaed1d8b56b1aa528be3bdd1877e59c56fa90c"
    .text
""" + "".join(f"""
    .globl {name}
    .type {name}, @function
{name}:
    movq tsd@gottpoff(%rip), %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdi, %rdx
    cmpq %fs:{offset + 8}(%rcx), %rdx
    jae 1f
    movq %rdx, %fs:{offset}(%rcx)
1:  ret
    .size {name}, .-{name}
""" for name, offset in (("malloc", 824), ("free", 840)))


def fast_paths(directory: Path) -> Path:
    """A shared object whose malloc and free have jemalloc's fast paths, through a TPOFF64
    GOT slot against its exported TSD `tsd`."""
    source = directory / "fast.s"
    source.write_text(FAST_PATHS)
    out = directory / "libfast.so"
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", out, source], check=True)
    return out


def test_a_slot_against_the_symbol_takes_the_code_over_the_symbols_value(tmp_path: Path):
    lib = fast_paths(tmp_path)
    [(slot, symbol, addend)] = relocations(lib, "R_X86_64_TPOFF64")
    assert (symbol, addend) == ("tsd", 0)
    facts = ObjectFacts(None, elf.Symbol("tsd", 64, 2632), False, tpoff_got=slot)
    layout = from_code(lib, facts)
    assert (layout.symbol, layout.symbol_offset, layout.allocated_offset,
            layout.tpoff_got, layout.tpoff_symbolic) == ("tsd", 0, 824, slot, True)
    assert layout.arena is None
    assert layout.arena_missing.startswith("table debian-12-libjemalloc2: its data is placed "
                                           "otherwise (")


def test_offsets_the_code_gives_out_of_bounds_are_refused(tmp_path: Path):
    """Forged: the slot's relocation given an addend of 1 MiB, as no linker writes one for
    a TSD of 2632 bytes: the counters would lie 1 MiB into the block."""
    lib = fast_paths(tmp_path)
    with open(lib, "rb") as stream:
        rela = elf.open_elf(stream).get_section_by_name(".rela.dyn")
        at = rela["sh_offset"] + 16  # the first entry's r_addend
    data = bytearray(lib.read_bytes())
    struct.pack_into("<q", data, at, 1 << 20)
    lib.write_bytes(bytes(data))
    assert from_code(lib, ObjectFacts(None, None, False, tpoff_got=0)) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, "machine code: offsets must be integers in [0, 1 MiB)")


def test_a_refused_debug_file_does_not_end_the_search(tmp_path: Path):
    program = executable(tmp_path)
    debug = tmp_path / "prog.debug"
    stripped = split_debug(program, debug)
    # the first candidate beside it has another CRC; the one in .debug/ is the object's
    (tmp_path / ".debug").mkdir()
    shutil.copy(debug, tmp_path / ".debug" / "prog.debug")
    debug.write_bytes(b"not the debug file")
    assert resolved(stripped).dwarf_source == f"debuglink {tmp_path / '.debug' / 'prog.debug'}"
    # the file at the build-id path is another build's: the debuglink is still followed
    debug_dir = tmp_path / "debug"
    wrong = debug_dir / ".build-id" / BUILD_ID[:2] / f"{BUILD_ID[2:]}.debug"
    wrong.parent.mkdir(parents=True)
    (tmp_path / "o").mkdir()
    other = executable(tmp_path / "o", "prog", build_id=OTHER_ID)
    subprocess.run(["objcopy", "--only-keep-debug", other, wrong], check=True)
    assert resolved(stripped, DebugSearch((str(debug_dir),))).dwarf_source == (
        f"debuglink {tmp_path / '.debug' / 'prog.debug'}")


def test_a_debug_file_that_is_the_objects_but_lacks_the_tsd(tmp_path: Path):
    """Its failure is the answer of the DWARF search, said with where it was read."""
    program = executable(tmp_path, "prog", source=SOURCE.replace("tsd_s", "tsd_t"))
    debug = tmp_path / "prog.debug"
    stripped = split_debug(program, debug)
    code = code_words(stripped)
    assert resolved(stripped, view="mnt:[1]") == LayoutFailure(
        tags.DWARF_PARSE_FAILURE,
        f"{stripped} (debuglink {debug}): no definition of struct tsd_s; machine code: {code}")
    # the same from its own DWARF
    assert resolved(program) == LayoutFailure(
        tags.DWARF_PARSE_FAILURE, f"{program}: no definition of struct tsd_s; machine code: "
        f"{code_words(program)}")


def test_resolve_takes_an_executable_by_default(tmp_path: Path):
    program = executable(tmp_path)
    with open(program, "rb") as stream:
        layout = resolve(InProcess(), stream, "P", [], DebugSearch(()))
    assert (layout.static_block_offset, layout.allocated_offset) == (112, 24)


GD_FAST_PATHS = """
    .section .tbss,"awT",@nobits
    .globl tsd
    .type tsd, @object
    .size tsd, 2632
tsd: .zero 2632
    .text
""" + "".join(f"""
    .globl {name}
    .type {name}, @function
{name}:
    pushq %rbx
    movq %rdi, %rbx
    .byte 0x66
    leaq tsd@tlsgd(%rip), %rdi
    .value 0x6666
    rex64
    call __tls_get_addr@PLT
    movq {offset}(%rax), %rdx
    addq %rbx, %rdx
    cmpq {offset + 8}(%rax), %rdx
    jae 1f
    movq %rdx, {offset}(%rax)
1:  popq %rbx
    ret
    .size {name}, .-{name}
""" for name, offset in (("malloc", 824), ("free", 840)))


def test_general_dynamic_fast_paths_place_the_tsd_behind_the_dtv(tmp_path: Path):
    """malloc and free reach the TSD through __tls_get_addr of the module's GOT pair."""
    source = tmp_path / "gd.s"
    source.write_text(GD_FAST_PATHS)
    lib = tmp_path / "libgd.so"
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", lib, source], check=True)
    assert from_code(lib, ObjectFacts(None, None, False, dynamic_tls=True)) == TsdLayout(
        None, "(stripped)", 0, 824, 840, dynamic_tls=True, dwarf_source="none",
        code_source="malloc/free fast paths",
        arena_missing="no arena layout table for jemalloc no version string (tables: "
                      "5.3.0-0-g54eaed1)")


def test_another_variables_pair_does_not_place_the_tsd(tmp_path: Path):
    """Only the pad is reached, through its general-dynamic pair: the TSD, at another
    offset, is placed by no relocation at all."""
    lib = library(tmp_path, "libj.so",
                  source=SOURCE.replace("return je_tsd_tls.between + pad_tls[1];",
                                        "return pad_tls[1];"))
    assert relocations(lib, "R_X86_64_DTPMOD64") and not relocations(lib, "R_X86_64_TPOFF64")
    assert inspect(lib, shared=True, what="S") == LayoutFailure(
        tags.JEMALLOC_UNREADABLE,
        "S: jemalloc, but no TLS relocation of its own places its thread data")


LOCAL_PAD = SOURCE.replace("__thread char pad_tls", "static __thread char pad_tls")


def test_the_tsds_own_pair_wins_over_a_slot_against_the_module(tmp_path: Path):
    """The pad (local) initial-exec through an anonymous slot, the TSD general-dynamic:
    the slot is not the TSD's."""
    lib = library(tmp_path, "libj.so", source=LOCAL_PAD, tsd="global-dynamic",
                  pad="initial-exec")
    [(_, symbol, _)] = relocations(lib, "R_X86_64_TPOFF64")
    assert symbol is None
    assert inspect(lib, shared=True).placement() == {
        "static_block_offset": None, "tpoff_got": None, "tpoff_addend": 0,
        "tpoff_symbolic": False, "dynamic_tls": True}


def test_a_slot_against_the_module_wins_over_a_pair_that_is_not_the_tsds(tmp_path: Path):
    """The TSD (local) initial-exec, the pad (local) general-dynamic: its pair's offset is
    in the file, the TSD's symbol is not at a pair, and the anonymous slot is taken."""
    lib = library(tmp_path, "libj.so", "-DTSD_STATIC", source=LOCAL_PAD)
    [(slot, _, addend)] = relocations(lib, "R_X86_64_TPOFF64")
    facts = inspect(lib, shared=True)
    assert facts.symbol == elf.Symbol("je_tsd_tls", 40, 64)
    assert (facts.tpoff_got, facts.tpoff_addend, facts.tpoff_symbolic, facts.dynamic_tls) == (
        slot, 40, False, False)
