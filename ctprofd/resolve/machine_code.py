"""The counters' offsets from jemalloc's own machine code, for binaries without DWARF
(x86_64, jemalloc 5.3).

jemalloc's allocation fast paths touch the counters through `%fs` relative to a register
that holds the TSD's offset from the thread pointer (the TLS anchor):

    mov  GOT(%rip),%rcx          # initial-exec: the GOT slot an R_X86_64_TPOFF64 fills
    mov  $-0xa48,%rcx            # or local-exec (an executable): the offset itself
    mov  %fs:0x338(%rcx),%rdx    # load thread_allocated (or `add %fs:…,%reg`)
    cmp  %fs:0x340(%rcx),%rdx    # compare with thread_allocated_next_event_fast
    mov  %rdx,%fs:0x338(%rcx)    # store it back

`malloc` does this for thread_allocated, `free` and `sdallocx` for thread_deallocated.
Only that whole shape counts (a load or add of the counter, a compare of the same register
with the field 8 bytes above, a store of it back, all relative to one anchor); the
functions must agree on the anchor, and the two counters must sit 16 bytes apart, as they
do in jemalloc 5.3. Anything else is refused, never guessed.

Binaries that export none of those functions (a stripped executable with a prefixed
jemalloc, e.g. Rust's `_rjem_`) are scanned: each `%fs`-relative compare in the executable
segments is decoded with the code before it, and the shapes found must name one anchor and
one pair of counters; the scan is only trusted in a file that carries jemalloc 5.3's
version string.
"""

from __future__ import annotations

import mmap
import re
from collections import defaultdict
from dataclasses import dataclass
from itertools import islice
from typing import BinaryIO, Callable, Iterable

import capstone
from capstone import x86_const as x86
from elftools.elf.elffile import ELFFile

from . import elf

ENTRY_POINTS = {"malloc": "allocated", "free": "deallocated", "sdallocx": "deallocated"}
PREFIXES = ("", "je_", "_rjem_")  # default, --with-jemalloc-prefix=je_, tikv-jemalloc-sys
FUNCTION_WINDOW = 1024            # bytes decoded from an entry point (the fast path is first)
COUNTER_GAP = 16                  # thread_deallocated - thread_allocated in jemalloc 5.3
MAX_TLS_OFFSET = 1 << 20
VERSION_5_3 = re.compile(rb"5\.3\.\d+-\d+-g[0-9a-f]{40}")
# cmp r64, %fs:disp32(base): fs prefix, REX.W, opcode 3B, ModRM with mod=10
FS_COMPARE = re.compile(rb"\x64[\x48-\x4f]\x3b[\x80-\xbf]", re.DOTALL)
SCAN_LEAD_INS = (96, 80, 64, 48, 40, 32, 24, 16)  # bytes decoded before a compare
SCAN_TAIL = 256                   # bytes decoded after it (the store back)
MAX_SCAN_CANDIDATES = 1_000      # %fs compares decoded at most (jemalloc 5.3 has ~6)
PF_X = 1


class CodeError(Exception):
    """The code does not show the counters unambiguously: the message says what was seen."""


@dataclass(frozen=True)
class Anchor:
    """Where the TSD's thread-pointer offset comes from: a GOT slot (its address) or an
    immediate (local-exec); or, general-dynamic, the GOT pair (its address) whose
    `__tls_get_addr` call returned the TSD's own address (no %fs then)."""

    kind: str  # "got" | "imm" | "dtv"
    value: int

    def __str__(self) -> str:
        return {"got": f"GOT slot {self.value:#x}", "imm": f"immediate {self.value:#x}",
                "dtv": f"__tls_get_addr of GOT pair {self.value:#x}"}[self.kind]


@dataclass(frozen=True)
class CounterShape:
    """A load/add, compare-with-next-event and store of one counter at anchor + offset."""

    anchor: Anchor
    offset: int


@dataclass(frozen=True)
class CodeOffsets:
    """What the code proves: the anchor and both counters' offsets from it."""

    anchor: Anchor
    allocated: int
    deallocated: int
    route: str  # "malloc/free fast paths" | "scan of the executable segment"


@dataclass(frozen=True)
class CodeLayout:
    """The counters placed as layout.TsdLayout places them (see its fields)."""

    symbol_offset: int
    allocated_offset: int
    deallocated_offset: int
    static_block_offset: int | None
    tpoff_got: int | None
    tpoff_addend: int
    tpoff_symbolic: bool
    route: str
    dynamic_tls: bool = False


