"""Persisting what exited threads counted, so a process's totals survive a ctprofd restart.

One JSON file in the state directory: {boot_id, processes: {"pid:start_time": [alloc, dealloc]}}.
A file from another boot is ignored (pids and start times restart with the kernel); a corrupt
one is set aside. Written atomically, only when it changed.
"""

from __future__ import annotations

import json
import logging
import os

from .atomic import write_json

log = logging.getLogger(__name__)
Key = tuple[int, int]


def boot_id(proc_root: str = "/proc") -> str:
    try:
        with open(os.path.join(proc_root, "sys/kernel/random/boot_id")) as f:
            return f.read().strip()
    except OSError:
        return ""


class RetainedStore:
    """Load and save retained per-process totals; disk problems degrade to memory."""

    def __init__(self, directory: str | None, proc_root: str = "/proc") -> None:
        self.path = os.path.join(directory, "retained.json") if directory else None
        self.boot_id = boot_id(proc_root)
        self._written: dict[Key, tuple[int, int]] | None = None

    def load(self) -> dict[Key, tuple[int, int]]:
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
            loaded = {}
            for key, (allocated, deallocated) in data["processes"].items():
                pid, start = key.split(":")
                loaded[(int(pid), int(start))] = (int(allocated), int(deallocated))
            self._written = loaded
            return loaded
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("setting aside unusable state file %s (%s)", self.path, exc)
            try:
                os.replace(self.path, self.path + ".corrupt")
            except OSError:
                pass
            return {}

    def save(self, retained: dict[Key, tuple[int, int]]) -> None:
        """Write the retained totals of the processes alive now (zero entries left out)."""
        retained = {k: v for k, v in retained.items() if v != (0, 0)}
        if self.path is None or retained == self._written:
            return
        data = {"boot_id": self.boot_id,
                "processes": {f"{pid}:{start}": list(v) for (pid, start), v in retained.items()}}
        try:
            write_json(self.path, data)
            self._written = retained
        except OSError as exc:
            log.warning("cannot write %s (%s); exited-thread totals will not survive a "
                        "restart", self.path, exc.strerror)
            self.path = None
