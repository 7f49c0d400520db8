"""Facts about one ELF object that locating jemalloc's TSD needs: build-id, PT_TLS,
the TSD symbol, debuglink, TLS relocations. Pure reads of an open file."""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import StringTableSection, SymbolTableSection

TSD_SYMBOL = re.compile(r"^(?:\w*_)?tsd_tls$")  # tsd_tls, je_tsd_tls, _rjem_je_tsd_tls, …
MALLCTL_SYMBOL = re.compile(r"^(?:\w*_)?mallctl$")
# strings ending in mallctl looked at per symbol table (jemalloc has one or two): each symbol
# is checked against every one of them
MAX_MALLCTL_NAMES = 64
JEMALLOC_MARKER = b"<jemalloc>: "
JEMALLOC_VERSION = re.compile(rb"[45]\.\d+\.\d+-\d+-g[0-9a-f]{40}")  # mallctl("version")
R_X86_64_DTPMOD64 = 16
R_X86_64_DTPOFF64 = 17
R_X86_64_TPOFF64 = 18
STT_FUNC = 2
STT_TLS = 6
_ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size


@dataclass(frozen=True)
class TlsSegment:
    """The PT_TLS program header: where the module's TLS block image lives and its size."""

    vaddr: int
    memsz: int
    align: int

    def static_block_offset(self) -> int:
        """Distance below the thread pointer of module 1's TLS block (x86_64 variant II),
        as glibc computes it: round_up(memsz - firstbyte, align) + firstbyte."""
        align = max(self.align, 1)
        firstbyte = (-self.vaddr) & (align - 1)
        return -(-(self.memsz - firstbyte) // align) * align + firstbyte


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int


@dataclass(frozen=True)
class TpoffReloc:
    """An R_X86_64_TPOFF64 relocation: the GOT slot the loader fills with a TP offset."""

    offset: int
    symbol: str | None  # None when against the module (symbol index 0)
    addend: int


def open_elf(stream: BinaryIO) -> ELFFile:
    """Parse the ELF header; raises ELFError or ValueError for a non-ELF file."""
    return ELFFile(stream)


def is_x86_64(elf: ELFFile) -> bool:
    return elf.elfclass == 64 and elf["e_machine"] == "EM_X86_64"


def is_shared_library(elf: ELFFile) -> bool:
    """ET_DYN without an interpreter: a library, not a PIE executable."""
    return elf["e_type"] == "ET_DYN" and not any(True for _ in elf.iter_segments("PT_INTERP"))


def build_id(elf: ELFFile) -> str | None:
    """NT_GNU_BUILD_ID as lowercase hex, from the note segments or else the note sections;
    None when neither has one."""
    for segment in elf.iter_segments("PT_NOTE"):
        for note in segment.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID":
                return note["n_desc"]
    return section_build_id(elf)


def section_build_id(elf: ELFFile) -> str | None:
    """NT_GNU_BUILD_ID from the note sections only, as lowercase hex, or None: a debug file
    (objcopy --only-keep-debug) keeps its program headers but not what they point at."""
    for section in elf.iter_sections("SHT_NOTE"):
        for note in section.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID":
                return note["n_desc"]
    return None


def tls_segment(elf: ELFFile) -> TlsSegment | None:
    for segment in elf.iter_segments("PT_TLS"):
        return TlsSegment(segment["p_vaddr"], segment["p_memsz"], segment["p_align"])
    return None


def _symbol_tables(elf: ELFFile) -> list[SymbolTableSection]:
    return [s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)
            and s["sh_type"] in ("SHT_SYMTAB", "SHT_DYNSYM")]


def has_symtab(elf: ELFFile) -> bool:
    return elf.get_section_by_name(".symtab") is not None


def tsd_symbol(elf: ELFFile) -> Symbol | None:
    """jemalloc's thread-local TSD variable, from .symtab or .dynsym."""
    for table in _symbol_tables(elf):
        found = _tls_symbols_elf64le(elf, table)
        if found is None:  # not ELF64 little-endian: let pyelftools decode every symbol
            found = (Symbol(s.name, s["st_value"], s["st_size"]) for s in table.iter_symbols()
                     if s["st_info"]["type"] == "STT_TLS")
        for symbol in found:
            if TSD_SYMBOL.match(symbol.name):
                return symbol
    return None


def _elf64le(elf: ELFFile, table: SymbolTableSection) -> tuple[bytes, Iterator[tuple]] | None:
    """A symbol table's string table and its raw entries (st_name, st_info, st_other,
    st_shndx, st_value, st_size), for ELF64 little-endian; None otherwise. Decoding the raw
    entries is what keeps a large program's .symtab (a hundred thousand entries, seconds in
    pyelftools) cheap."""
    if elf.elfclass != 64 or not elf.little_endian or table["sh_entsize"] != _ELF64_SYM.size:
        return None
    strings = elf.get_section(table["sh_link"])
    if not isinstance(strings, StringTableSection):
        return None
    data = table.data()
    return strings.data(), _ELF64_SYM.iter_unpack(data[:len(data) - len(data) % _ELF64_SYM.size])


def _tls_symbols_elf64le(elf: ELFFile, table: SymbolTableSection) -> list[Symbol] | None:
    """The STT_TLS symbols of a table, decoding only those; None when not ELF64 LE."""
    raw = _elf64le(elf, table)
    if raw is None:
        return None
    text, rows = raw
    return [Symbol(_string_at(text, name), value, size)
            for name, info, _, _, value, size in rows if info & 0xF == STT_TLS]


def _string_at(text: bytes, offset: int) -> str:
    end = text.find(b"\0", offset)
    return text[offset:end if end >= 0 else len(text)].decode("utf-8", "replace")


