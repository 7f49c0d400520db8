"""Builds the C fixture programs of tests/fixtures/ and the alloc_threads variants.

Output layout under `root` (all compiled -g -O1 -pthread -Wl,--build-id):

    static/alloc_threads                      jemalloc linked in statically, unstripped
    dynamic/alloc_threads                     uses <jemalloc_dir>/lib/libjemalloc.so.2 (RUNPATH)
    static-oddtls/, dynamic-oddtls/           the same with thread-locals of the program's own
                                              (-DFIXTURE_ODD_TLS): a PT_TLS segment whose size
                                              is not a multiple of its 64-byte alignment
    static-stripped-<mode>/alloc_threads      stripped; debug info placed per <mode>
    dynamic-stripped-<mode>/alloc_threads     unstripped executable using a private,
      + lib/libjemalloc.so.2                  stripped copy of libjemalloc.so.2, whose
                                              debug info is placed per <mode>
    debug-root/                               stand-in for /usr/lib/debug
    churn, alloc_loop                         jemalloc linked in statically
    hostile_threads                           jemalloc linked in statically (hardening tests)
    forker                                    jemalloc linked in statically (fork() children)
    poker                                     jemalloc linked in statically (rewrites its memory)

Modes (where the stripped object's debug file goes):

    buildid              debug-root/.build-id/xx/rest.debug (no .gnu_debuglink)
    debuglink            <obj>.debug next to the object, named by .gnu_debuglink
    debuglink-subdir     <obj dir>/.debug/<obj>.debug, named by .gnu_debuglink
    debuglink-debugroot  debug-root/<obj dir>/<obj>.debug, named by .gnu_debuglink
    badcrc               like debuglink, but the debug file was changed after the
                         link was made (valid ELF, CRC32 mismatch)
    nodebug              no debug file anywhere

Every variant's jemalloc object has its own build-id (executables: a per-variant
string compiled in; library copies: build-id rewritten), so no lookup can find
another variant's debug file.

Run as a script to build by hand: python tests/support/build.py OUTDIR [JEMALLOC_DIR]
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support import elf  # noqa: E402

FIXTURES_SRC = Path(__file__).resolve().parents[1] / "fixtures"
DEFAULT_JEMALLOC_DIR = Path("/var/cache/ctprofd/jemalloc-5.3.0")
JEMALLOC_STAMP = ".ctprofd-complete"  # written last by scripts/build-jemalloc.sh
JEMALLOC_FILES = (
    "lib/libjemalloc.a",
    "lib/libjemalloc_pic.a",
    "lib/libjemalloc.so.2",
    "include/jemalloc/jemalloc.h",
)
CFLAGS = ["-g", "-O1", "-pthread", "-Wall", "-Wl,--build-id"]
STATIC_LIBS = ["-lpthread", "-ldl", "-lm"]
LINKAGES = ("static", "dynamic")
MODES = ("buildid", "debuglink", "debuglink-subdir", "debuglink-debugroot", "badcrc", "nodebug")
BADCRC_TRAILER = b"\nctprofd: changed after the debuglink was made\n"


@dataclass(frozen=True)
class Variant:
    """One build of alloc_threads."""

    name: str  # e.g. "static", "dynamic-stripped-buildid"
    linkage: str  # "static" | "dynamic"
    mode: str  # "unstripped", "oddtls" (unstripped, unaligned PT_TLS) or one of MODES
    binary: Path  # the executable to run
    jemalloc_object: Path  # the ELF object holding jemalloc (binary, or its libjemalloc.so.2)
    debug_file: Path | None  # the split debug file, if any (badcrc: the altered one)

    @property
    def stripped(self) -> bool:
        return self.mode in MODES


@dataclass(frozen=True)
class FixtureBins:
    """Paths of everything build_all() made."""

    root: Path
    jemalloc_dir: Path
    debug_root: Path
    variants: dict[str, Variant]
    churn: Path
    alloc_loop: Path
    hostile_threads: Path
    forker: Path
    poker: Path

    def __getitem__(self, name: str) -> Variant:
        return self.variants[name]


def default_jemalloc_dir() -> Path:
    """$CTPROFD_JEMALLOC_DIR, else the cache dir scripts/build-jemalloc.sh fills."""
    return Path(os.environ.get("CTPROFD_JEMALLOC_DIR") or DEFAULT_JEMALLOC_DIR)


def jemalloc_dir_problem(jemalloc_dir: Path) -> str | None:
    """Why `jemalloc_dir` is not a complete jemalloc build, or None if it is."""
    missing = [f for f in (JEMALLOC_STAMP, *JEMALLOC_FILES) if not (jemalloc_dir / f).exists()]
    if not missing:
        return None
    return (
        f"no complete debug jemalloc build in {jemalloc_dir} (missing: {', '.join(missing)}); "
        "run scripts/build-jemalloc.sh as root (or scripts/setup.sh --test)"
    )


def _run(*argv: str | Path) -> None:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed:\n{result.stdout}{result.stderr}")


def _compile(src: str, out: Path, jemalloc_dir: Path, link: list[str | Path], variant: str = "") -> None:
    defines = [f'-DFIXTURE_VARIANT="{variant}"'] if variant else []
    if variant.endswith("-oddtls"):
        defines.append("-DFIXTURE_ODD_TLS")
    _run("gcc", *CFLAGS, *defines, "-I", jemalloc_dir / "include", FIXTURES_SRC / src, "-o", out, *link)


def _place_debug(obj: Path, mode: str, debug_root: Path) -> Path | None:
    """Strip `obj` and put its debug info where `mode` says; return the debug file."""
    if mode not in MODES:
        return None
    split = obj.with_name(obj.name + ".debug")
    _run("objcopy", "--only-keep-debug", obj, split)
    _run("objcopy", "--strip-all", obj)
    if mode == "nodebug":
        split.unlink()
        return None
    if mode == "buildid":
        bid = elf.build_id(obj)
        assert bid, f"{obj} has no build-id"
        dest = elf.build_id_path(debug_root, bid)
    elif mode in ("debuglink", "badcrc"):
        dest = split
    elif mode == "debuglink-subdir":
        dest = obj.parent / ".debug" / split.name
    elif mode == "debuglink-debugroot":
        dest = debug_root / obj.parent.resolve().relative_to("/") / split.name
    else:
        raise ValueError(f"unknown debug mode {mode!r}")
    if dest != split:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(split, dest)
    if mode != "buildid":
        _run("objcopy", f"--add-gnu-debuglink={dest}", obj)
    if mode == "badcrc":
        with open(dest, "ab") as f:
            f.write(BADCRC_TRAILER)
    return dest


def _build_variant(root: Path, jemalloc_dir: Path, debug_root: Path, linkage: str, mode: str) -> Variant:
    name = {"unstripped": linkage, "oddtls": f"{linkage}-oddtls"}.get(
        mode, f"{linkage}-stripped-{mode}")
    vdir = root / name
    vdir.mkdir()
    binary = vdir / "alloc_threads"
    if linkage == "static":
        _compile("alloc_threads.c", binary, jemalloc_dir,
                 [jemalloc_dir / "lib/libjemalloc.a", *STATIC_LIBS], variant=name)
        obj = binary
    else:
        lib = jemalloc_dir / "lib/libjemalloc.so.2"
        if mode in MODES:  # a private copy with its own build-id
            (vdir / "lib").mkdir()
            obj = vdir / "lib" / lib.name
            shutil.copy2(lib, obj)
            old = bytes.fromhex(elf.build_id(obj) or "")
            elf.set_build_id(obj, hashlib.sha1(old + name.encode()).digest()[: len(old)])
        else:
            obj = lib
        _compile("alloc_threads.c", binary, jemalloc_dir,
                 [obj, f"-Wl,-rpath,{obj.parent}"], variant=name)
    debug_file = _place_debug(obj, mode, debug_root)
    return Variant(name, linkage, mode, binary, obj, debug_file)


def build_all(root: Path, jemalloc_dir: Path) -> FixtureBins:
    """Build every fixture program and variant into `root` (must be empty or absent)."""
    problem = jemalloc_dir_problem(jemalloc_dir)
    if problem:
        raise FileNotFoundError(problem)
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    debug_root = root / "debug-root"
    debug_root.mkdir()
    static_link = [jemalloc_dir / "lib/libjemalloc.a", *STATIC_LIBS]
    jobs = [(linkage, mode) for linkage in LINKAGES for mode in ("unstripped", "oddtls", *MODES)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = [pool.submit(_build_variant, root, jemalloc_dir, debug_root, *job) for job in jobs]
        others = [pool.submit(_compile, f"{p}.c", root / p, jemalloc_dir, static_link)
                  for p in ("churn", "alloc_loop", "hostile_threads", "forker", "poker")]
        variants = {v.name: v for v in (f.result() for f in futures)}
        for f in others:
            f.result()
    # Readable and executable by any user (tests may drop privileges).
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
    return FixtureBins(root, jemalloc_dir, debug_root, variants, root / "churn", root / "alloc_loop",
                       root / "hostile_threads", root / "forker", root / "poker")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} OUTDIR [JEMALLOC_DIR]", file=sys.stderr)
        return 2
    jemalloc_dir = Path(argv[2]) if len(argv) == 3 else default_jemalloc_dir()
    bins = build_all(Path(argv[1]), jemalloc_dir)
    for v in bins.variants.values():
        print(f"{v.name:36} {v.binary}  (jemalloc in {v.jemalloc_object}; debug: {v.debug_file})")
    print(f"{'debug root':36} {bins.debug_root}")
    print(f"{'churn':36} {bins.churn}")
    print(f"{'alloc_loop':36} {bins.alloc_loop}")
    print(f"{'hostile_threads':36} {bins.hostile_threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
