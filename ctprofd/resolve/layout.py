"""Resolving where a binary keeps jemalloc's counters: the TSD variable's place in its
module's TLS block, and the counters' offsets in tsd_s, from the binary or its debug file.

The result is one of three values, all cacheable per binary:
`TsdLayout` (jemalloc found and understood), `NotJemalloc`, or `LayoutFailure` (a tag).

Two parsing phases, so that they can run in a sandbox fed with open files (parse_worker):
`inspect_object` reads the object's headers and symbols into `ObjectFacts`; then, unless
the layout is already known by build-id, `layout_from_dwarf` reads the DWARF of the object
itself or of the external debug file the caller found and opened in between. When no DWARF
gives the offsets, `layout_from_code` reads them from jemalloc's machine code (x86_64).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import BinaryIO, Callable, Protocol

from elftools.common.exceptions import DWARFError, ELFError
from elftools.construct import ConstructError

from ..report import tags
from . import arena_tables, dwarf, elf, machine_code
from .debuginfo import DebugSearch, ObjectDir, debug_files, stream_crc32

log = logging.getLogger(__name__)
TSD_SYMBOLS = ("je_tsd_tls", "tsd_tls", "_rjem_je_tsd_tls")
BUILD_ID = re.compile(r"^[0-9a-f]{2,128}$")


# The largest size of each record the arena statistics read, in bytes: several times what
# a jemalloc 5.x build has (5.3.0 x86_64: bin_t 224, bin_info_t 40, cache_bin_t 24,
# arena_stats_large_t 48; of these only bin_t holds a lock, which a --enable-debug build
# grows by a witness), so a binary that merely names jemalloc's types cannot make each read
# huge (a 65,016-byte bin_t read 254 MiB per arena).
RECORD_MAX = {"bin": 1024, "bin_info": 256, "cache_bin": 256, "lstat": 256}


# The ArenaLayout members of the allocator's health figures: each arena's words that ctl.c
# merges (arena_stats reads them in this order), then its base allocator's.
HEALTH_ARENA_WORDS = ("arena_nactive", "arena_dirty_pages", "arena_dirty_guarded_pages",
                      "arena_muzzy_pages", "arena_muzzy_guarded_pages", "arena_retained_pages",
                      "arena_retained_guarded_pages", "arena_pac_mapped")
HEALTH_FIELDS = (*HEALTH_ARENA_WORDS, "arena_base", "base_allocated", "base_resident",
                 "base_mapped")


@dataclass(frozen=True)
class ArenaLayout:
    """Where jemalloc keeps its process-wide arena statistics and how they are laid out
    (from DWARF; see arena_stats). Addresses are offsets from the object's first loaded
    page; the rest are member offsets, sizes and counts."""

    arenas: int               # arena_t *arenas[arenas_count]
    arenas_count: int
    narenas_total: int        # unsigned: arenas created so far
    nhbins: int               # unsigned: size classes a thread cache holds
    sz_index2size_tab: int    # size_t[nsizes]: the size of each class
    nsizes: int
    arena_bin_offsets: int    # uint32_t[nbins]: offset of each bin's first shard in arena_t
    bin_infos: int            # bin_info_t[nbins]
    bin_info_size: int
    bin_info_shards: int      # n_shards in bin_info_t
    tcache_bin_alloc_size: int       # size_t: bytes of each thread cache's stacks
    tcache_bin_alloc_alignment: int  # size_t: their alignment
    arena_internal: int       # stats.internal in arena_t
    arena_cache_locks: int    # tcache_ql_mtx's n_lock_ops: caches linked and unlinked
    arena_lstats: int         # stats.lstats: one arena_stats_large_t per large class
    nlarge: int
    lstat_size: int
    lstat_nmalloc: int
    lstat_ndalloc: int
    lstat_nrequests: int
    arena_descriptors: int    # the ring of thread caches' bin arrays
    tsd_descriptor: int       # a thread's own entry in that ring, in its tsd_s
    descriptor_next: int
    descriptor_bins: int
    cache_bin_size: int
    cache_bin_head: int
    cache_bin_nrequests: int
    cache_bin_empty: int
    bin_size: int
    bin_nrequests: int
    bin_curregs: int
    # what the live process is checked against before its statistics are believed (None:
    # a layout cached before these were read; arena_stats checks what it can)
    arena_ind: int | None = None          # arena_t's own index in the arenas array
    bin_info_reg_size: int | None = None  # bin_info_t: region size (= the class size)
    bin_info_slab_size: int | None = None
    bin_info_nregs: int | None = None     # regions per slab
    # what ctl.c merges into stats.active, resident, mapped, retained, metadata and the
    # dirty and muzzy pages (arena_stats.AllocatorHealth); None: a layout without them
    # (from an older ctprofd's offsets file, or a jemalloc that lacks one): no such figures
    arena_nactive: int | None = None        # pa_shard.nactive (pages)
    arena_dirty_pages: int | None = None    # pa_shard.pac.ecache_dirty.eset.npages
    arena_dirty_guarded_pages: int | None = None  # ... .guarded_eset.npages
    arena_muzzy_pages: int | None = None
    arena_muzzy_guarded_pages: int | None = None
    arena_retained_pages: int | None = None
    arena_retained_guarded_pages: int | None = None
    arena_pac_mapped: int | None = None     # stats.pa_shard_stats.pac_stats.pac_mapped
    arena_base: int | None = None           # base_t *base
    base_allocated: int | None = None       # in base_t: size_t allocated, resident, mapped
    base_resident: int | None = None
    base_mapped: int | None = None
    table: str = ""  # the layout table it came from (arena_tables), "" when from DWARF

    @property
    def has_health(self) -> bool:
        """Whether the allocator's health figures can be read with this layout."""
        return all(getattr(self, name) is not None for name in HEALTH_FIELDS)

    @property
    def nbins(self) -> int:
        return self.nsizes - self.nlarge

    def check(self) -> None:
        """Raise ValueError unless every field is plausible."""
        values = [getattr(self, f) for f in self.__dataclass_fields__ if f != "table"]
        if not isinstance(self.table, str) or len(self.table) > 100:
            raise ValueError("arena layout: table must be a short name")
        if not all(type(v) is int and 0 <= v < 1 << 40 for v in values if v is not None):
            raise ValueError("arena layout: offsets must be integers in [0, 2**40)")
        if not (0 < self.nlarge < self.nsizes <= 1024 and 0 < self.arenas_count <= 1 << 16):
            raise ValueError("arena layout: implausible size class or arena counts")
        records = {"lstat": (self.lstat_size, (self.lstat_nmalloc, self.lstat_ndalloc,
                                                self.lstat_nrequests)),
                   "cache_bin": (self.cache_bin_size, (self.cache_bin_head,
                                                      self.cache_bin_nrequests)),
                   "bin": (self.bin_size, (self.bin_nrequests, self.bin_curregs))}
        for name, (size, offsets) in records.items():
            if not (size <= RECORD_MAX[name] and all(o + 8 <= size for o in offsets)
                    and list(offsets) == sorted(set(offsets))):
                raise ValueError(f"arena layout: {name} members outside the record or "
                                 "out of order")
        if not 0 < self.bin_info_size <= RECORD_MAX["bin_info"]:
            raise ValueError(f"arena layout: a bin_info_t of {self.bin_info_size} bytes")
        if not self.cache_bin_nrequests + 8 <= self.cache_bin_empty <= self.cache_bin_size - 2:
            raise ValueError("arena layout: cache_bin members outside the record")
        if self.has_health and not (self.base_allocated + 8 == self.base_resident  # type: ignore[operator]
                                    == self.base_mapped - 8):  # type: ignore[operator]
            raise ValueError("arena layout: base_t's allocated, resident and mapped are not "
                             "three words in a row")