_FAMILIES: dict[int, int] = {}  # capstone register id -> id of its 64-bit register
for _full, _parts in {
        "RAX": ("EAX", "AX", "AL", "AH"), "RBX": ("EBX", "BX", "BL", "BH"),
        "RCX": ("ECX", "CX", "CL", "CH"), "RDX": ("EDX", "DX", "DL", "DH"),
        "RSI": ("ESI", "SI", "SIL"), "RDI": ("EDI", "DI", "DIL"),
        "RBP": ("EBP", "BP", "BPL"), "RSP": ("ESP", "SP", "SPL"),
        **{f"R{n}": (f"R{n}D", f"R{n}W", f"R{n}B") for n in range(8, 16)}}.items():
    for _name in (_full, *_parts):
        _FAMILIES[getattr(x86, f"X86_REG_{_name}")] = getattr(x86, f"X86_REG_{_full}")


def _family(reg: int) -> int:
    return _FAMILIES.get(reg, reg)


CALL_CLOBBERED = frozenset(getattr(x86, f"X86_REG_{name}") for name in (
    "RAX", "RCX", "RDX", "RSI", "RDI", "R8", "R9", "R10", "R11"))


def _disassembler() -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


class _Tracker:
    """Follows instructions in address order: which registers hold an anchor, which hold a
    counter loaded from %fs, which compared it; yields completed shapes. Jumps are not
    followed, and do not end what is tracked: compilers place the store back after a
    branch (gcc -Os), and only a register written since loses its meaning."""

    def __init__(self, tls_slot: Callable[[int], bool],
                 tls_pair: Callable[[int], bool] = lambda _: False) -> None:
        self.tls_slot = tls_slot          # GOT address -> is it a TPOFF slot?
        self.tls_pair = tls_pair          # GOT address -> is it a pair with our module id?
        self.pair_argument: int | None = None  # `lea PAIR(%rip),%rdi` just before a call
        self.anchors: dict[int, Anchor] = {}
        self.loaded: dict[int, tuple[Anchor, int]] = {}
        self.compared: set[tuple[int, Anchor, int]] = set()

    def _fs_operand(self, op) -> tuple[Anchor, int] | None:
        """An operand at anchor + offset: %fs-relative, or for a general-dynamic anchor
        (the TSD's own address in a register) plain."""
        mem = op.mem
        if op.type != x86.X86_OP_MEM or mem.index != 0:
            return None
        anchor = self.anchors.get(_family(mem.base))
        if anchor is None or (mem.segment == x86.X86_REG_FS) == (anchor.kind == "dtv"):
            return None
        return anchor, mem.disp

    def _call(self, pair: int | None) -> None:
        """A call clobbers the caller-saved registers; the one right after `lea
        PAIR(%rip),%rdi` for one of our module's GOT pairs is `__tls_get_addr`, whose
        result (%rax) is the TSD's address (the general-dynamic sequence the linker knows)."""
        for family in CALL_CLOBBERED:
            self.anchors.pop(family, None)
            self.loaded.pop(family, None)
        self.compared = {c for c in self.compared if c[0] not in CALL_CLOBBERED}
        if pair is not None:
            self.anchors[x86.X86_REG_RAX] = Anchor("dtv", pair)

    def step(self, insn) -> CounterShape | None:
        ops = insn.operands
        name = insn.mnemonic
        pair, self.pair_argument = self.pair_argument, None
        if name == "call":
            self._call(pair)
            return None
        if (name == "lea" and len(ops) == 2 and ops[0].type == x86.X86_OP_REG
                and _family(ops[0].reg) == x86.X86_REG_RDI and ops[1].type == x86.X86_OP_MEM
                and ops[1].mem.base == x86.X86_REG_RIP and ops[1].mem.index == 0
                and self.tls_pair(insn.address + insn.size + ops[1].mem.disp)):
            self._kill(insn)
            self.pair_argument = insn.address + insn.size + ops[1].mem.disp
            return None
        if len(ops) != 2:
            self._kill(insn)
            return None
        dst, src = ops
        if dst.type == x86.X86_OP_REG:
            reg = _family(dst.reg)
            fs = self._fs_operand(src)
            if name in ("mov", "add") and fs is not None and dst.size == 8:
                self._kill(insn)
                self.loaded[reg] = fs
                return None
            if name == "cmp" and fs is not None:
                held = self.loaded.get(reg)
                if held is not None and held == (fs[0], fs[1] - 8):
                    self.compared.add((reg, *held))
                return None
            if name == "add" and reg in self.loaded:
                held = self.loaded[reg]  # the size added to the loaded counter
                self._kill(insn)
                self.loaded[reg] = held
                return None
            anchor = self._anchor_source(insn, dst, src)
            self._kill(insn)
            if anchor is not None:
                self.anchors[reg] = anchor
            return None
        if name == "cmp" and src.type == x86.X86_OP_REG and (fs := self._fs_operand(dst)):
            held = self.loaded.get(_family(src.reg))  # the other operand order
            if held is not None and held == (fs[0], fs[1] - 8):
                self.compared.add((_family(src.reg), *held))
            return None
        if name == "mov" and src.type == x86.X86_OP_REG and (fs := self._fs_operand(dst)):
            key = (_family(src.reg), *fs)
            self._kill(insn)
            if key in self.compared:
                self.compared.discard(key)
                return CounterShape(*fs)
            return None
        self._kill(insn)
        return None

    def _anchor_source(self, insn, dst, src) -> Anchor | None:
        if insn.mnemonic not in ("mov", "movabs") or dst.size != 8:
            return None
        if src.type == x86.X86_OP_IMM:
            value = src.imm if src.imm < 1 << 63 else src.imm - (1 << 64)
            return Anchor("imm", value) if -MAX_TLS_OFFSET < value < 0 else None
        if src.type == x86.X86_OP_REG:
            return self.anchors.get(_family(src.reg))
        mem = src.mem
        if (src.type == x86.X86_OP_MEM and mem.base == x86.X86_REG_RIP and mem.index == 0
                and mem.segment == 0):
            slot = insn.address + insn.size + mem.disp
            return Anchor("got", slot) if self.tls_slot(slot) else None
        return None

    def _kill(self, insn) -> None:
        try:
            _, written = insn.regs_access()
        except capstone.CsError:
            written = ()
        for reg in written:
            family = _family(reg)
            self.anchors.pop(family, None)
            self.loaded.pop(family, None)
            self.compared = {c for c in self.compared if c[0] != family}


