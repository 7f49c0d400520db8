"""What a benchmark reports and where: the options every benchmark has (`parser`), the
progress log on stderr, and the result file in benchmarks/results/ with the machine and
commit it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import REPO
from .processes import count_processes

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_WORK_DIR = Path(os.environ.get("CTPROFD_BENCH_DIR", "/var/tmp/ctprofd-bench"))


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny scale and short runs: a smoke test, not a measurement")
    p.add_argument("--out", metavar="PATH", type=Path,
                   help="result JSON (default benchmarks/results/NAME.json, or "
                        "NAME-quick.json with --quick)")
    p.add_argument("--work-dir", metavar="DIR", type=Path, default=DEFAULT_WORK_DIR,
                   help=f"built programs and scratch files (default {DEFAULT_WORK_DIR}, "
                        "or $CTPROFD_BENCH_DIR)")
    p.add_argument("--fixtures", metavar="DIR", type=Path,
                   help="an existing `tests/support/build.py` output dir to use instead "
                        "of building one")
    return p


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as f:
        mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        os_name = ""
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "os": os_name, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(), "processes_at_start": count_processes()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "ctprofd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (ctprofd/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def write_result(name: str, args: argparse.Namespace, started: float,
                 host: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write the result JSON (`host`: machine() taken at the start); returns its path."""
    path = args.out or RESULTS / (f"{name}-quick.json" if args.quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": name,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "commit": git_commit(),
        "machine": host,
        "results": results,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    print(f"results written to {path}", file=sys.stderr)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON: {value!r}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
