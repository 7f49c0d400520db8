"""`ctprofd run`: snapshots on a fixed-rate schedule in one dedicated thread, the HTTP
endpoint beside it, signals (TERM/INT stop, HUP reloads) and systemd notification; built
from a Config (the command line's flags are overrides in it, cli).

Exit status: 0 after SIGTERM/SIGINT; 78 (EX_CONFIG) for a bad configuration, web config or
offsets file, or a lock file that is not a regular file; 75 (EX_TEMPFAIL) when another process
holds its state or cache directory; 1 when the listen address cannot be bound (e.g. the port
is in use).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import select
import signal
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, ProcessCollector

from ..config.settings import EX_CONFIG, Config, ConfigError
from ..config.web import load_web_config
from ..export.aggregate import Aggregator, AggregateView
from ..export.collector import (SNAPSHOT_DURATION_BUCKETS, THREAD_STOP_BUCKETS, DaemonCollector,
                                DaemonState, Histogram)
from ..export.server import MetricsServer, WebConfig, raise_fd_limit
from ..files import lock
from ..files.atomic import ReservedWriter
from ..probe.capture import Capturer, CaptureSettings
from ..probe.retained import RETAINED_FILE, boot_id
from ..procfs import processes
from ..procfs.capabilities import warn_if_unprivileged
from ..procfs.processes import ProcessInfo
from ..resolve.offsets_file import OffsetsFileError
from ..resolve.parse_worker import WorkerLimits, reserve_setid_for_worker
from .health import Health
from .notify import Notifier

log = logging.getLogger(__name__)

STATE_FILE = "aggregate.json"
EX_TEMPFAIL = 75  # another process holds the state or cache directory
STOP_GRACE_SECONDS = 0.5
# A snapshot waits this long at most (and half an interval at most) for new binaries to be
# resolved beside it, so that a process started just before is read at once.
RESOLVE_GRACE_SECONDS = 10.0
# Changing these needs a restart: they are bound (socket) or built into the Capturer.
RESTART_KEYS = ("listen", "cache_dir", "cache_max_entries", "cache_max_mib", "state_dir",
                "debug_dirs", "debuginfod_urls", "offsets_files", "parser")


def capture_settings(config: Config, **overrides: object) -> CaptureSettings:
    """Where the daemon with this configuration looks: every command searches alike."""
    return CaptureSettings(**{
        "cache_dir": config.cache_dir,
        "cache_max_entries": config.cache_max_entries,
        "cache_max_bytes": config.cache_max_mib << 20,
        "debug_dirs": config.debug_dirs,
        "debuginfod_urls": config.debuginfod_urls,
        "offsets_files": config.offsets_files,
        "parser": WorkerLimits(memory_bytes=config.parser.memory_limit_mib << 20,
                               timeout=config.parser.timeout,
                               max_file_bytes=config.parser.max_file_mib << 20),
        **overrides})


def resolve_grace(interval: float) -> float:
    """How long a snapshot may wait for binaries it found new: half an interval, at most
    RESOLVE_GRACE_SECONDS."""
    return min(interval / 2, RESOLVE_GRACE_SECONDS)


def process_alive(proc_root: str, pid: int, start_time: int) -> bool:
    """Whether (pid, start time) still runs: a reused pid has another start time."""
    try:
        return processes.read_stat(f"{proc_root}/{pid}/stat").start_time == start_time
    except (OSError, ValueError, IndexError):
        return False


class Daemon:
    """Owns the snapshot thread, the server thread and the reload logic. `config` is what it
    starts with; `load_config` reads the configuration again on SIGHUP (ConfigError if bad)."""

    def __init__(self, config: Config, load_config: Callable[[], Config],
                 server: MetricsServer, collector: DaemonCollector, notify: Notifier) -> None:
        self.config = config
        self._load_config = load_config
        self.server = server
        self.collector = collector
        self.notify = notify
        self.stop = threading.Event()  # also the capture's cancel event
        # the signal handler wakes the main thread through a pipe: it runs on the main
        # thread, between any two bytecodes, so a lock it took (Event.set) could be one
        # the main thread holds at that moment (Event.clear), and a SIGHUP storm hung it
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_loop = threading.Event()
        self._reload_requested = False
        self._thread_stops = Histogram(THREAD_STOP_BUCKETS)
        self._durations = Histogram(SNAPSHOT_DURATION_BUCKETS)
        self.capturer = Capturer(capture_settings(
            config, state_dir=config.state_dir, select=self._select,
            on_thread_stop=self._thread_stops.observe, background=True, process_events=True,
            resolve_grace=resolve_grace(config.interval)))
        self._state_path = os.path.join(config.state_dir, STATE_FILE)
        self._boot_id = boot_id()
        self._selection = config.selection  # what the processes remembered were selected by
        self.aggregator = self._new_aggregator(config)
        self._restore_state()
        self._snapshots = 0
        self._failed_snapshots = 0  # captures that raised: a bug, logged with its traceback
        self._overruns = 0
        self._state = ReservedWriter(
            self._state_path, "the series shown stay at those last written, so that "
            "none goes back after a restart, until a write succeeds (tried again every "
            "snapshot)")
        self._saved: dict[str, Any] | None = None  # the state last written
        # the series last written to disk: while writes fail, these are what is published,
        # so that no counter scraped is higher than what a restart continues from
        self._persisted: AggregateView | None = None
        self.health = Health(lambda: self.config.interval)
        server.health = self.health.check

    # -- selection and aggregate, read by the snapshot thread --

    def _select(self, info: ProcessInfo) -> bool:
        return self.config.selection.selects(info)

    @staticmethod
    def _new_aggregator(config: Config) -> Aggregator:
        return Aggregator(config.labels, config.max_series, config.series_retention)

    def _restore_state(self) -> None:
        try:
            with open(self._state_path, encoding="utf-8") as f:
                state = json.load(f)
            if self.aggregator.restore(state, same_boot=state.get("boot_id") == self._boot_id):
                log.info("continuing the series counters saved in %s", self._state_path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("ignoring unusable state file %s (%s)", self._state_path, err)
            self.aggregator = self._new_aggregator(self.config)

    def _save_state(self) -> bool:
        """Write the series state when it changed: after every snapshot, before it is
        published, so a counter scraped once is never lower after a SIGKILL. Whether the
        file holds the current state; a failed write is tried again at the next snapshot."""
        state = {"boot_id": self._boot_id, **self.aggregator.to_state()}
        if state == self._saved:
            return True
        if not self._state.write(state):
            return False
        self._saved = state
        return True

    # -- the snapshot thread --

    def _snapshot_loop(self) -> None:
        """Fixed-rate ticks on the monotonic clock; every capture runs in this thread."""
        tick = time.monotonic()
        while not self.stop.is_set():
            self._snapshot_once()
            interval = self.config.interval
            now = time.monotonic()
            missed = int((now - tick) // interval) if now - tick >= interval else 0
            self._overruns += missed
            tick += (missed + 1) * interval
            while not self.stop.is_set() and not self._sleep_until(tick):
                if self.config.interval != interval:  # reloaded: re-plan from the last tick
                    tick += self.config.interval - interval
                    interval = self.config.interval

    def _sleep_until(self, deadline: float) -> bool:
        """Wait for the deadline, pinging the watchdog; False when woken early by a reload."""
        while not self.stop.is_set():
            self.notify.watchdog()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            period = self.notify.watchdog_period or remaining
            if self._wake_loop.wait(min(remaining, period)):
                self._wake_loop.clear()
                return False
        return True

    def _snapshot_once(self) -> None:
        config = self.config
        if (config.labels, config.max_series, config.series_retention) != (
                self.aggregator.labels, self.aggregator.max_series, self.aggregator.retention):
            if config.labels != self.aggregator.labels:
                log.info("labels changed to [%s]: series counters start over",
                         ", ".join(config.labels))
                self.aggregator = self._new_aggregator(config)
            self.aggregator.max_series = config.max_series
            self.aggregator.retention = config.series_retention
        if config.selection != self._selection:  # reloaded: select every process anew
            self.capturer.selection_changed()
            self._selection = config.selection
        try:
            snapshot = self.capturer.capture(cancel=self.stop)
        except Exception:  # a bug in one snapshot must not end the daemon
            log.exception("snapshot failed")
            self._failed_snapshots += 1
            self.collector.publish(dataclasses.replace(
                self.collector.state, snapshot_failures_total=self._failed_snapshots))
            return
        if self.stop.is_set():  # cancelled: partial, not published
            return
        view = self.aggregator.update(
            snapshot, lambda pid, start: process_alive("/proc", pid, start))
        if self._save_state() or self._saved is None:
            # (never written yet, e.g. a disk full since start: nothing to hold to)
            self._persisted = view
        self._snapshots += 1
        self._durations.observe(snapshot.duration_seconds)
        stats = self.capturer.stats
        self.collector.publish(DaemonState(
            snapshot=snapshot, aggregate=self._persisted, snapshots_total=self._snapshots,
            snapshot_failures_total=self._failed_snapshots,
            overruns_total=self._overruns, interval_seconds=config.interval,
            cache_hits=stats.cache_hits, cache_misses=stats.cache_misses,
            cache_entries=stats.cache_entries, stop_timeouts_total=stats.stop_timeouts,
            state_write_failures={STATE_FILE: self._state.failures,
                                  RETAINED_FILE: stats.state_write_failures},
            snapshot_durations=self._durations.freeze(),
            thread_stops=self._thread_stops.freeze()))
        self.server.prerender()
        self.health.completed()
        status = f"STATUS={snapshot.summary.log_line()}"
        self.notify(*(("READY=1", status) if self._snapshots == 1 else (status,)))

    # -- the main thread --

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stop.set()
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def serve(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        for url in self.server.urls:
            log.info("listening on %s", url)
        loop = threading.Thread(target=self._snapshot_loop, name="snapshots", daemon=True)
        loop.start()
        while not self.stop.is_set():
            if select.select([self._wake_read], [], [], 1.0)[0]:
                while True:
                    try:
                        os.read(self._wake_read, 4096)
                    except BlockingIOError:
                        break
            if self._reload_requested and not self.stop.is_set():
                self._reload_requested = False
                self.reload()
        self.notify("STOPPING=1")
        log.info("stopping")
        self.server.shutdown()
        loop.join(STOP_GRACE_SECONDS)  # a capture in flight sees the cancel and detaches
        if not loop.is_alive():
            self._save_state()
            self.capturer.close()
        self.server.server_close()
        return 0

    def reload(self) -> None:
        """SIGHUP: apply a valid new configuration, or keep the old one and say why."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}")
        try:
            new = self._load_config()
            web = load_web_config(new.web_config_file)
        except ConfigError as err:
            log.error("reload failed, keeping the running configuration: %s", err)
            self.notify("READY=1")
            return
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: a change of %s takes effect only after a restart", key)
        self.config = dataclasses.replace(
            new, **{key: getattr(self.config, key) for key in RESTART_KEYS})
        self.capturer.settings.resolve_grace = resolve_grace(new.interval)
        self.capturer.cache.refresh()  # offsets imported: used from the next snapshot on
        self.server.web_config = web
        logging.getLogger().setLevel(new.log_level.upper())
        self._wake_loop.set()
        log.info("reloaded the configuration from %s", new.source)
        self.notify("READY=1")


