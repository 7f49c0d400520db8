"""The HTTP endpoint: /metrics, a landing page, TLS and basic auth as the web configuration
(config.web) says; an event loop holding connections cheaply, with a first-byte deadline,
per-connection deadlines, bounded requests and per-address connection limits."""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import gzip
import hashlib
import logging
import resource
import socket
import ssl
import struct
import termios
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import urlsplit

import bcrypt
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from .render import CollectError, Renderer

log = logging.getLogger(__name__)

REQUEST_DEADLINE_SECONDS = 10.0  # accept to the last byte of the answer
FIRST_BYTE_SECONDS = 3.0         # accept (and TLS handshake) to the first request byte
MAX_REQUEST_BYTES = 16384        # request line and headers
MAX_HEADERS = 100
MAX_CONNECTIONS = 4096           # held at once (bounded by the open-file limit too)
MAX_PER_ADDRESS = 64             # held at once by one source address
FD_RESERVE = 256                 # descriptors kept for everything but connections
LISTEN_BACKLOG = 512
HEALTH_PATH = "/health"
_AUTH_CACHE_SIZE = 256
# Checked for unknown users so that a wrong name costs as much as a wrong password.
_DUMMY_HASH = b"$2b$10$IsfneDbUYwE9EcQFv30A1.g/wHm.2ArdLuDeKeKMRGa7zDDYHSPii"
LANDING_PAGE = b"""<!DOCTYPE html>
<html><head><title>ctprofd</title></head>
<body><h1>ctprofd</h1>
<p>Exact per-process jemalloc allocation counters.</p>
<p><a href="/metrics">Metrics</a> &middot; <a href="/health">Health</a></p>
</body></html>
"""

@dataclass(frozen=True)
class WebConfig:
    """TLS context (None: plain HTTP) and basic-auth users (empty: no authentication)."""

    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    source: str = "<none>"


def parse_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT ("" host = every address; IPv6 hosts in brackets); ValueError if bad."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT with a port 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:19455")
    return host, int(port)


class Authenticator:
    """Basic-auth check against bcrypt hashes, remembering successes (bcrypt is slow) by a
    SHA-256 of user, password and hash, so a changed hash or password is checked afresh."""

    def __init__(self) -> None:
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def allowed(self, users: dict[str, bytes], header: str | None) -> bool:
        if not users:
            return True
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        name, password = credentials
        hashed = users.get(name)
        digest = hashlib.sha256(b"\0".join((name.encode(), password, hashed or b""))).digest()
        with self._lock:
            if hashed is not None and digest in self._ok:
                return True
        try:
            matched = bcrypt.checkpw(password, hashed or _DUMMY_HASH)
        except ValueError:  # e.g. a password longer than bcrypt's 72 bytes
            return False
        if not matched or hashed is None:
            return False
        with self._lock:
            if len(self._ok) >= _AUTH_CACHE_SIZE:
                self._ok.clear()
            self._ok.add(digest)
        return True


def _basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    name, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return name.decode("utf-8", "replace"), password


class _Drop(Exception):
    """Close the connection without an answer (too large, too slow, not HTTP)."""


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


def _header_end(data: bytes) -> int | None:
    """Where the first request's blank line ends in `data`, None before it arrived."""
    ends = [i + len(blank) for blank in (b"\r\n\r\n", b"\n\n") if (i := data.find(blank)) >= 0]
    return min(ends) if ends else None


