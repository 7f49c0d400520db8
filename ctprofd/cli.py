"""The `ctprofd` command line: snapshot, offsets, run, check-config."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__, offsets_file
from .cache import LayoutCache
from .capabilities import warn_if_unprivileged
from .capture import Capturer, CaptureSettings
from .config import add_check_config_parser
from .daemon import add_run_parser
from .debuginfo import DebugSearch
from .layout import LayoutFailure, NotJemalloc, TsdLayout, resolve_path
from .snapshot import Snapshot
from .summary import REMEDIATION_HINT


def _snapshot_table(snapshot: Snapshot) -> str:
    rows = [f"{'PID':>7} {'COMM':<16} {'THREADS':>7} {'ALLOCATED':>15} {'DEALLOCATED':>15} "
            f"{'LIVE':>15}  EXE"]
    for p in snapshot.processes:
        rows.append(f"{p.pid:>7} {p.comm:<16.16} {len(p.threads):>7} {p.allocated_bytes:>15} "
                    f"{p.deallocated_bytes:>15} {p.allocated_bytes - p.deallocated_bytes:>15}  "
                    f"{p.exe}")
    if snapshot.failed_pids:
        rows += ["", f"{'PID':>7} {'COMM':<16} {'TAG':<20} {'COUNT':>5}  REASON"]
        rows += [f"{f.pid:>7} {f.comm:<16.16} {f.tag:<20} {f.count:>5}  {f.reason}"
                 for f in snapshot.failed_pids]
    rows.append("")
    rows.append(snapshot.summary.log_line())
    if snapshot.denied_tgids:
        rows.append(f"denied: {snapshot.denied_tgids} processes cannot be seen (/proc/PID/exe "
                    f"refused); {REMEDIATION_HINT}")
    if snapshot.failures:
        rows.append("outcomes: " + ", ".join(f"{tag}={n}" for tag, n in
                                             sorted(snapshot.failures.items())))
    for pid, tracer in sorted(snapshot.traced_by.items()):
        rows.append(f"pid {pid}: ptrace-seize refused, already traced by pid {tracer}")
    return "\n".join(rows)


def cmd_snapshot(args: argparse.Namespace) -> int:
    warn_if_unprivileged()
    settings = CaptureSettings(proc_root=args.proc_root, cache_dir=args.cache_dir,
                               debug_dirs=tuple(args.debug_dir) or ("/usr/lib/debug",))
    capturer = Capturer(settings)
    try:
        snapshot = capturer.capture(pids=args.pid or None)
    finally:
        capturer.close()
    if args.json:
        json.dump(snapshot.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_snapshot_table(snapshot))
    return 0


def _print_layout(result: TsdLayout, as_json: bool) -> None:
    if as_json:
        json.dump({**result.to_dict(), "source": result.source}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(f"build-id:            {result.build_id or '(none)'}")
    print(f"offsets from:        {result.source}")
    print(f"symbol:              {result.symbol} (TLS offset {result.symbol_offset})")
    print(f"thread_allocated:    {result.allocated_offset}")
    print(f"thread_deallocated:  {result.deallocated_offset}")
    if result.in_executable:
        print(f"TLS:                 executable, block {result.static_block_offset} bytes "
              "below the thread pointer")
    else:
        print(f"TLS:                 shared object, initial-exec GOT slot at "
              f"+{result.tpoff_got:#x} from its first mapping")


def _resolve_or_explain(binary: str, search: DebugSearch) -> TsdLayout | None:
    try:
        result = resolve_path(binary, search)
    except OSError as exc:
        print(f"ctprofd: {binary}: {exc.strerror}", file=sys.stderr)
        return None
    if isinstance(result, NotJemalloc):
        print(f"ctprofd: {binary}: not linked with jemalloc ({result.reason})", file=sys.stderr)
        return None
    if isinstance(result, LayoutFailure):
        print(f"ctprofd: {result.tag}: {result.message}", file=sys.stderr)
        return None
    return result


def _offsets_export(path: str, binaries: list[str], search: DebugSearch) -> int:
    if binaries:
        layouts = [_resolve_or_explain(b, search) for b in binaries]
        if None in layouts:
            return 1
    else:  # everything jemalloc that runs here now
        capturer = Capturer(CaptureSettings(debug_dirs=search.debug_dirs))
        try:
            capturer.capture()
        finally:
            capturer.close()
        layouts = capturer.cache.layouts()
    try:
        count = offsets_file.dump([l for l in layouts if l is not None], path)
    except OSError as exc:
        print(f"ctprofd: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {count} layouts to {path}")
    return 0


def _offsets_import(path: str, cache_dir: str) -> int:
    try:
        layouts = offsets_file.load(path)
    except offsets_file.OffsetsFileError as exc:
        print(f"ctprofd: {exc}", file=sys.stderr)
        return 1
    cache = LayoutCache(cache_dir)
    for layout in layouts:
        cache.put(f"build-id:{layout.build_id}", layout)
    if cache.directory is None:
        print(f"ctprofd: {cache_dir}: cannot write the cache directory", file=sys.stderr)
        return 1
    print(f"imported {len(layouts)} layouts into {cache_dir}")
    return 0


def cmd_offsets(args: argparse.Namespace) -> int:
    search = DebugSearch(tuple(args.debug_dir) or ("/usr/lib/debug",))
    action, rest = args.args[0], args.args[1:]
    if action == "export" and rest:
        return _offsets_export(rest[0], rest[1:], search)
    if action == "import" and len(rest) == 1:
        return _offsets_import(rest[0], args.cache_dir)
    if len(args.args) != 1:
        print("ctprofd: usage: ctprofd offsets BINARY | export FILE [BINARY...] | import FILE",
              file=sys.stderr)
        return 2
    layout = _resolve_or_explain(action, search)
    if layout is None:
        return 1
    _print_layout(layout, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctprofd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ctprofd {__version__}")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    snap = commands.add_parser("snapshot", help="probe the host once and print the result")
    snap.add_argument("--json", action="store_true", help="machine-readable output")
    snap.add_argument("--pid", type=int, action="append", default=[],
                      help="probe only this tgid (repeatable)")
    snap.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    snap.add_argument("--cache-dir", default=None, help="offset cache directory (default: none)")
    snap.add_argument("--debug-dir", action="append", default=[],
                      help="debug file root (repeatable; default /usr/lib/debug)")
    snap.set_defaults(func=cmd_snapshot)

    offsets = commands.add_parser(
        "offsets", help="show, export or import where binaries keep jemalloc's counters",
        description="ctprofd offsets BINARY: show the layout; ctprofd offsets export FILE "
        "[BINARY...]: write layouts by build-id (default: of every jemalloc process running); "
        "ctprofd offsets import FILE: validate them and add them to the cache directory")
    offsets.add_argument("args", nargs="+", metavar="BINARY | export FILE [BINARY...] | import FILE")
    offsets.add_argument("--json", action="store_true",
                         help="ctprofd offsets BINARY: print the layout as JSON")
    offsets.add_argument("--cache-dir", default="/var/cache/ctprofd",
                         help="cache directory that import writes to (default %(default)s)")
    offsets.add_argument("--debug-dir", action="append", default=[],
                         help="debug file root (repeatable; default /usr/lib/debug)")
    offsets.set_defaults(func=cmd_offsets)
    add_run_parser(commands)
    add_check_config_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="ctprofd: %(message)s")
    return args.func(args)
