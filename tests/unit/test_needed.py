"""Following a program to the shared objects it loads (`ctprofd offsets PROGRAM`): as the
loader searches, and never stuck or raising on what it finds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ctprofd.resolve import needed


def build(directory: Path) -> Path:
    """A program that needs libfoo.so from its own directory ($ORIGIN)."""
    (directory / "foo.c").write_text("int foo(void) { return 1; }\n")
    (directory / "main.c").write_text("int foo(void);\nint main(void) { return foo(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", directory / "libfoo.so",
                    directory / "foo.c"], check=True)
    subprocess.run(["gcc", "-o", directory / "main", directory / "main.c", "-L", directory,
                    "-lfoo", "-Wl,-rpath,$ORIGIN"], check=True)
    return directory / "main"


def test_runpath_origin_then_the_system_directories(tmp_path):
    program = build(tmp_path)
    found = list(needed.loaded_objects(str(program)))
    assert found[0] == str(tmp_path / "libfoo.so")
    assert any(os.path.basename(p) == "libc.so.6" for p in found), found


def test_a_malformed_library_is_listed_but_not_followed(tmp_path):
    program = build(tmp_path)
    library = tmp_path / "libfoo.so"
    library.write_bytes(library.read_bytes()[:200])  # an ELF header, then nothing
    assert list(needed.loaded_objects(str(program), system_dirs=[])) == [str(library)]


def test_a_fifo_is_not_waited_on(tmp_path):
    fifo = tmp_path / "program"
    os.mkfifo(fifo)
    assert list(needed.loaded_objects(str(fifo))) == []
