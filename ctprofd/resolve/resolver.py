"""Resolution beside the snapshot loop: binaries not in the cache are parsed in a thread of
their own, so a new binary (slow to parse, or built to be) never delays the snapshot of
processes already known; their processes are reported as pending until it is done.

Jobs wait in one queue per owner (the uid owning the file), served in turn, so one user's
binaries cannot starve another's; an identity already queued or running is not queued
again; the queues are bounded (a job refused now is offered again at the next snapshot).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from typing import Callable

log = logging.getLogger(__name__)


class BackgroundResolver:
    """One thread running jobs (callables) in turn per owner."""

    def __init__(self, max_per_owner: int = 8, max_jobs: int = 64) -> None:
        self.max_per_owner = max_per_owner
        self.max_jobs = max_jobs
        self._cond = threading.Condition()
        self._queues: OrderedDict[int, deque[tuple[str, Callable[[], object]]]] = OrderedDict()
        self._keys: set[str] = set()  # queued or running
        self._running: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, key: str, owner: int, job: Callable[[], object]) -> bool:
        """Queue `job` for `key` unless that key is queued or running already, or the
        queues are full: False when the job was not taken (the caller then keeps what it
        would have handed over)."""
        with self._cond:
            queue = self._queues.get(owner)
            if (self._closed or key in self._keys or len(self._keys) >= self.max_jobs
                    or (queue is not None and len(queue) >= self.max_per_owner)):
                return False
            if queue is None:
                queue = self._queues[owner] = deque()
            queue.append((key, job))
            self._keys.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="resolver",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def queued(self, key: str) -> bool:
        """Whether `key` is queued or being resolved."""
        with self._cond:
            return key in self._keys

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every job to be done; whether they are."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._keys, timeout)

    @property
    def busy(self) -> bool:
        """Whether a job is running now."""
        with self._cond:
            return self._running is not None

    def close(self) -> None:
        """Take no more jobs and drop those queued; a running one finishes on its own."""
        with self._cond:
            self._closed = True
            self._queues.clear()
            self._keys = {self._running} if self._running else set()
            self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queues and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                owner, queue = self._queues.popitem(last=False)
                key, job = queue.popleft()
                if queue:
                    self._queues[owner] = queue  # back of the line: owners take turns
                self._running = key
            try:
                job()
            except Exception as exc:  # the job logs its own failures; never end the thread
                log.warning("resolving %s: unexpected %s: %s", key, type(exc).__name__, exc)
            finally:
                with self._cond:
                    self._running = None
                    self._keys.discard(key)
                    self._cond.notify_all()
