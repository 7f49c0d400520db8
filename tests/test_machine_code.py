"""Offsets from jemalloc's machine code: against the DWARF of the same build, on Debian's
stock stripped libjemalloc.so.2, and refusals on small objects assembled here whose fast
paths have almost the right shape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ctprofd.report import tags
from ctprofd.resolve import machine_code
from ctprofd.resolve.debuginfo import DebugSearch
from ctprofd.resolve.layout import (LayoutFailure, ObjectFacts, TsdLayout, inspect_object,
                                    layout_from_code, layout_from_dwarf, resolve_path)

STOCK_LIBJEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
VERSION = b"5.3.0-0-g54eaed1d8b56b1aa528be3bdd1877e59c56fa90c"


def facts_of(path: Path, shared: bool) -> ObjectFacts:
    with open(path, "rb") as stream:
        facts = inspect_object(stream, str(path), shared)
    assert isinstance(facts, ObjectFacts), facts
    return facts


def from_code(path: Path, shared: bool):
    with open(path, "rb") as stream:
        return layout_from_code(stream, facts_of(path, shared), str(path))


def tpoff_slots(path: Path) -> list[int]:
    """r_offset of every R_X86_64_TPOFF64 relocation, read with readelf."""
    out = subprocess.run(["readelf", "-rW", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [int(line.split()[0], 16) for line in out.splitlines() if "R_X86_64_TPOFF64" in line]


@pytest.mark.parametrize("variant", ["static", "dynamic"])
def test_code_gives_what_dwarf_gives(fixture_bins, variant):
    """The same unstripped object, resolved both ways: identical placement and offsets."""
    obj = fixture_bins[variant].jemalloc_object
    shared = variant == "dynamic"
    facts = facts_of(obj, shared)
    with open(obj, "rb") as stream:
        dwarf = layout_from_dwarf(stream, facts, str(obj), "embedded")
    code = from_code(obj, shared)
    assert isinstance(dwarf, TsdLayout) and isinstance(code, TsdLayout), (dwarf, code)
    assert code.source == "code: malloc/free fast paths"
    keep = ("symbol", "symbol_offset", "allocated_offset", "deallocated_offset",
            "static_block_offset", "tpoff_got", "tpoff_addend", "tpoff_symbolic")
    assert {k: getattr(code, k) for k in keep} == {k: getattr(dwarf, k) for k in keep}


def test_stock_libjemalloc_from_code(jemalloc_dir):
    """Debian's stripped libjemalloc2: no DWARF here, offsets from its fast paths, equal to
    the DWARF offsets of the same jemalloc version built from Debian's source."""
    result = resolve_path(str(STOCK_LIBJEMALLOC), DebugSearch(()))
    assert isinstance(result, TsdLayout), result
    assert result.source == "code: malloc/free fast paths"
    assert result.dwarf_source == "none"
    [slot] = tpoff_slots(STOCK_LIBJEMALLOC)
    assert result.tpoff_got == slot  # the first PT_LOAD of libjemalloc is at 0
    debug = resolve_path(str(jemalloc_dir / "lib/libjemalloc.so.2"), DebugSearch(()))
    assert isinstance(debug, TsdLayout) and debug.dwarf_source == "embedded"
    assert (result.allocated_offset, result.deallocated_offset) == (
        debug.allocated_offset, debug.deallocated_offset)
    assert VERSION in STOCK_LIBJEMALLOC.read_bytes()


def test_scan_finds_the_stock_fast_paths_without_symbols():
    """The symbol-less route on a real object: the same answer as the entry points."""
    with open(STOCK_LIBJEMALLOC, "rb") as stream:
        scanned = machine_code.counter_layout(stream, shared=True, scan=True)
        stream.seek(0)
        entry = machine_code.counter_layout(stream, shared=True)
    assert scanned.route == "scan of the executable segment"
    assert entry.route == "malloc/free fast paths"
    [slot] = tpoff_slots(STOCK_LIBJEMALLOC)
    assert scanned.tpoff_got == entry.tpoff_got == slot
    assert (scanned.allocated_offset, scanned.deallocated_offset) == (824, 840)
    assert (entry.allocated_offset, entry.deallocated_offset) == (824, 840)


# --- small objects, assembled here ------------------------------------------------------

FAST_PATH = """
    .globl {name}
    .type {name}, @function
{name}:
    movq {anchor}, %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdi, %rdx
    cmpq %fs:{next}(%rcx), %rdx
    jae 1f
    movq %rdx, %fs:{offset}(%rcx)
1:  ret
    .size {name}, .-{name}
"""
GOT = "tsd@gottpoff(%rip)"
OTHER_GOT = "other@gottpoff(%rip)"