def shapes_in(md: capstone.Cs, code: bytes, address: int, tls_slot: Callable[[int], bool],
              tls_pair: Callable[[int], bool] = lambda _: False) -> list[CounterShape]:
    """Every counter shape in a linear decode of `code` (at `address`)."""
    tracker = _Tracker(tls_slot, tls_pair)
    found = []
    for insn in md.disasm(code, address):
        shape = tracker.step(insn)
        if shape is not None:
            found.append(shape)
    return found


class Image:
    """An ELF object's bytes by virtual address, and the facts the code route needs."""

    def __init__(self, image: ELFFile, view: mmap.mmap, shared: bool) -> None:
        self.elf = image
        self.view = view
        self.shared = shared
        self.loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"], s["p_flags"])
                      for s in image.iter_segments("PT_LOAD")]
        self.tpoff_slots = {r.offset: r for r in elf.tpoff_relocations(image)}
        self.tls_pairs = elf.module_tls_pairs(image) if shared else {}
        self.prefix = elf.jemalloc_prefix(image)

    def is_tls_pair(self, address: int) -> bool:
        """A general-dynamic GOT pair carrying this object's own module id."""
        return address in self.tls_pairs

    def pair_offset(self, address: int) -> int | None:
        """The offset in the module's block a GOT pair's second word holds: from its
        DTPOFF64 relocation, else the constant the linker wrote into the file."""
        offset = self.tls_pairs.get(address)
        if offset is None:
            data = self.bytes_at(address + 8, 8)
            offset = int.from_bytes(data, "little") if len(data) == 8 else None
        return offset if offset is not None and 0 <= offset < MAX_TLS_OFFSET else None

    def bytes_at(self, address: int, size: int) -> bytes:
        for vaddr, offset, filesz, _ in self.loads:
            if vaddr <= address < vaddr + filesz:
                start = offset + address - vaddr
                return bytes(self.view[start:start + min(size, vaddr + filesz - address)])
        return b""

    def is_tls_slot(self, address: int) -> bool:
        """A GOT slot holding a TP offset: filled by a TPOFF64 relocation or, in an
        executable, by the linker (a constant in the file)."""
        return address in self.tpoff_slots or (
            not self.shared and self.constant_tpoff(address) is not None)

    def constant_tpoff(self, address: int) -> int | None:
        """The TP offset an executable's GOT slot holds in the file, if plausible."""
        data = self.bytes_at(address, 8)
        value = int.from_bytes(data, "little", signed=True) if len(data) == 8 else 0
        return value if -MAX_TLS_OFFSET < value < 0 else None

    def executable_segments(self) -> Iterable[tuple[int, int, int]]:
        for vaddr, offset, filesz, flags in self.loads:
            if flags & PF_X:
                yield vaddr, offset, filesz


