"""A MetricsServer run in this process on an ephemeral 127.0.0.1 port, and real-socket
clients for it that say how each connection ended (the server's FIN or its reset)."""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ctprofd.export.server import MetricsServer, WebConfig
from support.procs import wait_until

HANG_GUARD = 30.0  # seconds a client waits for the server: a guard, never a timing claim
# deadlines of a server a test does not set: far from anything a busy host may take
SLACK_SECONDS = 60.0


def small_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Gauge("ctprofd_test_value", "A test gauge.", registry=registry).set(42)
    return registry


class Huge:
    """A collector whose text exposition is about `megabytes` MB: an answer that cannot
    fit in the socket buffers of a client that does not read (rendered in milliseconds)."""

    def __init__(self, megabytes: int = 8) -> None:
        self.count = megabytes * 10

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("ctprofd_test_huge", "Long labels.", labels=["name"])
        for i in range(self.count):
            family.add_metric([f"{i}-" + "x" * 100_000], i)
        yield family


@contextlib.contextmanager
def serving(collector: Collector | None = None, web: WebConfig = WebConfig(),
            listen: str = "127.0.0.1:0", **options: object) -> Iterator[MetricsServer]:
    """A server on `listen` run by serve_forever in a thread; shut down and closed after.
    Its deadlines are SLACK_SECONDS unless given."""
    options.setdefault("deadline", SLACK_SECONDS)
    options.setdefault("first_byte", SLACK_SECONDS)
    server = MetricsServer(listen, collector if collector is not None else small_registry(),
                           web, **options)  # type: ignore[arg-type]
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever()
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            failures.append(err)

    thread = threading.Thread(target=serve, daemon=True, name="serve_forever")
    thread.start()
    try:
        wait_until(lambda: server._loop is not None, "the event loop running",
                   hang_guard=HANG_GUARD)
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(HANG_GUARD)
        assert not thread.is_alive(), "serve_forever did not return after shutdown"
        assert not failures, f"serve_forever raised {failures[0]!r}"


def held(server: MetricsServer) -> float:
    """ctprofd_http_connections as the server reports it now."""
    family = next(f for f in server.families() if f.name == "ctprofd_http_connections")
    return family.samples[0].value


def connect(server: MetricsServer, source: str = "127.0.0.1",
            rcvbuf: int | None = None) -> socket.socket:
    """A connection to `server` from the loopback address `source`."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(HANG_GUARD)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.server_port))
    return sock


@dataclass
class Reply:
    """What the server sent before it ended the connection, and how it ended it."""

    data: bytes
    reset: bool  # True: a reset; False: a FIN after the data

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/"):
            return None
        return int(self.data.split(b" ", 2)[1])

    @property
    def head(self) -> list[str]:
        return self.data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")

    @property
    def headers(self) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in self.head[1:])

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]


def read_to_end(sock: socket.socket | ssl.SSLSocket) -> Reply:
    """Everything `sock` receives until the server's end (a reset ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return Reply(data, True)
    return Reply(data, False)


def exchange(sock: socket.socket, request: bytes) -> Reply:
    try:
        sock.sendall(request)
    except (ConnectionResetError, BrokenPipeError):
        return Reply(b"", True)
    return read_to_end(sock)


def ask(server: MetricsServer, request: bytes, source: str = "127.0.0.1") -> Reply:
    """`request` sent on a new connection from `source`; the reply read to the end."""
    with connect(server, source) as sock:
        return exchange(sock, request)


def get(server: MetricsServer, path: str = "/metrics", source: str = "127.0.0.1",
        **headers: str) -> Reply:
    """GET `path` (headers given as Accept_Encoding="gzip" and so on)."""
    lines = [f"GET {path} HTTP/1.0"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ask(server, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), source)


def reset_by_server(sock: socket.socket) -> bool:
    """Whether the server ended `sock` with a reset (waits for its end: a hang guard)."""
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    assert poller.poll(HANG_GUARD * 1000), "the server never ended the connection"
    # EPIPE: the reset came after the server's FIN (the socket in CLOSE_WAIT)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (errno.ECONNRESET,
                                                                    errno.EPIPE)


def refused_at_once(server: MetricsServer, source: str) -> bool:
    """Whether a new connection from `source` is reset by the server before any request
    (the reset may come before connect() has returned)."""
    try:
        sock = connect(server, source)
    except ConnectionResetError:
        return True
    with sock:  # nothing sent before the reset
        return read_to_end(sock) == Reply(b"", True)


@contextlib.contextmanager
def loop_held(server: MetricsServer) -> Iterator[None]:
    """The server's event loop held in a callback until the block ends: connections made
    meanwhile wait in the listen backlog with their bytes in their sockets, and are then
    accepted in one burst and admitted before any of them is read (asyncio runs the tasks
    scheduled by accepting before the next read callbacks)."""
    wait_until(lambda: server._loop is not None, "the event loop running")
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(60)  # a hang guard: the block ends first

    assert server._loop is not None
    server._loop.call_soon_threadsafe(hold)
    assert entered.wait(60), "the event loop never ran the hold"
    try:
        yield
    finally:
        release.set()


def openssl_cert(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate naming `san` (e.g. "IP:127.0.0.1") and its key,
    made by the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    f"/CN={name}", *(["-addext", f"subjectAltName={san}"] if san else []),
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def taken(server: MetricsServer, sock: socket.socket) -> int:
    """Request bytes the server has read so far on its end of `sock` (0 before it holds
    it)."""
    name = sock.getsockname()
    while True:
        try:
            return sum(c.reader.taken for p in list(server._peers.values()) for c in list(p)
                       if c.writer.get_extra_info("peername") == name)
        except RuntimeError:  # changed by the event loop meanwhile: look again
            continue


def send_in_pieces(server: MetricsServer, sock: socket.socket, data: bytes,
                   size: int) -> None:
    """Send `data` `size` bytes at a time, each piece read by the server before the next
    is sent (all but the last)."""
    for start in range(0, len(data), size):
        sock.sendall(data[start:start + size])
        if start + size < len(data):
            wait_until(lambda: taken(server, sock) >= start + size, "the piece read",
                       hang_guard=HANG_GUARD)


def unhandled_task_errors(records: list[logging.LogRecord]) -> list[str]:
    """What asyncio logged of a connection's task ending in an exception nobody handled
    (after a collection, so that every finished task has been freed)."""
    return [r.getMessage() for r in records
            if r.name == "asyncio" and r.levelno >= logging.ERROR]
