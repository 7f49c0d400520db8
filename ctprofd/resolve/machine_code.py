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
version string. (General-dynamic code reaches the TSD through `__tls_get_addr`, not %fs:
it is read at the entry points only.)
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
# cmp between r64 and %fs:disp32(base), either order: fs prefix, REX.W, opcode 3B
# (register first) or 39 (memory first), ModRM with mod=10
FS_COMPARE = re.compile(rb"\x64[\x48-\x4f][\x39\x3b][\x80-\xbf]", re.DOTALL)
# mov %fs:0,r64 (the thread pointer; clang 16 then adds the TSD's offset and reads the
# counters without %fs), followed within TP_COMPARE_WINDOW bytes by a cmp between r64 and
# disp32(base), either order
TP_LOAD = re.compile(rb"\x64[\x48\x4c]\x8b[\x04\x0c\x14\x1c\x24\x2c\x34\x3c]\x25\0\0\0\0")
DISP32_COMPARE = re.compile(rb"[\x48-\x4f][\x39\x3b][\x80-\xbf]", re.DOTALL)
TP_COMPARE_WINDOW = 160
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


_TP, _OFFSET, _ADDRESS, _COUNTER = "tp", "offset", "address", "counter"


class _Tracker:
    """Follows instructions in address order, with what each register holds: the thread
    pointer (read from %fs:0), the TSD's offset from it (an anchor), the TSD's address (the
    two added), or a counter read through one of those (plus, maybe, a size); yields
    completed shapes. Jumps are not followed, and do not end what is tracked: compilers
    place the store back after a branch (gcc -Os), and only a register written since loses
    its meaning.

    The forms accepted, any registers, as gcc 11-12 and clang 14-16 emit them (M is a
    counter's memory operand: %fs:off(OFFSET), off(ADDRESS) or off(TP,OFFSET); a
    general-dynamic module's ADDRESS is %rax after `lea PAIR(%rip),%rdi; call`):
      anchor   mov GOT(%rip)|$imm,R                          (an offset)
               mov %fs:0,R; add GOT(%rip)|$imm|OFFSET,R      (an address; or lea)
      read     mov|add M,R     add|lea (R's counter plus anything, or anything plus R's)
      compare  cmp M+8,R  or  cmp R,M+8                      (R holding the counter at M)
      store    mov R,M    or  add S,M                        (after that compare)"""

    def __init__(self, tls_slot: Callable[[int], bool],
                 tls_pair: Callable[[int], bool] = lambda _: False) -> None:
        self.tls_slot = tls_slot          # GOT address -> is it a TPOFF slot?
        self.tls_pair = tls_pair          # GOT address -> is it a pair with our module id?
        self.pair_argument: int | None = None  # `lea PAIR(%rip),%rdi` just before a call
        self.regs: dict[int, tuple[str, object]] = {}  # register family -> (kind, value)
        self.compared: set[tuple[int, Anchor, int]] = set()
        self.read_at: dict[int, int] = {}  # register family -> where it got what it holds

    def _holds(self, reg: int, kind: str):
        state = self.regs.get(_family(reg))
        return state[1] if state is not None and state[0] == kind else None

    def _counter_operand(self, op) -> tuple[Anchor, int] | None:
        """(anchor, offset) of a memory operand relative to the TSD."""
        if op.type != x86.X86_OP_MEM:
            return None
        mem = op.mem
        if mem.segment == x86.X86_REG_FS:
            anchor = self._holds(mem.base, _OFFSET) if mem.index == 0 else None
        elif mem.segment != 0:
            anchor = None
        elif mem.index == 0:
            anchor = self._holds(mem.base, _ADDRESS)
        else:
            anchor = self._tp_plus_offset(mem.base, mem.index, mem.scale)
        return (anchor, mem.disp) if anchor is not None else None

    def _tp_plus_offset(self, a: int, b: int, scale: int) -> Anchor | None:
        if scale != 1:
            return None
        if self._holds(a, _TP) is not None:
            return self._holds(b, _OFFSET)
        return self._holds(a, _OFFSET) if self._holds(b, _TP) is not None else None

    def _counter_in(self, op) -> tuple[Anchor, int] | None:
        """The counter a 64-bit register operand holds."""
        if op.type == x86.X86_OP_REG and op.size == 8:
            return self._holds(op.reg, _COUNTER)
        return None

    def _call(self, pair: int | None) -> None:
        """A call clobbers the caller-saved registers; the one right after `lea
        PAIR(%rip),%rdi` for one of our module's GOT pairs is `__tls_get_addr`, whose
        result (%rax) is the TSD's address (the general-dynamic sequence the linker knows)."""
        for family in CALL_CLOBBERED:
            self.regs.pop(family, None)
        self.compared = {c for c in self.compared if c[0] not in CALL_CLOBBERED}
        if pair is not None:
            self.regs[x86.X86_REG_RAX] = (_ADDRESS, Anchor("dtv", pair))

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
        if name == "cmp":
            self._compare(dst, src)
            self._compare(src, dst)
            return None
        if dst.type == x86.X86_OP_REG:
            state = self._written(insn, dst, src) if dst.size == 8 else None
            self._kill(insn)
            if state is not None:
                self.regs[_family(dst.reg)] = state
                self.read_at[_family(dst.reg)] = (
                    self.read_at.get(_family(src.reg), insn.address)
                    if src.type == x86.X86_OP_REG and self.regs.get(_family(src.reg)) == state
                    else insn.address)
            return None
        fs = self._counter_operand(dst)
        self._kill(insn)
        if fs is None or src.type != x86.X86_OP_REG or src.size != 8:
            return None
        if name == "mov" and (_family(src.reg), *fs) in self.compared:
            return self._stored(fs)
        if name == "add" and any(c[1:] == fs for c in self.compared):
            return self._stored(fs)
        return None

    def _written(self, insn, dst, src) -> tuple[str, object] | None:
        """What a 64-bit register holds after `insn` writes it from `src`."""
        name, old = insn.mnemonic, self.regs.get(_family(dst.reg))
        counter = None if name == "lea" else self._counter_operand(src)
        if counter is not None:
            return (_COUNTER, counter) if name in ("mov", "add") else None
        if name in ("mov", "movabs"):
            if src.type == x86.X86_OP_REG:
                return self.regs.get(_family(src.reg))
            if self._is_thread_pointer(src):
                return _TP, True
            anchor = self._offset_source(insn, src)
            return (_OFFSET, anchor) if anchor is not None else None
        if name == "add":
            added = self._counter_in(src)
            if old is not None and old[0] == _COUNTER and (  # both read: read_at has both
                    added is None
                    or self.read_at[_family(dst.reg)] > self.read_at[_family(src.reg)]):
                return old  # the counter plus a size (or an older counter, from before)
            if added is not None:
                return _COUNTER, added
            return self._address(old, src, insn)
        if name == "lea" and src.type == x86.X86_OP_MEM and src.mem.segment == 0:
            return self._lea(src.mem)
        return None

    def _address(self, old, src, insn) -> tuple[str, object] | None:
        """TP + offset, added into a register that held one of the two."""
        if old is None:
            return None
        if old[0] == _TP:
            anchor = (self._holds(src.reg, _OFFSET) if src.type == x86.X86_OP_REG
                      else self._offset_source(insn, src))
            return (_ADDRESS, anchor) if anchor is not None else None
        if old[0] == _OFFSET and (self._is_thread_pointer(src) or (
                src.type == x86.X86_OP_REG and self._holds(src.reg, _TP) is not None)):
            return _ADDRESS, old[1]
        return None

    def _lea(self, mem) -> tuple[str, object] | None:
        """`lea` of a counter plus anything, or of TP + offset."""
        held = [self._holds(r, _COUNTER) for r, scale in ((mem.base, 1), (mem.index, mem.scale))
                if r != 0 and scale == 1 and self._holds(r, _COUNTER) is not None]
        if held:
            return (_COUNTER, held[0]) if len(held) == 1 else None
        if mem.index != 0:
            anchor = self._tp_plus_offset(mem.base, mem.index, mem.scale)
            return (_ADDRESS, anchor) if anchor is not None and mem.disp == 0 else None
        if self._holds(mem.base, _TP) is not None and -MAX_TLS_OFFSET < mem.disp < 0:
            return _ADDRESS, Anchor("imm", mem.disp)
        return None

    def _compare(self, reg_op, mem_op) -> None:
        """Note a compare of a register holding a counter with the field 8 bytes above."""
        fs = self._counter_operand(mem_op)
        held = self._counter_in(reg_op)
        if fs is not None and held is not None and held == (fs[0], fs[1] - 8):
            self.compared.add((_family(reg_op.reg), *held))

    def _stored(self, fs: tuple[Anchor, int]) -> CounterShape:
        self.compared = {c for c in self.compared if c[1:] != fs}
        return CounterShape(*fs)

    @staticmethod
    def _is_thread_pointer(op) -> bool:
        mem = op.mem
        return (op.type == x86.X86_OP_MEM and mem.segment == x86.X86_REG_FS and mem.base == 0
                and mem.index == 0 and mem.disp == 0)

    def _offset_source(self, insn, src) -> Anchor | None:
        """The TSD's offset from TP in an immediate (local-exec) or a TPOFF GOT slot."""
        if src.type == x86.X86_OP_IMM:  # capstone gives it sign-extended
            return Anchor("imm", src.imm) if -MAX_TLS_OFFSET < src.imm < 0 else None
        mem = src.mem
        if (src.type == x86.X86_OP_MEM and mem.base == x86.X86_REG_RIP and mem.index == 0
                and mem.segment == 0):
            slot = insn.address + insn.size + mem.disp
            return Anchor("got", slot) if self.tls_slot(slot) else None
        return None

    def _kill(self, insn) -> None:
        _, written = insn.regs_access()  # a CsError: counter_layout refuses the object
        for reg in written:
            family = _family(reg)
            self.regs.pop(family, None)
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
    candidates = list(islice(_scan_candidates(image), MAX_SCAN_CANDIDATES + 1))
    if len(candidates) > MAX_SCAN_CANDIDATES:
        raise CodeError(f"more than {MAX_SCAN_CANDIDATES} %fs compares (or thread-pointer "
                        "loads followed by a compare) in the code: too many to scan")
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


