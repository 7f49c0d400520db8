"""Offsets from jemalloc's machine code: against the DWARF of the same build, on Debian's
stock stripped libjemalloc.so.2, and refusals on small objects assembled here whose fast
paths have almost the right shape."""

from __future__ import annotations

import mmap
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

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
    refused(lib, f"more than {machine_code.MAX_SCAN_CANDIDATES} %fs compares (or "
                 "thread-pointer loads followed by a compare) in the code: too many to scan")


# --- every form the compilers emit (issue 21) --------------------------------------------

FORMS = {  # the fast path as each compiler writes it; {anchor}: a TPOFF GOT slot or $imm
    "gcc 12: cmp %fs:next,reg": """
    movq {anchor}, %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdi, %rdx
    cmpq %fs:{next}(%rcx), %rdx
    jae 1f
    movq %rdx, %fs:{offset}(%rcx)
""",
    "gcc 11, ruff: cmp reg,%fs:next, other registers": """
    movq {anchor}, %r8
    movq %fs:{offset}(%r8), %r11
    addq %rdi, %r11
    cmpq %r11, %fs:{next}(%r8)
    jbe 1f
    movq %r11, %fs:{offset}(%r8)
""",
    "add of the counter from memory": """
    movq {anchor}, %r9
    movq (%rsi), %r10
    addq %fs:{offset}(%r9), %r10
    cmpq %fs:{next}(%r9), %r10
    jae 1f
    movq %r10, %fs:{offset}(%r9)
""",
    "lea of counter plus size, then a copy": """
    movq {anchor}, %rcx
    movq %fs:{offset}(%rcx), %rdx
    leaq (%rdi,%rdx), %rax
    movq %rax, %rsi
    cmpq %rsi, %fs:{next}(%rcx)
    jbe 1f
    movq %rsi, %fs:{offset}(%rcx)
""",
    "add of size into a register holding the counter": """
    movq {anchor}, %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdx, %rdi
    cmpq %fs:{next}(%rcx), %rdi
    jae 1f
    movq %rdi, %fs:{offset}(%rcx)
""",
    "store back by add into memory": """
    movq {anchor}, %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdi, %rdx
    cmpq %fs:{next}(%rcx), %rdx
    jae 1f
    addq %rdi, %fs:{offset}(%rcx)
""",
    "clang 14, 15: the size from a table, the TSD's address taken between": """
    movq {anchor}, %r10
    movq %fs:{offset}(%r10), %rdx
    addq (%rcx,%rax,8), %rdx
    cmpq %fs:{next}(%r10), %rdx
    jae 1f
    leaq (%rax,%rax,2), %rsi
    movq %fs:0, %rax
    addq %r10, %rax
    movq %fs:0x360(%r10,%rsi,8), %rcx
    movq %rdx, %fs:{offset}(%r10)
    addq $1, %fs:0x368(%r10,%rsi,8)
""",
    "clang 16: the TSD's address, %fs:0 plus the slot": """
    movq %fs:0, %rax
    addq {anchor}, %rax
    movq (%rsi), %rcx
    addq {offset}(%rax), %rcx
    cmpq {next}(%rax), %rcx
    jae 1f
    movq %rcx, {offset}(%rax)
""",
    "clang 16: the slot, then %fs:0 added to it": """
    movq {anchor}, %rcx
    movq %fs:0, %rax
    addq %rcx, %rax
    movq {offset}(%rax), %rdx
    addq %rdi, %rdx
    cmpq %rdx, {next}(%rax)
    jbe 1f
    movq %rdx, {offset}(%rax)
""",
    "thread pointer and slot as base and index": """
    movq {anchor}, %rcx
    movq %fs:0, %rax
    leaq (%rax,%rcx), %r8
    movq {offset}(%rax,%rcx), %rdx
    addq %rdi, %rdx
    cmpq {next}(%r8), %rdx
    jae 1f
    movq %rdx, {offset}(%rcx,%rax)
""",
}


TLS_BLOCK = "tsd: .zero 2632\nother: .zero 64"  # 2696 bytes, the TSD first