def _parse_request(data: bytes) -> _Request:
    """The request line and headers of `data` (which ends with the blank line)."""
    lines = data.decode("latin-1").split("\n")
    if len(lines) > MAX_HEADERS + 3:
        raise _Drop("too many header lines")
    words = lines[0].rstrip("\r").split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        raise _Drop(f"not an HTTP/1 request line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.rstrip("\r").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return _Request(words[0], words[1], headers)


class _Reader(asyncio.StreamReader):
    """A stream reader that remembers whether any byte arrived (before it is read)."""

    received = False

    def feed_data(self, data: bytes) -> None:
        self.received = True
        super().feed_data(data)


@dataclass(eq=False)
class _Connection:
    """One accepted connection; `requested` once its whole request arrived (from then on
    it is being answered and is never evicted)."""

    address: str
    reader: _Reader
    writer: asyncio.StreamWriter
    requested: bool = False


class MetricsServer:
    """An event-loop HTTP(S) server for one registry, run by `serve_forever` in a thread.

    Idle and slow clients cannot crowd out scrapes: a connection must send its first request
    byte (after the TLS handshake) within `first_byte` seconds and finish its request and
    the answer within `deadline`; one source address holds at most `per_address`
    connections and all together at most `max_connections`. When a limit is reached, the
    oldest connection that has not sent a whole request yet (of that address, else of the
    address holding the most) is closed to make room; only when every held connection is
    being answered is the new one refused. Holding a connection costs no thread, only a
    socket and a small task. Rendering and bcrypt run in a small thread pool. `web_config`
    can be swapped while serving (applies to new connections)."""

    def __init__(self, listen: str, registry: CollectorRegistry, web_config: WebConfig,
                 deadline: float = REQUEST_DEADLINE_SECONDS,
                 first_byte: float = FIRST_BYTE_SECONDS, per_address: int = MAX_PER_ADDRESS,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        host, port = parse_listen(listen)
        self.registry = registry
        self.renderer = Renderer(registry)
        self.web_config = web_config
        self.deadline = deadline
        self.first_byte = first_byte
        self.per_address = per_address
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_connections = max(1, min(max_connections, soft - FD_RESERVE))
        self.authenticator = Authenticator()
        # (healthy, why) for GET /health, answered without basic auth; the daemon sets it
        self.health: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        self.evicted = 0
        self.refused = 0
        self._peers: dict[str, list[_Connection]] = {}
        self._count = 0
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="http-render")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()
        family, address = _resolve(host, port)
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address[0] == "::":
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.socket.bind(address)
            self.socket.listen(LISTEN_BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self.server_port = self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.web_config.tls else "http"
        return f"{scheme}://{host}:{self.server_port}"

    def serve_forever(self) -> None:
        """Serve until `shutdown` (call it from another thread)."""
        try:
            asyncio.run(self._serve())
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Stop serving and wait until `serve_forever` has returned."""
        self._stopping.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop already ended
                pass
            self._done.wait()

    def server_close(self) -> None:
        self.socket.close()
        self._pool.shutdown(wait=False)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stopping.is_set():
            return
        server = await self._loop.create_server(
            lambda: asyncio.StreamReaderProtocol(_Reader(), self._client), sock=self.socket)
        async with server:
            await self._stop.wait()
            server.close()
            for peers in list(self._peers.values()):
                for connection in peers:
                    connection.writer.transport.abort()

    # -- connection limits --

    def _admit(self, connection: _Connection) -> bool:
        peers = self._peers.setdefault(connection.address, [])
        if len(peers) >= self.per_address and not self._evict(peers):
            return False
        if self._count >= self.max_connections and not any(
                self._evict(p) for p in sorted(self._peers.values(), key=len, reverse=True)):
            return False
        peers.append(connection)
        self._count += 1
        return True

    def _evict(self, peers: list[_Connection]) -> bool:
        """Close the oldest of `peers` that has not sent a whole request, preferring one that
        has sent no byte at all: a scraper's request may have arrived but not been parsed yet
        (connections accepted in one burst are admitted before any of them is read). False
        when every one of `peers` is being answered."""
        waiting = (c for c in peers if not c.requested)
        oldest = victim = next(waiting, None)
        while victim is not None and _sent_something(victim):
            victim = next(waiting, None)
        victim = victim or oldest
        if victim is None:
            return False
        self._release(victim)
        victim.writer.transport.abort()
        self.evicted += 1
        return True

    def _release(self, connection: _Connection) -> None:
        peers = self._peers.get(connection.address, [])
        if connection in peers:
            peers.remove(connection)
            self._count -= 1
            if not peers:
                del self._peers[connection.address]

    # -- one connection --

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(reader, _Reader)
        connection = _Connection(_source(writer), reader, writer)
        if not self._admit(connection):
            self.refused += 1
            log.debug("%s: every connection is being answered; refused", connection.address)
            writer.transport.abort()
            return
        try:
            async with asyncio.timeout(self.deadline):
                await self._converse(connection, reader, writer)
        except (_Drop, TimeoutError, OSError, ssl.SSLError, EOFError) as err:
            log.debug("%s: connection closed: %s", connection.address, err or type(err).__name__)
        except Exception:  # noqa: BLE001 - a bug answering one client must not stop the server
            log.error("%s: answering failed", connection.address, exc_info=True)
        finally:
            self._release(connection)
            writer.transport.abort()

    async def _converse(self, connection: _Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        web = self.web_config
        async with asyncio.timeout(self.first_byte):  # the handshake and the first byte
            if web.tls is not None:
                await writer.start_tls(web.tls)
            data = await reader.read(MAX_REQUEST_BYTES)
        while (end := _header_end(data)) is None:  # bytes after it (pipelined) are ignored
            if not data or len(data) >= MAX_REQUEST_BYTES:
                raise _Drop("no request" if not data else "request too large")
            chunk = await reader.read(MAX_REQUEST_BYTES - len(data))
            if not chunk:
                raise _Drop("closed mid-request")
            data += chunk
        connection.requested = True
        request = _parse_request(data[:end])
        status, body, content_type, headers = await self._answer(request, web)
        lines = [f"HTTP/1.0 {status} {_REASONS[status]}", "Server: ctprofd",
                 f"Date: {formatdate(usegmt=True)}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}", "Connection: close",
                 *(f"{name}: {value}" for name, value in headers)]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(head if request.method == "HEAD" else head + body)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def _answer(self, request: _Request, web: WebConfig) -> tuple[
            int, bytes, str, list[tuple[str, str]]]:
        text = "text/plain; charset=utf-8"
        if request.method not in ("GET", "HEAD"):
            return 405, b"Method Not Allowed\n", text, [("Allow", "GET, HEAD")]
        path = urlsplit(request.path).path
        if path == HEALTH_PATH:  # probes send no credentials; the answer holds no metric data
            healthy, why = self.health()
            return 200 if healthy else 503, f"{why}\n".encode(), text, []
        loop = asyncio.get_running_loop()
        if web.users and not await loop.run_in_executor(
                self._pool, self.authenticator.allowed, web.users,
                request.headers.get("authorization")):
            return 401, b"Unauthorized\n", text, [
                ("WWW-Authenticate", 'Basic realm="ctprofd", charset="UTF-8"')]
        if path == "/metrics":
            return await loop.run_in_executor(self._pool, self._metrics, request.headers)
        if path == "/":
            return 200, LANDING_PAGE, "text/html; charset=utf-8", []
        return 404, b"Not Found\n", text, []

    def _metrics(self, headers: dict[str, str]) -> tuple[int, bytes, str, list[tuple[str, str]]]:
        encoder, content_type = choose_encoder(headers.get("accept"))
        try:
            body = self.renderer.render(encoder, self._families())
        except CollectError:
            return 500, b"Collecting the metrics failed: see the log.\n", \
                "text/plain; charset=utf-8", []
        if "gzip" in headers.get("accept-encoding", ""):
            return 200, gzip.compress(body), content_type, [("Content-Encoding", "gzip")]
        return 200, body, content_type, []


    def _families(self) -> list[Metric]:
        held = GaugeMetricFamily("ctprofd_http_connections", "HTTP connections held now.",
                                 value=self._count)
        evicted = CounterMetricFamily(
            "ctprofd_http_connections_evicted", "Connections closed before sending a whole "
            "request, to make room under the per-address or total connection limit.",
            value=self.evicted)
        refused = CounterMetricFamily(
            "ctprofd_http_connections_refused", "Connections refused because every held "
            "connection of the address (or of all) was being answered.", value=self.refused)
        return [held, evicted, refused]


def _sent_something(connection: _Connection) -> bool:
    """Whether bytes arrived on the connection, read by the loop or still in the socket."""
    if connection.reader.received:
        return True
    sock = connection.writer.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0] > 0
    except (OSError, AttributeError):
        return False


def _source(writer: asyncio.StreamWriter) -> str:
    """The client's address, an IPv4-mapped IPv6 one written as IPv4."""
    peer = writer.get_extra_info("peername")
    address = str(peer[0]) if peer else "?"
    return address.removeprefix("::ffff:")


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one (at most 65536): each held connection
    is a descriptor, and the usual soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    """Address family and bind address; "" is every address, dual-stack when IPv6 works."""
    if not host:
        if socket.has_ipv6:
            try:
                socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
                return socket.AF_INET6, ("::", port)
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", port)
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return family, address
