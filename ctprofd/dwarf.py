"""Finding jemalloc's `tsd_s` counter members (and the TSD variable's TLS offset) in DWARF.

Large programs carry thousands of compile units; only jemalloc's own define `tsd_s`.
Units whose source file is one of jemalloc's are searched first, top-level DIEs only
(DW_AT_sibling lets pyelftools skip whole subtrees), then every other unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarf_expr import DWARFExprParser
from elftools.elf.elffile import ELFFile

MANGLE_PREFIX = "cant_access_tsd_items_directly_use_a_getter_or_setter_"
COUNTERS = ("thread_allocated", "thread_deallocated")
JEMALLOC_SOURCES = frozenset({"tsd.c", "jemalloc.c", "ctl.c", "arena.c", "tcache.c"})
DW_ATE_UNSIGNED = (0x07, 0x08)  # DW_ATE_unsigned, DW_ATE_unsigned_char
TLS_OPS = ("DW_OP_GNU_push_tls_address", "DW_OP_form_tls_address")


class DwarfError(Exception):
    """The DWARF is absent or does not describe a usable tsd_s."""


@dataclass(frozen=True)
class TsdOffsets:
    """Byte offsets of the two counters in tsd_s, and the DWARF names they were found by."""

    allocated: int
    deallocated: int
    allocated_member: str
    deallocated_member: str
    tsd_size: int


def _name(die: DIE) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    if attr is None:
        return None
    value = attr.value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ordered_units(dwarf) -> Iterator[CompileUnit]:
    later = []
    for cu in dwarf.iter_CUs():
        source = os.path.basename(_name(cu.get_top_DIE()) or "")
        if source in JEMALLOC_SOURCES:
            yield cu
        else:
            later.append(cu.cu_offset)
    for offset in later:
        yield dwarf.get_CU_at(offset)


def _member_offset(member: DIE) -> int:
    attr = member.attributes.get("DW_AT_data_member_location")
    if attr is None:
        raise DwarfError(f"member {_name(member)} has no DW_AT_data_member_location")
    if isinstance(attr.value, int):
        return attr.value
    ops = DWARFExprParser(member.cu.structs).parse_expr(attr.value)
    if len(ops) == 1 and ops[0].op_name == "DW_OP_plus_uconst":
        return ops[0].args[0]
    raise DwarfError(f"member {_name(member)} has a computed location")


def _base_type(die: DIE) -> DIE:
    for _ in range(16):
        if die.tag == "DW_TAG_base_type":
            return die
        if "DW_AT_type" not in die.attributes:
            break
        die = die.get_DIE_from_attribute("DW_AT_type")
    raise DwarfError(f"type of {_name(die)} is not a base type")


def _check_counter(member: DIE) -> None:
    base = _base_type(member.get_DIE_from_attribute("DW_AT_type"))
    size = base.attributes["DW_AT_byte_size"].value
    encoding = base.attributes["DW_AT_encoding"].value
    if size != 8 or encoding not in DW_ATE_UNSIGNED:
        raise DwarfError(f"member {_name(member)} is not an 8-byte unsigned integer")


def _offsets_from_struct(struct: DIE) -> TsdOffsets:
    members = {_name(m): m for m in struct.iter_children() if m.tag == "DW_TAG_member"}
    found = []
    for counter in COUNTERS:
        member = members.get(MANGLE_PREFIX + counter) or members.get(counter)
        if member is None:
            raise DwarfError(f"tsd_s has no member {counter}")
        _check_counter(member)
        found.append((_member_offset(member), _name(member)))
    (alloc, alloc_name), (dealloc, dealloc_name) = found
    size = struct.attributes["DW_AT_byte_size"].value
    if not alloc < dealloc <= size - 8:
        raise DwarfError(f"implausible tsd_s layout: allocated at {alloc}, "
                         f"deallocated at {dealloc}, size {size}")
    return TsdOffsets(alloc, dealloc, alloc_name, dealloc_name, size)


def tsd_offsets(elf: ELFFile) -> TsdOffsets:
    """Offsets of thread_allocated/thread_deallocated in the first complete tsd_s."""
    if not elf.has_dwarf_info():
        raise DwarfError("no DWARF")
    for cu in _ordered_units(elf.get_dwarf_info()):
        for die in cu.get_top_DIE().iter_children():
            if (die.tag == "DW_TAG_structure_type" and _name(die) == "tsd_s"
                    and "DW_AT_declaration" not in die.attributes):
                return _offsets_from_struct(die)
    raise DwarfError("no definition of struct tsd_s")


def tls_variable_offset(elf: ELFFile, symbol_names: tuple[str, ...]) -> tuple[str, int]:
    """(name, offset in the module's TLS block) of the TSD variable, from its DW_AT_location;
    for objects whose symbol table was stripped."""
    if not elf.has_dwarf_info():
        raise DwarfError("no DWARF")
    for cu in _ordered_units(elf.get_dwarf_info()):
        for die in cu.get_top_DIE().iter_children():
            location = die.attributes.get("DW_AT_location")
            if die.tag != "DW_TAG_variable" or location is None or isinstance(location.value, int):
                continue
            name = _name(die)
            if name is None and "DW_AT_specification" in die.attributes:
                name = _name(die.get_DIE_from_attribute("DW_AT_specification"))
            if name not in symbol_names:
                continue
            ops = DWARFExprParser(die.cu.structs).parse_expr(location.value)
            if len(ops) == 2 and ops[1].op_name in TLS_OPS and ops[0].args:
                return name, ops[0].args[0]
    raise DwarfError(f"no TLS location for {' or '.join(symbol_names)}")
