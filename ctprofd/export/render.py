"""The bodies of /metrics: rendered once per published snapshot, per format and compression,
so that what a scrape costs depends neither on the number of series nor on the number of
scrapers; and rendered so that one bad series cannot empty the endpoint.

A body is two parts. The snapshot part (everything a snapshot publishes) is collected once per
snapshot and rendered for each format asked for (the gzip one compresses the plain one). The
live part (ctprofd's own process_*, HTTP and render figures) is rendered at most once per
LIVE_SECONDS, so a scrape finding it older waits for that render. A scrape joins the two
(an OpenMetrics snapshot part without its `# EOF`; two gzip members, which gzip readers
concatenate).

prometheus_client renders every family into one string and encodes it at the end: a single
sample it cannot render (a label value that is not valid UTF-8, say) fails the whole render.
When that happens the failure is logged at error level and counted, each family is rendered
on its own, and in a family that fails only the samples that cannot be rendered are left out;
the rest is served.
"""

from __future__ import annotations

import copy
import gzip
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Encoder = Callable[[Collector], bytes]
LIVE_SECONDS = 1.0  # the live part is at most this old
GZIP_LEVEL = 6
_OM_EOF = b"# EOF\n"
_OM_VERSIONS = ("", "0.0.1", "1.0.0")


@dataclass(frozen=True)
class Format:
    """An exposition format: its name, Content-Type and encoder."""

    name: str
    content_type: str
    encoder: Encoder


# Spelled out: prometheus_client's names for them differ between 0.16 (Debian 12) and now.
TEXT = Format("text", "text/plain; version=0.0.4; charset=utf-8", generate_latest)
OPENMETRICS = Format("openmetrics", "application/openmetrics-text; version=1.0.0; "
                     "charset=utf-8", om_exposition.generate_latest)


def negotiate(accept: str | None) -> Format:
    """OpenMetrics 1.0.0 when `accept` lists application/openmetrics-text without a version
    or with one this server writes; otherwise (any other or unparseable value) the text
    format 0.0.4."""
    for entry in (accept or "").split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        if media.lower() != "application/openmetrics-text":
            continue
        version = next((value.strip().strip('"') for key, _, value in
                        (p.partition("=") for p in params) if key.strip().lower() == "version"),
                       "")
        if version in _OM_VERSIONS:
            return OPENMETRICS
    return TEXT


class CollectError(Exception):
    """A collector raised: nothing can be rendered (already logged and counted)."""


