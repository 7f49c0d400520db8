"""A jemalloc look-alike executable gcc builds in a moment (its TSD's counters at 24 and
40, DWARF embedded), and the ways the sandboxed parser's tests break a copy of it."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ctprofd.resolve import dwarf

BUILD_ID = "0123456789abcdef0123456789abcdef01234567"
SOURCE = r"""
#include <stdint.h>
struct pre { int a; int b; };  /* before tsd_s: a sibling cycle here hangs the search */
struct pre pre_var __attribute__((used));
struct tsd_s {
    char before[24];
    uint64_t cant_access_tsd_items_directly_use_a_getter_or_setter_thread_allocated;
    uint64_t between;
    uint64_t cant_access_tsd_items_directly_use_a_getter_or_setter_thread_deallocated;
    char after[16];
};
__thread struct tsd_s je_tsd_tls __attribute__((used, tls_model("local-exec")));
__thread char pad_tls[40] __attribute__((used, tls_model("local-exec")));
uint64_t get(void) { return je_tsd_tls.between + pad_tls[1]; }
int je_mallctl(void) { return 0; }
int main(void) { return (int)get(); }
"""


def build_prog(directory: Path) -> Path:
    """The look-alike, built by gcc -O1 -g into `directory/prog`."""
    (directory / "prog.c").write_text(SOURCE)
    subprocess.run(["gcc", "-O1", "-g", f"-Wl,--build-id=0x{BUILD_ID}", "-o",
                    directory / "prog", directory / "prog.c"], check=True, capture_output=True)
    return directory / "prog"


def sibling_cycle(src: Path, dst: Path) -> None:
    """Copy `src`, making the first DIE with a DW_AT_sibling, in the unit searched first for
    tsd_s, its own next sibling: a parser walking the unit's children never ends."""
    shutil.copy(src, dst)
    with open(src, "rb") as f:
        image = ELFFile(f)
        unit = next(dwarf._ordered_units(image.get_dwarf_info()))
        for die in unit.get_top_DIE().iter_children():
            sibling = die.attributes.get("DW_AT_sibling")
            if die.has_children and sibling is not None and sibling.form == "DW_FORM_ref4":
                break
        else:
            raise AssertionError(f"{src}: no DW_AT_sibling in ref4 form")
        at = image.get_section_by_name(".debug_info")["sh_offset"] + sibling.offset
        with open(dst, "r+b") as out:
            out.seek(at)
            out.write(struct.pack("<I", die.offset - unit.cu_offset))


def nobits_abbrev(src: Path, dst: Path, size: int) -> None:
    """Copy `src`, turning .debug_abbrev into a SHT_NOBITS section of `size` bytes, which a
    reader materialises as that many zero bytes."""
    shutil.copy(src, dst)
    with open(src, "rb") as f:
        image = ELFFile(f)
        index = next(i for i, s in enumerate(image.iter_sections())
                     if s.name == ".debug_abbrev")
        header = image["e_shoff"] + index * image["e_shentsize"]
    with open(dst, "r+b") as out:
        out.seek(header + 4)
        out.write(struct.pack("<I", 8))  # sh_type = SHT_NOBITS
        out.seek(header + 32)
        out.write(struct.pack("<Q", size))  # sh_size
