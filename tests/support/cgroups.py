"""Putting a test's process into a real cgroup named like a systemd unit (or at any path, e.g.
shaped as a Kubernetes pod's container), in the hierarchy ctprofd reads units from (cgroup
v2, or v1's name=systemd), without systemd."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def unit_hierarchy() -> Path:
    """Where the cgroup v2 hierarchy (else v1's name=systemd one) is mounted."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    for fstype, wanted in (("cgroup2", None), ("cgroup", "name=systemd")):
        for _, mount_point, kind, options, *_ in mounts:
            if kind == fstype and (wanted is None or wanted in options.split(",")):
                return Path(mount_point)
    raise AssertionError("no cgroup v2 or name=systemd hierarchy mounted")


def unique_unit(kind: str = "scope") -> str:
    """A unit name no other test or helper uses."""
    return f"ctprofd-test-{uuid.uuid4().hex[:12]}.{kind}"


@contextmanager
def in_unit(pid: int, unit: str) -> Iterator[Path]:
    """Move `pid` (all its threads) into a new top-level cgroup named `unit`; afterwards
    move whatever is left back to the root and remove the cgroup."""
    with in_cgroup(pid, unit) as cgroup:
        yield cgroup


@contextmanager
def in_cgroup(pid: int, path: str) -> Iterator[Path]:
    """Move `pid` into a new cgroup at `path` (relative, its parents created as needed; the
    first must not exist yet); afterwards move whatever is left back to the root and remove
    the cgroups made."""
    root = unit_hierarchy()
    made = []
    cgroup = root
    for part in path.split("/"):
        cgroup = cgroup / part
        if not made and cgroup.exists():
            raise AssertionError(f"{cgroup} exists: choose a path no one else uses")
        cgroup.mkdir()
        made.append(cgroup)
    try:
        (cgroup / "cgroup.procs").write_text(str(pid))
        yield cgroup
    finally:
        for member in (cgroup / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(member)
            except OSError:  # exited meanwhile
                pass
        for directory in reversed(made):
            os.rmdir(directory)
