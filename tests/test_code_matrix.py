"""Offsets from machine code across jemalloc 5.3.0 builds (scripts/build-jemalloc.sh VARIANT):
gcc -O2/-O3/-Os, clang -O2, --enable-prof, the je_ and _rjem_ prefixes, _rjem_ by gcc 10, 11
and 13 and clang 14, 15 and 16 as tikv-jemalloc-sys builds it; each linked
statically and as a shared object, unstripped and stripped. Unstripped, the code must give
what the object's DWARF gives; stripped, a live fixture is read through the code route alone
and must match its own mallctl truth and the DWARF offsets of its unstripped twin."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.resolve.layout import (ObjectFacts, TsdLayout, inspect_object, layout_from_code,
                                    layout_from_dwarf)
from support.build import FIXTURES_SRC, default_jemalloc_dir, jemalloc_dir_problem
from support.procs import assert_no_thread_stopped_or_traced

CACHE = Path("/var/cache/ctprofd")
VARIANTS = {"gcc-O2": "", "gcc-O3": "", "gcc-Os": "", "clang-O2": "", "prof": "", "je": "je_",
            "rjem": "_rjem_", "rjem-gcc10": "_rjem_", "rjem-gcc11": "_rjem_",
            "rjem-gcc13": "_rjem_", "rjem-clang14": "_rjem_", "rjem-clang15": "_rjem_",
            "rjem-clang16": "_rjem_"}
# build -> the prefix of its public functions (rjem-gcc10 and rjem-gcc13: built in Debian 11
# and 13 roots, Debian 12 packages neither compiler; rjem-gcc11: compare with memory first;
# rjem-clang14/15: the size added from a table; rjem-clang16: counters read through the
# TSD's address, without %fs)
PLACEMENT = ("symbol_offset", "allocated_offset", "deallocated_offset", "static_block_offset",
             "tpoff_got", "tpoff_addend", "tpoff_symbolic")
LIBS = ["-lpthread", "-ldl", "-lm"]


@dataclass(frozen=True)
class Build:
    """alloc_threads linked against one jemalloc build, one way."""

    jemalloc: Path      # the build's directory
    linkage: str        # "static" | "dynamic"
    unstripped: Path    # the executable (its own lib/ next to it when dynamic)
    stripped: Path

    def jemalloc_object(self, binary: Path) -> Path:
        return binary if self.linkage == "static" else binary.parent / "lib/libjemalloc.so.2"


def jemalloc_build(variant: str) -> Path:
    path = default_jemalloc_dir() if variant == "gcc-O2" else CACHE / f"jemalloc-5.3.0-{variant}"
    problem = jemalloc_dir_problem(path) if variant == "gcc-O2" else (
        None if (path / ".ctprofd-complete").exists() else
        f"no jemalloc build {path}: run scripts/build-jemalloc.sh {variant} (or setup.sh --test)")
    if problem:
        pytest.fail(problem, pytrace=False)
    return path


def link(variant: str, linkage: str, root: Path) -> Build:
    jemalloc = jemalloc_build(variant)
    mangle = ["-DJEMALLOC_MANGLE"] if VARIANTS[variant] else []  # malloc -> je_malloc, ...
    unstripped, stripped = (root / f"{variant}-{linkage}-{kind}" for kind in ("full", "stripped"))
    (unstripped / "lib").mkdir(parents=True)
    if linkage == "static":
        objects = [jemalloc / "lib/libjemalloc_pic.a"]
    else:
        shutil.copy(jemalloc / "lib/libjemalloc.so.2", unstripped / "lib")
        objects = [unstripped / "lib/libjemalloc.so.2", "-Wl,-rpath,$ORIGIN/lib"]
    subprocess.run(["gcc", "-O1", "-pthread", *mangle, "-Wl,--build-id", "-I",
                    jemalloc / "include", FIXTURES_SRC / "alloc_threads.c", "-o",
                    unstripped / "alloc_threads", *objects, *LIBS], check=True,
                   capture_output=True)
    shutil.copytree(unstripped, stripped)
    target = "alloc_threads" if linkage == "static" else "lib/libjemalloc.so.2"
    subprocess.run(["strip", "--strip-all", stripped / target], check=True)
    return Build(jemalloc, linkage, unstripped / "alloc_threads", stripped / "alloc_threads")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Callable[[str, str], Build]:
    """(variant, linkage) -> its Build, linked on first use."""
    root = tmp_path_factory.mktemp("code-matrix")
    root.chmod(0o755)
    made: dict[tuple[str, str], Build] = {}

    def build(variant: str, linkage: str) -> Build:
        if (variant, linkage) not in made:
            made[variant, linkage] = link(variant, linkage, root)
        return made[variant, linkage]
    return build


def facts(obj: Path, shared: bool) -> ObjectFacts:
    with open(obj, "rb") as stream:
        found = inspect_object(stream, str(obj), shared)
    assert isinstance(found, ObjectFacts), found
    return found


@functools.cache  # both tests of a build compare with it
def dwarf_layout(build: Build) -> TsdLayout:
    obj = build.jemalloc_object(build.unstripped)
    with open(obj, "rb") as stream:
        layout = layout_from_dwarf(stream, facts(obj, build.linkage == "dynamic"), str(obj),
                                   "embedded")
    assert isinstance(layout, TsdLayout), layout
    return layout


def expected_route(variant: str, linkage: str, stripped: bool) -> str:
    """A stripped static executable exports a prefixed jemalloc's functions to nobody."""
    if stripped and linkage == "static" and VARIANTS[variant]:
        return "code: scan of the executable segment"
    return "code: malloc/free fast paths"


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unstripped_code_gives_the_dwarf_offsets(builds, variant, linkage):
    build = builds(variant, linkage)
    obj = build.jemalloc_object(build.unstripped)
    with open(obj, "rb") as stream:
        code = layout_from_code(stream, facts(obj, linkage == "dynamic"), str(obj))
    assert isinstance(code, TsdLayout), code
    assert code.source == expected_route(variant, linkage, stripped=False)
    dwarf = dwarf_layout(build)
    assert {k: getattr(code, k) for k in PLACEMENT} == {k: getattr(dwarf, k) for k in PLACEMENT}


