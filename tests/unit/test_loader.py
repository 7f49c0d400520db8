"""What resolve.loader reads of the dynamic loader's objects and how it places them: this
host's glibc 2.36 (libc.so.6's `_thread_db_` descriptors, ld.so's `_r_debug` and
`_rtld_global`), and objects gcc builds here exporting descriptors of chosen values, some
of them with a symbol or a program header moved by hand (the first and last bytes of a
segment, a descriptor straddling a segment's end or past the end of the file); what the
parser worker's answer must hold to be taken (`from_dict`), and what `place` says when the
loader does not describe itself."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from ctprofd.resolve.loader import (DESCRIPTORS, MAX_OFFSET, Field, LoaderFacts, LoaderLayout,
                                    loader_facts, place)

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LD_SO = "/lib64/ld-linux-x86-64.so.2"
BASE = 0x11000  # where the objects built here are linked: their first loaded page

# (descriptor, bits, count, offset), as glibc's _thread_db_<struct>_<field> arrays hold them
CHOSEN = (("link_map_l_tls_modid", 64, 1, 0x470), ("link_map_l_tls_offset", 64, 1, 0x468),
          ("pthread_dtvp", 64, 1, 0x8), ("dtv_dtv", 128, 0, 0),
          ("dtv_t_pointer_val", 64, 1, 0x0), ("dtv_t_counter", 64, 1, 0x8),
          ("rtld_global__dl_tls_dtv_slotinfo_list", 64, 1, 0x1000),
          ("dtv_slotinfo_list_len", 64, 1, 0x0), ("dtv_slotinfo_list_next", 64, 1, 0x8),
          ("dtv_slotinfo_list_slotinfo", 128, 0, 0x10), ("dtv_slotinfo_gen", 64, 1, 0x0),
          ("dtv_slotinfo_map", 64, 1, 0x8),
          ("pthread_tid", 32, 1, 0x2d0))  # glibc has it; the walk does not read it
EXPECTED_FIELDS = {name: Field(offset, bits // 8) for name, bits, _, offset in CHOSEN
                   if name in DESCRIPTORS}

SOURCE = "\n".join(
    [r"""#include <stdint.h>
#define DESC(name, bits, count, offset) \
    const uint32_t _thread_db_##name[3] __attribute__((used)) = {bits, count, offset};
#ifndef BITS
#define BITS 64
#endif
"""] + [f"DESC({name}, {'BITS' if name == 'dtv_t_counter' else bits}, {count}, {offset})"
        for name, bits, count, offset in CHOSEN] + [r"""
#if defined(SIZE_IN_DATA)
uint32_t _thread_db_sizeof_dtv_slotinfo __attribute__((used)) = 24;  /* writable: .data */
#elif defined(SIZE_IN_BSS)
uint32_t _thread_db_sizeof_dtv_slotinfo __attribute__((used));  /* no bytes in the file */
#else
const uint32_t _thread_db_sizeof_dtv_slotinfo __attribute__((used)) = 16;
#endif
const uint32_t _thread_db_sizeof_pthread __attribute__((used)) = 2304;
char _r_debug[40];
char _rtld_global[4000];
"""])


def gcc(out: Path, *args: str | Path) -> Path:
    subprocess.run(["gcc", "-o", out, *args], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The objects built once for the module, by name."""
    d = tmp_path_factory.mktemp("loader")
    (d / "lib.c").write_text(SOURCE)
    (d / "fn.c").write_text("void _r_debug(void) {}\n")
    (d / "exe.c").write_text("extern void _r_debug(void);\n"
                             "int main(void) { return (int)(long)&_r_debug; }\n")
    (d / "abs.s").write_text(".globl _r_debug\n.set _r_debug, 0\n"
                             ".globl _rtld_global\n.set _rtld_global, 0x5000\n"
                             ".section .note.GNU-stack,\"\",@progbits\n")
    lib = ("-shared", "-fPIC", "-O1", f"-Wl,-Ttext-segment={BASE:#x}")
    fn = gcc(d / "fn.so", "-shared", "-fPIC", d / "fn.c")
    return {
        "lib": gcc(d / "lib.so", *lib, d / "lib.c"),
        "odd": gcc(d / "odd.so", *lib, "-DBITS=12", d / "lib.c"),
        "zero": gcc(d / "zero.so", *lib, "-DBITS=0", d / "lib.c"),
        "data": gcc(d / "data.so", *lib, "-DSIZE_IN_DATA", d / "lib.c"),
        "bss": gcc(d / "bss.so", *lib, "-DSIZE_IN_BSS", d / "lib.c"),
        "object": gcc(d / "lib.o", "-c", "-fPIC", d / "lib.c"),
        "abs": gcc(d / "abs.so", "-shared", d / "abs.s"),
        "exe": gcc(d / "exe", "-no-pie", "-fno-pic", "-O1", d / "exe.c", fn),
    }