class _Families:
    """A collector over fixed families (what an encoder takes)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Renderer:
    """Renders families with an exposition encoder, leaving out samples that cannot be
    rendered; counts the renders that failed and the samples left out."""

    def __init__(self) -> None:
        self.failures = 0       # collects that raised, renders whose first attempt failed
        self.dropped = 0        # samples left out of those renders
        self._lock = threading.Lock()

    def collect(self, collector: Collector) -> list[Metric]:
        """Every family of `collector`; CollectError (logged, counted) if it raised."""
        try:
            return list(collector.collect())
        except Exception as exc:  # noqa: BLE001 - a bug must not be a silent empty reply
            with self._lock:
                self.failures += 1
            log.error("collecting the metrics failed: %s: %s", type(exc).__name__, exc)
            raise CollectError(str(exc)) from exc

    def render(self, encoder: Encoder, families: list[Metric]) -> bytes:
        """The exposition of `families`; when it fails, of every sample that renders."""
        try:
            return encoder(_Families(families))
        except Exception as exc:  # noqa: BLE001 - whatever broke, serve what still renders
            first = exc
        kept, dropped = [], []
        for family in families:
            if _renders(encoder, family):
                kept.append(family)
                continue
            good = [s for s in family.samples if _renders(encoder, _with_samples(family, [s]))]
            dropped += [s for s in family.samples if s not in good]
            kept.append(_with_samples(family, good))
        with self._lock:
            self.failures += 1
            self.dropped += len(dropped)
        log.error("rendering the metrics failed (%s: %s); served without %d sample(s) that "
                  "cannot be rendered, first: %s", type(first).__name__, first.args[0] if
                  first.args else "", len(dropped), ascii(dropped[0]) if dropped else "none")
        return encoder(_Families(kept))

    def counters(self) -> Iterator[Metric]:
        with self._lock:
            failures, dropped = self.failures, self.dropped
        family = CounterMetricFamily("ctprofd_render_failures",
                                     "Collects or renders of the metrics that failed: a "
                                     "collector raised (the scrape is answered 500), or a "
                                     "render was served without the samples that cannot be "
                                     "rendered. The snapshot part is rendered once per "
                                     "snapshot and format, ctprofd's own live part at most "
                                     "once a second per format.")
        family.add_metric([], failures)
        yield family
        family = CounterMetricFamily("ctprofd_render_dropped_samples",
                                     "Samples left out of renders because they cannot be "
                                     "rendered (see the error log).")
        family.add_metric([], dropped)
        yield family


@dataclass(frozen=True)
class _Part:
    key: object   # the generation (snapshot part) or the render time (live part)
    data: bytes


class Exposition:
    """The /metrics bodies of `snapshot` (re-rendered when `generation()` returns another
    object: the daemon passes its published state) and `live` (re-rendered when older than
    LIVE_SECONDS). `body` and `cached` return the parts to send, in order."""

    def __init__(self, snapshot: Collector, live: Collector,
                 generation: Callable[[], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshot = snapshot
        self.live = live
        self.generation = generation
        self.renderer = Renderer()
        self._clock = clock
        self._parts: dict[tuple[str, str, bool], _Part] = {}
        self._asked: set[tuple[Format, bool]] = set()  # what scrapes asked for
        self._lock = threading.Lock()  # one render at a time

    def cached(self, fmt: Format, compressed: bool) -> tuple[bytes, bytes] | None:
        """The body if both parts are fresh, without rendering; else None."""
        head = self._parts.get(("snapshot", fmt.name, compressed))
        tail = self._parts.get(("live", fmt.name, compressed))
        if head is None or tail is None or head.key is not self.generation() \
                or self._clock() - tail.key >= LIVE_SECONDS:
            return None
        return head.data, tail.data

    def body(self, fmt: Format, compressed: bool) -> tuple[bytes, bytes]:
        """The body, rendering the parts that are stale (CollectError if a collector
        raised). Concurrent callers wait for one render."""
        with self._lock:
            self._asked.add((fmt, compressed))
            return self._snapshot_part(fmt, compressed), self._live_part(fmt, compressed)

    def prerender(self) -> None:
        """Render the snapshot part of the current generation in every format and
        compression scrapes asked for so far (the daemon calls it after each snapshot, so
        that no scrape waits for a render)."""
        with self._lock:
            for fmt, compressed in list(self._asked):
                try:
                    self._snapshot_part(fmt, compressed)
                except CollectError:
                    return

    def _snapshot_part(self, fmt: Format, compressed: bool) -> bytes:
        """The snapshot part: the snapshot collected once per generation and encoded in every
        format asked for so far (a format asked for the first time collects again); the gzip
        one compresses the plain one."""
        generation = self.generation()
        key = ("snapshot", fmt.name, compressed)
        part = self._parts.get(key)
        if part is None or part.key is not generation:
            if compressed:
                plain = self._snapshot_part(fmt, False)
                data = gzip.compress(plain, GZIP_LEVEL)
                generation = self._parts[("snapshot", fmt.name, False)].key
            else:  # one collect encoded in every format asked for so far (not held after)
                families = self.renderer.collect(self.snapshot)
                for other in {f for f, _ in self._asked} - {fmt}:
                    self._parts[("snapshot", other.name, False)] = _Part(
                        generation, self._encode(other, families, last=False))
                data = self._encode(fmt, families, last=False)
            part = _Part(generation, data)
            self._parts[key] = part
        return part.data

    def _live_part(self, fmt: Format, compressed: bool) -> bytes:
        """The live part, at most LIVE_SECONDS old; the gzip one compresses the plain one."""
        key = ("live", fmt.name, compressed)
        part = self._parts.get(key)
        now = self._clock()
        if part is None or now - part.key >= LIVE_SECONDS:
            if compressed:
                plain = self._live_part(fmt, False)
                part = _Part(self._parts[("live", fmt.name, False)].key,
                             gzip.compress(plain, GZIP_LEVEL))
            else:
                families = [*self.renderer.collect(self.live), *self.renderer.counters()]
                part = _Part(now, self._encode(fmt, families, last=True))
            self._parts[key] = part
        return part.data

    def _encode(self, fmt: Format, families: list[Metric], last: bool) -> bytes:
        data = self.renderer.render(fmt.encoder, families)
        return data.removesuffix(_OM_EOF) if fmt is OPENMETRICS and not last else data


def _renders(encoder: Encoder, family: Metric) -> bool:
    try:
        encoder(_Families([family]))
        return True
    except Exception:  # noqa: BLE001
        return False


def _with_samples(family: Metric, samples: list) -> Metric:
    copied = copy.copy(family)
    copied.samples = list(samples)
    return copied