def assemble_forms(tmp_path: Path, functions: list[tuple[str, str, str, int, int]],
                   exported: bool = True, executable: bool = False, data: str = "",
                   tls: str | None = TLS_BLOCK, prefix: str = "",
                   link: tuple[str, ...] = ()) -> Path:
    """Like `assemble`, each function (name, FORMS body, anchor, offset, compared offset);
    `executable`: a static non-PIE executable (local-exec), else a shared object; `tls`:
    the .tbss section's labels (None: no TLS at all); `prefix`: mallctl's; `link`: more
    linker arguments."""
    source = ['    .section .tbss,"awT",@nobits', "    .p2align 3", tls] if tls else []
    source += ["    .section .rodata", f'    .ascii "{VERSION.decode()}"',
               "    .data", "    .p2align 3", data, "    .text", "    .globl _start",
               "_start: ret", f"    .globl {prefix}mallctl",
               f"    .type {prefix}mallctl, @function", f"{prefix}mallctl: ret",
               f"    .size {prefix}mallctl, .-{prefix}mallctl"]
    for name, form, anchor, offset, compared in functions:
        body = form.format(anchor=anchor, offset=offset, next=compared)
        source += [f"    .{'globl' if exported else 'local'} {name}",
                   f"    .type {name}, @function", f"{name}:", body, "1:  ret",
                   f"    .size {name}, .-{name}"]
    asm = tmp_path / "forms.s"
    asm.write_text("\n".join(source) + "\n")
    out = tmp_path / ("fast" if executable else "libfast.so")
    mode = ["-static", "-no-pie"] if executable else ["-shared"]
    subprocess.run(["gcc", *mode, "-nostdlib", "-Wl,--build-id", *link, "-o", out, asm],
                   check=True)
    if not exported:
        subprocess.run(["strip", out], check=True)
    return out


def code_layout(path: Path, shared: bool = True):
    """machine_code.counter_layout itself (below the layout checks that follow it)."""
    with open(path, "rb") as stream:
        return machine_code.counter_layout(stream, shared=shared)


def code_refusal(path: Path, shared: bool = True) -> str:
    with pytest.raises(machine_code.CodeError) as refusal:
        code_layout(path, shared)
    return str(refusal.value)


@pytest.mark.parametrize("exported", [True, False], ids=["entry points", "scan"])
@pytest.mark.parametrize("form", list(FORMS))
def test_each_compiler_form_is_read(tmp_path, form, exported):
    lib = assemble_forms(tmp_path, [("_rjem_malloc", FORMS[form], GOT, 0x338, 0x340),
                                    ("_rjem_free", FORMS[form], GOT, 0x348, 0x350)],
                         exported=exported)
    found = code_layout(lib)
    [slot] = tpoff_slots(lib)
    assert (found.allocated_offset, found.deallocated_offset, found.tpoff_got) == (
        0x338, 0x348, slot)
    assert found.route == ("malloc/free fast paths" if exported
                           else "scan of the executable segment")


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_in_an_executable_local_exec(tmp_path, form):
    """A static executable: the linker makes the slot an immediate (mov or add $imm)."""
    exe = assemble_forms(tmp_path, [("_rjem_malloc", FORMS[form], GOT, 0x338, 0x340),
                                    ("_rjem_sdallocx", FORMS[form], GOT, 0x348, 0x350)],
                         exported=False, executable=True)
    found = code_layout(exe, shared=False)
    assert (found.symbol_offset, found.allocated_offset, found.deallocated_offset,
            found.static_block_offset, found.tpoff_got) == (0, 0x338, 0x348, 2696, None)


def test_functions_may_differ_in_form_when_they_agree_on_the_anchor(tmp_path):
    lib = assemble_forms(tmp_path, [
        ("malloc", FORMS["gcc 11, ruff: cmp reg,%fs:next, other registers"], GOT, 0x338, 0x340),
        ("free", FORMS["clang 16: the TSD's address, %fs:0 plus the slot"], GOT, 0x348, 0x350)])
    found = code_layout(lib)
    assert (found.allocated_offset, found.deallocated_offset) == (0x338, 0x348)


