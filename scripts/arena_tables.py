#!/usr/bin/env python3
"""Generate ctprofd/resolve/arena_tables.json, the arena-statistics layouts of jemalloc
builds without DWARF, from reference builds made with -g (see that module's docstring and
docs/totals.md).

    .venv/bin/python scripts/arena_tables.py           # write the tables
    .venv/bin/python scripts/arena_tables.py --check   # regenerate, compare, exit 1 on a difference

Each reference build reproduces how a distributor builds jemalloc, so that its data
sections are placed as in the distributor's stripped binary; `REFERENCE_BUILDS` says how
each is made. A build missing here is kept as checked in (and said so); `--check` compares
the ones present. Adding a table: bump FORMAT_VERSION in ctprofd/resolve/cache.py, so that
layouts cached without it are parsed again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctprofd.resolve import arena_tables, dwarf, elf  # noqa: E402

# (name, built library with DWARF, how it is made)
REFERENCE_BUILDS = [
    ("debian-12-libjemalloc2", "/var/cache/ctprofd/jemalloc-5.3.0-debian/lib/libjemalloc.so.2",
     "Debian 12 libjemalloc2 5.3.0-1 (jemalloc 5.3.0-0-g54eaed1): scripts/build-jemalloc.sh "
     "debian (its source package, debian/rules' configure options, dpkg-buildflags, "
     "--with-lg-vaddr=48)"),
]
SECTIONS = (".tdata", ".tbss", ".data", ".bss")  # where the variables and the TSD live


def entry(name: str, lib: str, how: str) -> dict:
    """The table of one reference build."""
    with open(lib, "rb") as stream:
        image = elf.open_elf(stream)
        found = dwarf.arena_offsets(image)
        tsd = dwarf.tsd_offsets(image)
        [version] = arena_tables.versions_in(stream)
        sections = arena_tables.sections_of(image)
    return {"name": name, "built": how, "version": version,
            "sections": {s: list(sections[s]) for s in SECTIONS if s in sections},
            "tsd": {"thread_allocated": tsd.allocated, "thread_deallocated": tsd.deallocated},
            "members": {k: v for k, v in sorted(found.items())
                        if k not in dwarf.ARENA_VARIABLES},
            "variables": {k: found[k] for k in dwarf.ARENA_VARIABLES}}


def generate(checked_in: dict) -> tuple[dict, list[str]]:
    """The tables regenerated from the builds present here (the others as checked in),
    and the names of the builds missing here."""
    old = {t["name"]: t for t in checked_in.get("tables", [])}
    tables, missing = [], []
    for name, lib, how in REFERENCE_BUILDS:
        if Path(lib).exists():
            tables.append(entry(name, lib, how))
        elif name in old:
            tables.append(old[name])
            missing.append(name)
        else:
            missing.append(name)
    return {"generated_by": "scripts/arena_tables.py", "tables": tables}, missing


def render(tables: dict) -> str:
    return json.dumps(tables, indent=1) + "\n"


def main(argv: list[str]) -> int:
    path = arena_tables.TABLES
    checked_in = json.loads(path.read_text()) if path.exists() else {}
    tables, missing = generate(checked_in)
    for name in missing:
        print(f"{name}: reference build not present here, kept as checked in", file=sys.stderr)
    if argv[1:] == ["--check"]:
        if render(tables) != (path.read_text() if path.exists() else ""):
            print(f"{path}: differs from what the reference builds give", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print("usage: arena_tables.py [--check]", file=sys.stderr)
        return 2
    path.write_text(render(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