def _scan_candidates(image: Image) -> Iterable[tuple[int, int]]:
    """(address, its segment's address) of each %fs compare, then of each thread-pointer
    load with a compare after it, in the executable segments."""
    view = image.view
    for vaddr, offset, filesz in image.executable_segments():
        for match in FS_COMPARE.finditer(view, offset, offset + filesz):
            yield vaddr + match.start() - offset, vaddr
    for vaddr, offset, filesz in image.executable_segments():
        end = offset + filesz
        for match in TP_LOAD.finditer(view, offset, end):
            if DISP32_COMPARE.search(view, match.end(), min(end, match.end() + TP_COMPARE_WINDOW)):
                yield vaddr + match.start() - offset, vaddr


def _shapes_around(image: Image, md: capstone.Cs, compare: int,
                   segment: int) -> list[CounterShape]:
    """The shapes in the code around a compare at `compare`, decoded from the longest
    lead-in (within the segment starting at `segment`) whose decode falls on an instruction
    boundary at the compare: one decode with details per compare."""
    for start in sorted({max(segment, compare - lead) for lead in SCAN_LEAD_INS}):
        code = image.bytes_at(start, compare - start + SCAN_TAIL)  # the compare's segment
        boundary = False
        for insn_address, _, _, _ in md.disasm_lite(code[:compare - start + 16], start):
            if insn_address >= compare:
                boundary = insn_address == compare
                break
        if boundary:
            return shapes_in(md, code, start, image.is_tls_slot)  # no %fs in general dynamic
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
        first_page = image.loads[0][0] & ~0xFFF  # the code found is in one of them
        placement = {"static_block_offset": None, "tpoff_got": anchor.value - first_page,
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
