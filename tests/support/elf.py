"""Small ELF helpers (pyelftools) to build and check the fixture variants.

Independent of ctprofd's own ELF code on purpose: the tests check that code
against these.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

BUILD_ID_SECTION = ".note.gnu.build-id"


def section_names(path: Path) -> set[str]:
    """Names of all sections of the ELF file."""
    with open(path, "rb") as f:
        return {s.name for s in ELFFile(f).iter_sections()}


def build_id(path: Path) -> str | None:
    """The NT_GNU_BUILD_ID note as lowercase hex, or None."""
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, NoteSection):
                for note in section.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return note["n_desc"]
    return None


def build_id_path(debug_root: Path, bid: str) -> Path:
    """Where a debug file lives in a build-id tree: <root>/.build-id/xx/rest.debug."""
    return debug_root / ".build-id" / bid[:2] / f"{bid[2:]}.debug"


def debuglink(path: Path) -> tuple[str, int] | None:
    """(file name, CRC32) from the .gnu_debuglink section, or None."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        section = elf.get_section_by_name(".gnu_debuglink")
        if section is None:
            return None
        data = section.data()
        name = data[: data.index(b"\0")].decode()
        crc_at = (len(name) + 1 + 3) & ~3
        (crc,) = struct.unpack_from("<I" if elf.little_endian else ">I", data, crc_at)
        return name, crc


def file_crc32(path: Path) -> int:
    """The CRC32 a .gnu_debuglink records for a debug file (zlib's CRC-32)."""
    return zlib.crc32(Path(path).read_bytes()) & 0xFFFFFFFF


def symbol(path: Path, name: str) -> dict | None:
    """The .symtab entry `name` as {"type", "bind", "value", "size"}, or None."""
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(section, SymbolTableSection):
            return None
        syms = section.get_symbol_by_name(name)
        if not syms:
            return None
        sym = syms[0]
        return {
            "type": sym["st_info"]["type"],
            "bind": sym["st_info"]["bind"],
            "value": sym["st_value"],
            "size": sym["st_size"],
        }


def has_pt_tls(path: Path) -> bool:
    """Whether the object has a PT_TLS segment."""
    with open(path, "rb") as f:
        return any(seg["p_type"] == "PT_TLS" for seg in ELFFile(f).iter_segments())


def pt_tls(path: Path) -> tuple[int, int] | None:
    """(p_memsz, p_align) of the PT_TLS segment, or None."""
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_TLS":
                return seg["p_memsz"], seg["p_align"]
    return None


def set_build_id(path: Path, new_id: bytes) -> None:
    """Overwrite the build-id note's descriptor in place (same length)."""
    with open(path, "r+b") as f:
        elf = ELFFile(f)
        section = elf.get_section_by_name(BUILD_ID_SECTION)
        if section is None:
            raise ValueError(f"{path}: no {BUILD_ID_SECTION}")
        endian = "<" if elf.little_endian else ">"
        namesz, descsz, _ = struct.unpack_from(endian + "III", section.data(), 0)
        if descsz != len(new_id):
            raise ValueError(f"{path}: build-id is {descsz} bytes, not {len(new_id)}")
        desc_at = section["sh_offset"] + 12 + ((namesz + 3) & ~3)
        f.seek(desc_at)
        f.write(new_id)


def set_debuglink_crc(path: Path, crc: int) -> None:
    """Overwrite the CRC32 the .gnu_debuglink section records, in place."""
    with open(path, "r+b") as f:
        elf = ELFFile(f)
        section = elf.get_section_by_name(".gnu_debuglink")
        if section is None:
            raise ValueError(f"{path}: no .gnu_debuglink")
        data = section.data()
        crc_at = (data.index(b"\0") + 1 + 3) & ~3
        f.seek(section["sh_offset"] + crc_at)
        f.write(struct.pack("<I" if elf.little_endian else ">I", crc))