@pytest.mark.parametrize("form", ["gcc 11, ruff: cmp reg,%fs:next, other registers",
                                  "clang 16: the TSD's address, %fs:0 plus the slot"])
def test_new_forms_that_disagree_on_the_anchor_are_refused(tmp_path, form):
    lib = assemble_forms(tmp_path, [("malloc", FORMS[form], GOT, 0x338, 0x340),
                                    ("free", FORMS[form], OTHER_GOT, 0x348, 0x350)])
    assert "disagree on the TLS anchor" in code_refusal(lib)


# --- refusals, each failing without its check (issue 28) ---------------------------------

ALMOST = {  # fast paths missing one part of the shape: no counter in them
    "the thread pointer alone, no offset added": """
    movq %fs:0, %rax
    movq {offset}(%rax), %rdx
    addq %rdi, %rdx
    cmpq {next}(%rax), %rdx
    jae 1f
    movq %rdx, {offset}(%rax)
""",
    "a positive constant added to the thread pointer": """
    movq %fs:0, %rax
    addq $0x100, %rax
    movq {offset}(%rax), %rdx
    addq %rdi, %rdx
    cmpq {next}(%rax), %rdx
    jae 1f
    movq %rdx, {offset}(%rax)
""",
    "a positive displacement lea'd onto the thread pointer": """
    movq %fs:0, %rax
    leaq 0x100(%rax), %rax
    movq {offset}(%rax), %rdx
    addq %rdi, %rdx
    cmpq {next}(%rax), %rdx
    jae 1f
    movq %rdx, {offset}(%rax)
""",
    "a register compared that does not hold the counter": """
    movq tsd@gottpoff(%rip), %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdi, %rdx
    cmpq %rsi, %fs:{next}(%rcx)
    jae 1f
    movq %rdx, %fs:{offset}(%rcx)
""",
    "the counter's register overwritten before the store": """
    movq tsd@gottpoff(%rip), %rcx
    movq %fs:{offset}(%rcx), %rdx
    addq %rdi, %rdx
    cmpq %rdx, %fs:{next}(%rcx)
    jbe 1f
    movl $1, %edx
    movq %rdx, %fs:{offset}(%rcx)
""",
    "the counter scaled (not counter plus size)": """
    movq tsd@gottpoff(%rip), %rcx
    movq %fs:{offset}(%rcx), %rdx
    leaq (%rdi,%rdx,2), %rax
    cmpq %rax, %fs:{next}(%rcx)
    jbe 1f
    movq %rax, %fs:{offset}(%rcx)
""",
}


@pytest.mark.parametrize("exported", [True, False], ids=["entry points", "scan"])
@pytest.mark.parametrize("almost", list(ALMOST))
def test_almost_the_shape_is_no_counter(tmp_path, almost, exported):
    lib = assemble_forms(tmp_path, [("malloc", ALMOST[almost], "", 0x338, 0x340),
                                    ("free", ALMOST[almost], "", 0x348, 0x350)],
                         exported=exported)
    assert "scan of the code found 0 counter pairs" in code_refusal(lib)


def test_two_offsets_for_one_counter_are_refused_not_the_lowest_taken(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340), ("je_malloc", GOT, 0x328, 0x330),
                              ("free", GOT, 0x348, 0x350)])
    assert "ambiguous counters: allocated at [808, 824]" in code_refusal(lib)


def test_counters_in_the_wrong_order_are_refused(tmp_path):
    """thread_deallocated 16 bytes below thread_allocated: jemalloc 5.3 has it above."""
    lib = assemble(tmp_path, [("malloc", GOT, 0x348, 0x350), ("free", GOT, 0x338, 0x340)])
    assert "counters at 0x348 and 0x338 are not 16 bytes apart" in code_refusal(lib)


