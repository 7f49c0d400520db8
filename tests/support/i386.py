"""A static 32-bit x86 program that only pauses, assembled and linked with binutils (no
compiler, no libc): a process whose register set is the ia32 one, without fs_base."""

from __future__ import annotations

import subprocess
from pathlib import Path

PAUSE_I386 = """
.globl _start
_start:
    mov $29, %eax  # pause(), i386 numbering
    int $0x80
    jmp _start
"""


def build_pause(where: Path) -> Path:
    """Assemble and link the program in `where`; its path."""
    (where / "pause.s").write_text(PAUSE_I386)
    subprocess.run(["as", "--32", "-o", str(where / "pause.o"), str(where / "pause.s")],
                   check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-o", str(where / "pause"), str(where / "pause.o")],
                   check=True)
    return where / "pause"
