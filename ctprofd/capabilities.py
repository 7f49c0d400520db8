"""What this process may do to others: CAP_SYS_PTRACE, read from /proc/self/status."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
CAP_SYS_PTRACE = 19


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path, "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_ptrace_capability() -> bool:
    return bool(effective_capabilities() >> CAP_SYS_PTRACE & 1)


def warn_if_unprivileged() -> None:
    """Say once, at start, what a capture without CAP_SYS_PTRACE cannot see."""
    if not has_ptrace_capability():
        log.warning("running without CAP_SYS_PTRACE: processes of other users and "
                    "privileged ones cannot be read (their /proc/PID/exe is unreadable and "
                    "ptrace is refused), so they show up as readlink-failure or ptrace-seize")