@dataclass(frozen=True)
class TsdLayout:
    """Everything needed to turn a thread pointer into the counters' addresses."""

    build_id: str | None
    symbol: str
    symbol_offset: int            # the TSD variable's offset in its module's TLS block
    allocated_offset: int         # of thread_allocated in tsd_s
    deallocated_offset: int       # of thread_deallocated in tsd_s
    static_block_offset: int | None = None  # executable: module 1's block is this far below TP
    tpoff_got: int | None = None  # shared object: GOT slot (from load base) with the TP offset
    tpoff_addend: int = 0
    tpoff_symbolic: bool = False  # relocation against the symbol: the slot includes symbol_offset
    dynamic_tls: bool = False     # shared object, general-dynamic: the block is behind the DTV
    dwarf_source: str = "embedded"  # how the DWARF was found ("none": offsets from code)
    code_source: str | None = None  # offsets from machine code: which route found them
    arena: ArenaLayout | None = None  # None: only per-thread counters can be read
    arena_missing: str = ""  # why `arena` is None, when the DWARF was searched for it
    # the target's view of the files (debuginfo.ObjectDir.view) its debug file was found
    # in, beside the object; "" when none or ctprofd's own: it is cached for that view only
    view: str = ""

    @property
    def source(self) -> str:
        """Where the offsets came from: `dwarf: HOW` or `code: ROUTE`. Code gives the two
        counters only: no other tsd_s or arena member can be read from such a layout."""
        return f"code: {self.code_source}" if self.code_source else f"dwarf: {self.dwarf_source}"

    @property
    def in_executable(self) -> bool:
        return self.static_block_offset is not None

    def static_tsd_delta(self) -> int:
        """addr(tsd) - fs_base for jemalloc linked into the executable."""
        assert self.static_block_offset is not None
        return self.symbol_offset - self.static_block_offset

    def dso_tsd_delta(self, slot_value: int) -> int:
        """addr(tsd) - fs_base for jemalloc in a shared object, from the GOT slot's value."""
        module_offset = slot_value - self.tpoff_addend
        return module_offset if self.tpoff_symbolic else module_offset + self.symbol_offset

    def to_dict(self) -> dict:
        return {"kind": "layout", **asdict(self)}


