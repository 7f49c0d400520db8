"""The facts resolve.elf reads from an ELF object, on small objects gcc builds here: the
build-id from notes (segments, else sections), the TSD symbol by jemalloc's names, the
prefix of the mallctl an object defines, the debuglink, jemalloc's strings in a stripped
file, and the TLS relocations, each in the shape that decides it."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from ctprofd.resolve import elf

BUILD_ID = "0123456789abcdef0123456789abcdef01234567"


def build(directory: Path, source: str, *flags: str, name: str = "obj") -> Path:
    """`source` compiled and linked by gcc with `flags` (a PIE executable by default)."""
    c = directory / f"{name}.c"
    c.write_text(source)
    out = directory / name
    subprocess.run(["gcc", "-O1", f"-Wl,--build-id=0x{BUILD_ID}", "-o", out, c, *flags],
                   check=True, capture_output=True)
    return out


def facts(path: Path, read):
    with open(path, "rb") as stream:
        return read(elf.open_elf(stream))


MAIN = "int main(void) { return 0; }\n"


def section_header(path: Path, name: str) -> int:
    """The file offset of section `name`'s header."""
    with open(path, "rb") as stream:
        parsed = elf.open_elf(stream)
        index = next(i for i, s in enumerate(parsed.iter_sections()) if s.name == name)
        return parsed["e_shoff"] + index * parsed["e_shentsize"]


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, *values)
    path.write_bytes(bytes(data))


def assemble(directory: Path, flag: str) -> Path:
    """A relocatable object of another ELF class or ABI (`as --32`, `as --x32`) holding two
    thread-locals, jemalloc's TSD the second."""
    source = directory / "tls.s"
    source.write_text("""
\t.section .tbss,"awT",@nobits
\t.globl other_tls
\t.type other_tls, @object
\t.size other_tls, 16
other_tls:
\t.zero 16
\t.globl je_tsd_tls
\t.type je_tsd_tls, @object
\t.size je_tsd_tls, 3000
je_tsd_tls:
\t.zero 3000
""")
    out = directory / f"tls{flag}.o"
    subprocess.run(["as", flag, "-o", out, source], check=True)
    return out


# -- kind and build-id --

def test_a_library_and_a_pie_executable_are_told_apart(tmp_path: Path):
    library = build(tmp_path, "int f(void) { return 1; }\n", "-shared", "-fPIC", name="lib")
    program = build(tmp_path, MAIN, "-pie", "-fPIE", name="pie")
    assert facts(library, elf.is_shared_library) is True
    assert facts(program, elf.is_shared_library) is False
    assert facts(program, elf.is_x86_64) is True
    for flag in ("--32", "--x32"):  # i386; x86-64's ILP32 ABI: ELF32 both, not read
        assert facts(assemble(tmp_path, flag), elf.is_x86_64) is False


def test_the_build_id_from_the_notes_and_from_a_debug_files_sections(tmp_path: Path):
    program = build(tmp_path, MAIN)
    assert facts(program, elf.build_id) == BUILD_ID
    assert facts(program, elf.section_build_id) == BUILD_ID
    debug = tmp_path / "obj.debug"  # program headers kept, what they point at not
    subprocess.run(["objcopy", "--only-keep-debug", program, debug], check=True)
    assert facts(debug, elf.build_id) == BUILD_ID
    headless = tmp_path / "headless"  # no section headers (sstrip): the segments only
    headless.write_bytes(program.read_bytes())
    patch(headless, 0x28, "Q", 0)  # e_shoff
    patch(headless, 0x3C, "HH", 0, 0)  # e_shnum, e_shstrndx
    assert facts(headless, elf.build_id) == BUILD_ID
    assert facts(headless, elf.section_build_id) is None
    bare = tmp_path / "bare"
    subprocess.run(["gcc", "-O1", "-Wl,--build-id=none", "-o", bare, tmp_path / "obj.c"],
                   check=True)
    assert facts(bare, elf.build_id) is None
    assert facts(bare, elf.section_build_id) is None


# -- symbols --

@pytest.mark.parametrize("name, found", [
    ("tsd_tls", True), ("je_tsd_tls", True), ("_rjem_je_tsd_tls", True),
    ("je_tsd_tls_x", False), ("tsd_tlsx", False), ("mytsd_tls", False),
])
def test_the_tsd_symbol_by_jemallocs_names(tmp_path: Path, name: str, found: bool):
    source = (f"__thread char {name}[3000] __attribute__((used));\n"
              "__thread int other __attribute__((used));\n" + MAIN)
    program = build(tmp_path, source)
    symbol = facts(program, elf.tsd_symbol)
    if found:
        assert (symbol.name, symbol.size) == (name, 3000)
        assert facts(program, elf.has_symtab)
    else:
        assert symbol is None


