"""Finding jemalloc's `tsd_s` counter members (and the TSD variable's TLS offset) in DWARF.

Large programs carry thousands of compile units; only jemalloc's own define `tsd_s`.
Units whose source file is one of jemalloc's are searched first, top-level DIEs only
(DW_AT_sibling lets pyelftools skip whole subtrees), then every other unit.
"""

from __future__ import annotations

import os
import struct
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


def _ordered_units(dwarf, sources: frozenset[str] = JEMALLOC_SOURCES,
                   rest: bool = True) -> Iterator[CompileUnit]:
    """Every unit once: those of the named jemalloc `sources` first, then (with `rest`)
    the others in section order."""
    try:
        names = _unit_names(dwarf)
    except (IndexError, ValueError, OverflowError, struct.error):
        names = None  # not plain enough for the fast reader: let pyelftools walk it
    if names is None:
        later = []
        for cu in dwarf.iter_CUs():
            if _is_source(_name(cu.get_top_DIE()), sources):
                yield cu
            else:
                later.append(cu.cu_offset)
        for offset in later if rest else ():
            yield dwarf.get_CU_at(offset)
        return
    later = []
    for offset, name in names:
        if name is _UNKNOWN:  # a form the fast reader leaves to pyelftools
            name = _name(dwarf.get_CU_at(offset).get_top_DIE())
        if _is_source(name, sources):
            yield dwarf.get_CU_at(offset)
        else:
            later.append(offset)
    for offset in later if rest else ():
        yield dwarf.get_CU_at(offset)


def _is_source(name: str | None, sources: frozenset[str]) -> bool:
    return os.path.basename(name or "") in sources


# --- the units' names, straight from the section bytes ----------------------------------
#
# Ordering the units needs only the DW_AT_name of each unit's top DIE. pyelftools gets it by
# parsing the unit's whole abbreviation table through `construct`, which costs about as
# much as the rest of the search together in a program of thousands of units. This reader
# decodes just the unit header, the top DIE's abbreviation and its attributes up to the
# name. It only orders the search: every unit is still searched, through pyelftools, so a
# name it gets wrong or cannot read (_UNKNOWN: a form it leaves alone) costs time, never
# a result.

_UNKNOWN = object()
DW_AT_NAME = 0x03
_FIXED_SIZE = {0x05: 2, 0x06: 4, 0x07: 8, 0x0B: 1, 0x0C: 1, 0x11: 1, 0x12: 2, 0x13: 4,
               0x14: 8, 0x19: 0, 0x1E: 16, 0x20: 8, 0x21: 0, 0x25: 1, 0x26: 2, 0x27: 3,
               0x28: 4, 0x29: 1, 0x2A: 2, 0x2B: 3, 0x2C: 4}
_OFFSET_SIZED = (0x0E, 0x10, 0x17, 0x1F)  # strp, ref_addr (DWARF >= 3), sec_offset, line_strp
_LEB = (0x0D, 0x0F, 0x15, 0x1A, 0x1B)      # sdata, udata, ref_udata, strx, addrx
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")
# type tags that name the type below them: stripped to find a struct, an array or a pointer
_QUALIFIERS = ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
               "DW_TAG_atomic_type")
_SAME_VALUE = (*_QUALIFIERS, "DW_TAG_enumeration_type")  # ... and an integer's value


def _section_bytes(section) -> memoryview | None:
    """A DWARF section's bytes, without a copy: pyelftools (0.29 on) reads each into a
    BytesIO."""
    return section.stream.getbuffer() if section is not None else None


