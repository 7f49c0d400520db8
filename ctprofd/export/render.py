"""Rendering a registry for a scrape so that one bad series cannot empty the endpoint.

prometheus_client renders every family into one string and encodes it at the end: a single
sample it cannot render (a label value that is not valid UTF-8, say) fails the whole scrape.
When that happens the failure is logged at error level and counted, each family is rendered
on its own, and in a family that fails only the samples that cannot be rendered are left out;
the rest is served. The counters are rendered with every scrape.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Encoder = Callable[[Collector], bytes]


class CollectError(Exception):
    """A collector raised: nothing can be rendered (already logged and counted)."""


class _Families:
    """A collector over fixed families (what an encoder takes)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class Renderer:
    """Renders `registry` plus its own two counters with an exposition encoder."""

    def __init__(self, registry: Collector) -> None:
        self.registry = registry
        self.failures = 0       # scrapes whose first rendering failed
        self.dropped = 0        # samples left out of those scrapes
        self._lock = threading.Lock()

    def render(self, encoder: Encoder, extra: Iterable[Metric] = ()) -> bytes:
        """The exposition of every family (and of `extra`); when it fails, of every sample
        that renders. CollectError when a collector itself raised."""
        try:
            families = [*self.registry.collect(), *extra]
        except Exception as exc:  # noqa: BLE001 - a bug must not be a silent empty reply
            with self._lock:
                self.failures += 1
            log.error("collecting the metrics failed: %s: %s", type(exc).__name__, exc)
            raise CollectError(str(exc)) from exc
        try:
            return encoder(_Families([*families, *self._counters()]))
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
        return encoder(_Families([*kept, *self._counters()]))

    def _counters(self) -> Iterator[Metric]:
        with self._lock:
            failures, dropped = self.failures, self.dropped
        family = CounterMetricFamily("ctprofd_render_failures",
                                     "Scrapes whose rendering failed and that were served "
                                     "without the samples that cannot be rendered.")
        family.add_metric([], failures)
        yield family
        family = CounterMetricFamily("ctprofd_render_dropped_samples",
                                     "Samples left out of scrapes because they cannot be "
                                     "rendered (see the error log).")
        family.add_metric([], dropped)
        yield family


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
