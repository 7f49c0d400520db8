"""Resolving where a binary keeps jemalloc's counters: the TSD variable's place in its
module's TLS block, and the counters' offsets in tsd_s, from the binary or its debug file.

The result is one of three values, all cacheable per binary:
`TsdLayout` (jemalloc found and understood), `NotJemalloc`, or `LayoutFailure` (a tag).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import BinaryIO

from elftools.common.exceptions import ELFError

from . import dwarf, elf, tags
from .debuginfo import DebugFileNotFound, DebugSearch, find_debug_file

TSD_SYMBOLS = ("je_tsd_tls", "tsd_tls", "_rjem_je_tsd_tls")


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
    dwarf_source: str = "embedded"

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
    """The binary has no recognised jemalloc in it."""

    reason: str = "no jemalloc TSD symbol"

    def to_dict(self) -> dict:
        return {"kind": "not-jemalloc", "reason": self.reason}


@dataclass(frozen=True)
class LayoutFailure:
    """jemalloc is (probably) there but cannot be located: an actionable tag and why."""

    tag: str
    message: str

    def to_dict(self) -> dict:
        return {"kind": "failure", "tag": self.tag, "message": self.message}


Resolution = TsdLayout | NotJemalloc | LayoutFailure


def resolution_from_dict(data: dict) -> Resolution:
    """Inverse of `to_dict`; raises (KeyError, TypeError, ValueError) on malformed input."""
    kind = data["kind"]
    fields = {k: v for k, v in data.items() if k != "kind"}
    if kind == "layout":
        layout = TsdLayout(**fields)
        validate(layout)
        return layout
    if kind == "not-jemalloc":
        return NotJemalloc(**fields)
    if kind == "failure":
        if fields["tag"] not in tags.ACTIONABLE:
            raise ValueError(f"unknown tag {fields['tag']!r}")
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
    if not isinstance(layout.symbol, str) or not isinstance(layout.dwarf_source, str):
        raise ValueError("symbol and dwarf_source must be strings")
    if not layout.allocated_offset < layout.deallocated_offset:
        raise ValueError("thread_deallocated must come after thread_allocated")
    if (layout.static_block_offset is None) == (layout.tpoff_got is None):
        raise ValueError("exactly one of static_block_offset and tpoff_got must be set")


def _offsets(image: elf.ELFFile, what: str) -> dwarf.TsdOffsets:
    try:
        return dwarf.tsd_offsets(image)
    except dwarf.DwarfError as exc:
        raise _Failure(tags.DWARF_PARSE_FAILURE, f"{what}: {exc}") from None


class _Failure(Exception):
    def __init__(self, tag: str, message: str) -> None:
        super().__init__(message)
        self.result = LayoutFailure(tag, message)


def _with_debug_file(image, build_id, object_dirs, search, what, use):
    """Call `use(debug_image, source)` with the object's external debug file."""
    try:
        path, source = find_debug_file(build_id, elf.debuglink(image), object_dirs, search)
    except DebugFileNotFound as exc:
        raise _Failure(tags.DWARF_PARSE_FAILURE, f"{what}: no DWARF: {exc}") from None
    with open(path, "rb") as stream:
        try:
            debug_image = elf.open_elf(stream)
        except (ELFError, ValueError) as exc:
            raise _Failure(tags.DWARF_PARSE_FAILURE, f"{path}: not an ELF file: {exc}") from None
        return use(debug_image, source)


def _is_jemalloc(image, stream, symbol: elf.Symbol | None, shared: bool) -> bool:
    if shared:  # the dynamic symbol table survives stripping
        return elf.exports_mallctl(image) and elf.tls_segment(image) is not None
    if symbol is not None:
        return True
    return not elf.has_symtab(image) and elf.has_jemalloc_marker(stream)