@pytest.mark.parametrize("linkage", ["static", "dynamic"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stripped_is_read_from_code_exactly(builds, spawn_fixture, tmp_path, variant, linkage):
    build = builds(variant, linkage)
    fixture = spawn_fixture(build.stripped, 4)
    engine = Capturer(CaptureSettings(debug_dirs=(str(tmp_path / "empty"),)))
    snapshot = engine.capture(pids=[fixture.pid])
    assert snapshot.summary.failed == 0, snapshot.failures
    [process] = snapshot.processes
    assert {t.tid: (t.allocated_bytes, t.deallocated_bytes) for t in process.threads} == {
        t["tid"]: (t["allocated"], t["deallocated"]) for t in fixture.threads}
    [layout] = engine.cache.layouts()
    assert layout.source == expected_route(variant, linkage, stripped=True)
    dwarf = dwarf_layout(build)
    assert {k: getattr(layout, k) for k in PLACEMENT} == {
        k: getattr(dwarf, k) for k in PLACEMENT}
    assert_no_thread_stopped_or_traced(fixture.pid)


def test_offsets_command_and_export_name_the_code_route(builds, tmp_path):
    """`ctprofd offsets` (text and JSON) and `offsets export` say where the offsets of a
    stripped static _rjem_ build came from: the scan."""
    binary = str(builds("rjem", "static").stripped)
    empty = ["--debug-dir", str(tmp_path / "empty"), "--cache-dir", str(tmp_path / "cache")]
    text = ctprofd("offsets", binary, *empty)
    assert text.returncode == 0, text.stderr
    assert "offsets from:        code: scan of the executable segment" in text.stdout
    assert ("arena statistics:    no (totals: per-thread sums; table debian-12-libjemalloc2: "
            "its data is placed otherwise (") in text.stdout  # Debian's version, built otherwise
    shown = json.loads(ctprofd("offsets", "--json", binary, *empty).stdout)
    assert shown["source"] == "code: scan of the executable segment"
    exported = tmp_path / "offsets.json"
    result = ctprofd("offsets", "export", str(exported), binary, *empty)
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(exported.read_text())["layouts"].values()
    assert (entry["code_source"], entry["dwarf_source"]) == ("scan of the executable segment",
                                                             "none")


def ctprofd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctprofd", *args], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