def test_the_tsd_symbol_of_a_stripped_library_from_its_dynamic_symbols(tmp_path: Path):
    library = build(tmp_path, "__thread char je_tsd_tls[824];\n"
                    "char *f(void) { return je_tsd_tls; }\n", "-shared", "-fPIC", "-s",
                    name="lib")
    assert not facts(library, elf.has_symtab)
    symbol = facts(library, elf.tsd_symbol)
    assert (symbol.name, symbol.size) == ("je_tsd_tls", 824)


def test_the_tsd_symbol_of_an_object_that_is_not_elf64_decoded_by_pyelftools(tmp_path: Path):
    symbol = facts(assemble(tmp_path, "--32"), elf.tsd_symbol)
    assert symbol == elf.Symbol("je_tsd_tls", 16, 3000)


def test_a_thread_local_named_in_bytes_that_are_not_utf8_is_no_tsd(tmp_path: Path):
    source = tmp_path / "bad.s"  # a forged name: read, replaced where not UTF-8, passed over
    source.write_bytes(b'\t.section .tbss,"awT",@nobits\n\t.globl "je\xfftls"\n'
                       b'\t.type "je\xfftls", @object\n\t.size "je\xfftls", 8\n'
                       b'"je\xfftls":\n\t.zero 8\n')
    subprocess.run(["as", "-o", tmp_path / "bad.o", source], check=True)
    assert facts(tmp_path / "bad.o", elf.tsd_symbol) is None


MALLCTLS = """
int je_arrow_mallctl(void) { return 1; }
int mallctl_not(void) { return 2; }
int (*take)(void) = je_arrow_mallctl;
"""


def test_the_mallctl_an_object_defines_gives_its_prefix(tmp_path: Path):
    program = build(tmp_path, MALLCTLS + MAIN)
    assert facts(program, elf.jemalloc_prefix) == "je_arrow_"
    found = facts(program, lambda e: elf.defined_functions(e, {"je_arrow_mallctl", "main",
                                                              "absent"}))
    assert set(found) == {"je_arrow_mallctl", "main"}
    assert all(address and size for address, size in found.values())
    # a name the dynamic string table holds nowhere: looked for in .symtab after it
    assert set(facts(program, lambda e: elf.defined_functions(e, {"je_arrow_mallctl"}))) == {
        "je_arrow_mallctl"}


@pytest.mark.parametrize("source", [
    "extern int mallctl(void); int g(void) { return mallctl(); }\n",  # undefined: another's
    "int mallctl = 5;\n",  # a variable, not a function
    "int je_mallctlx(void) { return 1; }\n",  # not ending in mallctl
])
def test_no_prefix_without_a_defined_mallctl_function(tmp_path: Path, source: str):
    library = build(tmp_path, source, "-shared", "-fPIC", name="lib")
    assert facts(library, elf.jemalloc_prefix) is None


def test_a_local_mallctl_counts_among_names_that_only_contain_it(tmp_path: Path):
    decoys = "".join(f"int v{i}_mallctl_ = {i};\nint d{i}mallctl_x(void) {{ return {i}; }}\n"
                     for i in range(3))
    program = build(tmp_path, decoys + "static int _rjem_mallctl(void) { return 7; }\n"
                    "int (*keep)(void) = _rjem_mallctl;\n" + MAIN)
    assert facts(program, elf.jemalloc_prefix) == "_rjem_"


def string_offset(path: Path, name: str) -> int:
    with open(path, "rb") as stream:
        return stream.read().find(b"\0" + name.encode() + b"\0")


@pytest.mark.parametrize("decoys, prefix", [(elf.MAX_MALLCTL_NAMES - 1, "je_"),
                                            (elf.MAX_MALLCTL_NAMES, None)])
def test_only_so_many_names_ending_in_mallctl_are_looked_at(tmp_path: Path, decoys: int,
                                                            prefix: str | None):
    """Names ending in mallctl before the real one in the string table: past the bound,
    the real one is not looked at (a forged table costs a bounded search)."""
    source = "".join(f"static int x{i:03d}mallctl __attribute__((used)) = {i};\n"
                     for i in range(decoys))
    program = build(tmp_path, source + "int je_mallctl(void) { return 7; }\n"
                    "int (*keep)(void) = je_mallctl;\n" + MAIN)
    real = string_offset(program, "je_mallctl")
    assert all(0 <= string_offset(program, f"x{i:03d}mallctl") < real for i in range(decoys))
    assert facts(program, elf.jemalloc_prefix) == prefix


# -- debug info and debuglink --