@dataclass(frozen=True)
class NotJemalloc:
    """The binary has no recognised jemalloc in it. For a process, `mapped` is a digest of
    the code objects it mapped when they were looked at (None for a file's resolution): a
    module loaded later changes it."""

    reason: str = "no jemalloc TSD symbol"
    mapped: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"kind": "not-jemalloc", "reason": self.reason}


@dataclass(frozen=True)
class LayoutFailure:
    """jemalloc is (probably) there but cannot be located: an actionable tag and why.
    `crashed`: the sandboxed parser timed out, overran a limit or died on the file, which
    is then not parsed again for its machine code. `lost`: the parser worker itself was lost
    (died, stopped answering, could not start) while on the file: not the file's doing, so
    it is retried later and never cached."""

    tag: str
    message: str
    crashed: bool = False
    lost: bool = False
    subject: str = ""  # the object's path the message begins with ("": not known)

    def about(self, what: str) -> LayoutFailure:
        """This failure told of the object at `what`, the path the process asking has it
        at: a failure cached for a file found at another path (a hard link, another mount
        namespace, the path an operator typed at the CLI) names `what` instead."""
        if not self.subject:
            return replace(self, subject=what) if self.message.startswith(what) else self
        if self.subject == what or not self.message.startswith(self.subject):
            return self
        return replace(self, message=what + self.message[len(self.subject):], subject=what)

    def to_dict(self) -> dict:
        return {"kind": "failure", "tag": self.tag, "message": self.message,
                "crashed": self.crashed, "lost": self.lost, "subject": self.subject}


Resolution = TsdLayout | NotJemalloc | LayoutFailure


