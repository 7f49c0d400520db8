"""The TLS arithmetic of x86_64 variant II on synthetic program headers: where module 1's
block sits below the thread pointer, and the TSD's offset from it in either model."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, strategies as st

from ctprofd.report import tags
from ctprofd.resolve import elf, layout as layout_module
from ctprofd.resolve.elf import TlsSegment
from ctprofd.resolve.layout import LayoutFailure, TsdLayout, validate

PT_LOAD, PT_TLS = 1, 7
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")  # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align


def synthetic_elf(*phdrs: tuple[int, int, int, int, int, int]) -> io.BytesIO:
    """An x86_64 ELF with only these program headers, each (p_type, p_offset, p_vaddr,
    p_filesz, p_memsz, p_align); p_paddr is set apart from p_vaddr on purpose."""
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = _EHDR.pack(ident, 2, 62, 1, 0x401000, _EHDR.size, 0, 0, _EHDR.size,
                        _PHDR.size, len(phdrs), 64, 0, 0)
    table = b"".join(_PHDR.pack(kind, 4, offset, vaddr, vaddr + 0x10000, filesz, memsz, align)
                     for kind, offset, vaddr, filesz, memsz, align in phdrs)
    return io.BytesIO(header + table)


def test_tls_segment_reads_vaddr_memsz_and_align_of_the_pt_tls_header():
    image = elf.open_elf(synthetic_elf((PT_LOAD, 0, 0x400000, 0x1000, 0x1000, 0x1000),
                                       (PT_TLS, 0x2e10, 0x3e10, 0x0d, 0xa88, 0x40)))
    assert elf.tls_segment(image) == TlsSegment(vaddr=0x3e10, memsz=0xa88, align=0x40)


def test_no_pt_tls_header_is_no_segment():
    image = elf.open_elf(synthetic_elf((PT_LOAD, 0, 0x400000, 0x1000, 0x1000, 0x1000)))
    assert elf.tls_segment(image) is None


@pytest.mark.parametrize("vaddr, memsz, align, offset", [
    (0x9f6c0, 2632, 8, 2632),      # jemalloc's tsd_tls alone: already a multiple
    (0x3e00, 2696, 64, 2752),      # an aligned(64) variable, odd-sized .tdata/.tbss
    (0x4000, 1, 4096, 4096),       # a tiny block with a page alignment
    (0x3e00, 128, 64, 128),        # a multiple stays put
    (0x3e03, 13, 1, 13),           # alignment 1 (and 0, which means 1): no rounding
    (0x3e03, 13, 0, 13),
    (0x3e10, 100, 64, 112),        # block starts 16 bytes into a 64-byte line: firstbyte 48
    (0x3e10, 10, 64, 48),          # smaller than firstbyte
    (0x3e30, 100, 64, 144),        # firstbyte 16: round_up(84, 64) + 16
])
def test_static_block_offset_is_glibcs_placement(vaddr, memsz, align, offset):
    assert TlsSegment(vaddr, memsz, align).static_block_offset() == offset


@given(vaddr=st.integers(0, 1 << 40), memsz=st.integers(0, 1 << 20),
       align_log2=st.integers(0, 12))
def test_static_block_offset_is_the_nearest_aligned_place_the_block_fits(vaddr, memsz,
                                                                         align_log2):
    """The block ends at the thread pointer (itself aligned to at least `align`), starts
    congruent to its image's vaddr modulo `align`, and wastes less than `align` bytes."""
    align = 1 << align_log2
    offset = TlsSegment(vaddr, memsz, align).static_block_offset()
    assert memsz <= offset < memsz + align
    assert (-offset) % align == vaddr % align


def layout(**placement) -> TsdLayout:
    return TsdLayout("ab", "je_tsd_tls", 16, 824, 840, **placement)


def test_static_tsd_delta_is_the_symbol_above_the_block_start():
    assert layout(static_block_offset=2752).static_tsd_delta() == 16 - 2752


