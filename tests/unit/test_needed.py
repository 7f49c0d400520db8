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


def test_ld_so_conf_lists_directories_and_follows_includes_as_the_loader_does(tmp_path):
    conf = tmp_path / "ld.so.conf"
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("/b/dir\n")
    (tmp_path / "conf.d" / "a.conf").write_bytes(b"/a/dir # a comment\n/caf\xe9/dir\n")
    (tmp_path / "abs.conf").write_text("/abs/dir\n")
    conf.write_text("# /not/this\n  /first/dir  \n"
                    "include conf.d/*.conf\n"          # relative to the file's directory
                    f"include\t{tmp_path}/abs.conf\n"  # absolute, after a tab
                    "include\n"                        # no pattern: nothing
                    "relative/dir\n"                   # not absolute: not a directory
                    "/last/dir#comment#more\n")
    assert needed.conf_dirs(str(conf)) == [
        "/first/dir", "/a/dir", "/caf\ufffd/dir", "/b/dir", "/abs/dir", "/last/dir"]
    assert needed.conf_dirs(str(tmp_path / "missing.conf")) == []


def test_includes_nest_four_deep_and_no_further(tmp_path):
    for level in range(6):
        (tmp_path / f"{level}.conf").write_text(f"/level/{level}\ninclude {level + 1}.conf\n")
    assert needed.conf_dirs(str(tmp_path / "0.conf")) == [f"/level/{n}" for n in range(5)]
    assert needed.conf_dirs(str(tmp_path / "2.conf"), depth=2) == ["/level/2", "/level/3",
                                                                    "/level/4"]


def test_only_the_first_mebibyte_of_ld_so_conf_is_read(tmp_path):
    conf = tmp_path / "ld.so.conf"
    first = "/early/dir\n"
    conf.write_text(first + "#" * ((1 << 20) - len(first) - 1) + "\n/late/dir\n")
    assert needed.conf_dirs(str(conf)) == ["/early/dir"]


def test_the_default_is_the_hosts_ld_so_conf():
    assert needed.conf_dirs() == needed.conf_dirs("/etc/ld.so.conf")
    assert needed.conf_dirs()  # Debian's lists the multiarch directories


def link(directory: Path, *flags: str) -> Path:
    """`main` needing libfoo.so, found through the search path `flags` give the linker."""
    program = build(directory)
    subprocess.run(["gcc", "-o", program, directory / "main.c", "-L", directory, "-lfoo",
                    *flags], check=True)
    return program


def test_rpath_and_runpath_entries_are_each_searched_with_origin_expanded(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    runpath = link(tmp_path, "-Wl,--enable-new-dtags,-rpath,/nowhere:${ORIGIN}/lib")
    (tmp_path / "libfoo.so").rename(lib / "libfoo.so")
    assert list(needed.loaded_objects(str(runpath)))[0] == str(lib / "libfoo.so")
    (lib / "libfoo.so").rename(tmp_path / "libfoo.so")
    rpath = link(tmp_path, "-Wl,--disable-new-dtags,-rpath,/nowhere:$ORIGIN/lib")
    (tmp_path / "libfoo.so").rename(lib / "libfoo.so")
    assert list(needed.loaded_objects(str(rpath)))[0] == str(lib / "libfoo.so")


def test_ld_so_conf_include_patterns_may_hold_spaces(tmp_path):
    (tmp_path / "with space.conf").write_text("/spaced/dir\n")
    conf = tmp_path / "ld.so.conf"
    conf.write_text("include with space.conf\n")
    assert needed.conf_dirs(str(conf)) == ["/spaced/dir"]


def test_objects_are_listed_once_and_the_walk_stops_after_max_objects(tmp_path, monkeypatch):
    program = build(tmp_path)
    everything = list(needed.loaded_objects(str(program)))
    assert len(everything) == len(set(everything)) >= 3  # libfoo, libc, the loader
    # the bound is checked before each object's DT_NEEDED are followed: main's two first
    monkeypatch.setattr(needed, "MAX_OBJECTS", 1)
    assert list(needed.loaded_objects(str(program))) == everything[:2]
    monkeypatch.setattr(needed, "MAX_OBJECTS", 3)
    assert list(needed.loaded_objects(str(program))) == everything[:3]


def test_a_shared_dependency_is_listed_once_and_the_bound_cuts_between_levels(tmp_path,
                                                                             monkeypatch):
    """main needs libA and libB, both need libC, libC needs libD (all -nostdlib: no libc in
    the graph). Breadth first, libC once; the bound is checked before each object's
    DT_NEEDED are followed, so the walk stops at the first object that reaches it."""
    for name, deps in {"D": [], "C": ["D"], "B": ["C"], "A": ["C"]}.items():
        (tmp_path / f"{name}.c").write_text(f"int {name.lower()}(void) {{ return 0; }}\n")
        subprocess.run(["gcc", "-shared", "-fPIC", "-nostdlib", "-o", tmp_path / f"lib{name}.so",
                        tmp_path / f"{name}.c", f"-L{tmp_path}", "-Wl,--no-as-needed",
                        *[f"-l{d}" for d in deps], "-Wl,-rpath,$ORIGIN"], check=True)
    (tmp_path / "main.c").write_text("void _start(void) {}\n")
    subprocess.run(["gcc", "-nostdlib", "-o", tmp_path / "main", tmp_path / "main.c",
                    f"-L{tmp_path}", "-Wl,--no-as-needed", "-lA", "-lB", "-Wl,-rpath,$ORIGIN"],
                   check=True)
    libs = [str(tmp_path / f"lib{name}.so") for name in "ABCD"]
    assert list(needed.loaded_objects(str(tmp_path / "main"), [])) == libs
    for bound, listed in ((2, 2), (3, 3)):
        monkeypatch.setattr(needed, "MAX_OBJECTS", bound)
        assert list(needed.loaded_objects(str(tmp_path / "main"), [])) == libs[:listed]