def resolution_from_dict(data: dict) -> Resolution:
    """Inverse of `to_dict`; raises (KeyError, TypeError, ValueError) on malformed input."""
    kind = data["kind"]
    fields = {k: v for k, v in data.items() if k != "kind"}
    if kind == "layout":
        arena = fields.pop("arena", None)
        layout = TsdLayout(**fields, arena=ArenaLayout(**arena) if arena is not None else None)
        validate(layout)
        return layout
    if kind == "not-jemalloc":
        return NotJemalloc(**fields)
    if kind == "failure":
        if fields["tag"] not in tags.ACTIONABLE:
            raise ValueError(f"unknown tag {fields['tag']!r}")
        if any(type(fields.get(k, False)) is not bool for k in ("crashed", "lost")):
            raise ValueError("crashed and lost must be booleans")
        if type(fields.get("subject", "")) is not str:
            raise ValueError("subject must be a string")
        return LayoutFailure(**fields)
    raise ValueError(f"unknown kind {kind!r}")


def validate(layout: TsdLayout) -> None:
    """Reject layouts no jemalloc could have (from a corrupt cache or offsets file)."""
    ints = (layout.symbol_offset, layout.allocated_offset, layout.deallocated_offset)
    if not all(type(v) is int and 0 <= v < 1 << 20 for v in ints):
        raise ValueError("offsets must be integers in [0, 1 MiB)")
    for name in ("static_block_offset", "tpoff_got"):
        value = getattr(layout, name)
        if value is not None and not (type(value) is int and 0 <= value < 1 << 40):
            raise ValueError(f"{name} must be a non-negative integer")
    if type(layout.tpoff_addend) is not int or type(layout.tpoff_symbolic) is not bool:
        raise ValueError("tpoff_addend must be an integer and tpoff_symbolic a boolean")
    if type(layout.dynamic_tls) is not bool:
        raise ValueError("dynamic_tls must be a boolean")
    if not isinstance(layout.symbol, str) or not isinstance(layout.dwarf_source, str):
        raise ValueError("symbol and dwarf_source must be strings")
    if layout.code_source is not None and not isinstance(layout.code_source, str):
        raise ValueError("code_source must be a string or null")
    if not isinstance(layout.arena_missing, str) or len(layout.arena_missing) > 500:
        raise ValueError("arena_missing must be a short string")
    if not isinstance(layout.view, str) or len(layout.view) > 200:
        raise ValueError("view must be a short string")
    if not layout.allocated_offset < layout.deallocated_offset:
        raise ValueError("thread_deallocated must come after thread_allocated")
    placements = (layout.static_block_offset is not None, layout.tpoff_got is not None,
                  layout.dynamic_tls)
    if sum(placements) != 1:
        raise ValueError("exactly one of static_block_offset, tpoff_got and dynamic_tls "
                         "must be set")
    if layout.arena is not None:
        layout.arena.check()


class _Failure(Exception):
    def __init__(self, tag: str, message: str) -> None:
        super().__init__(message)
        self.result = LayoutFailure(tag, message)


# What pyelftools raises on a malformed file (others, e.g. MemoryError, escape: the sandboxed
# parser in parse_worker turns any exception into a failure).
MALFORMED = (ELFError, DWARFError, ConstructError, ValueError, KeyError, IndexError,
             AssertionError, OSError, OverflowError, NotImplementedError, zlib.error)