ROLES = {prefix + name: role for prefix in PREFIXES for name, role in ENTRY_POINTS.items()}


def _from_entry_points(image: Image, md: capstone.Cs) -> CodeOffsets | None:
    """The offsets from the exported (or, unstripped, named) entry points; None when
    there are none, or none shows a counter."""
    roles = dict(ROLES)
    if image.prefix:  # the prefix of its mallctl: pyarrow's je_arrow_, and any other
        roles.update({image.prefix + name: role for name, role in ENTRY_POINTS.items()})
    functions = elf.defined_functions(image.elf, set(roles))
    counters: dict[str, set[tuple[Anchor, int]]] = defaultdict(set)
    seen = []
    for name, (address, size) in sorted(functions.items()):
        code = image.bytes_at(address, min(size or FUNCTION_WINDOW, FUNCTION_WINDOW))
        shapes = shapes_in(md, code, address, image.is_tls_slot, image.is_tls_pair)
        seen.append(f"{name}: {len(shapes)}")
        counters[roles[name]].update((s.anchor, s.offset) for s in shapes)
    if not any(counters.values()):
        return None
    if not counters["allocated"] or not counters["deallocated"]:
        raise CodeError(f"counter shapes per entry point: {', '.join(seen)}; "
                        "need thread_allocated in malloc and thread_deallocated in "
                        "free/sdallocx")
    anchors = {a for pairs in counters.values() for a, _ in pairs}
    if len(anchors) != 1:
        raise CodeError("the fast paths disagree on the TLS anchor: "
                        + ", ".join(sorted(map(str, anchors))))
    return _offsets(anchors.pop(), counters["allocated"], counters["deallocated"],
                    "malloc/free fast paths")


def _offsets(anchor: Anchor, allocated: set, deallocated: set, route: str) -> CodeOffsets:
    if len(allocated) != 1 or len(deallocated) != 1:
        raise CodeError(f"ambiguous counters: allocated at {sorted(d for _, d in allocated)}, "
                        f"deallocated at {sorted(d for _, d in deallocated)}")
    (_, alloc), = allocated
    (_, dealloc), = deallocated
    if dealloc - alloc != COUNTER_GAP:
        raise CodeError(f"counters at {alloc:#x} and {dealloc:#x} are not {COUNTER_GAP} "
                        "bytes apart as in jemalloc 5.3")
    return CodeOffsets(anchor, alloc, dealloc, route)


def _scan(image: Image, md: capstone.Cs) -> CodeOffsets:
    """Find the fast paths without symbols: every %fs-relative compare, decoded with the
    code before it, in the executable segments."""
    if not VERSION_5_3.search(image.view):
        raise CodeError("no allocation entry point exported and no jemalloc 5.3 version "
                        "string to trust a scan of the code")
    candidates = list(islice(((vaddr + match.start() - offset, vaddr)
                              for vaddr, offset, filesz in image.executable_segments()
                              for match in FS_COMPARE.finditer(image.view, offset,
                                                               offset + filesz)),
                             MAX_SCAN_CANDIDATES + 1))
    if len(candidates) > MAX_SCAN_CANDIDATES:
        raise CodeError(f"more than {MAX_SCAN_CANDIDATES} %fs compares in the code: "
                        "too many to scan")
    found: dict[Anchor, set[int]] = defaultdict(set)
    for compare, segment in candidates:
        for shape in _shapes_around(image, md, compare, segment):
            found[shape.anchor].add(shape.offset)
    pairs = {(anchor, d) for anchor, offsets in found.items() for d in offsets
             if d + COUNTER_GAP in offsets}
    if len(pairs) != 1:
        seen = "; ".join(f"{a}: {sorted(map(hex, o))}" for a, o in found.items()) or "none"
        raise CodeError(f"scan of the code found {len(pairs)} counter pairs "
                        f"(shapes by anchor: {seen})")
    (anchor, alloc), = pairs
    return CodeOffsets(anchor, alloc, alloc + COUNTER_GAP, "scan of the executable segment")


