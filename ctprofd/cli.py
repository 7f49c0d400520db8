"""The `ctprofd` command line: snapshot, offsets, run, check-config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from .config.settings import (DEFAULT_PATH, EX_CONFIG, LOG_LEVELS, Config, ConfigError, Override,
                              load, load_effective)
from .config.web import load_web_config
from .export.revision import version_text
from .files import lock
from .probe.capture import Capturer
from .procfs.capabilities import warn_if_unprivileged
from .report import tags
from .report.snapshot import Snapshot
from .resolve import needed, offsets_file
from .resolve.cache import LayoutCache, imported_path
from .resolve.debughelp import how_to_get_debug_info
from .resolve.layout import LayoutFailure, NotJemalloc, TsdLayout
from .resolve.offsets_file import OffsetsFileError
from .service.daemon import capture_settings, run
from .service.logs import FORMATS, setup_logging

log = logging.getLogger(__name__)


def human_bytes(n: int) -> str:
    """`n` bytes in binary units, one decimal: 512 B, 1.5 KiB, 123.4 MiB."""
    size, unit = float(abs(n)), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024 or unit == "EiB":
            break
        size /= 1024
    sign = "-" if n < 0 else ""
    if unit == "B":
        return f"{sign}{int(size)} B"
    return f"{sign}{size:.1f} {unit}"


def _snapshot_table(snapshot: Snapshot, raw_bytes: bool = False) -> str:
    """Processes largest live bytes first, then the failures, the summary and notes."""
    show = str if raw_bytes else human_bytes
    rows = [f"{'PID':>7} {'COMM':<16} {'THREADS':>7} {'ALLOCATED':>15} {'DEALLOCATED':>15} "
            f"{'LIVE':>15} {'TOTALS':<7}  EXE"]
    processes = sorted(snapshot.processes, key=lambda p: (
        -(p.allocated_bytes - p.deallocated_bytes), p.pid))
    for p in processes:
        rows.append(f"{p.pid:>7} {p.comm:<16.16} {len(p.threads):>7} "
                    f"{show(p.allocated_bytes):>15} {show(p.deallocated_bytes):>15} "
                    f"{show(p.allocated_bytes - p.deallocated_bytes):>15} "
                    f"{p.totals_source:<7}  {p.exe}")
    if snapshot.failed_pids:
        rows += ["", f"{'PID':>7} {'COMM':<16} {'TAG':<20} {'COUNT':>5}  REASON"]
        rows += [f"{f.pid:>7} {f.comm:<16.16} {f.tag:<20} {f.count:>5}  {f.reason}"
                 for f in snapshot.failed_pids]
    rows.append("")
    rows.append(snapshot.summary.log_line())
    if snapshot.denied_tgids:  # why, and what to do, is the warning on stderr
        rows.append(f"denied: {snapshot.denied_tgids} processes cannot be seen (/proc/PID/exe "
                    "refused)")
    if snapshot.failures:
        rows.append("outcomes: " + ", ".join(f"{tag}={n}" for tag, n in
                                             sorted(snapshot.failures.items())))
    for pid, tracer in sorted(snapshot.traced_by.items()):
        name = snapshot.tracer_names.get(tracer) or "?"
        rows.append(f"pid {pid}: ptrace-traced: held by another tracer, pid {tracer} ({name});"
                    " it is read once that tracer detaches (strace, gdb or a parent that "
                    "traces it: not a privilege problem)")
    return "\n".join(rows)


def _capturer(args: argparse.Namespace, **overrides: object) -> Capturer:
    """A Capturer that looks where the daemon with this configuration looks (--config, else
    /etc/ctprofd/ctprofd.yaml when present, else the defaults); --cache-dir and --debug-dir
    override. Beside a daemon that owns the cache directory, its cache is read, never
    written. Raises ConfigError, OffsetsFileError."""
    config = load_effective(args.config, _search_overrides(args))
    owner = lock.holder(config.cache_dir) if config.cache_dir else None
    if owner is not None:
        log.info("a ctprofd (pid %d) owns %s: reading its cache, writing nothing", owner,
                 config.cache_dir)
        overrides = {"cache_writable": False, **overrides}
    return Capturer(capture_settings(config, **overrides))


def _search_overrides(args: argparse.Namespace) -> list[Override]:
    """--cache-dir ('' for none) and --debug-dir, over the configuration's keys."""
    overrides = []
    if args.cache_dir is not None:
        overrides.append(Override("cache_dir", args.cache_dir or None, "--cache-dir"))
    if args.debug_dir:
        overrides.append(Override("debug_dirs", args.debug_dir, "--debug-dir"))
    return overrides