@dataclass(frozen=True)
class ObjectFacts:
    """Phase 1's findings in a jemalloc object: where its TLS block is placed, and what
    phase 2 needs to read the counters' offsets from DWARF (its own, or a debug file's)."""

    build_id: str | None
    symbol: elf.Symbol | None       # the TSD variable, when the object's symbol tables have it
    embedded_dwarf: bool
    debuglink: tuple[str, int] | None = None
    static_block_offset: int | None = None
    tpoff_got: int | None = None
    tpoff_addend: int = 0
    tpoff_symbolic: bool = False
    dynamic_tls: bool = False
    load_page: int = 0  # link-time address of the first loaded page

    def placement(self) -> dict:
        """The TsdLayout fields that place the TLS block."""
        return {"static_block_offset": self.static_block_offset, "tpoff_got": self.tpoff_got,
                "tpoff_addend": self.tpoff_addend, "tpoff_symbolic": self.tpoff_symbolic,
                "dynamic_tls": self.dynamic_tls}

    def to_dict(self) -> dict:
        return {"kind": "facts", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ObjectFacts:
        """Inverse of `to_dict`, for facts from another process: raises (KeyError,
        TypeError, ValueError) unless every field is plausible."""
        fields = {k: v for k, v in data.items() if k != "kind"}
        if data["kind"] != "facts":
            raise ValueError(f"not object facts: {data['kind']!r}")
        symbol, link = fields.pop("symbol"), fields.pop("debuglink")
        facts = cls(symbol=elf.Symbol(**symbol) if symbol is not None else None,
                    debuglink=(link[0], link[1]) if link is not None else None, **fields)
        facts.check()
        return facts

    def check(self) -> None:
        """Raise ValueError unless every field is plausible."""
        if self.build_id is not None and not _plausible_build_id(self.build_id):
            raise ValueError("build_id must be 2 to 128 lowercase hex digits")
        if self.debuglink is not None and not (
                _plain_file_name(self.debuglink[0]) and type(self.debuglink[1]) is int
                and 0 <= self.debuglink[1] < 1 << 32):
            raise ValueError("debuglink must be a file name and a CRC32")
        if self.symbol is not None and not (
                isinstance(self.symbol.name, str) and type(self.symbol.value) is int
                and type(self.symbol.size) is int):
            raise ValueError("symbol must be a name, a value and a size")
        if type(self.embedded_dwarf) is not bool:
            raise ValueError("embedded_dwarf must be a boolean")
        if not (type(self.load_page) is int and 0 <= self.load_page < 1 << 48):
            raise ValueError("load_page must be a non-negative integer")
        validate(TsdLayout(None, "", 0, 0, 8, **self.placement()))  # checks the placement


def _plausible_build_id(value: object) -> bool:
    return isinstance(value, str) and BUILD_ID.match(value) is not None


def _plain_file_name(name: object) -> bool:
    """A debuglink names a file, never a path: no way out of the directories searched."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and "/" not in name and "\0" not in name)


def _is_jemalloc(image, stream, symbol: elf.Symbol | None, shared: bool) -> bool:
    """jemalloc by its TSD symbol or its `mallctl` (exported, local or prefixed); failing
    those, in a file stripped of them, by its message prefix (an executable) or by that and
    its version string (a shared object: a library may quote the prefix)."""
    if symbol is not None or elf.jemalloc_prefix(image) is not None:
        return True
    if elf.has_symtab(image) and not shared:
        return False
    return elf.has_jemalloc_version(stream) if shared else elf.has_jemalloc_marker(stream)


def _shared_placement(image, symbol: elf.Symbol | None, what: str) -> dict:
    """Where a shared object's TSD block is: initial-exec (the TPOFF64 GOT slot the loader
    fills) or general-dynamic (behind each thread's DTV, the object's own DTPMOD64 pairs)."""
    relocs = elf.tpoff_relocations(image)
    named = [r for r in relocs if r.symbol is not None and elf.TSD_SYMBOL.match(r.symbol)]
    pairs = elf.module_tls_pairs(image)
    dynamic = bool(pairs) and (symbol is None or symbol.value in pairs.values()
                               or None in pairs.values())
    anonymous = [r for r in relocs if r.symbol is None]
    if named or (anonymous and not (dynamic and symbol is not None
                                    and symbol.value in pairs.values())):
        reloc = (named or anonymous)[0]
        return {"tpoff_got": reloc.offset, "tpoff_addend": reloc.addend,
                "tpoff_symbolic": reloc.symbol is not None}
    if dynamic:
        return {"dynamic_tls": True}
    model = "no TLS relocation" if not relocs else "TLS relocations name other symbols"
    raise _Failure(tags.JEMALLOC_UNREADABLE, f"{what}: jemalloc, but {model} of its own places "
                   "its thread data")


def _first_load_page(image) -> int:
    for segment in image.iter_segments("PT_LOAD"):
        return segment["p_vaddr"] & ~0xFFF
    raise _Failure(tags.DWARF_PARSE_FAILURE, "no PT_LOAD segment")


def inspect_object(stream: BinaryIO, what: str,
                   shared: bool) -> ObjectFacts | NotJemalloc | LayoutFailure:
    """Phase 1: is jemalloc in this executable (static TLS, module 1) or, with `shared`,
    this shared object loaded at start (initial-exec TLS through a TPOFF64 GOT slot), and
    where is its TLS block? Reads no DWARF. `what` names the binary in messages."""
    try:
        image = elf.open_elf(stream)
        symbol = elf.tsd_symbol(image)
        if not _is_jemalloc(image, stream, symbol, shared):
            return NotJemalloc()
        if not elf.is_x86_64(image):
            return LayoutFailure(tags.ARCH_MISMATCH,
                                 f"{what}: {image['e_machine']} ELFCLASS{image.elfclass}, "
                                 "only x86_64 is supported")
        tls = elf.tls_segment(image)
        if tls is None:
            return LayoutFailure(tags.JEMALLOC_UNREADABLE, f"{what}: jemalloc, but no PT_TLS "
                                 "segment holds its thread data")
        build_id = elf.build_id(image)
        link = elf.debuglink(image)
        facts = ObjectFacts(build_id if _plausible_build_id(build_id) else None,
                            symbol, elf.has_debug_info(image),
                            link if link and _plain_file_name(link[0]) else None,
                            load_page=_first_load_page(image))
        if shared:
            placement = _shared_placement(image, symbol, what)
            if "tpoff_got" in placement:
                placement["tpoff_got"] -= facts.load_page
            facts = replace(facts, **placement)
        else:
            facts = replace(facts, static_block_offset=tls.static_block_offset())
        facts.check()
        return facts
    except _Failure as failure:
        return failure.result
    except MALFORMED as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{what}: malformed ELF: {exc}")


def _tsd_symbol_from_dwarf(image, where: str) -> elf.Symbol:
    try:
        name, offset = dwarf.tls_variable_offset(image, TSD_SYMBOLS)
    except dwarf.DwarfError as exc:
        raise _Failure(tags.DWARF_PARSE_FAILURE, f"{where}: no TSD symbol: {exc}") from None
    return elf.Symbol(name, offset, 0)


def layout_from_dwarf(stream: BinaryIO, facts: ObjectFacts, what: str, source: str) -> Resolution:
    """Phase 2: the layout, with the counters' offsets (and the TSD variable, when the
    object's symbols lack it) from the DWARF in `stream`: the object itself when `source`
    is "embedded", else its debug file, found as `source` says."""
    where = what if source == "embedded" else f"{what} ({source})"
    try:
        image = elf.open_elf(stream)
        symbol = facts.symbol or elf.tsd_symbol(image) or _tsd_symbol_from_dwarf(image, where)
        offsets = dwarf.tsd_offsets(image)
        layout = TsdLayout(facts.build_id, symbol.name, symbol.value, offsets.allocated,
                           offsets.deallocated, dwarf_source=source,
                           **_arena_layout(image, facts.load_page), **facts.placement())
        validate(layout)
        return layout
    except _Failure as failure:
        return failure.result
    except dwarf.DwarfError as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{where}: {exc}")
    except MALFORMED as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{where}: malformed ELF: {exc}")


def layout_from_code(stream: BinaryIO, facts: ObjectFacts, what: str) -> Resolution:
    """The layout from jemalloc's machine code in `stream` (the object itself), for when
    no DWARF gives it; a failure's message says what the code showed."""
    try:
        found = machine_code.counter_layout(stream, shared=facts.static_block_offset is None)
    except machine_code.CodeError as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"machine code: {exc}")
    except MALFORMED as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"machine code: malformed ELF: {exc}")
    symbol = facts.symbol
    if symbol is not None and not found.tpoff_symbolic and symbol.value != found.symbol_offset:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"machine code: the fast paths place "
                             f"the TSD at TLS offset {found.symbol_offset}, {symbol.name} is "
                             f"at {symbol.value}")
    layout = TsdLayout(facts.build_id, symbol.name if symbol else "(stripped)",
                       found.symbol_offset, found.allocated_offset, found.deallocated_offset,
                       found.static_block_offset, found.tpoff_got, found.tpoff_addend,
                       found.tpoff_symbolic, found.dynamic_tls, dwarf_source="none",
                       code_source=found.route)
    layout = replace(layout, **_arena_from_table(stream, layout, facts.load_page))
    try:
        validate(layout)
    except ValueError as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"machine code: {exc}")
    return layout