def defined_functions(elf: ELFFile, names: set[str]) -> dict[str, tuple[int, int]]:
    """(address, size) of the defined functions called `names`, from .dynsym and .symtab.
    ELF64 little-endian only. Decodes only the symbols whose name is one of them: the string
    table is searched first."""
    found: dict[str, tuple[int, int]] = {}
    for table in _symbol_tables(elf):
        raw = _elf64le(elf, table)
        if raw is None:
            continue
        text, rows = raw
        wanted = {}
        for name in names:
            needle = name.encode() + b"\0"
            at = text.find(needle)
            while at >= 0:
                wanted[at] = name
                at = text.find(needle, at + 1)
        if not wanted:
            continue
        for st_name, info, _, shndx, value, size in rows:
            if st_name in wanted and info & 0xF == STT_FUNC and shndx != 0 and value:
                found.setdefault(wanted[st_name], (value, size))
    return found


def jemalloc_prefix(elf: ELFFile) -> str | None:
    """The prefix of the `mallctl` function the object defines, exported or local (e.g.
    '' for Debian's library, 'je_arrow_' inside pyarrow's libarrow, '_rjem_' in Rust's
    tikv-jemalloc-sys), from .dynsym or .symtab; None when it defines none. ELF64
    little-endian only; only the names ending in `mallctl` are decoded."""
    for table in _symbol_tables(elf):
        raw = _elf64le(elf, table)
        if raw is None:
            continue
        text, rows = raw
        ends: list[tuple[int, int]] = []  # [start, end) of every string ending in mallctl
        at = text.find(b"mallctl\0")
        while at >= 0 and len(ends) < MAX_MALLCTL_NAMES:
            ends.append((text.rfind(b"\0", 0, at) + 1, at))
            at = text.find(b"mallctl\0", at + 1)
        if not ends:
            continue
        for st_name, info, _, shndx, value, _ in rows:
            if (info & 0xF == STT_FUNC and shndx != 0 and value
                    and any(start <= st_name <= end for start, end in ends)):
                name = _string_at(text, st_name)
                if MALLCTL_SYMBOL.match(name):
                    return name.removesuffix("mallctl")
    return None


def has_jemalloc_marker(stream: BinaryIO) -> bool:
    """jemalloc's message prefix is in the file: a stripped binary may still be jemalloc."""
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return view.find(JEMALLOC_MARKER) >= 0


def has_jemalloc_version(stream: BinaryIO) -> bool:
    """jemalloc's message prefix and a version string as `mallctl("version")` returns it
    (`5.3.0-0-g54eaed1…`) are both in the file: jemalloc, stripped of every symbol."""
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return view.find(JEMALLOC_MARKER) >= 0 and JEMALLOC_VERSION.search(view) is not None


def has_debug_info(elf: ELFFile) -> bool:
    section = elf.get_section_by_name(".debug_info") or elf.get_section_by_name(".zdebug_info")
    return section is not None and section["sh_type"] != "SHT_NOBITS" and section["sh_size"] > 0


def debuglink(elf: ELFFile) -> tuple[str, int] | None:
    """The .gnu_debuglink file name and its CRC32, or None."""
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None:
        return None
    data = section.data()
    name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    crc_at = (len(name) + 1 + 3) & ~3
    return name, int.from_bytes(data[crc_at:crc_at + 4], "little")


def _linked_symbols(elf: ELFFile, section) -> SymbolTableSection | None:
    """The symbol table a relocation section names, or None (none, or not a symbol table:
    a crafted sh_link)."""
    linked = elf.get_section(section["sh_link"]) if section["sh_link"] else None
    return linked if isinstance(linked, SymbolTableSection) else None


def module_tls_pairs(elf: ELFFile) -> dict[int, int | None]:
    """General-dynamic TLS: the GOT pairs whose first word an R_X86_64_DTPMOD64
    relocation fills with this object's own module id, mapped to the offset in the
    module's block that the second word holds: from the R_X86_64_DTPOFF64 relocation
    there (symbol value + addend), or None when the linker wrote it into the file (a
    local symbol) and the caller reads it there. Pairs naming a symbol the object does
    not define belong to another module and are left out."""
    modules: dict[int, int | None] = {}
    offsets: dict[int, int] = {}
    for section in elf.iter_sections("SHT_RELA"):
        symtab = _linked_symbols(elf, section)
        for rel in section.iter_relocations():
            kind, index = rel["r_info_type"], rel["r_info_sym"]
            if kind not in (R_X86_64_DTPMOD64, R_X86_64_DTPOFF64):
                continue
            symbol = symtab.get_symbol(index) if index and symtab is not None else None
            if index and (symbol is None or symbol["st_shndx"] == "SHN_UNDEF"):
                continue
            if kind == R_X86_64_DTPMOD64:
                modules[rel["r_offset"]] = None
            else:
                offsets[rel["r_offset"]] = (symbol["st_value"] if symbol else 0) + rel["r_addend"]
    return {slot: offsets.get(slot + 8) for slot in modules}


def tpoff_relocations(elf: ELFFile) -> list[TpoffReloc]:
    """R_X86_64_TPOFF64 dynamic relocations (initial-exec TLS accesses)."""
    relocs = []
    for section in elf.iter_sections("SHT_RELA"):
        symtab = _linked_symbols(elf, section)
        for rel in section.iter_relocations():
            if rel["r_info_type"] != R_X86_64_TPOFF64:
                continue
            index = rel["r_info_sym"]
            name = symtab.get_symbol(index).name if index and symtab is not None else None
            relocs.append(TpoffReloc(rel["r_offset"], name or None, rel["r_addend"]))
    return relocs
