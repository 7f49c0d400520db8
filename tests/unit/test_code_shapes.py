"""The code route's instruction tracker (`machine_code.shapes_in`) on snippets assembled
here: each form it accepts gives exactly its shape, and each near miss gives none.

A snippet is assembled alone (no link): `slot` is a GOT slot holding a TP offset and
`pair` a general-dynamic GOT pair of the object's own module, both placed after the code
in the same section, so the assembler resolves every `(%rip)` reference to them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ctprofd.resolve import machine_code

COUNT = """
    movq %fs:0x338({r}), %rdx
    addq %rdi, %rdx
    cmpq %fs:0x340({r}), %rdx
    jae 1f
    movq %rdx, %fs:0x338({r})
1:
"""  # the counter at 0x338 from the TSD's offset in {r}
COUNT_AT = """
    movq 0x338({r}), %rdx
    addq %rdi, %rdx
    cmpq 0x340({r}), %rdx
    jae 1f
    movq %rdx, 0x338({r})
1:
"""  # ... from the TSD's address in {r}
SLOT = "slot"
PAIR = "pair"


def shapes(tmp_path: Path, body: str) -> list[tuple[str, object, int]]:
    """(anchor kind, `slot`/`pair` or the immediate, counter offset) of each shape."""
    source = tmp_path / "snippet.s"
    source.write_text(f"    .text\n{body}\nend:\n    .p2align 3\nslot: .quad 0\n"
                      "pair: .quad 0, 0\nplain: .quad 0, 0\n")
    obj, raw = tmp_path / "snippet.o", tmp_path / "snippet.bin"
    subprocess.run(["as", "-o", obj, source], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, raw], check=True)
    out = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
    labels = {row[2]: int(row[0], 16) for row in map(str.split, out.splitlines())
              if len(row) == 3}  # not the undefined __tls_get_addr
    names = {labels[SLOT]: SLOT, labels[PAIR]: PAIR}
    code = raw.read_bytes()[:labels["end"]]
    found = machine_code.shapes_in(machine_code._disassembler(), code, 0,
                                   lambda a: a == labels[SLOT], lambda a: a == labels[PAIR])
    return [(s.anchor.kind, names.get(s.anchor.value, s.anchor.value)
             if s.anchor.kind != "imm" else s.anchor.value, s.offset) for s in found]


LOWEST = -(1 << 20) + 1
GD_CALL = "    .byte 0x66\n    leaq pair(%rip), %rdi\n    .value 0x6666\n    rex64\n" \
          "    call *__tls_get_addr@GOTPCREL(%rip)\n"  # the sequence the linker knows

FOUND = {
    "a 64-bit immediate (movabs)": ("    movabsq $-2696, %rcx\n" + COUNT.format(r="%rcx"),
                                    [("imm", -2696, 0x338)]),
    "the thread pointer plus a negative displacement (lea)": (
        "    movq %fs:0, %rax\n    leaq -2696(%rax), %rax\n" + COUNT_AT.format(r="%rax"),
        [("imm", -2696, 0x338)]),
    "lea at the lowest plausible displacement": (
        f"    movq %fs:0, %rax\n    leaq {LOWEST}(%rax), %rax\n" + COUNT_AT.format(r="%rax"),
        [("imm", LOWEST, 0x338)]),
    "the slot, then the thread pointer added from %fs:0": (
        "    movq slot(%rip), %rcx\n    addq %fs:0, %rcx\n" + COUNT_AT.format(r="%rcx"),
        [("got", SLOT, 0x338)]),
    "the slot, then a register holding the thread pointer added": (
        "    movq %fs:0, %rax\n    movq slot(%rip), %rcx\n    addq %rax, %rcx\n"
        + COUNT_AT.format(r="%rcx"), [("got", SLOT, 0x338)]),
    "general dynamic: __tls_get_addr of our pair returns the TSD's address": (
        GD_CALL + COUNT_AT.format(r="%rax"), [("dtv", PAIR, 0x338)]),
    "an offset in a callee-saved register outlives a call": (
        "    movq slot(%rip), %rbx\n    call *%r11\n" + COUNT.format(r="%rbx"),
        [("got", SLOT, 0x338)]),
    "a compared counter in a callee-saved register outlives a call": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rbx\n    addq %rdi, %rbx\n"
        "    cmpq %fs:0x340(%rcx), %rbx\n    jae 1f\n    movq slot(%rip), %rcx\n"
        "    call *%r11\n    movq slot(%rip), %rcx\n    movq %rbx, %fs:0x338(%rcx)\n1:\n",
        [("got", SLOT, 0x338)]),
    "the counter as a lea's base": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n"
        "    leaq (%rdx,%rdi), %rax\n    cmpq %fs:0x340(%rcx), %rax\n    jae 1f\n"
        "    movq %rax, %fs:0x338(%rcx)\n1:\n", [("got", SLOT, 0x338)]),
    "a compare with other memory before the one with the next-event field": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n    addq %rdi, %rdx\n"
        "    cmpq (%rsi), %rdx\n    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n"
        "    movq %rdx, %fs:0x338(%rcx)\n1:\n", [("got", SLOT, 0x338)]),
    "of two counters added, the one read later is what the sum holds": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x348(%rcx), %rdx\n"
        "    movq %fs:0x338(%rcx), %rsi\n    addq %rsi, %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x338(%rcx)\n1:\n",
        [("got", SLOT, 0x338)]),
    "... whichever register it is in": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rsi\n"
        "    movq %fs:0x348(%rcx), %rdx\n    addq %rsi, %rdx\n"
        "    cmpq %fs:0x350(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x348(%rcx)\n1:\n",
        [("got", SLOT, 0x348)]),
    "a copy keeps when its counter was read": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n"
        "    movq %fs:0x348(%rcx), %rsi\n    movq %rdx, %rax\n    addq %rsi, %rax\n"
        "    cmpq %fs:0x350(%rcx), %rax\n    jae 1f\n    movq %rax, %fs:0x348(%rcx)\n1:\n",
        [("got", SLOT, 0x348)]),
    "a sum keeps the counter it kept, as read when the sum was made": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x328(%rcx), %rsi\n"
        "    movq %fs:0x318(%rcx), %r8\n    movq %fs:0x338(%rcx), %rdx\n"
        "    addq %rsi, %rdx\n    addq %r8, %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x338(%rcx)\n1:\n",
        [("got", SLOT, 0x338)]),
    "a counter stored twice after one compare is one shape": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n    addq %rdi, %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x338(%rcx)\n"
        "    movq %rdx, %fs:0x338(%rcx)\n1:\n", [("got", SLOT, 0x338)]),
}


@pytest.mark.parametrize("form", list(FOUND))
def test_each_form_gives_its_shape(tmp_path, form):
    body, expected = FOUND[form]
    assert shapes(tmp_path, body) == expected


NONE = {
    "zero as the offset": "    movq $0, %rcx\n" + COUNT.format(r="%rcx"),
    "zero loaded where the thread pointer would be": (
        "    movq $0, %rax\n    addq slot(%rip), %rax\n" + COUNT_AT.format(r="%rax")),
    "lea onto the thread pointer with no displacement": (
        "    movq %fs:0, %rax\n    leaq 0(%rax), %rax\n" + COUNT_AT.format(r="%rax")),
    "lea onto the thread pointer 1 MiB below": (
        f"    movq %fs:0, %rax\n    leaq {-(1 << 20)}(%rax), %rax\n"
        + COUNT_AT.format(r="%rax")),
    "lea of the thread pointer and the slot with a displacement": (
        "    movq slot(%rip), %rcx\n    movq %fs:0, %rax\n    leaq 8(%rax,%rcx), %r8\n"
        + COUNT_AT.format(r="%r8")),
    "the slot read through %fs": "    movq %fs:slot(%rip), %rcx\n" + COUNT.format(r="%rcx"),
    "the slot's address reached from another base register": (
        "    movq (slot - 2f)(%rbx), %rcx\n2:\n" + COUNT.format(r="%rcx")),
    "the offset plus a register that is not the thread pointer": (
        "    movq slot(%rip), %rcx\n" + COUNT_AT.format(r="%rcx,%rsi")),
    "a %fs operand with an index register": (
        "    movq slot(%rip), %rcx\n" + COUNT.format(r="%rcx,%rsi")),
    "a %gs operand": "    movq slot(%rip), %rcx\n" + COUNT.format(r="%rcx").replace("%fs", "%gs"),
    "a 32-bit load of the counter": (
        "    movq slot(%rip), %rcx\n    movl %fs:0x338(%rcx), %edx\n    addq %rdi, %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x338(%rcx)\n1:\n"),
    "a 32-bit store back": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n    addq %rdi, %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movl %edx, %fs:0x338(%rcx)\n1:\n"),
    "a store of a register that was not compared": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n    addq %rdi, %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rsi, %fs:0x338(%rcx)\n1:\n"),
    "a call between the compare and the store": (
        "    movq slot(%rip), %rbx\n    movq %fs:0x338(%rbx), %rdx\n    addq %rdi, %rdx\n"
        "    cmpq %fs:0x340(%rbx), %rdx\n    jae 1f\n    call *%r11\n"
        "    movq %rdx, %fs:0x338(%rbx)\n1:\n"),
    "an offset in a caller-saved register across a call": (
        "    movq slot(%rip), %rcx\n    call *%r11\n" + COUNT.format(r="%rcx")),
    "the offset's register overwritten (32 bits)": (
        "    movq slot(%rip), %rcx\n    movl $5, %ecx\n" + COUNT.format(r="%rcx")),
    "the counter subtracted": (
        "    movq slot(%rip), %rcx\n    movq %rsi, %rdx\n    subq %fs:0x338(%rcx), %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x338(%rcx)\n1:\n"),
    "both of a lea's registers hold counters": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n"
        "    movq %fs:0x338(%rcx), %rsi\n    leaq (%rdx,%rsi), %rax\n"
        "    cmpq %fs:0x340(%rcx), %rax\n    jae 1f\n    movq %rax, %fs:0x338(%rcx)\n1:\n"),
    "a counter in through one control register and out of another": (  # no GPR family
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rdx\n    movq %rdx, %cr0\n"
        "    movq %cr2, %rsi\n    cmpq %fs:0x340(%rcx), %rsi\n    jae 1f\n"
        "    movq %rsi, %fs:0x338(%rcx)\n1:\n"),
    "a counter used as an address by another instruction than lea": (
        "    movq slot(%rip), %rcx\n    movq %fs:0x338(%rcx), %rsi\n    subq (%rsi), %rdx\n"
        "    cmpq %fs:0x340(%rcx), %rdx\n    jae 1f\n    movq %rdx, %fs:0x338(%rcx)\n1:\n"),
    "the offset plus a register that does not hold the thread pointer": (
        "    movq slot(%rip), %rcx\n    addq %rsi, %rcx\n" + COUNT_AT.format(r="%rcx")),
    "the offset plus a constant": (
        "    movq slot(%rip), %rcx\n    addq $8, %rcx\n" + COUNT_AT.format(r="%rcx")),
    "the thread pointer added to an address": (
        "    movq %fs:0, %rax\n    addq slot(%rip), %rax\n    addq %fs:0, %rax\n"
        + COUNT_AT.format(r="%rax")),
    "a call with no pair before it: %rax is no TSD address": (
        "    call *%r11\n" + COUNT_AT.format(r="%rax")),
    "a pair's address in another register than %rdi": (
        GD_CALL.replace("%rdi", "%rsi") + COUNT_AT.format(r="%rax")),
    "data that is not our module's pair in %rdi": (
        GD_CALL.replace("pair(", "plain(") + COUNT_AT.format(r="%rax")),
    "an instruction between the pair's lea and the call": (
        GD_CALL.replace("    .value", "    nop\n    .value") + COUNT_AT.format(r="%rax")),
    "a second call after __tls_get_addr": (
        GD_CALL + "    call *%r11\n" + COUNT_AT.format(r="%rax")),
}


@pytest.mark.parametrize("near_miss", list(NONE))
def test_each_near_miss_gives_no_shape(tmp_path, near_miss):
    assert shapes(tmp_path, NONE[near_miss]) == []