def _shapes_around(image: Image, md: capstone.Cs, compare: int,
                   segment: int) -> list[CounterShape]:
    """The shapes in the code around a compare at `compare`, decoded from the longest
    lead-in (within the segment starting at `segment`) whose decode falls on an instruction
    boundary at the compare: one decode with details per compare."""
    for start in sorted({max(segment, compare - lead) for lead in SCAN_LEAD_INS}):
        code = image.bytes_at(start, compare - start + SCAN_TAIL)
        if len(code) <= compare - start:
            continue
        boundary = False
        for insn_address, _, _, _ in md.disasm_lite(code[:compare - start + 16], start):
            if insn_address >= compare:
                boundary = insn_address == compare
                break
        if boundary:
            return shapes_in(md, code, start, image.is_tls_slot, image.is_tls_pair)
    return []


def _placed(image: Image, found: CodeOffsets) -> CodeLayout:
    """Where the TSD is, from the anchor: for a shared object the TPOFF64 GOT slot (the
    relocation's addend is the TSD's offset in the module's block when it names no
    symbol), for an executable the TP offset below module 1's block."""
    tls = elf.tls_segment(image.elf)
    if tls is None:
        raise CodeError("no PT_TLS segment")
    anchor, alloc, dealloc = found.anchor, found.allocated, found.deallocated
    if anchor.kind == "dtv":
        symbol_offset = image.pair_offset(anchor.value)
        if symbol_offset is None:
            raise CodeError(f"{anchor}: no plausible offset in the TLS block")
        shift = 0
        placement = {"static_block_offset": None, "tpoff_got": None, "tpoff_addend": 0,
                     "tpoff_symbolic": False, "dynamic_tls": True}
    elif image.shared:
        reloc = image.tpoff_slots.get(anchor.value) if anchor.kind == "got" else None
        if reloc is None:
            raise CodeError(f"a shared object whose fast paths use {anchor}, not a TPOFF64 slot")
        shift = reloc.addend if reloc.symbol is not None else 0
        symbol_offset = 0 if reloc.symbol is not None else reloc.addend
        placement = {"static_block_offset": None, "tpoff_got": anchor.value - _first_page(image),
                     "tpoff_addend": reloc.addend, "tpoff_symbolic": reloc.symbol is not None}
    else:
        tp_offset = anchor.value if anchor.kind == "imm" else image.constant_tpoff(anchor.value)
        if anchor.kind == "got" and anchor.value in image.tpoff_slots or tp_offset is None:
            raise CodeError(f"an executable whose fast paths use {anchor}, filled at run time")
        block = tls.static_block_offset()
        shift, symbol_offset = 0, tp_offset + block
        placement = {"static_block_offset": block, "tpoff_got": None, "tpoff_addend": 0,
                     "tpoff_symbolic": False}
    if shift == 0 and not (0 <= symbol_offset and symbol_offset + dealloc + 8 <= tls.memsz):
        raise CodeError(f"counters at {anchor} + {dealloc:#x} lie outside the "
                        f"{tls.memsz}-byte TLS block")
    return CodeLayout(symbol_offset, alloc + shift, dealloc + shift, route=found.route,
                      **placement)


def _first_page(image: Image) -> int:
    if not image.loads:
        raise CodeError("no PT_LOAD segment")
    return image.loads[0][0] & ~0xFFF


def counter_layout(stream: BinaryIO, shared: bool, scan: bool = False) -> CodeLayout:
    """The TSD's placement and counter offsets the code proves; raises CodeError saying
    what was tried, or what pyelftools raises for a malformed file. `scan`: skip the entry
    points (benchmarks/cold_start.py measures the scan of a large binary with it)."""
    image = elf.open_elf(stream)
    if not elf.is_x86_64(image):
        raise CodeError("the code route reads x86_64 only")
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as view:
        found = Image(image, view, shared)
        md = _disassembler()
        try:
            entry = None if scan else _from_entry_points(found, md)
            return _placed(found, entry or _scan(found, md))
        except capstone.CsError as exc:
            raise CodeError(f"disassembler: {exc}") from None