def test_rip_relative_load_of_ordinary_data_is_no_anchor(tmp_path):
    """In a shared object only a slot a TPOFF64 relocation fills is a TLS anchor."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    lib = assemble_forms(tmp_path, [("malloc", form, "datum(%rip)", 0x338, 0x340),
                                    ("free", form, "datum(%rip)", 0x348, 0x350)],
                         data="datum: .quad -2696")
    assert "scan of the code found 0 counter pairs" in code_refusal(lib)


@pytest.mark.parametrize("immediate", ["$0x100", f"$-{1 << 20}"])
def test_implausible_immediate_is_no_thread_pointer_offset(tmp_path, immediate):
    """Local-exec: only a negative offset below 1 MiB is the TSD's place below TP."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    exe = assemble_forms(tmp_path, [("malloc", form, immediate, 0x338, 0x340),
                                    ("free", form, immediate, 0x348, 0x350)],
                         executable=True)
    assert "scan of the code found 0 counter pairs" in code_refusal(exe, shared=False)


@pytest.mark.parametrize("immediate", ["$-8", "$-2704"])
def test_counters_outside_the_tls_block_are_refused(tmp_path, immediate):
    """A plausible offset that puts the counters past the 2696-byte block's end (-8) or
    before its start (-2704)."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    exe = assemble_forms(tmp_path, [("malloc", form, immediate, 0x338, 0x340),
                                    ("free", form, immediate, 0x348, 0x350)],
                         executable=True)
    assert "lie outside the 2696-byte TLS block" in code_refusal(exe, shared=False)


def test_executable_got_slot_constant_is_the_anchor(tmp_path):
    """A GOT slot the linker filled in an executable: its constant is the TP offset."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    exe = assemble_forms(tmp_path, [("malloc", form, "slot(%rip)", 0x338, 0x340),
                                    ("free", form, "slot(%rip)", 0x348, 0x350)],
                         executable=True, data="slot: .quad -2696")
    found = code_layout(exe, shared=False)
    assert (found.symbol_offset, found.allocated_offset) == (0, 0x338)


def test_executable_got_slot_a_relocation_fills_is_refused_whatever_the_file_holds(tmp_path):
    """An executable whose fast paths read a GOT slot that an R_X86_64_TPOFF64 fills at run
    time (a TLS variable of another module): the bytes in the file are not what the slot
    will hold, even when they are a plausible offset of the executable's own block."""
    (tmp_path / "ext.s").write_text('    .section .tbss,"awT",@nobits\n    .globl ext\n'
                                    "    .p2align 3\next: .zero 2632\n")
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", tmp_path / "libext.so",
                    tmp_path / "ext.s"], check=True)
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    source = ['    .section .tbss,"awT",@nobits', "    .p2align 3", "mine: .zero 2632",
              "    .text", "    .globl _start", "_start: ret"]
    for name, offset in (("malloc", 0x338), ("free", 0x348)):
        source += [f"    .globl {name}", f"    .type {name}, @function", f"{name}:",
                   form.format(anchor="ext@gottpoff(%rip)", offset=offset, next=offset + 8),
                   "1:  ret", f"    .size {name}, .-{name}"]
    (tmp_path / "exe.s").write_text("\n".join(source) + "\n")
    exe = tmp_path / "exe"
    subprocess.run(["gcc", "-no-pie", "-nostdlib", "-Wl,--build-id", "-o", exe,
                    tmp_path / "exe.s", f"-L{tmp_path}", "-lext"], check=True)
    [slot] = tpoff_slots(exe)
    assert "filled at run time" in code_refusal(exe, shared=False)  # the file holds 0
    with open(exe, "r+b") as stream:
        [(vaddr, offset)] = [(s["p_vaddr"], s["p_offset"])
                             for s in ELFFile(stream).iter_segments("PT_LOAD")
                             if s["p_vaddr"] <= slot < s["p_vaddr"] + s["p_filesz"]]
        stream.seek(offset + slot - vaddr)
        stream.write((-2632).to_bytes(8, "little", signed=True))  # the block's start
    assert "filled at run time" in code_refusal(exe, shared=False)


SLOTS = {"negative": ("-2696", -2696), "lowest": (f"-{(1 << 20) - 1}", -(1 << 20) + 1),
         "too low": (f"-{1 << 20}", None), "zero": ("0", None), "positive": ("16", None)}