def _uleb(data, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _skip_leb(data, at: int) -> int:
    while data[at] & 0x80:
        at += 1
    return at + 1


def _cstring(data, at: int) -> str:
    end = at
    while data[end]:
        end += 1
    return bytes(data[at:end]).decode("utf-8", "replace")


def _abbrev(abbrevs, at: int, code: int) -> list[tuple[int, int]] | None:
    """The (attribute, form) list of abbreviation `code` in the table at `at`."""
    while True:
        found, at = _uleb(abbrevs, at)
        if found == 0:
            return None
        _, at = _uleb(abbrevs, at)  # tag
        at += 1                     # has children
        specs = []
        while True:
            attribute, at = _uleb(abbrevs, at)
            form, at = _uleb(abbrevs, at)
            if form == 0x21:  # implicit_const: its value sits in the table
                at = _skip_leb(abbrevs, at)
            if attribute == 0 and form == 0:
                break
            specs.append((attribute, form))
        if found == code:
            return specs


def _unit_names(dwarf) -> list[tuple[int, object]] | None:
    """(offset, name) of every unit in .debug_info: a str, None (no name), or _UNKNOWN;
    None when the section is not one this reader handles (big-endian, no abbrevs)."""
    if not dwarf.config.little_endian:
        return None
    info = _section_bytes(dwarf.debug_info_sec)
    abbrevs = _section_bytes(dwarf.debug_abbrev_sec)
    if info is None or abbrevs is None:
        return None
    strings = _section_bytes(dwarf.debug_str_sec)
    line_strings = _section_bytes(dwarf.debug_line_str_sec)
    names = []
    offset, size = 0, len(info)
    while offset + 11 <= size:
        length = _U32.unpack_from(info, offset)[0]
        at, offset_size = offset + 4, 4
        if length == 0xFFFFFFFF:
            length, at, offset_size = _U64.unpack_from(info, at)[0], at + 8, 8
        end = at + length
        if length < 7 or end > size:
            raise ValueError("unit overruns .debug_info")
        version = _U16.unpack_from(info, at)[0]
        at += 2
        unpack_offset = _U32.unpack_from if offset_size == 4 else _U64.unpack_from
        if version >= 5:
            unit_type, address_size = info[at], info[at + 1]
            abbrev_offset = unpack_offset(info, at + 2)[0]
            at += 2 + offset_size
            if unit_type in (0x04, 0x05):      # skeleton, split_compile: dwo_id
                at += 8
            elif unit_type in (0x02, 0x06):    # type, split_type: signature, type offset
                at += 8 + offset_size
        elif version >= 2:
            abbrev_offset = unpack_offset(info, at)[0]
            address_size = info[at + offset_size]
            at += offset_size + 1
        else:
            raise ValueError(f"DWARF version {version}")
        names.append((offset, _top_die_name(info, at, abbrevs, abbrev_offset, version,
                                            offset_size, address_size, strings,
                                            line_strings)))
        offset = end
    return names


def _top_die_name(info, at: int, abbrevs, abbrev_offset: int, version: int, offset_size: int,
                  address_size: int, strings, line_strings) -> object:
    code, at = _uleb(info, at)
    specs = _abbrev(abbrevs, abbrev_offset, code) if code else None
    if specs is None:
        return _UNKNOWN
    for attribute, form in specs:
        if attribute == DW_AT_NAME:
            if form == 0x08:  # string
                return _cstring(info, at)
            if form in (0x0E, 0x1F):  # strp, line_strp
                table = strings if form == 0x0E else line_strings
                if table is None:
                    return _UNKNOWN
                return _cstring(table, (_U32 if offset_size == 4 else _U64).unpack_from(
                    info, at)[0])
            return _UNKNOWN
        if form in _FIXED_SIZE:
            at += _FIXED_SIZE[form]
        elif form in _OFFSET_SIZED:
            at += offset_size if form != 0x10 or version >= 3 else address_size
        elif form in _LEB:
            at = _skip_leb(info, at)
        elif form == 0x01:  # addr
            at += address_size
        elif form == 0x08:
            while info[at]:
                at += 1
            at += 1
        else:  # blocks, indirect, GNU extensions: not worth reading here
            return _UNKNOWN
    return None


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
    """The base type under typedefs, qualifiers and an enumeration's underlying type;
    never through a pointer or an array, which are no counters whatever they point to."""
    for _ in range(16):
        if die.tag == "DW_TAG_base_type":
            return die
        if die.tag not in _SAME_VALUE or "DW_AT_type" not in die.attributes:
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


# --- jemalloc's arena statistics: what survives a thread ---------------------------------

ARENA_SOURCES = frozenset({"jemalloc.c", "arena.c", "tcache.c", "sz.c", "bin_info.c"})
ARENA_VARIABLES = ("arenas", "narenas_total", "nhbins", "sz_index2size_tab",
                   "arena_bin_offsets", "bin_infos", "tcache_bin_alloc_size",
                   "tcache_bin_alloc_alignment")
_PREFIXES = ("je_", "_rjem_je_", "")


def _strip(die: DIE) -> DIE:
    """The type under typedefs and qualifiers."""
    for _ in range(16):
        if die.tag not in _QUALIFIERS or "DW_AT_type" not in die.attributes:
            return die
        die = die.get_DIE_from_attribute("DW_AT_type")
    raise DwarfError("type chain too deep")


def _type(die: DIE) -> DIE:
    if "DW_AT_type" not in die.attributes:
        raise DwarfError(f"{_name(die)} has no type")
    return _strip(die.get_DIE_from_attribute("DW_AT_type"))


def _members(struct: DIE) -> dict[str | None, DIE]:
    return {_name(m): m for m in struct.iter_children() if m.tag == "DW_TAG_member"}


def _find_member(struct: DIE, name: str) -> tuple[int, DIE] | None:
    """(offset, member) of `name` in `struct`, also inside anonymous structs and unions."""
    def offset(member: DIE) -> int:  # a union's members sit at 0, often unsaid
        if struct.tag == "DW_TAG_union_type" and \
                "DW_AT_data_member_location" not in member.attributes:
            return 0
        return _member_offset(member)

    members = _members(struct)
    if name in members:
        return offset(members[name]), members[name]
    for member in struct.iter_children():
        if member.tag == "DW_TAG_member" and _name(member) is None:
            inner = _find_member(_type(member), name)
            if inner is not None:
                return offset(member) + inner[0], inner[1]
    return None


def _member(struct: DIE, path: str) -> tuple[int, DIE]:
    """(offset, stripped type) of a dotted member path, e.g. "stats.lstats"."""
    offset = 0
    for name in path.split("."):
        found = _find_member(struct, name)
        if found is None:
            raise DwarfError(f"struct {_name(struct)} has no member {name}")
        offset += found[0]
        struct = _type(found[1])
    return offset, struct


def _size(die: DIE) -> int:
    attr = die.attributes.get("DW_AT_byte_size")
    if attr is None or not isinstance(attr.value, int):
        raise DwarfError(f"{_name(die) or die.tag} has no size")
    return attr.value


def _count(array: DIE) -> int:
    """Elements of a one-dimensional array type (0 for a flexible array)."""
    if array.tag != "DW_TAG_array_type":
        raise DwarfError(f"{_name(array) or array.tag} is not an array")
    for sub in array.iter_children():
        if sub.tag == "DW_TAG_subrange_type":
            if "DW_AT_count" in sub.attributes:
                return sub.attributes["DW_AT_count"].value
            if "DW_AT_upper_bound" in sub.attributes:
                return sub.attributes["DW_AT_upper_bound"].value + 1
            return 0
    raise DwarfError("array without a subrange")


def _pointee(die: DIE) -> DIE:
    if die.tag != "DW_TAG_pointer_type":
        raise DwarfError(f"{_name(die) or die.tag} is not a pointer")
    return _type(die)


def _variable_address(die: DIE) -> int | None:
    """The link-time address of a statically allocated variable's definition."""
    location = die.attributes.get("DW_AT_location")
    if location is None or isinstance(location.value, int):
        return None
    ops = DWARFExprParser(die.cu.structs).parse_expr(location.value)
    if len(ops) == 1 and ops[0].op_name == "DW_OP_addr":
        return ops[0].args[0]
    return None


def _variable_type(die: DIE) -> DIE:
    """A variable's type, from its declaration when the definition refers to one."""
    if "DW_AT_type" not in die.attributes and "DW_AT_specification" in die.attributes:
        die = die.get_DIE_from_attribute("DW_AT_specification")
    return _type(die)


def _variable_name(die: DIE) -> str | None:
    name = _name(die)
    if name is None and "DW_AT_specification" in die.attributes:
        name = _name(die.get_DIE_from_attribute("DW_AT_specification"))
    return name


def arena_offsets(elf: ELFFile) -> dict[str, int]:
    """Where jemalloc keeps its arena statistics and how they are laid out: the link-time
    addresses of its arena array and size-class tables, and member offsets of arena_t,
    bin_t, the large-class statistics and the thread caches' bins. Searches only
    jemalloc's own units; raises DwarfError when anything is missing."""
    if not elf.has_dwarf_info():
        raise DwarfError("no DWARF")
    wanted = {prefix + name: name for name in ARENA_VARIABLES for prefix in _PREFIXES}
    variables: dict[str, DIE] = {}
    structs: dict[str, DIE] = {}
    for cu in _ordered_units(elf.get_dwarf_info(), ARENA_SOURCES, rest=False):
        for die in cu.get_top_DIE().iter_children():
            if (die.tag == "DW_TAG_structure_type" and _name(die) in ("arena_s", "tsd_s")
                    and "DW_AT_declaration" not in die.attributes):
                structs.setdefault(_name(die), die)
            elif die.tag == "DW_TAG_variable":
                name = wanted.get(_variable_name(die) or "")
                if name and name not in variables and _variable_address(die) is not None:
                    variables[name] = die
        if len(structs) == 2 and len(variables) == len(ARENA_VARIABLES):
            break
    else:
        missing = sorted(set(ARENA_VARIABLES) - set(variables)) + sorted(
            {"arena_s", "tsd_s"} - set(structs))
        raise DwarfError(f"jemalloc's units lack {', '.join(missing)}")
    arena, tsd = structs["arena_s"], structs["tsd_s"]
    found = {name: _variable_address(die) for name, die in variables.items()}
    found.update(arenas_count=_count(_variable_type(variables["arenas"])),
                 nsizes=_count(_variable_type(variables["sz_index2size_tab"])))
    bin_info = _type(_variable_type(variables["bin_infos"]))
    found.update(bin_info_size=_size(bin_info), bin_info_shards=_member(bin_info, "n_shards")[0],
                 bin_info_reg_size=_member(bin_info, "reg_size")[0],
                 bin_info_slab_size=_member(bin_info, "slab_size")[0],
                 bin_info_nregs=_member(bin_info, "nregs")[0],
                 arena_ind=_member(arena, "ind")[0])
    found["arena_internal"] = _member(arena, "stats.internal")[0]
    found["arena_cache_locks"] = _member(arena, "tcache_ql_mtx.prof_data.n_lock_ops")[0]
    found["arena_lstats"], lstats = _member(arena, "stats.lstats")
    large = _type(lstats)
    found.update(nlarge=_count(lstats), lstat_size=_size(large),
                 lstat_nmalloc=_member(large, "nmalloc")[0],
                 lstat_ndalloc=_member(large, "ndalloc")[0],
                 lstat_nrequests=_member(large, "nrequests")[0])
    slow = _find_member(tsd, MANGLE_PREFIX + "tcache_slow") or _find_member(tsd, "tcache_slow")
    if slow is None:
        raise DwarfError("tsd_s has no member tcache_slow")
    found["tsd_descriptor"] = slow[0] + _member(_type(slow[1]), "cache_bin_array_descriptor")[0]
    found["arena_descriptors"], head = _member(arena, "cache_bin_array_descriptor_ql.qlh_first")
    descriptor = _pointee(head)
    found.update(descriptor_next=_member(descriptor, "link.qre_next")[0])
    found["descriptor_bins"], bins_pointer = _member(descriptor, "bins")
    cache_bin = _pointee(bins_pointer)
    found.update(cache_bin_size=_size(cache_bin),
                 cache_bin_head=_member(cache_bin, "stack_head")[0],
                 cache_bin_nrequests=_member(cache_bin, "tstats.nrequests")[0],
                 cache_bin_empty=_member(cache_bin, "low_bits_empty")[0])
    found.update(_health_offsets(arena))
    _, bins = _member(arena, "bins")
    bin_type = _type(bins)
    found.update(bin_size=_size(bin_type),
                 bin_nrequests=_member(bin_type, "stats.nrequests")[0],
                 bin_curregs=_member(bin_type, "stats.curregs")[0])
    return found


# arena_t members ctl.c merges into stats.active, resident, mapped, retained and the arenas'
# pdirty and pmuzzy (pa_shard_basic_stats_merge, pa_shard_stats_merge, pac_mapped)
HEALTH_MEMBERS = {
    "arena_nactive": "pa_shard.nactive",
    "arena_dirty_pages": "pa_shard.pac.ecache_dirty.eset.npages",
    "arena_dirty_guarded_pages": "pa_shard.pac.ecache_dirty.guarded_eset.npages",
    "arena_muzzy_pages": "pa_shard.pac.ecache_muzzy.eset.npages",
    "arena_muzzy_guarded_pages": "pa_shard.pac.ecache_muzzy.guarded_eset.npages",
    "arena_retained_pages": "pa_shard.pac.ecache_retained.eset.npages",
    "arena_retained_guarded_pages": "pa_shard.pac.ecache_retained.guarded_eset.npages",
    "arena_pac_mapped": "stats.pa_shard_stats.pac_stats.pac_mapped",
}


def _health_offsets(arena: DIE) -> dict[str, int]:
    """The offsets of what jemalloc's ctl.c merges into the allocator's health figures:
    the arena_t members above, its `base` pointer and base_t's allocated, resident and
    mapped (base_stats_get). Empty when a member is missing (another jemalloc version):
    the totals do not need them."""
    try:
        found = {name: _member(arena, path)[0] for name, path in HEALTH_MEMBERS.items()}
        found["arena_base"], pointer = _member(arena, "base")
        base = _pointee(pointer)
        found.update(base_allocated=_member(base, "allocated")[0],
                     base_resident=_member(base, "resident")[0],
                     base_mapped=_member(base, "mapped")[0])
    except DwarfError:
        return {}
    return found