def _tsd_symbol_from_debug(debug_image, symbol: elf.Symbol | None, what: str) -> elf.Symbol:
    """The TSD variable from the object, its debug file's symbols, or its DWARF location."""
    found = symbol or elf.tsd_symbol(debug_image)
    if found is not None:
        return found
    try:
        name, offset = dwarf.tls_variable_offset(debug_image, TSD_SYMBOLS)
    except dwarf.DwarfError as exc:
        raise _Failure(tags.DWARF_PARSE_FAILURE, f"{what}: no TSD symbol: {exc}") from None
    return elf.Symbol(name, offset, 0)


def _tpoff_reloc(image, what: str) -> elf.TpoffReloc:
    """The initial-exec relocation whose GOT slot gives the TSD's offset from the TP."""
    relocs = elf.tpoff_relocations(image)
    for reloc in relocs:
        if reloc.symbol is None or reloc.symbol in TSD_SYMBOLS:
            return reloc
    model = "no initial-exec TLS relocation" if not relocs else "TLS relocations name other symbols"
    raise _Failure(tags.JEMALLOC_IN_DSO, f"{what}: {model}; jemalloc built for dynamic TLS "
                   "(general-dynamic model) is not supported")


def _first_load_page(image) -> int:
    for segment in image.iter_segments("PT_LOAD"):
        return segment["p_vaddr"] & ~0xFFF
    raise _Failure(tags.DWARF_PARSE_FAILURE, "no PT_LOAD segment")


def resolve_object(stream: BinaryIO, what: str, object_dirs: list[str], search: DebugSearch,
                   shared: bool = False) -> Resolution:
    """Resolve jemalloc linked into an executable (static TLS, module 1) or, with `shared`,
    into a shared object loaded at start (initial-exec TLS through a TPOFF64 GOT slot).

    `what` names the binary in messages; `object_dirs` are where its debuglink may point.
    Never raises: a malformed file is a LayoutFailure.
    """
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
            return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{what}: jemalloc but no PT_TLS")
        build_id = elf.build_id(image)
        placement: dict = {"static_block_offset": tls.static_block_offset()}
        if shared:
            reloc = _tpoff_reloc(image, what)
            placement = {"tpoff_got": reloc.offset - _first_load_page(image),
                         "tpoff_addend": reloc.addend,
                         "tpoff_symbolic": reloc.symbol is not None}

        def from_debug(debug_image, source: str) -> TsdLayout:
            found = _tsd_symbol_from_debug(debug_image, symbol, f"{what} ({source})")
            offsets = _offsets(debug_image, f"{what} ({source})")
            return TsdLayout(build_id, found.name, found.value, offsets.allocated,
                             offsets.deallocated, dwarf_source=source, **placement)

        if elf.has_debug_info(image):
            return from_debug(image, "embedded")
        return _with_debug_file(image, build_id, object_dirs, search, what, from_debug)
    except _Failure as failure:
        return failure.result
    except (ELFError, ValueError, KeyError, IndexError, AssertionError, OSError,
            UnicodeDecodeError) as exc:
        return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{what}: malformed ELF: {exc}")


def resolve_path(path: str, search: DebugSearch) -> Resolution:
    """Resolve a file on disk, as a shared library or an executable by its ELF type."""
    with open(path, "rb") as stream:
        try:
            shared = elf.is_shared_library(elf.open_elf(stream))
        except (ELFError, ValueError) as exc:
            return LayoutFailure(tags.DWARF_PARSE_FAILURE, f"{path}: not an ELF file: {exc}")
        stream.seek(0)
        return resolve_object(stream, path, object_dirs_for(path, "/"), search, shared)


def object_dirs_for(exe_path: str, root: str) -> list[str]:
    """Directories a debuglink of `exe_path` may be relative to, also inside the target's
    mount namespace (`root` is /proc/PID/root)."""
    directory = os.path.dirname(exe_path.removesuffix(" (deleted)"))
    return [directory, os.path.join(root, directory.lstrip("/"))]