def _arena_from_table(stream: BinaryIO, layout: TsdLayout, load_page: int) -> dict:
    """The TsdLayout fields of the arena statistics' layout for offsets found in machine
    code: from the layout table of the reference build this binary matches
    (arena_tables), or why none applies."""
    try:
        found = arena_tables.arena_fields(elf.open_elf(stream), stream, layout.allocated_offset,
                                          layout.deallocated_offset, load_page)
        names = set(ArenaLayout.__dataclass_fields__)
        arena = ArenaLayout(**{k: v for k, v in found.items() if k in names})
        arena.check()
        return {"arena": arena}
    except arena_tables.TableError as exc:
        return {"arena_missing": str(exc)[:500]}
    except (*MALFORMED, TypeError) as exc:  # the counters' offsets found stand without it
        return {"arena_missing": f"arena layout table: {exc}"[:500]}


def _arena_layout(image, load_page: int) -> dict:
    """The TsdLayout fields of the arena statistics' layout: `arena`, or why there is
    none (`arena_missing`: the DWARF lacks a part of it, and totals are per-thread sums)."""
    try:
        found = dwarf.arena_offsets(image)
        for name in dwarf.ARENA_VARIABLES:
            if found[name] < load_page:
                raise ValueError(f"{name} lies below the first loaded page")
            found[name] -= load_page
        arena = ArenaLayout(**found)
        arena.check()
        return {"arena": arena}
    except (dwarf.DwarfError, *MALFORMED) as exc:
        return {"arena_missing": str(exc)[:500]}


