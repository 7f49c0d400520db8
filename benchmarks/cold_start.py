"""Cold start: resolving jemalloc's offsets in a binary with >= 100 MB of .debug_info whose
jemalloc compile units come last among thousands, against `pahole -C tsd_s` on the same file.

The binary is generated (never committed): UNITS C files, each with STRUCTS struct types
(24 members, nested arrays and pointers) and as many functions, compiled with -g -O0
-fno-eliminate-unused-debug-types in parallel, linked before libjemalloc.a so that
jemalloc's objects, pulled out of the archive, come after every generated unit. The result
is cached in the work dir, keyed by its parameters. Its main() allocates through jemalloc,
prints READY and blocks, so it can be run and captured like any target.

Measured, each REPEATS times after one untimed run that warms the page cache:
  pahole           `pahole -C tsd_s BINARY`: wall, CPU, peak RSS (wait4)
  daemon           a new Capturer's `capture(pids=[pid])` of the running binary: what the
                   daemon does on first sight (sandboxed parse worker started from scratch,
                   /proc, both parse phases, one ptrace stop); peak RSS of the worker's
                   parsing child (VmHWM, polled)
  tsd_offsets      `ctprofd.resolve.dwarf.tsd_offsets` in a fresh interpreter: the DWARF search
                   alone; peak RSS of that interpreter (wait4)
  resolve_object   `ctprofd.resolve.layout.resolve_object` in a fresh interpreter: both phases
                   (ELF symbols, then DWARF) in process
  code_stripped    `resolve_object` in a fresh interpreter on the binary's stripped twin
                   (`strip --strip-all`, no debug file anywhere): the DWARF search finds
                   nothing and the offsets come from the malloc/free fast paths
  code_scan        `machine_code.counter_layout(scan=True)` on the stripped twin: the scan
                   of the executable segment that a binary exporting no allocation
                   function needs (the slowest code route)
  daemon_stripped  the `daemon` measurement on the running stripped twin

Run: .venv/bin/python -m benchmarks.cold_start [--quick] [--units N] [--structs N]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.build import default_jemalloc_dir

from . import REPO
from .processes import Processes, children_of, die_with_parent, status_kib
from .report import log, machine, parser, write_result
from .stats import distribution

TYPES = ("int", "unsigned long", "double", "char", "short", "long long", "float",
         "unsigned char")
MAIN_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <jemalloc/jemalloc.h>
int main(void) {
    size_t len = sizeof(unsigned long);
    unsigned long allocated = 0;
    volatile char *p = malloc(4096);
    p[0] = 1;
    mallctl("thread.allocated", &allocated, &len, NULL, 0);
    printf("READY\n");
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0)
        ;
    free((void *)p);
    return 0;
}
"""
JEMALLOC_UNIT = re.compile(r"(^|/)src/[a-z_0-9]+\.c$")


def unit_source(i: int, structs: int) -> str:
    out = [f"/* generated unit {i} */"]
    for s in range(structs):
        out.append(f"struct u{i}_s{s} {{")
        for m in range(24):
            t = TYPES[(s * 7 + m) % len(TYPES)]
            if m % 6 == 5 and s > 0:
                out.append(f"  struct u{i}_s{s - 1} *l{m};")
            elif m % 4 == 3:
                out.append(f"  {t} a{m}[{m + 1}][2];")
            else:
                out.append(f"  {t} f{m};")
        out.append("};")
        out.append(f"long u{i}_f{s}(struct u{i}_s{s} *p, int k) {{ long acc = k; "
                   f"int x{s} = k * 2; double y = x{s}; for (int j = 0; j < k; j++) "
                   f"{{ long t = p->f0 * j; acc += t + (long)y; }} "
                   f"return acc + (long)sizeof(*p); }}")
    return "\n".join(out) + "\n"


def _run(argv: list[str], **kw) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, **kw)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed:\n{result.stderr[-2000:]}")