def test_constant_tpoff_takes_only_a_plausible_negative_offset(tmp_path):
    data = "\n".join(f"slot{i}: .quad {text}" for i, (text, _) in enumerate(SLOTS.values()))
    exe = assemble_forms(tmp_path, [], executable=True, data=data)
    symbols = _symbols(exe)
    with open(exe, "rb") as stream, mmap.mmap(stream.fileno(), 0,
                                              access=mmap.ACCESS_READ) as view:
        image = machine_code.Image(ELFFile(stream), view, shared=False)
        got = {name: image.constant_tpoff(symbols[f"slot{i}"])
               for i, name in enumerate(SLOTS)}
        assert got == {name: want for name, (_, want) in SLOTS.items()}
        assert image.constant_tpoff(0x10) is None  # outside every segment
        assert image.is_tls_slot(symbols["slot0"]) and not image.is_tls_slot(symbols["slot4"])
        shared = machine_code.Image(ELFFile(stream), view, shared=True)
        assert not shared.is_tls_slot(symbols["slot0"])  # a shared object's needs a TPOFF64


def _symbols(path: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(path)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in map(str.split, out.splitlines())
            if len(parts) == 3}


# --- placement of what the code shows, and the route's own refusals (issue 28) -----------

GENERAL_DYNAMIC = """
    .byte 0x66
    leaq tsd@tlsgd(%rip), %rdi
    .value 0x6666
    rex64
    call __tls_get_addr@PLT
    movq {offset}(%rax), %rdx
    addq %rsi, %rdx
    cmpq {next}(%rax), %rdx
    jae 1f
    movq %rdx, {offset}(%rax)
"""
TSD_SECOND = "other: .zero 64\ntsd: .zero 2632"  # the TSD 64 bytes into the block


def general_dynamic(tmp_path: Path, visibility: str = "local") -> Path:
    """A shared object whose malloc and free reach the TSD through `__tls_get_addr`; a
    global `tsd` gets an R_X86_64_DTPOFF64, a local one a constant in the GOT pair."""
    return assemble_forms(tmp_path, [("malloc", GENERAL_DYNAMIC, "", 0x338, 0x340),
                                     ("free", GENERAL_DYNAMIC, "", 0x348, 0x350)],
                          tls=TSD_SECOND if visibility == "local" else ".globl tsd\n" + TSD_SECOND)