def applies_to(layout: TsdLayout, facts: ObjectFacts) -> bool:
    """Whether a layout learned from another file (same build-id) fits what this file says
    of itself: the build-id, where its PT_TLS header (or TPOFF relocation) puts the TLS
    block and, when its symbols name it, the TSD variable. A build-id alone proves nothing:
    anyone can write any build-id into a file."""
    return (layout.build_id == facts.build_id
            and {name: getattr(layout, name) for name in facts.placement()} == facts.placement()
            and (facts.symbol is None
                 or (facts.symbol.name, facts.symbol.value) == (layout.symbol,
                                                                layout.symbol_offset)))


class Parser(Protocol):
    """Runs the two phases somewhere: in this process, or in a sandbox (parse_worker)."""

    def inspect(self, stream: BinaryIO, what: str,
                shared: bool) -> ObjectFacts | NotJemalloc | LayoutFailure: ...

    def identify(self, stream: BinaryIO, what: str,
                 crc: bool) -> tuple[int | None, str | None] | LayoutFailure: ...

    def layout(self, stream: BinaryIO, facts: ObjectFacts, what: str,
               source: str) -> Resolution: ...

    def code(self, stream: BinaryIO, facts: ObjectFacts, what: str) -> Resolution: ...


class InProcess:
    """The phases run right here: only for files the operator named."""

    inspect = staticmethod(inspect_object)
    layout = staticmethod(layout_from_dwarf)
    code = staticmethod(layout_from_code)

    identify = staticmethod(lambda stream, what, crc: debug_identity(stream, crc))


def debug_identity(stream: BinaryIO, crc: bool) -> tuple[int | None, str | None]:
    """A debug file's CRC32 (when `crc`) and its own build-id (None when it has none or is
    no ELF file)."""
    checksum = stream_crc32(stream) if crc else None
    try:
        found = elf.section_build_id(elf.open_elf(stream))
    except MALFORMED:
        found = None
    return checksum, found if _plausible_build_id(found) else None


