"""Telling systemd how the daemon is doing: sd_notify(3) datagrams (READY, RELOADING,
STOPPING, STATUS, WATCHDOG) to $NOTIFY_SOCKET, without a library."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify(3) without a library: one datagram to $NOTIFY_SOCKET per call (a path, or an
    abstract address spelled with a leading @); silent when not started by systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if address.startswith(("/", "@")):
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        elif address:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an abstract address", address)
        usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_period = int(usec) / 2e6 if usec and usec.isdigit() and ours else None

    def __call__(self, *assignments: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as err:  # systemd gone or the socket unreachable: nothing to tell
            log.debug("sd_notify to %s failed: %s", self._address, err)

    def watchdog(self) -> None:
        if self.watchdog_period is not None:
            self("WATCHDOG=1")