def relocations(path: Path, kind: str) -> list[int]:
    out = subprocess.run(["readelf", "-rW", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [int(line.split()[0], 16) for line in out.splitlines() if kind in line]


def write_at(path: Path, vaddr: int, data: bytes) -> None:
    """Overwrite the file's bytes that segment mapping places at `vaddr`."""
    with open(path, "r+b") as stream:
        [(start, offset)] = [(s["p_vaddr"], s["p_offset"])
                             for s in ELFFile(stream).iter_segments("PT_LOAD")
                             if s["p_vaddr"] <= vaddr < s["p_vaddr"] + s["p_filesz"]]
        stream.seek(offset + vaddr - start)
        stream.write(data)


@pytest.mark.parametrize("visibility", ["local", "global"])
def test_general_dynamic_fast_paths_are_placed_in_the_modules_block(tmp_path, visibility):
    found = code_layout(general_dynamic(tmp_path, visibility))
    assert found == machine_code.CodeLayout(
        symbol_offset=64, allocated_offset=0x338, deallocated_offset=0x348,
        static_block_offset=None, tpoff_got=None, tpoff_addend=0, tpoff_symbolic=False,
        route="malloc/free fast paths", dynamic_tls=True)


def test_general_dynamic_pair_with_no_plausible_offset_is_refused(tmp_path):
    lib = general_dynamic(tmp_path)
    [pair] = relocations(lib, "R_X86_64_DTPMOD64")
    write_at(lib, pair + 8, (1 << 20).to_bytes(8, "little"))
    assert code_refusal(lib) == (f"__tls_get_addr of GOT pair {pair:#x}: no plausible offset "
                                 "in the TLS block")


def test_pair_offset_takes_the_relocation_else_a_plausible_constant(tmp_path):
    """The DTPOFF64's value wins over the file's word; a constant must lie in 0..1 MiB."""
    (tmp_path / "global").mkdir()
    lib = general_dynamic(tmp_path / "global", "global")
    [pair] = relocations(lib, "R_X86_64_DTPMOD64")
    write_at(lib, pair + 8, (8).to_bytes(8, "little"))  # what the relocation overwrites
    with open(lib, "rb") as stream, mmap.mmap(stream.fileno(), 0,
                                              access=mmap.ACCESS_READ) as view:
        assert machine_code.Image(ELFFile(stream), view, shared=True).pair_offset(pair) == 64
    local = general_dynamic(tmp_path)
    [pair] = relocations(local, "R_X86_64_DTPMOD64")
    got = {}
    for value in (0, 64, (1 << 20) - 1, 1 << 20, (1 << 64) - 8):
        write_at(local, pair + 8, value.to_bytes(8, "little"))
        with open(local, "rb") as stream, mmap.mmap(stream.fileno(), 0,
                                                    access=mmap.ACCESS_READ) as view:
            image = machine_code.Image(ELFFile(stream), view, shared=True)
            got[value] = image.pair_offset(pair)
            end = max(vaddr + size for vaddr, _, size, _ in image.loads)
            assert image.pair_offset(end + 0x1000) is None  # no word there at all
    assert got == {0: 0, 64: 64, (1 << 20) - 1: (1 << 20) - 1, 1 << 20: None,
                   (1 << 64) - 8: None}


def test_a_symbolic_tpoff_slot_shifts_the_counters_by_its_addend(tmp_path):
    """An R_X86_64_TPOFF64 naming the TSD's symbol: the symbol is the TSD, the addend
    (forged here: linkers write 0) moves the counters; the slot is given from the first
    page of the object, which need not be 0."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    lib = assemble_forms(tmp_path, [("malloc", form, GOT, 0x338, 0x340),
                                    ("free", form, GOT, 0x348, 0x350)],
                         tls=".globl tsd\n" + TLS_BLOCK, link=("-Wl,-Ttext-segment=0x201000",))
    [slot] = tpoff_slots(lib)
    with open(lib, "r+b") as stream:
        rela = ELFFile(stream).get_section_by_name(".rela.dyn")
        [index] = [i for i, rel in enumerate(rela.iter_relocations())
                   if rel["r_offset"] == slot]
        stream.seek(rela["sh_offset"] + index * rela["sh_entsize"] + 16)  # r_addend
        stream.write((16).to_bytes(8, "little", signed=True))
    assert code_layout(lib) == machine_code.CodeLayout(
        symbol_offset=0, allocated_offset=0x348, deallocated_offset=0x358,
        static_block_offset=None, tpoff_got=slot - 0x201000, tpoff_addend=16,
        tpoff_symbolic=True, route="malloc/free fast paths")


def test_a_slot_without_symbol_gives_the_tsds_place_in_the_block(tmp_path):
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    lib = assemble_forms(tmp_path, [("malloc", form, OTHER_GOT, 0x10, 0x18),
                                    ("free", form, OTHER_GOT, 0x20, 0x28)])
    [slot] = tpoff_slots(lib)
    assert code_layout(lib) == machine_code.CodeLayout(
        symbol_offset=2632, allocated_offset=0x10, deallocated_offset=0x20,
        static_block_offset=None, tpoff_got=slot, tpoff_addend=2632, tpoff_symbolic=False,
        route="malloc/free fast paths")


def test_a_shared_object_whose_fast_paths_use_an_immediate_is_refused(tmp_path):
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    lib = assemble_forms(tmp_path, [("malloc", form, "$-2696", 0x338, 0x340),
                                    ("free", form, "$-2696", 0x348, 0x350)])
    assert code_refusal(lib) == ("a shared object whose fast paths use immediate -0xa88, "
                                 "not a TPOFF64 slot")


def test_an_object_without_tls_is_refused(tmp_path):
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    exe = assemble_forms(tmp_path, [("malloc", form, "$-2696", 0x338, 0x340),
                                    ("free", form, "$-2696", 0x348, 0x350)],
                         executable=True, tls=None)
    assert code_refusal(exe, shared=False) == "no PT_TLS segment"


@pytest.mark.parametrize("immediate, fits", [("$-848", True), ("$-844", False)])
def test_counters_must_end_within_the_tls_block(tmp_path, immediate, fits):
    """The 2696-byte block from TP - 2696: at -848 thread_deallocated (0x348) ends at its
    last byte; 4 bytes later it does not."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    exe = assemble_forms(tmp_path, [("malloc", form, immediate, 0x338, 0x340),
                                    ("free", form, immediate, 0x348, 0x350)],
                         executable=True)
    if fits:
        assert code_layout(exe, shared=False).symbol_offset == 2696 - 848
    else:
        assert code_refusal(exe, shared=False) == (
            "counters at immediate -0x34c + 0x348 lie outside the 2696-byte TLS block")