def resolve(parser: Parser, stream: BinaryIO, what: str, object_dirs: list[ObjectDir],
            search: DebugSearch, shared: bool = False,
            known: Callable[[ObjectFacts], TsdLayout | None] | None = None) -> Resolution:
    """Both phases: inspect the object, then take a layout already `known` for it (by
    build-id, and shown to apply: see `applies_to`), or read it from its own DWARF or from
    its external debug file (looked for in `object_dirs`, where its debuglink may point,
    and as `search` says), or, when none gives it, from its machine code. Every file is
    opened once and read only by the parser, a debuglink's CRC included."""
    facts = parser.inspect(stream, what, shared)
    owner = os.fstat(stream.fileno()).st_uid
    if not isinstance(facts, ObjectFacts):
        return facts
    if known is not None and facts.build_id and (found := known(facts)) is not None:
        return found
    if facts.embedded_dwarf:
        result = parser.layout(stream, facts, what, "embedded")
    else:
        result = _layout_from_debug_files(parser, facts, what, object_dirs, search, owner)
    if not (isinstance(result, LayoutFailure) and result.tag == tags.DWARF_PARSE_FAILURE
            and not result.crashed):
        return result
    from_code = parser.code(stream, facts, what)
    if isinstance(from_code, LayoutFailure):
        return LayoutFailure(result.tag, f"{result.message}; {from_code.message}",
                             lost=from_code.lost)
    log.info("%s; offsets from %s", result.message, from_code.source)
    return from_code


def _layout_from_debug_files(parser: Parser, facts: ObjectFacts, what: str,
                             object_dirs: list[ObjectDir], search: DebugSearch,
                             owner: int) -> Resolution:
    """The layout from the first external debug file found that is the object's: its own
    build-id equal to the object's, and a debuglink's CRC matching."""
    tried: list[str] = []
    for candidate in debug_files(facts.build_id, facts.debuglink, object_dirs, search, tried,
                                 owner):
        with candidate.stream:
            identity = parser.identify(candidate.stream, what, candidate.crc is not None)
            if isinstance(identity, LayoutFailure):
                return identity
            crc, build_id = identity
            if crc != candidate.crc:
                tried.append(f"{candidate.source}: CRC mismatch")
                continue
            if build_id != facts.build_id:
                tried.append(f"{candidate.source}: refused: its build-id {build_id or '(none)'} "
                             f"is not {what}'s {facts.build_id or '(none)'}")
                continue
            result = parser.layout(candidate.stream, facts, what, candidate.source)
            return (replace(result, view=candidate.view)
                    if isinstance(result, TsdLayout) and candidate.view else result)
    return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{what}: no DWARF: {'; '.join(tried)}")


def resolve_object(stream: BinaryIO, what: str, object_dirs: list[ObjectDir], search: DebugSearch,
                   shared: bool = False) -> Resolution:
    """`resolve` in this process. Never raises for a malformed file: a LayoutFailure."""
    return resolve(InProcess(), stream, what, object_dirs, search, shared)


def resolve_path(path: str, search: DebugSearch) -> Resolution:
    """Resolve a file on disk, as a shared library or an executable by its ELF type, in
    this process (for tests and tools; `ctprofd offsets BINARY` goes through the
    sandboxed worker and the cache: Attacher.resolve_file)."""
    with open(path, "rb") as stream:
        try:
            shared = elf.is_shared_library(elf.open_elf(stream))
        except (ELFError, ValueError) as exc:
            return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{path}: not an ELF file: {exc}")
        stream.seek(0)
        return resolve_object(stream, path, object_dirs_for(path, "/"), search, shared)


def object_dirs_for(exe_path: str, root: str, view: str = "") -> list[ObjectDir]:
    """The directory a debuglink of `exe_path` may be relative to, as seen from `root`
    (the target's, /proc/PID/root: it may live in another mount namespace, named `view`)."""
    return [ObjectDir(root, os.path.dirname(exe_path), view)]  # " (deleted)" is in the name
