"""The dynamic loader's own layouts, read the way debuggers read them: glibc exports, for
libthread_db, a descriptor of every field it needs (`_thread_db_<struct>_<field>`, in
libc.so.6's dynamic symbols since glibc 2.34: three uint32 words, the size in bits, the
count and the offset in bytes), and ld.so exports `_r_debug` (the link map chain) and
`_rtld_global` (the slotinfo list). No glibc offset is written here.

Verified against glibc 2.36 (Debian 12).
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import BinaryIO

from elftools.elf.sections import SymbolTableSection

from . import elf

DESCRIPTORS = ("link_map_l_tls_modid", "link_map_l_tls_offset", "pthread_dtvp", "dtv_dtv",
               "dtv_t_pointer_val", "dtv_t_counter", "rtld_global__dl_tls_dtv_slotinfo_list",
               "dtv_slotinfo_list_len", "dtv_slotinfo_list_next", "dtv_slotinfo_list_slotinfo",
               "dtv_slotinfo_gen", "dtv_slotinfo_map")
SIZES = ("dtv_slotinfo",)  # `_thread_db_sizeof_<struct>`: one uint32, in bytes
SYMBOLS = ("_r_debug", "_rtld_global")
MAX_OFFSET = 1 << 16
_DESCRIPTOR = struct.Struct("<III")


@dataclass(frozen=True)
class Field:
    """One field as a descriptor gives it: its offset and the size of one element."""

    offset: int
    size: int  # bytes of one element

    def at(self, base: int, index: int = 0) -> int:
        return base + self.offset + index * self.size


@dataclass(frozen=True)
class LoaderFacts:
    """What one mapped object of the loader says of itself: libc.so.6 its descriptors,
    ld.so its symbols (link-time addresses; `load_page` is its first loaded page)."""

    fields: dict[str, Field]
    sizes: dict[str, int]
    symbols: dict[str, int]
    load_page: int = 0

    def to_dict(self) -> dict:
        return {"kind": "loader", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LoaderFacts:
        """Inverse of `to_dict`, from the parser worker: raises (KeyError, TypeError,
        ValueError) unless every value is plausible."""
        if data["kind"] != "loader":
            raise ValueError(f"not loader facts: {data['kind']!r}")
        facts = cls({k: Field(**v) for k, v in data["fields"].items()}, dict(data["sizes"]),
                    dict(data["symbols"]), data["load_page"])
        for name, f in facts.fields.items():
            if not (name in DESCRIPTORS and type(f.offset) is int and type(f.size) is int
                    and 0 <= f.offset < MAX_OFFSET and 0 < f.size <= MAX_OFFSET):
                raise ValueError(f"descriptor {name}: implausible")
        if not all(k in SIZES and type(v) is int and 0 < v < MAX_OFFSET
                   for k, v in facts.sizes.items()):
            raise ValueError("implausible struct size")
        if not all(k in SYMBOLS and type(v) is int and 0 <= v < 1 << 48
                   for k, v in list(facts.symbols.items()) + [("_r_debug", facts.load_page)]):
            raise ValueError("implausible symbol")
        return facts


def loader_facts(stream: BinaryIO) -> LoaderFacts:
    """The descriptors and symbols an object exports (none for most objects). Runs in the
    parser worker: the file is the target's."""
    image = elf.open_elf(stream)
    table = image.get_section_by_name(".dynsym")
    fields: dict[str, Field] = {}
    sizes: dict[str, int] = {}
    symbols: dict[str, int] = {}
    if not isinstance(table, SymbolTableSection) or not elf.is_x86_64(image):
        return LoaderFacts(fields, sizes, symbols)
    loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in image.iter_segments("PT_LOAD")]

    def read(address: int, size: int) -> bytes | None:
        for vaddr, offset, filesz in loads:
            if vaddr <= address and address + size <= vaddr + filesz:
                stream.seek(offset + address - vaddr)
                data = stream.read(size)
                return data if len(data) == size else None
        return None

    for symbol in table.iter_symbols():
        name, value = symbol.name, symbol["st_value"]
        if symbol["st_shndx"] == "SHN_UNDEF" or not value:
            continue
        if name in SYMBOLS:
            symbols[name] = value
        elif name.startswith("_thread_db_sizeof_") and name[18:] in SIZES:
            data = read(value, 4)
            if data is not None:
                sizes[name[18:]] = int.from_bytes(data, "little")
        elif name.startswith("_thread_db_") and name[11:] in DESCRIPTORS:
            data = read(value, _DESCRIPTOR.size)
            if data is not None:
                bits, _, offset = _DESCRIPTOR.unpack(data)
                if bits % 8 == 0 and bits:
                    fields[name[11:]] = Field(offset, bits // 8)
    load_page = loads[0][0] & ~0xFFF if loads else 0
    return LoaderFacts(fields, sizes, symbols, load_page)


@dataclass(frozen=True)
class LoaderLayout:
    """A process's loader, placed: where `_r_debug` and `_rtld_global` are in its memory,
    and the glibc fields the DTV walk reads (see probe.dtv)."""

    r_debug: int
    rtld_global: int
    fields: dict[str, Field]
    slotinfo_size: int


def place(libc: LoaderFacts, ld: LoaderFacts, ld_base: int) -> LoaderLayout | str:
    """The layout from libc's descriptors (offsets within glibc's structures, wherever libc
    is mapped) and ld.so's symbols, at the address ld.so is mapped; or why not (what is
    missing)."""
    missing = [n for n in DESCRIPTORS if n not in libc.fields] + [
        n for n in SYMBOLS if n not in ld.symbols] + [n for n in SIZES if n not in libc.sizes]
    if missing:
        return "the loader does not describe " + ", ".join(missing)
    pointers = [n for n in DESCRIPTORS if n not in ("dtv_dtv", "dtv_slotinfo_list_slotinfo")]
    if any(libc.fields[n].size != 8 for n in pointers):
        return "the loader's descriptors are not of 64-bit fields"
    return LoaderLayout(ld_base - ld.load_page + ld.symbols["_r_debug"],
                        ld_base - ld.load_page + ld.symbols["_rtld_global"],
                        libc.fields, libc.sizes["dtv_slotinfo"])