def test_an_object_for_another_machine_is_refused(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340), ("free", GOT, 0x348, 0x350)])
    with open(lib, "r+b") as stream:
        stream.seek(18)  # e_machine
        stream.write((183).to_bytes(2, "little"))  # EM_AARCH64
    assert code_refusal(lib) == "the code route reads x86_64 only"


def test_fast_paths_without_free_are_refused_with_what_each_showed(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340), ("free", GOT, 0x348, 0x358)])
    assert code_refusal(lib) == (
        "counter shapes per entry point: free: 0, malloc: 1; need thread_allocated in "
        "malloc and thread_deallocated in free/sdallocx")


def test_the_mallctl_prefix_names_the_entry_points(tmp_path):
    """pyarrow's je_arrow_: its malloc and free are read, not scanned for."""
    form = FORMS["gcc 12: cmp %fs:next,reg"]
    lib = assemble_forms(tmp_path, [("je_arrow_malloc", form, GOT, 0x338, 0x340),
                                    ("je_arrow_free", form, GOT, 0x348, 0x350)],
                         prefix="je_arrow_")
    assert code_layout(lib).route == "malloc/free fast paths"


def test_disagreeing_anchors_are_named(tmp_path):
    lib = assemble(tmp_path, [("malloc", GOT, 0x338, 0x340),
                              ("free", OTHER_GOT, 0x348, 0x350)])
    first, second = sorted(tpoff_slots(lib))
    assert code_refusal(lib) == ("the fast paths disagree on the TLS anchor: "
                                 f"GOT slot {first:#x}, GOT slot {second:#x}")


def test_scan_refusals_say_what_was_found(tmp_path):
    (tmp_path / "none").mkdir()
    lib = assemble(tmp_path / "none", [("a", GOT, 0x338, 0x348), ("b", GOT, 0x348, 0x358)],
                   exported=False)
    assert code_refusal(lib) == "scan of the code found 0 counter pairs (shapes by anchor: none)"
    two = assemble(tmp_path, [("a", GOT, 0x338, 0x340), ("b", GOT, 0x348, 0x350),
                              ("c", OTHER_GOT, 0x10, 0x18), ("d", OTHER_GOT, 0x20, 0x28)],
                   exported=False)
    first, second = tpoff_slots(two)  # which is tsd's: the scan names both either way
    shapes = {f"GOT slot {slot:#x}: {offsets}" for slot, offsets in (
        (first, "['0x338', '0x348']"), (second, "['0x10', '0x20']"))} | {
        f"GOT slot {slot:#x}: {offsets}" for slot, offsets in (
            (second, "['0x338', '0x348']"), (first, "['0x10', '0x20']"))}
    message = code_refusal(two)
    prefix = "scan of the code found 2 counter pairs (shapes by anchor: "
    assert message.startswith(prefix) and message.endswith(")")
    assert len(set(message[len(prefix):-1].split("; ")) & shapes) == 2