@pytest.mark.parametrize("symbolic, addend, slot, delta", [
    (False, 0, -2632, -2632 + 16),    # against the module: the slot is the block's offset
    (False, 8, -2624, -2632 + 16),    # an addend is in the slot, not in the block offset
    (True, 0, -2616, -2616),          # against the symbol: the slot includes st_value
    (True, 24, -2592, -2616),
])
def test_dso_tsd_delta_from_the_got_slot(symbolic, addend, slot, delta):
    placed = layout(tpoff_got=0x1ff8, tpoff_addend=addend, tpoff_symbolic=symbolic)
    assert placed.dso_tsd_delta(slot) == delta
    assert not placed.in_executable and layout(static_block_offset=0).in_executable


def test_the_got_slot_is_counted_from_the_first_load_segments_page():
    image = elf.open_elf(synthetic_elf((PT_TLS, 0x2e10, 0x3e10, 0x0d, 0xa88, 0x40),
                                       (PT_LOAD, 0, 0x7234, 0x1000, 0x1000, 0x1000),
                                       (PT_LOAD, 0x1000, 0x9000, 0x1000, 0x1000, 0x1000)))
    assert layout_module._first_load_page(image) == 0x7000
    with pytest.raises(layout_module._Failure) as info:
        layout_module._first_load_page(elf.open_elf(
            synthetic_elf((PT_TLS, 0x2e10, 0x3e10, 0x0d, 0xa88, 0x40))))
    assert info.value.result == LayoutFailure(tags.DWARF_PARSE_FAILURE, "no PT_LOAD segment")


VALID = dict(build_id="ab", symbol="je_tsd_tls", symbol_offset=0, allocated_offset=824,
             deallocated_offset=840, static_block_offset=2752)


@pytest.mark.parametrize("change", [
    {}, {"symbol_offset": (1 << 20) - 1}, {"allocated_offset": 0, "deallocated_offset": 1},
    {"deallocated_offset": (1 << 20) - 1}, {"static_block_offset": 0},
    {"static_block_offset": (1 << 40) - 1},
    {"static_block_offset": None, "tpoff_got": 0, "tpoff_addend": -8, "tpoff_symbolic": True},
    {"static_block_offset": None, "tpoff_got": (1 << 40) - 1},
    {"code_source": "code: malloc/free fast paths"},
])
def test_plausible_layouts_are_accepted(change):
    validate(TsdLayout(**{**VALID, **change}))


@pytest.mark.parametrize("change, message", [
    ({"symbol_offset": -1}, "offsets must be integers in [0, 1 MiB)"),
    ({"symbol_offset": 1 << 20}, "offsets must be integers in [0, 1 MiB)"),
    ({"allocated_offset": -1}, "offsets must be integers in [0, 1 MiB)"),
    ({"deallocated_offset": 1 << 20}, "offsets must be integers in [0, 1 MiB)"),
    ({"symbol_offset": True}, "offsets must be integers in [0, 1 MiB)"),
    ({"allocated_offset": 824.0}, "offsets must be integers in [0, 1 MiB)"),
    ({"static_block_offset": -1}, "static_block_offset must be a non-negative integer"),
    ({"static_block_offset": 1 << 40}, "static_block_offset must be a non-negative integer"),
    ({"static_block_offset": 2752.0}, "static_block_offset must be a non-negative integer"),
    ({"static_block_offset": None, "tpoff_got": -1}, "tpoff_got must be a non-negative integer"),
    ({"static_block_offset": None, "tpoff_got": 1 << 40},
     "tpoff_got must be a non-negative integer"),
    ({"tpoff_addend": 1.5}, "tpoff_addend must be an integer and tpoff_symbolic a boolean"),
    ({"tpoff_symbolic": 1}, "tpoff_addend must be an integer and tpoff_symbolic a boolean"),
    ({"symbol": 7}, "symbol and dwarf_source must be strings"),
    ({"dwarf_source": None}, "symbol and dwarf_source must be strings"),
    ({"code_source": 5}, "code_source must be a string or null"),
    ({"deallocated_offset": 824}, "thread_deallocated must come after thread_allocated"),
    ({"tpoff_got": 4096}, "exactly one of static_block_offset, tpoff_got and dynamic_tls must be set"),
    ({"static_block_offset": None}, "exactly one of static_block_offset, tpoff_got and dynamic_tls must be set"),
])
def test_implausible_layouts_are_rejected(change, message):
    with pytest.raises(ValueError) as info:
        validate(TsdLayout(**{**VALID, **change}))
    assert str(info.value) == message
