"""TLS relocations read from a crafted object: a relocation section whose sh_link names
something other than a symbol table is read as having no symbols, not as a crash."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

from ctprofd.resolve import elf

SOURCE = """
__thread int dynamic_one;
__thread int initial_one __attribute__((tls_model("initial-exec")));
int get(void) { return dynamic_one + initial_one; }
"""


def tls_object(directory: Path) -> Path:
    (directory / "tls.c").write_text(SOURCE)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", directory / "tls.so",
                    directory / "tls.c"], check=True)
    return directory / "tls.so"


def relink_relocations(path: Path, target: str) -> None:
    """Point every SHT_RELA section's sh_link at the section named `target`."""
    with open(path, "rb") as f:
        parsed = ELFFile(f)
        shoff, shentsize = parsed["e_shoff"], parsed["e_shentsize"]
        index = next(i for i, s in enumerate(parsed.iter_sections()) if s.name == target)
        relas = [i for i, s in enumerate(parsed.iter_sections()) if s["sh_type"] == "SHT_RELA"]
    data = bytearray(path.read_bytes())
    for i in relas:
        struct.pack_into("<I", data, shoff + i * shentsize + 40, index)  # Elf64_Shdr.sh_link
    path.write_bytes(bytes(data))


def read(path: Path) -> tuple[dict, list]:
    with open(path, "rb") as f:
        parsed = elf.open_elf(f)
        return elf.module_tls_pairs(parsed), elf.tpoff_relocations(parsed)


def test_both_kinds_are_found(tmp_path):
    pairs, tpoffs = read(tls_object(tmp_path))
    assert pairs and tpoffs


def test_a_sh_link_to_a_section_that_is_no_symbol_table(tmp_path):
    path = tls_object(tmp_path)
    relink_relocations(path, ".text")
    pairs, tpoffs = read(path)  # raised AttributeError: 'Section' has no get_symbol
    assert tpoffs and all(r.symbol is None for r in tpoffs)
    assert isinstance(pairs, dict)