def test_debug_info_and_the_debuglink_a_stripped_file_keeps(tmp_path: Path):
    program = build(tmp_path, MAIN, "-g")
    assert facts(program, elf.has_debug_info)
    assert facts(program, elf.debuglink) is None
    debug = tmp_path / "prog.debug.x"  # 12 bytes and a NUL: 3 bytes of padding
    subprocess.run(["objcopy", "--only-keep-debug", program, debug], check=True)
    stripped = tmp_path / "stripped"
    subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={debug}", program,
                    stripped], check=True)
    assert not facts(stripped, elf.has_debug_info)
    assert facts(stripped, elf.debuglink) == (debug.name, zlib.crc32(debug.read_bytes()))
    # 11 bytes and a NUL: no padding; a name not in UTF-8, each such byte replaced
    for name in (b"prog.debugx", b"prog\xff.debug"):
        other = tmp_path / os.fsdecode(name)
        other.write_bytes(debug.read_bytes())
        linked = tmp_path / "linked"
        subprocess.run(["objcopy", "--strip-debug", f"--add-gnu-debuglink={other}", program,
                        linked], check=True)
        assert facts(linked, elf.debuglink) == (name.decode("utf-8", "replace"),
                                                zlib.crc32(debug.read_bytes()))
    assert facts(build(tmp_path, MAIN, name="plain"), elf.has_debug_info) is False


def test_compressed_empty_and_nobits_debug_info(tmp_path: Path):
    program = build(tmp_path, MAIN, "-g")
    zdebug = tmp_path / "zdebug"  # the older GNU compression: .zdebug_info
    subprocess.run(["objcopy", "--compress-debug-sections=zlib-gnu", program, zdebug],
                   check=True)
    assert facts(zdebug, lambda e: e.get_section_by_name(".debug_info")) is None
    assert facts(zdebug, elf.has_debug_info)
    header = section_header(program, ".debug_info")
    for offset, fmt, value, has in ((4, "I", 8, False),  # SHT_NOBITS: no bytes in the file
                                    (32, "Q", 0, False), (32, "Q", 1, True)):  # sh_size
        changed = tmp_path / f"changed-{offset}-{value}"
        changed.write_bytes(program.read_bytes())
        patch(changed, header + offset, fmt, value)
        assert facts(changed, elf.has_debug_info) is has


# -- jemalloc's strings in a file stripped of every symbol --

VERSION = "54eaed1d8b56b1aa528be3bdd1877e59c56fa90c"


@pytest.mark.parametrize("strings, marker, version", [
    (f'"<jemalloc>: oops", "5.3.0-0-g{VERSION}"', True, True),
    ('"<jemalloc>: oops"', True, False),
    (f'"5.3.0-0-g{VERSION}"', False, False),
    (f'"<jemalloc> oops", "4.5.0-0-g{VERSION}"', False, False),
    (f'"<jemalloc>: oops", "3.6.0-0-g{VERSION}"', True, False),
    (f'"<jemalloc>: oops", "5.3.0-0-g{VERSION[:-1]}"', True, False),
])
def test_jemalloc_strings_in_a_stripped_file(tmp_path: Path, strings: str, marker: bool,
                                             version: bool):
    program = build(tmp_path, f"const char *s[] = {{{strings}}};\n"
                    "const char **keep(void) { return s; }\n" + MAIN, "-s")
    with open(program, "rb") as stream:
        assert elf.has_jemalloc_marker(stream) is marker
        assert elf.has_jemalloc_version(stream) is version


# -- TLS relocations --

TLS = """
__thread long pad_a = 3;
__thread long gd_one = 1;
extern __thread long gd_other;
static __thread long gd_local;
__thread long ie_one __attribute__((tls_model("initial-exec")));
long get(void) { return gd_one + gd_other + gd_local + ie_one + pad_a; }
void set(long v) { gd_local = v; }
long (*pointer)(void) = get;  /* a relocation of another kind */
"""


def test_general_dynamic_pairs_of_this_module_only_and_initial_exec_slots(tmp_path: Path):
    library = build(tmp_path, TLS, "-shared", "-fPIC", "-Wl,--unresolved-symbols=ignore-all",
                    name="lib")
    pairs = facts(library, elf.module_tls_pairs)
    value = facts(library, lambda e: {s.name: s["st_value"] for s in
                                      e.get_section_by_name(".symtab").iter_symbols()})
    # gd_one and pad_a by their symbols' values; gd_local (local dynamic) against the
    # module, its offset written into the file: None; gd_other another module's: left out
    assert sorted(pairs.values(), key=lambda v: -1 if v is None else v) == [
        None, *sorted([value["gd_one"], value["pad_a"]])]
    assert value["pad_a"] != value["gd_one"]
    [tpoff] = facts(library, elf.tpoff_relocations)
    assert (tpoff.symbol, tpoff.addend) == ("ie_one", 0)
    assert tpoff.offset not in pairs and tpoff.offset - 8 not in pairs


