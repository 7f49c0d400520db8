"""Persisting what a process's threads counted, so its totals survive a ctprofd restart.

One JSON file in the state directory:
{boot_id, processes: {"pid:start_time": [alloc, dealloc]},
          threads: {"pid:start_time": {"tid:start_time": [alloc, dealloc]}},
          reported: {"pid:start_time": [alloc, dealloc]}}
`processes` holds what exited threads (and images before an execve) counted; `threads` what
each thread alive at the last snapshot was last read at, so that one exiting while ctprofd
is down still counts; `reported` the totals last reported (from the arena statistics, when
they were read), which the next ctprofd never reports below. A file from another boot is ignored (pids and start times restart
with the kernel); a corrupt one is set aside. Written atomically, only when it changed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import NamedTuple

from ..files.atomic import ReservedWriter

log = logging.getLogger(__name__)
Key = tuple[int, int]
Totals = tuple[int, int]


class Saved(NamedTuple):
    """What is known of one process (pid, start time) across a restart."""

    retained: Totals  # of threads that exited, and images before an execve
    threads: dict[Key, Totals]  # (tid, start time) -> last read, of threads alive then
    reported: Totals = (0, 0)  # the process's totals last reported: a floor


def _key(text: str) -> Key:
    first, second = text.split(":")
    return int(first), int(second)


def boot_id(proc_root: str = "/proc") -> str:
    try:
        with open(os.path.join(proc_root, "sys/kernel/random/boot_id")) as f:
            return f.read().strip()
    except OSError:
        return ""


RETAINED_FILE = "retained.json"


class RetainedStore:
    """Load and save retained per-process totals; disk problems degrade to memory."""

    def __init__(self, directory: str | None, proc_root: str = "/proc") -> None:
        self.path = os.path.join(directory, RETAINED_FILE) if directory else None
        self.boot_id = boot_id(proc_root)
        self._written: dict[Key, Saved] | None = None
        self._writer = ReservedWriter(
            self.path, "tried again at each snapshot: until then, a restart loses the "
            "totals of threads that exited since the last write") if self.path else None

    @property
    def write_failures(self) -> int:
        """Writes that failed, each tried again at the next save."""
        return self._writer.failures if self._writer is not None else 0

    def load(self) -> dict[Key, Saved]:
        if self.path is None:
            return {}
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return {}
        except OSError as exc:  # not a corrupt file: a directory we cannot use at all
            log.warning("cannot read %s (%s); exited-thread totals will not survive a "
                        "restart", self.path, exc.strerror)
            self.path = None
            return {}
        try:
            with f:
                data = json.load(f)
            if data.get("boot_id") != self.boot_id:
                return {}
            loaded = {_key(key): Saved((int(allocated), int(deallocated)), {})
                      for key, (allocated, deallocated) in data["processes"].items()}
            for key, threads in data.get("threads", {}).items():
                retained = loaded[_key(key)].retained if _key(key) in loaded else (0, 0)
                loaded[_key(key)] = Saved(retained, {
                    _key(thread): (int(allocated), int(deallocated))
                    for thread, (allocated, deallocated) in threads.items()})
            for key, (allocated, deallocated) in data.get("reported", {}).items():
                known = loaded.get(_key(key), Saved((0, 0), {}))
                loaded[_key(key)] = known._replace(reported=(int(allocated), int(deallocated)))
            self._written = dict(loaded)  # the caller consumes what it is given
            return loaded
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("setting aside unusable state file %s (%s)", self.path, exc)
            try:
                os.replace(self.path, self.path + ".corrupt")
            except OSError:
                pass
            return {}

    def save(self, saved: dict[Key, Saved]) -> None:
        """Write what is known of the processes alive now (zero entries left out)."""
        saved = {key: v._replace(threads={t: c for t, c in v.threads.items() if c != (0, 0)})
                 for key, v in saved.items()}
        saved = {key: v for key, v in saved.items()
                 if v.retained != (0, 0) or v.threads or v.reported != (0, 0)}
        if self.path is None or saved == self._written:
            return
        data = {"boot_id": self.boot_id,
                "processes": {f"{pid}:{start}": list(v.retained)
                              for (pid, start), v in saved.items()},
                "threads": {f"{pid}:{start}": {f"{tid}:{tstart}": list(c)
                                               for (tid, tstart), c in v.threads.items()}
                            for (pid, start), v in saved.items() if v.threads},
                "reported": {f"{pid}:{start}": list(v.reported)
                             for (pid, start), v in saved.items() if v.reported != (0, 0)}}
        assert self._writer is not None
        if not self._writer.write(data):
            return  # tried again at the next save: what is on disk still differs
        self._written = saved