def test_scan_counts_candidates_in_executable_segments_only(tmp_path):
    """As many compares and thread-pointer loads as the bound allows, in data: not code."""
    lib = assemble(tmp_path, [("je_malloc", GOT, 0x338, 0x340), ("je_free", GOT, 0x348, 0x350)],
                   exported=False,
                   extra=f"    .data\n.rept {machine_code.MAX_SCAN_CANDIDATES}\n"
                         "    movq %fs:0, %rax\n    cmpq 0x340(%rcx), %rdx\n"
                         "    cmpq %fs:0x340(%rcx), %rdx\n.endr\n    .text")
    assert code_layout(lib).route == "scan of the executable segment"


def test_scan_takes_thread_pointer_loads_followed_by_a_compare_only(tmp_path):
    """Loads of %fs:0 with no compare within 160 bytes after are no candidates."""
    lib = assemble(tmp_path, [("je_malloc", GOT, 0x338, 0x340), ("je_free", GOT, 0x348, 0x350)],
                   exported=False,
                   extra=f".rept {machine_code.MAX_SCAN_CANDIDATES}\n    movq %fs:0, %rax\n"
                         ".endr\n    .fill 200, 1, 0x90\n    cmpq 0x340(%rcx), %rdx")
    assert code_layout(lib).route == "scan of the executable segment"


def test_scan_bound_is_inclusive(tmp_path):
    """Exactly MAX_SCAN_CANDIDATES compares (two of them the fast paths') are scanned."""
    lib = assemble(tmp_path, [("je_malloc", GOT, 0x338, 0x340), ("je_free", GOT, 0x348, 0x350)],
                   exported=False, extra=f".rept {machine_code.MAX_SCAN_CANDIDATES - 2}\n"
                                         "    cmpq %fs:0x340(%rcx), %rdx\n.endr")
    assert code_layout(lib).route == "scan of the executable segment"


def test_scan_decodes_from_the_longest_lead_in_that_reaches_the_compare(tmp_path):
    """Bytes that do not decode 25 bytes before each compare: the lead-ins from before
    them stop there, the one from 24 bytes before reads the whole fast path."""
    fast_path = FAST_PATH.replace("{name}:\n", "{name}:\n    .fill 32, 1, 0x90\n    .byte 0x06\n"
                                              "    .fill 6, 1, 0x90\n")
    source = ['    .section .tbss,"awT",@nobits', "    .p2align 3", "tsd: .zero 2632",
              "    .section .rodata", f'    .ascii "{VERSION.decode()}"', "    .text"]
    for name, offset in (("je_malloc", 0x338), ("je_free", 0x348)):
        source.append(fast_path.format(name=name, anchor=GOT, offset=offset, next=offset + 8))
    (tmp_path / "lead.s").write_text("\n".join(source) + "\n")
    lib = tmp_path / "liblead.so"
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", lib, tmp_path / "lead.s"], check=True)
    subprocess.run(["strip", lib], check=True)
    found = code_layout(lib)
    assert (found.route, found.allocated_offset) == ("scan of the executable segment", 0x338)


def test_bytes_at_a_segment_end_stop_there(tmp_path):
    """A word cut by its segment's end is no TP offset, whatever its first bytes say."""
    exe = assemble_forms(tmp_path, [], executable=True)
    with open(exe, "rb") as stream:
        [(vaddr, filesz)] = [(s["p_vaddr"], s["p_filesz"])
                             for s in ELFFile(stream).iter_segments("PT_LOAD")
                             if s["p_filesz"]][:1]
    end = vaddr + filesz
    write_at(exe, end - 4, (-2696).to_bytes(4, "little", signed=True))
    with open(exe, "rb") as stream, mmap.mmap(stream.fileno(), 0,
                                              access=mmap.ACCESS_READ) as view:
        image = machine_code.Image(ELFFile(stream), view, shared=False)
        assert image.bytes_at(end - 4, 8) == (-2696).to_bytes(4, "little", signed=True)
        assert image.constant_tpoff(end - 4) is None
        assert image.bytes_at(end, 8) == b""
