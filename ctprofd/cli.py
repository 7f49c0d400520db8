"""The `ctprofd` command line: snapshot, offsets, run, check-config."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .capabilities import warn_if_unprivileged
from .capture import Capturer, CaptureSettings
from .debuginfo import DebugSearch
from .layout import LayoutFailure, NotJemalloc, TsdLayout, resolve_path
from .snapshot import Snapshot


def _snapshot_table(snapshot: Snapshot) -> str:
    rows = [f"{'PID':>7} {'COMM':<16} {'THREADS':>7} {'ALLOCATED':>15} {'DEALLOCATED':>15} "
            f"{'LIVE':>15}  EXE"]
    for p in snapshot.processes:
        rows.append(f"{p.pid:>7} {p.comm:<16.16} {len(p.threads):>7} {p.allocated_bytes:>15} "
                    f"{p.deallocated_bytes:>15} {p.allocated_bytes - p.deallocated_bytes:>15}  "
                    f"{p.exe}")
    rows.append("")
    rows.append(snapshot.summary.log_line())
    if snapshot.failures:
        rows.append("outcomes: " + ", ".join(f"{tag}={n}" for tag, n in
                                             sorted(snapshot.failures.items())))
    return "\n".join(rows)


def cmd_snapshot(args: argparse.Namespace) -> int:
    warn_if_unprivileged()
    settings = CaptureSettings(proc_root=args.proc_root, cache_dir=args.cache_dir,
                               debug_dirs=tuple(args.debug_dir) or ("/usr/lib/debug",))
    snapshot = Capturer(settings).capture(pids=args.pid or None)
    if args.json:
        json.dump(snapshot.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_snapshot_table(snapshot))
    return 0


def cmd_offsets(args: argparse.Namespace) -> int:
    search = DebugSearch(tuple(args.debug_dir) or ("/usr/lib/debug",))
    try:
        result = resolve_path(args.binary, search)
    except OSError as exc:
        print(f"ctprofd: {args.binary}: {exc.strerror}", file=sys.stderr)
        return 1
    if isinstance(result, TsdLayout):
        print(f"build-id:            {result.build_id or '(none)'}")
        print(f"dwarf:               {result.dwarf_source}")
        print(f"symbol:              {result.symbol} (TLS offset {result.symbol_offset})")
        print(f"thread_allocated:    {result.allocated_offset}")
        print(f"thread_deallocated:  {result.deallocated_offset}")
        if result.in_executable:
            print(f"TLS:                 executable, block {result.static_block_offset} bytes "
                  "below the thread pointer")
        else:
            print(f"TLS:                 shared object, initial-exec GOT slot at "
                  f"+{result.tpoff_got:#x} from its first mapping")
        return 0
    if isinstance(result, NotJemalloc):
        print(f"ctprofd: {args.binary}: not linked with jemalloc ({result.reason})",
              file=sys.stderr)
        return 1
    assert isinstance(result, LayoutFailure)
    print(f"ctprofd: {result.tag}: {result.message}", file=sys.stderr)
    return 1


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

    offsets = commands.add_parser("offsets", help="show where a binary keeps jemalloc's counters")
    offsets.add_argument("binary")
    offsets.add_argument("--debug-dir", action="append", default=[],
                         help="debug file root (repeatable; default /usr/lib/debug)")
    offsets.set_defaults(func=cmd_offsets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="ctprofd: %(message)s")
    return args.func(args)
