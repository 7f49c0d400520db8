"""Hand mutants of ctprofd/resolve/machine_code.py's refusals, the ones issue 28 found
surviving (scripts/hand_mutants.py; scores in docs/testing.md)."""

F = "ctprofd/resolve/machine_code.py"
MUTANTS = [
    ("fast paths: the lowest offset guessed instead of refused", F,
     "    if len(allocated) != 1 or len(deallocated) != 1:\n",
     "    if False:\n"
     "        pass\n"
     "    allocated = {min(allocated, key=lambda p: p[1])}\n"
     "    deallocated = {min(deallocated, key=lambda p: p[1])}\n"
     "    if len(allocated) != 1 or len(deallocated) != 1:\n"),
    ("scan: the lowest pair guessed instead of refused", F,
     "    if len(pairs) != 1:\n",
     "    pairs = {min(pairs, key=lambda p: p[1])} if pairs else pairs\n"
     "    if len(pairs) != 1:\n"),
    ("counters in the wrong order accepted", F,
     "    if dealloc - alloc != COUNTER_GAP:\n",
     "    if abs(dealloc - alloc) != COUNTER_GAP:\n"),
    ("a positive immediate taken as a TP offset", F,
     "            return Anchor(\"imm\", src.imm) if -MAX_TLS_OFFSET < src.imm < 0 else None\n",
     "            return Anchor(\"imm\", src.imm) if -MAX_TLS_OFFSET < src.imm < MAX_TLS_OFFSET "
     "else None\n"),
    ("an immediate of any size taken as a TP offset", F,
     "            return Anchor(\"imm\", src.imm) if -MAX_TLS_OFFSET < src.imm < 0 else None\n",
     "            return Anchor(\"imm\", src.imm) if src.imm < 0 else None\n"),
    ("any RIP-relative load taken as the TLS anchor", F,
     "            return Anchor(\"got\", slot) if self.tls_slot(slot) else None\n",
     "            return Anchor(\"got\", slot)\n"),
    ("counters inside the TLS block: check removed", F,
     "    if shift == 0 and not (0 <= symbol_offset and symbol_offset + dealloc + 8 <= tls.memsz):\n",
     "    if False:\n"),
    ("counters inside the TLS block: start not checked", F,
     "not (0 <= symbol_offset and symbol_offset + dealloc + 8 <= tls.memsz)",
     "not (symbol_offset + dealloc + 8 <= tls.memsz)"),
    ("counters inside the TLS block: end not checked", F,
     "not (0 <= symbol_offset and symbol_offset + dealloc + 8 <= tls.memsz)",
     "not (0 <= symbol_offset)"),
    ("constant_tpoff: any constant", F,
     "        return value if -MAX_TLS_OFFSET < value < 0 else None\n",
     "        return value\n"),
    ("constant_tpoff: a positive constant", F,
     "        return value if -MAX_TLS_OFFSET < value < 0 else None\n",
     "        return value if -MAX_TLS_OFFSET < value else None\n"),
    ("constant_tpoff: unsigned", F,
     'value = int.from_bytes(data, "little", signed=True) if len(data) == 8 else 0',
     'value = int.from_bytes(data, "little") if len(data) == 8 else 0'),
    ("a shared object's GOT constant taken as a TP offset", F,
     "            not self.shared and self.constant_tpoff(address) is not None)",
     "            self.constant_tpoff(address) is not None)"),
    ("an executable's run-time TPOFF slot taken", F,
     '        if anchor.kind == "got" and anchor.value in image.tpoff_slots or tp_offset is None:',
     "        if tp_offset is None:"),
]