def facts_of(path: Path | str) -> LoaderFacts:
    with open(path, "rb") as stream:
        return loader_facts(stream)


def loads(path: Path) -> list[tuple[int, int, int, int]]:
    """(index, p_vaddr, p_offset, p_filesz) of each PT_LOAD header."""
    with open(path, "rb") as f:
        return [(i, s["p_vaddr"], s["p_offset"], s["p_filesz"])
                for i, s in enumerate(ELFFile(f).iter_segments()) if s["p_type"] == "PT_LOAD"]


def copy_with_symbol_at(path: Path, out: Path, name: str, value: int) -> Path:
    """A copy of `path` whose .dynsym entry `name` has the value (address) `value`."""
    shutil.copy(path, out)
    with open(out, "r+b") as f:
        table = ELFFile(f).get_section_by_name(".dynsym")
        [index] = [i for i, s in enumerate(table.iter_symbols()) if s.name == name]
        offset = table["sh_offset"] + index * table["sh_entsize"] + 8  # st_value
    with open(out, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))
    return out


def patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def u32_at(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack("<I", f.read(4))[0]


def test_a_field_is_its_offset_from_a_base_plus_whole_elements():
    field = Field(0x10, 16)
    assert (field.at(0x1000), field.at(0x1000, 3)) == (0x1010, 0x1040)


def test_this_hosts_libc_describes_every_field_the_walk_reads_and_ld_so_its_symbols():
    libc, ld = facts_of(LIBC), facts_of(LD_SO)
    assert set(libc.fields) == set(DESCRIPTORS)  # and not its other descriptors or sizes
    assert libc.fields["dtv_dtv"] == Field(0, 16) and libc.fields["pthread_dtvp"].size == 8
    assert (libc.sizes, libc.symbols, libc.load_page) == ({"dtv_slotinfo": 16}, {}, 0)
    assert (ld.fields, ld.sizes, set(ld.symbols), ld.load_page) == (
        {}, {}, {"_r_debug", "_rtld_global"}, 0)
    placed = place(libc, ld, 0x7F0000000000)
    assert isinstance(placed, LoaderLayout)
    assert placed.r_debug == 0x7F0000000000 + ld.symbols["_r_debug"]


def test_the_descriptors_sizes_and_symbols_an_object_exports(built: dict[str, Path]):
    facts = facts_of(built["lib"])
    assert facts.fields == EXPECTED_FIELDS  # pthread_tid is no field the walk reads
    assert facts.sizes == {"dtv_slotinfo": 16}  # nor sizeof_pthread a size it needs
    assert set(facts.symbols) == {"_r_debug", "_rtld_global"}
    assert facts.load_page == BASE


def test_a_descriptor_of_no_whole_bytes_is_left_out(built: dict[str, Path]):
    for name in ("odd", "zero"):  # dtv_t_counter of 12 bits, of 0 bits
        facts = facts_of(built[name])
        assert facts.fields == {k: v for k, v in EXPECTED_FIELDS.items() if k != "dtv_t_counter"}


def test_a_value_is_read_from_its_own_segment(built: dict[str, Path]):
    # the writable segment's file offsets are not its addresses less the first segment's
    assert facts_of(built["data"]).sizes == {"dtv_slotinfo": 24}
    assert facts_of(built["bss"]).sizes == {}  # in .bss: no bytes in the file to read


def test_a_value_is_read_from_a_segments_first_to_its_last_file_byte(built: dict[str, Path],
                                                                      tmp_path: Path):
    name = "_thread_db_sizeof_dtv_slotinfo"
    for i, vaddr, offset, filesz in loads(built["lib"])[1:]:
        first = copy_with_symbol_at(built["lib"], tmp_path / f"first{i}", name, vaddr)
        last = copy_with_symbol_at(built["lib"], tmp_path / f"last{i}", name,
                                   vaddr + filesz - 4)
        across = copy_with_symbol_at(built["lib"], tmp_path / f"across{i}", name,
                                     vaddr + filesz - 2)
        assert facts_of(first).sizes == {"dtv_slotinfo": u32_at(first, offset)}
        assert facts_of(last).sizes == {"dtv_slotinfo": u32_at(last, offset + filesz - 4)}
        assert facts_of(across).sizes == {}  # its last two bytes are in no segment's file


def test_a_segment_that_claims_bytes_past_the_end_of_the_file_gives_none(
        built: dict[str, Path], tmp_path: Path):
    out = tmp_path / "long.so"
    i, vaddr, _, _ = loads(built["lib"])[-1]
    copy_with_symbol_at(built["lib"], out, "_thread_db_sizeof_dtv_slotinfo",
                        vaddr + (1 << 20) - 4)
    with open(out, "rb") as f:
        phoff = ELFFile(f).header["e_phoff"]
    for field_offset in (32, 40):  # p_filesz, p_memsz: 1 MiB, far past the file's end
        patch(out, phoff + i * 56 + field_offset, "<Q", 1 << 20)
    assert facts_of(out).sizes == {}


def test_only_a_loaded_segment_says_where_a_values_bytes_are(built: dict[str, Path],
                                                            tmp_path: Path):
    out = tmp_path / "note.so"
    copy_with_symbol_at(built["lib"], out, "_thread_db_sizeof_dtv_slotinfo", 0x900000)
    with open(out, "rb") as f:
        image = ELFFile(f)
        phoff = image.header["e_phoff"]
        [index] = [i for i, s in enumerate(image.iter_segments())
                   if s["p_type"] == "PT_GNU_STACK"]
    header = phoff + index * 56  # this header now claims 4 bytes at 0x900000, not loaded
    patch(out, header + 8, "<Q", 0)  # p_offset
    patch(out, header + 16, "<Q", 0x900000)  # p_vaddr
    patch(out, header + 32, "<Q", 4)  # p_filesz
    assert facts_of(out).sizes == {}


def test_without_program_headers_nothing_is_read_and_symbols_are_still_found(
        built: dict[str, Path], tmp_path: Path):
    out = shutil.copy(built["lib"], tmp_path / "nophdr.so")
    patch(out, 0x38, "<H", 0)  # e_phnum
    facts = facts_of(out)
    assert (facts.fields, facts.sizes, facts.load_page) == ({}, {}, 0)
    assert set(facts.symbols) == {"_r_debug", "_rtld_global"}


def test_an_object_for_another_machine_or_without_dynamic_symbols_describes_nothing(
        built: dict[str, Path], tmp_path: Path):
    other = shutil.copy(built["lib"], tmp_path / "aarch64.so")
    patch(other, 0x12, "<H", 183)  # e_machine: EM_AARCH64
    assert facts_of(other) == LoaderFacts({}, {}, {})
    assert facts_of(built["object"]) == LoaderFacts({}, {}, {})  # a .o has no .dynsym


def test_undefined_symbols_and_symbols_at_zero_are_left_out(built: dict[str, Path]):
    # an absolute _r_debug at 0; an executable's undefined _r_debug at its PLT entry
    assert facts_of(built["abs"]).symbols == {"_rtld_global": 0x5000}
    exe = facts_of(built["exe"])
    assert (exe.symbols, exe.load_page) == ({}, 0x400000)


def test_facts_survive_the_trip_from_the_worker(built: dict[str, Path]):
    for facts in (facts_of(built["lib"]), facts_of(LIBC), facts_of(LD_SO)):
        assert LoaderFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


def refusal(change: dict) -> str:
    """The message from_dict refuses the synthetic object's facts with, `change` applied to
    its to_dict() (a value of None removes the key)."""
    data = LoaderFacts({"dtv_dtv": Field(0, 16)}, {"dtv_slotinfo": 16},
                       {"_r_debug": 0x1000, "_rtld_global": 0x2000}, BASE).to_dict()
    for key, value in change.items():
        data[key] = value
    with pytest.raises(ValueError) as raised:
        LoaderFacts.from_dict(data)
    return str(raised.value)


@pytest.mark.parametrize("change, message", [
    ({"kind": "object"}, "not loader facts: 'object'"),
    ({"fields": {"pthread_tid": {"offset": 0, "size": 4}}}, "descriptor pthread_tid: implausible"),
    ({"fields": {"dtv_dtv": {"offset": -1, "size": 16}}}, "descriptor dtv_dtv: implausible"),
    ({"fields": {"dtv_dtv": {"offset": MAX_OFFSET, "size": 16}}}, "descriptor dtv_dtv: implausible"),
    ({"fields": {"dtv_dtv": {"offset": 1.0, "size": 16}}}, "descriptor dtv_dtv: implausible"),
    ({"fields": {"dtv_dtv": {"offset": 0, "size": 0}}}, "descriptor dtv_dtv: implausible"),
    ({"fields": {"dtv_dtv": {"offset": 0, "size": MAX_OFFSET + 1}}},
     "descriptor dtv_dtv: implausible"),
    ({"fields": {"dtv_dtv": {"offset": 0, "size": "16"}}}, "descriptor dtv_dtv: implausible"),
    ({"sizes": {"pthread": 16}}, "implausible struct size"),
    ({"sizes": {"dtv_slotinfo": 0}}, "implausible struct size"),
    ({"sizes": {"dtv_slotinfo": MAX_OFFSET}}, "implausible struct size"),
    ({"sizes": {"dtv_slotinfo": 16.0}}, "implausible struct size"),
    ({"symbols": {"_dl_argv": 0x1000}}, "implausible symbol"),
    ({"symbols": {"_r_debug": -1}}, "implausible symbol"),
    ({"symbols": {"_r_debug": 1 << 48}}, "implausible symbol"),
    ({"symbols": {"_r_debug": True}}, "implausible symbol"),
    ({"load_page": 1 << 48}, "implausible symbol"),
    ({"load_page": -4096}, "implausible symbol"),
])
def test_implausible_facts_from_the_worker_are_refused(change: dict, message: str):
    assert refusal(change) == message


def test_the_bounds_of_plausible_facts_are_taken():
    data = LoaderFacts({"dtv_dtv": Field(MAX_OFFSET - 1, MAX_OFFSET),
                        "pthread_dtvp": Field(0, 1)},
                       {"dtv_slotinfo": MAX_OFFSET - 1},
                       {"_r_debug": (1 << 48) - 1, "_rtld_global": 0}, (1 << 48) - 4096)
    assert LoaderFacts.from_dict(data.to_dict()) == data
    assert LoaderFacts.from_dict(dataclasses.replace(data, sizes={"dtv_slotinfo": 1},
                                                     load_page=0).to_dict()).sizes == {
        "dtv_slotinfo": 1}


def test_place_puts_the_symbols_where_ld_so_is_mapped_less_its_first_page(
        built: dict[str, Path]):
    facts = facts_of(built["lib"])  # both: descriptors and symbols, first page at BASE
    placed = place(facts, facts, 0x7F0000000000 + BASE)
    assert placed == LoaderLayout(0x7F0000000000 + facts.symbols["_r_debug"],
                                  0x7F0000000000 + facts.symbols["_rtld_global"],
                                  EXPECTED_FIELDS, 16)


def test_place_names_what_the_loader_does_not_describe(built: dict[str, Path]):
    assert place(LoaderFacts({}, {}, {}), LoaderFacts({}, {}, {}), 0) == (
        "the loader does not describe " + ", ".join(DESCRIPTORS)
        + ", _r_debug, _rtld_global, dtv_slotinfo")
    facts = facts_of(built["lib"])
    without = dataclasses.replace(facts, fields={k: v for k, v in facts.fields.items()
                                                 if k != "dtv_t_counter"})
    assert place(without, facts, 0) == "the loader does not describe dtv_t_counter"


def test_place_refuses_pointer_fields_that_are_not_64_bits(built: dict[str, Path]):
    facts = facts_of(built["lib"])
    for name in ("pthread_dtvp", "dtv_slotinfo_map"):
        narrow = dataclasses.replace(facts, fields={**facts.fields, name: Field(0, 4)})
        assert place(narrow, facts, 0) == "the loader's descriptors are not of 64-bit fields"