_held: dict[str, int] = {}  # directory -> its lock's descriptor, open until the process exits


def own_directories(config: Config) -> None:
    """Create the cache and state directories and lock each for this process's lifetime:
    two daemons sharing one would export each other's series and trim each other's cache.
    Raises lock.DirectoryBusy and lock.LockRefused; a directory that cannot be created or
    locked otherwise (a read-only file system) is warned about, and its users degrade to
    memory."""
    for directory in dict.fromkeys(filter(None, (config.cache_dir, config.state_dir))):
        if directory in _held:
            continue
        try:  # systemd makes them (StateDirectory=, CacheDirectory=)
            os.makedirs(directory, exist_ok=True)
            _held[directory] = lock.acquire(directory)
        except lock.LockRefused:
            raise
        except OSError as err:
            log.warning("cannot create or lock %s: %s", directory, err.strerror or err)


def run(config: Config, web: WebConfig, load_config: Callable[[], Config]) -> int:
    """`ctprofd run` once its configuration is read and logging set up: returns the exit
    status (see the module docstring). `load_config` is what SIGHUP reloads."""
    try:
        own_directories(config)
    except lock.DirectoryBusy as busy:
        log.error("%s: give each ctprofd its own state_dir and cache_dir", busy)
        return EX_TEMPFAIL
    except lock.LockRefused as err:
        log.error("%s", err.strerror)
        return EX_CONFIG
    if reserve_setid_for_worker():  # before any thread starts
        log.debug("CAP_SETUID and CAP_SETGID are permitted, not effective: only the parse "
                 "worker uses them, to take a uid of its own")
    collector = DaemonCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    live = CollectorRegistry()  # rendered at most once a second, not once per snapshot
    ProcessCollector(registry=live)  # process_*: ctprofd's own CPU, memory, fds
    raise_fd_limit()  # before the server sizes its connection limit by it
    try:  # a scrape serves the bodies of the published state, rendered once
        server = MetricsServer(config.listen, registry, web, live=live,
                               generation=lambda: collector.state)
    except OSError as err:
        log.error("cannot listen on %s: %s", err.filename, err.strerror)
        return 1
    notify = Notifier()
    try:
        daemon = Daemon(config, load_config, server, collector, notify)
    except OffsetsFileError as err:
        log.error("%s", err)
        server.server_close()
        return EX_CONFIG
    collector.publish(DaemonState(interval_seconds=config.interval))
    log.info("ctprofd starting: config %s, snapshot every %g s", config.source, config.interval)
    warn_if_unprivileged()
    return daemon.serve()