def debug_info_size(binary: Path) -> int:
    out = subprocess.run(["readelf", "-SW", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if ".debug_info" in fields:
            at = fields.index(".debug_info")
            return int(fields[at + 4], 16)  # Name Type Address Off Size
    return 0


def unit_order(binary: Path) -> dict:
    """Where jemalloc's compile units are among all units, in .debug_info order."""
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        names = []
        for cu in dwarf.iter_CUs():
            name = cu.get_top_DIE().attributes.get("DW_AT_name")
            names.append(name.value.decode() if name else "")
    jemalloc = [i for i, n in enumerate(names) if JEMALLOC_UNIT.search(n)]
    tsd = [i for i, n in enumerate(names) if n.endswith("src/tsd.c")]
    return {"units": len(names), "jemalloc_units": len(jemalloc),
            "first_jemalloc_unit": min(jemalloc, default=-1),
            "tsd_c_unit": tsd[0] if tsd else -1,
            "jemalloc_units_last": bool(jemalloc) and min(jemalloc) > max(
                (i for i, n in enumerate(names) if "/gen/u" in n or n.startswith("gen/u")),
                default=-1)}


def generate(work_dir: Path, units: int, structs: int) -> tuple[Path, dict]:
    """The big binary and its facts (cached by parameters)."""
    jemalloc = default_jemalloc_dir()
    directory = work_dir / f"big-{units}x{structs}"
    binary, stamp = directory / "big", directory / "facts.json"
    if stamp.exists() and binary.exists() and stripped_twin(binary).exists():
        return binary, json.loads(stamp.read_text())
    gen = directory / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    log(f"generating {units} units of {structs} structs in {gen}")
    started = time.monotonic()
    flags = ["-g", "-O0", "-fno-eliminate-unused-debug-types"]

    def build(i: int) -> Path:
        obj = gen / f"u{i}.o"
        if not obj.exists():
            src = gen / f"u{i}.c"
            src.write_text(unit_source(i, structs))
            _run(["gcc", "-c", *flags, "-o", str(obj) + ".tmp", str(src)])
            os.replace(str(obj) + ".tmp", obj)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objects = list(pool.map(build, range(units)))
    main = gen / "main.c"
    main.write_text(MAIN_C)
    # generated units first, then main, then the archive: the members the link pulls out
    # of libjemalloc.a land after everything else.
    _run(["gcc", "-g", "-pthread", "-I", str(jemalloc / "include"), "-o", str(binary),
          *map(str, objects), str(main), str(jemalloc / "lib" / "libjemalloc.a"),
          "-lpthread", "-ldl", "-lm"], cwd=gen)
    _run(["strip", "--strip-all", "-o", str(stripped_twin(binary)), str(binary)])
    facts = {"units_generated": units, "structs_per_unit": structs,
             "build_seconds": round(time.monotonic() - started, 1),
             "file_bytes": binary.stat().st_size, "debug_info_bytes": debug_info_size(binary),
             "stripped_file_bytes": stripped_twin(binary).stat().st_size,
             **unit_order(binary)}
    stamp.write_text(json.dumps(facts, indent=2))
    log(f"built {binary}: {facts}")
    return binary, facts


def stripped_twin(binary: Path) -> Path:
    return binary.with_name(binary.name + ".stripped")


def timed_child(argv: list[str], **kw) -> dict:
    """Run to completion; wall, CPU and peak RSS (wait4) of the child."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=die_with_parent, **kw)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err.decode()[-2000:]}")
    return {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "stdout": out.decode()}


IN_PROCESS = {
    "tsd_offsets": """
import json, sys, time
t0 = time.perf_counter()
from elftools.elf.elffile import ELFFile
from ctprofd.resolve import dwarf
t1 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    offsets = dwarf.tsd_offsets(ELFFile(f))
t2 = time.perf_counter()
print(json.dumps({"import_seconds": t1 - t0, "call_seconds": t2 - t1,
                  "allocated": offsets.allocated, "deallocated": offsets.deallocated}))
""",
    "resolve_object": """
import json, sys, time
t0 = time.perf_counter()
from ctprofd.resolve import layout
from ctprofd.resolve.debuginfo import DebugSearch
t1 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    found = layout.resolve_object(f, sys.argv[1], [], DebugSearch(()), False)
t2 = time.perf_counter()
print(json.dumps({"import_seconds": t1 - t0, "call_seconds": t2 - t1,
                  "allocated": found.allocated_offset, "deallocated": found.deallocated_offset,
                  "source": found.source}))
""",
}
SCAN = """
import json, sys, time
t0 = time.perf_counter()
from ctprofd.resolve import machine_code
t1 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    found = machine_code.counter_layout(f, shared=False, scan=True)
t2 = time.perf_counter()
print(json.dumps({"import_seconds": t1 - t0, "call_seconds": t2 - t1,
                  "allocated": found.allocated_offset, "deallocated": found.deallocated_offset,
                  "source": found.route}))
"""
ON_STRIPPED = {"code_stripped": IN_PROCESS["resolve_object"], "code_scan": SCAN}


def in_process(code: str, binary: Path, env: dict) -> dict:
    """A fresh interpreter running `code`: its wall, CPU and peak RSS, and the seconds of
    its imports and of the call itself, as it measured them."""
    run = timed_child([sys.executable, "-c", code, str(binary)], cwd=REPO,
                      env={**os.environ, **env})
    said = json.loads(run["stdout"].strip().splitlines()[-1])
    return {**run, "import_seconds": said["import_seconds"], "call_seconds": said["call_seconds"],
            "said": said}


class HwmPoller:
    """Samples VmHWM of every descendant of the parse worker zygote until stopped."""

    def __init__(self, capturer) -> None:
        self.capturer = capturer
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            zygote = self.capturer.attacher.worker.pid
            if zygote is not None:
                for child in children_of(zygote):
                    try:
                        self.peak_kib = max(self.peak_kib, status_kib(child, "VmHWM"))
                    except OSError:
                        pass
            self._stop.wait(0.005)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def daemon_path(pid: int) -> dict:
    """A fresh Capturer's first capture of the target, as the daemon's first snapshot."""
    from ctprofd.probe.capture import Capturer, CaptureSettings
    started = time.perf_counter()
    capturer = Capturer(CaptureSettings(cache_dir=None, state_dir=None))
    poller = HwmPoller(capturer)
    try:
        snapshot = capturer.capture(pids=[pid])
        wall = time.perf_counter() - started
    finally:
        peak = poller.stop()
        capturer.close()
    summary = snapshot.summary
    if summary.jemalloc_detected != 1 or summary.probed_ok != 1:
        raise RuntimeError(f"the daemon path did not resolve the big binary: {summary}, "
                           f"{snapshot.failures}")
    [layout] = capturer.cache.layouts()
    log(f"daemon path on pid {pid}: offsets from {layout.source}")
    return {"wall_seconds": wall, "worker_child_peak_rss_mib": peak,
            "elf_opens": capturer.stats.elf_opens}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, help="generated compile units (default 2300; "
                   "--quick 40)")
    p.add_argument("--structs", type=int, default=100, help="structs per unit (default 100)")
    p.add_argument("--repeats", type=int, help="timed runs of each method (default 5; "
                   "--quick 1)")
    args = p.parse_args(argv)
    units = args.units or (40 if args.quick else 2300)
    repeats = args.repeats or (1 if args.quick else 5)
    started, host = time.time(), machine()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    binary, facts = generate(args.work_dir, units, args.structs)
    results: dict = {"binary": facts, "repeats": repeats}
    env_path = {"PYTHONPATH": str(REPO)}
    stripped = stripped_twin(binary)
    methods = {
        "pahole": lambda: timed_child(["pahole", "-C", "tsd_s", str(binary)]),
        **{name: (lambda code=code: in_process(code, binary, env_path))
           for name, code in IN_PROCESS.items()},
        **{name: (lambda code=code: in_process(code, stripped, env_path))
           for name, code in ON_STRIPPED.items()},
    }
    with Processes() as procs:
        targets = {}
        for name, path in (("daemon", binary), ("daemon_stripped", stripped)):
            targets[name] = procs.popen([path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            if targets[name].stdout.readline().strip() != b"READY":
                raise RuntimeError(f"{path} did not start")
        methods["daemon"] = lambda: daemon_path(targets["daemon"].pid)
        methods["daemon_stripped"] = lambda: daemon_path(targets["daemon_stripped"].pid)
        runs: dict[str, list[dict]] = {name: [] for name in methods}
        for name, method in methods.items():  # untimed: page cache, imports
            first = method()
            if name == "pahole" and "thread_allocated" not in first["stdout"]:
                raise RuntimeError(f"pahole found no tsd_s: {first['stdout'][:500]}")
            if name in ON_STRIPPED:
                results[f"{name}_found"] = first["said"]
        for round_ in range(repeats):  # interleaved rounds
            for name, method in methods.items():
                run = method()
                run.pop("stdout", None)
                run.pop("said", None)
                runs[name].append(run)
                log(f"round {round_ + 1}/{repeats} {name}: "
                    f"{run['wall_seconds']:.3f} s wall")
    for name, samples in runs.items():
        keys = [k for k in samples[0] if isinstance(samples[0][k], (int, float))]
        results[name] = {k: distribution([s[k] for s in samples], 4) for k in keys}
    pahole = results["pahole"]["wall_seconds"]["p50"]
    results["ratios_to_pahole_p50_wall"] = {
        name: round(results[name]["wall_seconds"]["p50"] / pahole, 4)
        for name in methods if name != "pahole"}
    results["target"] = ("daemon path wall within 2x of pahole (target: faster): "
                         + ("met" if results["ratios_to_pahole_p50_wall"]["daemon"] <= 2
                            else "NOT met"))
    if facts["debug_info_bytes"] < 100e6 and not args.quick:
        results["warning"] = "the binary has less than 100 MB of .debug_info"
    write_result("cold_start", args, started, host, results)
    print(json.dumps(results["ratios_to_pahole_p50_wall"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