def assemble(tmp_path: Path, functions: list[tuple[str, str, int, int]],
             version: bytes = VERSION, exported: bool = True, extra: str = "") -> Path:
    """A shared object whose functions (name, anchor, counter offset, compared offset)
    have the fast-path shape, a 2632-byte TLS block `tsd` (and `other`), jemalloc's
    version string, and an exported `mallctl` (which makes it jemalloc to inspect_object)."""
    source = ['    .section .tbss,"awT",@nobits', "    .p2align 3", "tsd: .zero 2632",
              "other: .zero 64", "    .section .rodata", f'    .ascii "{version.decode()}"',
              "    .text", "    .globl mallctl", "    .type mallctl, @function", "mallctl: ret",
              "    .size mallctl, .-mallctl"]
    for name, anchor, offset, compared in functions:
        text = FAST_PATH.format(name=name, anchor=anchor, offset=offset, next=compared)
        source.append(text if exported else text.replace(f".globl {name}", f".local {name}"))
    source.append(extra)
    asm = tmp_path / "fast.s"
    asm.write_text("\n".join(source) + "\n")
    out = tmp_path / "libfast.so"
    subprocess.run(["gcc", "-shared", "-nostdlib", "-Wl,--build-id", "-o", out, asm],
                   check=True)
    if not exported:
        subprocess.run(["strip", out], check=True)
    return out


def code_of(lib: Path):
    """layout_from_code on an assembled shared object (not jemalloc enough for
    inspect_object: no mallctl)."""
    with open(lib, "rb") as stream:
        return layout_from_code(stream, ObjectFacts(None, None, False, tpoff_got=0), str(lib))


def refused(path: Path, *words: str) -> None:
    result = code_of(path)
    assert isinstance(result, LayoutFailure), result
    assert result.tag == tags.DWARF_PARSE_FAILURE
    for word in words:
        assert word in result.message, result.message


def test_assembled_fast_paths_are_read(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340), ("free", GOT, 0x348, 0x350)])
    result = code_of(lib)
    [slot] = tpoff_slots(lib)
    assert isinstance(result, TsdLayout), result
    assert (result.allocated_offset, result.deallocated_offset, result.tpoff_got) == (
        0x338, 0x348, slot)


def test_scan_reads_unexported_fast_paths(tmp_path):
    lib = assemble(tmp_path, [("je_malloc", GOT, 0x338, 0x340), ("je_free", GOT, 0x348, 0x350)],
                   exported=False)
    result = code_of(lib)
    assert isinstance(result, TsdLayout), result
    assert result.source == "code: scan of the executable segment"
    assert (result.allocated_offset, result.deallocated_offset) == (0x338, 0x348)


def test_fast_paths_that_disagree_on_the_anchor_are_refused(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340),
                              ("free", OTHER_GOT, 0x348, 0x350)])
    refused(lib, "disagree on the TLS anchor")


def test_refusal_names_the_dwarf_search_and_the_code(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340),
                              ("free", OTHER_GOT, 0x348, 0x350)])
    result = resolve_path(str(lib), DebugSearch((str(tmp_path / "empty"),)))
    assert isinstance(result, LayoutFailure), result
    assert result.tag == tags.DWARF_PARSE_FAILURE
    assert "no DWARF" in result.message
    assert "machine code: the fast paths disagree on the TLS anchor" in result.message


def test_counters_not_16_bytes_apart_are_refused(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340), ("free", GOT, 0x358, 0x360)])
    refused(lib, "not 16 bytes apart")


def test_compare_with_another_field_is_no_shape(tmp_path):
    """A compare 16 bytes above instead of 8: not the next-event field, so no counter;
    the scan that follows finds nothing either."""
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x348), ("free", GOT, 0x348, 0x358)])
    refused(lib, "scan of the code found 0 counter pairs")


def test_scan_needs_the_version_string(tmp_path):
    lib = assemble(tmp_path, [("je_malloc", GOT, 0x338, 0x340), ("je_free", GOT, 0x348, 0x350)],
                   version=b"4.5.0-0-g0000000000000000000000000000000000000000", exported=False)
    refused(lib, "no jemalloc 5.3 version string")


def test_two_candidate_pairs_in_a_scan_are_refused(tmp_path):
    lib = assemble(tmp_path, [("a", GOT, 0x338, 0x340), ("b", GOT, 0x348, 0x350),
                              ("c", OTHER_GOT, 0x10, 0x18), ("d", OTHER_GOT, 0x20, 0x28)],
                   exported=False)
    refused(lib, "found 2 counter pairs")


def test_scan_is_bounded(tmp_path):
    lib = assemble(tmp_path, [("je_malloc", GOT, 0x338, 0x340), ("je_free", GOT, 0x348, 0x350)],
                   exported=False, extra=f".rept {machine_code.MAX_SCAN_CANDIDATES}\n"
                                         "    cmpq %fs:0x340(%rcx), %rdx\n.endr")
    refused(lib, f"more than {machine_code.MAX_SCAN_CANDIDATES} %fs compares in the code")