def rela_entries(path: Path) -> list[tuple[int, int, int]]:
    """(file offset, symbol index, type) of each entry of .rela.dyn."""
    with open(path, "rb") as stream:
        section = elf.open_elf(stream).get_section_by_name(".rela.dyn")
        return [(section["sh_offset"] + 24 * i, r["r_info_sym"], r["r_info_type"])
                for i, r in enumerate(section.iter_relocations())]


def test_a_dtpoff_relocations_addend_and_one_against_the_module(tmp_path: Path):
    """Relocations as a linker may write them, not as gcc does here: an addend, and a
    DTPOFF64 against the module (symbol index 0), its offset the addend alone."""
    library = build(tmp_path, TLS, "-shared", "-fPIC", "-Wl,--unresolved-symbols=ignore-all",
                    name="lib")
    value = facts(library, lambda e: {s.name: s["st_value"] for s in
                                      e.get_section_by_name(".symtab").iter_symbols()})
    dynamic = facts(library, lambda e: [s.name for s in
                                        e.get_section_by_name(".dynsym").iter_symbols()])
    dtpoffs = {dynamic[sym]: at for at, sym, kind in rela_entries(library)
               if kind == elf.R_X86_64_DTPOFF64}
    patch(library, dtpoffs["gd_one"] + 16, "q", 16)  # r_addend
    patch(library, dtpoffs["pad_a"] + 8, "Q", elf.R_X86_64_DTPOFF64)  # r_info: symbol 0
    patch(library, dtpoffs["pad_a"] + 16, "q", 40)
    pairs = facts(library, elf.module_tls_pairs)
    assert sorted(pairs.values(), key=lambda v: -1 if v is None else v) == [
        None, *sorted([value["gd_one"] + 16, 40])]


def test_pairs_are_read_past_another_modules_relocations_in_any_order(tmp_path: Path):
    """A linker may write .rela.dyn in any order: with another module's DTPMOD64 moved to
    the front, this module's pairs are still all read."""
    library = build(tmp_path, TLS, "-shared", "-fPIC", "-Wl,--unresolved-symbols=ignore-all",
                    name="lib")
    before = facts(library, elf.module_tls_pairs)
    dynamic = facts(library, lambda e: [s.name for s in
                                        e.get_section_by_name(".dynsym").iter_symbols()])
    entries = rela_entries(library)
    [other] = [at for at, sym, kind in entries
               if kind == elf.R_X86_64_DTPMOD64 and dynamic[sym] == "gd_other"]
    first = entries[0][0]
    data = bytearray(library.read_bytes())
    data[first:first + 24], data[other:other + 24] = data[other:other + 24], data[first:first + 24]
    library.write_bytes(bytes(data))
    assert rela_entries(library)[0][1:] == (dynamic.index("gd_other"), elf.R_X86_64_DTPMOD64)
    assert facts(library, elf.module_tls_pairs) == before and len(before) == 3


def test_a_string_table_without_its_final_nul_still_names_its_last_symbol(tmp_path: Path):
    """Forged: .strtab cut before its final NUL. The last name runs to the table's end."""
    obj = assemble(tmp_path, "--64")
    with open(obj, "rb") as stream:
        strtab = elf.open_elf(stream).get_section_by_name(".strtab")
        assert strtab.data().endswith(b"\0je_tsd_tls\0")  # the TSD's name is the last
        size = strtab["sh_size"]
    patch(obj, section_header(obj, ".strtab") + 32, "Q", size - 1)  # sh_size
    assert facts(obj, elf.tsd_symbol).name == "je_tsd_tls"


def test_a_function_named_by_any_occurrence_of_its_name_in_the_strings(tmp_path: Path):
    """Forged: `malloc`'s name points into the middle one of three other names ending in
    it (a linker may share a name's tail): every occurrence is looked at."""
    source = "".join(f"void {n}(void) {{}}\n" for n in ("amalloc", "bmalloc", "cmalloc",
                                                          "malloc"))
    library = build(tmp_path, source, "-shared", "-fPIC", "-nostdlib", name="lib")
    subprocess.run(["strip", library], check=True)  # .dynsym alone
    with open(library, "rb") as stream:
        parsed = elf.open_elf(stream)
        table = parsed.get_section_by_name(".dynsym")
        text = parsed.get_section(table["sh_link"]).data()
        [index] = [i for i, s in enumerate(table.iter_symbols()) if s.name == "malloc"]
        address = table.get_symbol(index)["st_value"]
        entry = table["sh_offset"] + index * table["sh_entsize"]
    occurrences = [i for i in range(len(text)) if text.startswith(b"malloc\0", i)]
    assert len(occurrences) >= 3
    patch(library, entry, "I", occurrences[1])  # st_name
    assert facts(library, lambda e: elf.defined_functions(e, {"malloc"}))["malloc"][0] == address
