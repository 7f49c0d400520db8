"""What this process may do to others: CAP_SYS_PTRACE, read from /proc/self/status."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
CAP_SYS_PTRACE = 19


def own_status() -> dict[str, str]:
    """This process's /proc/self/status, field name to value."""
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def has_ptrace_capability() -> bool:
    return bool(int(own_status()["CapEff"], 16) >> CAP_SYS_PTRACE & 1)


def warn_if_unprivileged() -> None:
    """Say once, at start, what a capture without CAP_SYS_PTRACE cannot see."""
    if not has_ptrace_capability():
        log.warning("running without CAP_SYS_PTRACE: processes of other users and "
                    "privileged ones cannot be read (their /proc/PID/exe is unreadable and "
                    "ptrace is refused), so they show up as readlink-failure or ptrace-seize")