def _with_capturer(args: argparse.Namespace, action: Callable[[Capturer], int],
                   **overrides: object) -> int:
    """Run `action` with a Capturer; a bad configuration is one line and exit 78."""
    try:
        capturer = _capturer(args, **overrides)
    except (ConfigError, OffsetsFileError) as err:
        print(f"ctprofd: {err}", file=sys.stderr)
        return EX_CONFIG
    try:
        return action(capturer)
    finally:
        capturer.close()


def cmd_snapshot(args: argparse.Namespace) -> int:
    missing = [pid for pid in args.pid if not os.path.isdir(f"{args.proc_root}/{pid}")]
    if missing:
        print(f"ctprofd: no such process: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    warn_if_unprivileged()

    def snapshot(capturer: Capturer) -> int:
        result = capturer.capture(pids=args.pid or None)
        if args.json:
            json.dump(result.to_dict(), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(_snapshot_table(result, raw_bytes=args.bytes))
        unread = _unread_pids(args.pid, result, capturer)
        for pid, why in unread.items():
            print(f"ctprofd: pid {pid} {why}", file=sys.stderr)
        return 1 if unread else 0
    return _with_capturer(args, snapshot, proc_root=args.proc_root)


def _unread_pids(pids: list[int], snapshot: Snapshot, capturer: Capturer) -> dict[int, str]:
    """Each pid asked for that the snapshot did not read, or read only in part (it had
    actionable failures), and why."""
    read = {p.pid for p in snapshot.processes}
    failed = {f.pid: f for f in snapshot.failed_pids}
    unread: dict[int, str] = {}
    for pid in dict.fromkeys(pids):
        if pid in failed:
            unread[pid] = (f"{'read in part' if pid in read else 'not read'}: "
                           f"{failed[pid].tag}: {failed[pid].reason}")
        elif pid in read:
            continue
        elif (reason := capturer.not_jemalloc_reason(pid)) is not None:
            unread[pid] = f"not read: not linked with a recognised jemalloc ({reason})"
        else:
            unread[pid] = f"not read: {_why_unseen(pid, capturer.settings.proc_root)}"
    return unread


def _why_unseen(pid: int, proc_root: str) -> str:
    """Why a process that had no failure and no layout was not read."""
    try:
        os.readlink(f"{proc_root}/{pid}/exe")
    except FileNotFoundError:
        return ("it exited" if not os.path.isdir(f"{proc_root}/{pid}")
                else "no executable: a kernel thread or a zombie")
    except OSError as exc:
        return f"reading {proc_root}/{pid}/exe was refused ({exc.strerror})"
    return "none of its threads could be read yet"


def _print_layout(where: str, result: TsdLayout, as_json: bool) -> None:
    if as_json:
        json.dump({**result.to_dict(), "source": result.source, "object": where}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
        return
    print(f"object:              {where}")
    print(f"build-id:            {result.build_id or '(none)'}")
    print(f"offsets from:        {result.source}")
    print(f"symbol:              {result.symbol} (TLS offset {result.symbol_offset})")
    print(f"thread_allocated:    {result.allocated_offset}")
    print(f"thread_deallocated:  {result.deallocated_offset}")
    why = (f"; {result.arena_missing}" if result.arena_missing
           else "; offsets from code give the two counters only" if result.code_source else "")
    table = f" (layout table {result.arena.table})" if result.arena and result.arena.table else ""
    print(f"arena statistics:    "
          f"{f'yes{table}' if result.arena else f'no (totals: per-thread sums{why})'}")
    if result.in_executable:
        print(f"TLS:                 executable, block {result.static_block_offset} bytes "
              "below the thread pointer")
    else:
        print(f"TLS:                 shared object, initial-exec GOT slot at "
              f"+{result.tpoff_got:#x} from its first mapping")


def _resolve_or_explain(binary: str, capturer: Capturer) -> tuple[str, TsdLayout] | None:
    """The object holding jemalloc (`binary`, or a shared object it loads: its DT_NEEDED,
    found as the loader finds them) and its layout; None after saying on stderr why there
    is none."""
    try:
        result = capturer.attacher.resolve_file(os.path.realpath(binary))
    except OSError as exc:
        print(f"ctprofd: {binary}: {exc.strerror}", file=sys.stderr)
        return None
    where = os.path.realpath(binary)
    if isinstance(result, NotJemalloc):
        for loaded in needed.loaded_objects(binary):
            try:
                found = capturer.attacher.resolve_file(loaded)
            except OSError:
                continue
            if not isinstance(found, NotJemalloc):
                result, where = found, loaded
                break
    if isinstance(result, NotJemalloc):
        print(f"ctprofd: {binary}: not linked with jemalloc, in itself or in the shared "
              f"objects it loads ({result.reason})", file=sys.stderr)
        return None
    if isinstance(result, LayoutFailure):
        print(f"ctprofd: {result.tag}: {result.message}", file=sys.stderr)
        if result.tag == tags.DWARF_PARSE_FAILURE and "no DWARF" in result.message:
            print(f"ctprofd: {how_to_get_debug_info(where)}", file=sys.stderr)
        return None
    return where, result


def _offsets_export(capturer: Capturer, path: str, binaries: list[str]) -> int:
    if binaries:
        found = [_resolve_or_explain(b, capturer) for b in binaries]
        if None in found:
            return 1
        layouts = [layout for _, layout in filter(None, found)]
    else:  # everything jemalloc that runs here now
        capturer.capture()
        layouts = capturer.cache.layouts()
    try:
        count = offsets_file.dump([l for l in layouts if l is not None], path)
    except OSError as exc:
        print(f"ctprofd: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {count} layouts to {path}")
    return 0


def _imported_file(cache_dir: str | None) -> str | None:
    """Where `offsets import` keeps the layouts it pins; None (after saying so) without a
    cache directory, or when it names something else than a directory."""
    if not cache_dir:
        print("ctprofd: no cache directory for imported layouts (cache_dir is null): pass "
              "--cache-dir DIR", file=sys.stderr)
        return None
    if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
        print(f"ctprofd: cache_dir {cache_dir} is not a directory", file=sys.stderr)
        return None
    return imported_path(cache_dir)


def _read_imported(path: str) -> list[TsdLayout] | None:
    """The layouts imported so far ([] before the first import); None after saying why
    the file cannot be used."""
    if not os.path.lexists(path):
        return []
    try:
        return offsets_file.load(path)
    except OffsetsFileError as exc:
        print(f"ctprofd: {exc}", file=sys.stderr)
        return None


def _offsets_import(path: str, cache_dir: str | None) -> int:
    """Add the layouts of an offsets file to the imported ones (pinned: never evicted); a
    running daemon reads them at its next snapshot and retries the binaries that failed."""
    try:
        layouts = offsets_file.load(path)
    except OffsetsFileError as exc:
        print(f"ctprofd: {exc}", file=sys.stderr)
        return 1
    target = _imported_file(cache_dir)
    held = _read_imported(target) if target else None
    if target is None or held is None:
        return 1
    merged = {layout.build_id: layout for layout in (*held, *layouts)}
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        offsets_file.dump(list(merged.values()), target)
    except OSError as exc:
        print(f"ctprofd: {target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"imported {len(layouts)} layouts into {target} ({len(merged)} imported in all)")
    return 0


def _offsets_remove(build_ids: list[str], cache_dir: str | None) -> int:
    """Remove imported layouts by build-id; one line and exit 1 for one not imported."""
    target = _imported_file(cache_dir)
    held = _read_imported(target) if target else None
    if target is None or held is None:
        return 1
    kept = [layout for layout in held if layout.build_id not in build_ids]
    unknown = sorted(set(build_ids) - {layout.build_id for layout in held})
    if unknown:
        print(f"ctprofd: not imported in {target}: {', '.join(unknown)}", file=sys.stderr)
        return 1
    try:
        offsets_file.dump(kept, target)
    except OSError as exc:
        print(f"ctprofd: {target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"removed {len(held) - len(kept)} layouts from {target} ({len(kept)} imported "
          "remain)")
    return 0


def _offsets_list(cache: LayoutCache, as_json: bool) -> int:
    """Every layout the cache holds: imported (pinned), configured (offsets_files), then
    learned from binaries here, with their owner."""
    def row(layout: TsdLayout, kind: str, owner: int | None = None) -> dict[str, object]:
        return {"build_id": layout.build_id, "kind": kind, "owner": owner,
                "allocated_offset": layout.allocated_offset,
                "deallocated_offset": layout.deallocated_offset, "source": layout.source}
    rows = [row(layout, kind)
            for kind, pinned in (("imported", cache.imported()),
                                 ("configured", cache.configured()))
            for _, layout in sorted(pinned.items())]
    rows += [row(layout, "learned", owner)
             for _, owner, layout in sorted(cache.learned(), key=lambda e: e[0])]
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'BUILD-ID':<40} {'KIND':<10} {'OWNER':>6} {'COUNTERS':>9}  SOURCE")
    for row in rows:
        owner = "-" if row["owner"] is None else str(row["owner"])
        print(f"{row['build_id']:<40} {row['kind']:<10} {owner:>6} "
              f"{row['allocated_offset']:>4}/{row['deallocated_offset']:<4}  {row['source']}")
    return 0


OFFSETS_USAGE = ("ctprofd offsets [options] BINARY\n"
                 "       ctprofd offsets [options] export FILE [BINARY ...]\n"
                 "       ctprofd offsets [options] import FILE\n"
                 "       ctprofd offsets [options] list\n"
                 "       ctprofd offsets [options] remove BUILD-ID [BUILD-ID ...]")


def cmd_offsets(args: argparse.Namespace) -> int:
    action, rest = args.action, args.rest
    if action in ("import", "remove"):
        if action == "import" and len(rest) != 1:
            args.error("offsets import takes one FILE")
        if action == "remove" and not rest:
            args.error("offsets remove takes BUILD-ID [BUILD-ID ...]")
        try:
            config = load_effective(args.config, _search_overrides(args))
        except ConfigError as err:
            print(f"ctprofd: {err}", file=sys.stderr)
            return EX_CONFIG
        if action == "import":
            return _offsets_import(rest[0], config.cache_dir)
        return _offsets_remove(rest, config.cache_dir)
    if action == "list":
        if rest:
            args.error("offsets list takes no arguments")
        return _with_capturer(args, lambda c: _offsets_list(c.cache, args.json),
                              cache_writable=False)  # a listing changes nothing
    if action == "export":
        if not rest:
            args.error("offsets export takes FILE [BINARY ...]")
        return _with_capturer(args, lambda c: _offsets_export(c, rest[0], rest[1:]))
    if rest:
        args.error(f"unexpected arguments after BINARY: {' '.join(rest)}")

    def show(capturer: Capturer) -> int:
        found = _resolve_or_explain(action, capturer)
        if found is None:
            return 1
        _print_layout(*found, args.json)
        return 0
    return _with_capturer(args, show)


def cmd_run(args: argparse.Namespace) -> int:
    """`ctprofd run`: the configuration with the flags over it, logging, then the daemon
    (which reads the same file with the same flags again on SIGHUP)."""
    listen = args.listen[0] if args.listen and len(args.listen) == 1 else args.listen
    overrides = [Override(key, value, flag) for key, value, flag in (
        ("listen", listen, "--web.listen-address"), ("interval", args.interval, "--interval"),
        ("web_config_file", args.web_config_file, "--web.config.file"),
        ("log_level", args.log_level, "--log.level")) if value is not None]

    def load_config() -> Config:
        return load_effective(args.config, overrides)
    try:
        config = load_config()
        web = load_web_config(config.web_config_file)
    except ConfigError as err:
        print(f"ctprofd: {err}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(config.log_level, args.log_format)
    return run(config, web, load_config)


def cmd_check_config(args: argparse.Namespace) -> int:
    """`ctprofd check-config PATH`: print `PATH: OK` or the one-line error; 0 or 78. Refuses
    whatever `run` refuses at start: the file, the web config and the offsets files."""
    try:
        config = load(args.path)
        load_web_config(config.web_config_file)
        for path in config.offsets_files:
            offsets_file.load(path)
    except (ConfigError, OffsetsFileError) as err:
        print(err, file=sys.stderr)
        return EX_CONFIG
    print(f"{args.path}: OK")
    return 0


def add_run_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `run [--config PATH] [--web.listen-address HOST:PORT ...] [--interval SECONDS]
    [--web.config.file PATH]`; flags override the configuration file."""
    parser = subparsers.add_parser(
        "run", help="run the exporter daemon",
        description="Take a snapshot every interval and serve the metrics over HTTP. Exit "
                    "status 78 on a bad configuration, 75 when another process holds the state or "
                    "cache directory, 1 when the address cannot be bound.")
    parser.add_argument("--config", metavar="PATH",
                        help=f"configuration file (default {DEFAULT_PATH} if present, "
                             "else the built-in defaults)")
    parser.add_argument("--web.listen-address", "--listen", dest="listen", metavar="HOST:PORT",
                        action="append", help="override `listen` (repeatable: one socket each)")
    parser.add_argument("--interval", metavar="SECONDS", type=float,
                        help="override `interval`")
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="PATH",
                        help="override `web_config_file` (TLS and basic auth)")
    parser.set_defaults(func=cmd_run)
    return parser


def add_check_config_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `check-config PATH` (also validates the web config file it names)."""
    parser = subparsers.add_parser(
        "check-config", help="validate a configuration file",
        description="Validate a ctprofd configuration file (and the web config file it "
                    "names); print OK or a one-line error. Exit 0, or 78 on a bad config.")
    parser.add_argument("path", metavar="PATH", help="the YAML configuration file")
    parser.set_defaults(func=cmd_check_config)
    return parser


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    """Where snapshot and offsets look: as the daemon with this configuration does."""
    parser.add_argument("--config", metavar="PATH",
                        help=f"take cache_dir, debug_dirs, debuginfod_urls, offsets_files and "
                             f"parser from this configuration (default {DEFAULT_PATH} if "
                             "present, else the built-in defaults)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="offset cache directory (default: the configuration's cache_dir, "
                             "/var/cache/ctprofd unless configured; '' for none)")
    parser.add_argument("--debug-dir", metavar="DIR", action="append", default=[],
                        help="debug file root (repeatable; default: the configuration's "
                             "debug_dirs, /usr/lib/debug unless configured)")


def _add_log_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--log.level (or --log-level) and --log.format, given before or after the subcommand;
    they override the configuration's log_level."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--log.level", "--log-level", dest="log_level", choices=LOG_LEVELS,
                        default=default, metavar="{debug,info,warn,error}",
                        help="log level (default: the configuration's log_level for run, warn "
                        "for the other commands)")
    parser.add_argument("--log.format", dest="log_format", choices=FORMATS,
                        default="text" if top else argparse.SUPPRESS,
                        help="log line format on stderr (default text; each with a UTC "
                        "timestamp for run)")


class _Version(argparse.Action):
    """--version as one unwrapped line (argparse's own action wraps it to the terminal)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctprofd", description=__doc__)
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version, revision, Python and platform, and exit")
    _add_log_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)

    snap = commands.add_parser(
        "snapshot", help="probe the host once and print the result",
        description="Probe the host (or the --pid processes) once and print the result. Exit "
                    "status 1 when a process asked for with --pid was not read, or only in "
                    "part (why: on stderr), 78 on a bad configuration.")
    snap.add_argument("--json", action="store_true", help="machine-readable output")
    snap.add_argument("--bytes", action="store_true",
                      help="the table in bytes (default: KiB, MiB, GiB)")
    snap.add_argument("--pid", type=int, action="append", default=[],
                      help="probe only this tgid (repeatable)")
    snap.add_argument("--proc-root", default="/proc", help=argparse.SUPPRESS)
    _add_search_options(snap)
    snap.set_defaults(func=cmd_snapshot)

    offsets = commands.add_parser(
        "offsets", help="show, export or import where binaries keep jemalloc's counters",
        usage=OFFSETS_USAGE,
        description="ctprofd offsets BINARY: show the layout, found as the daemon finds it; "
        "ctprofd offsets export FILE [BINARY ...]: write layouts by build-id (default: of "
        "every jemalloc process running); ctprofd offsets import FILE: validate them and pin "
        "them in the cache directory that snapshot and the daemon read (CACHE_DIR/"
        "imported.json: never evicted; a running daemon reads them at its next snapshot); "
        "ctprofd offsets list: the layouts cached (imported, configured, learned with their "
        "owner uid); ctprofd offsets remove BUILD-ID ...: unpin imported layouts")
    offsets.add_argument("action", metavar="BINARY|export|import|list|remove")
    offsets.add_argument("rest", nargs="*", metavar="ARG", help=argparse.SUPPRESS)
    offsets.add_argument("--json", action="store_true",
                         help="ctprofd offsets BINARY or list: print JSON")
    _add_search_options(offsets)
    offsets.set_defaults(func=cmd_offsets, error=offsets.error)
    add_run_parser(commands)
    add_check_config_parser(commands)
    for command in commands.choices.values():
        _add_log_options(command, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level or "warn", args.log_format, text="ctprofd: %(message)s",
                  journal=False)  # `run` sets it up again once its configuration is read
    return args.func(args)
