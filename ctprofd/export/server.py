"""The HTTP endpoint: /metrics (bodies rendered once per snapshot, `render`), a landing page,
TLS, basic auth and response headers as the web configuration (config.web) says; an event
loop holding connections cheaply, with a first-byte deadline, per-connection deadlines,
bounded requests, per-address connection limits, limits on the requests being answered per
address and per network, and failed authentication rate-limited per address."""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import hashlib
import ipaddress
import logging
import random
import resource
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Protocol
from urllib.parse import urlsplit

import bcrypt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .render import CollectError, Exposition, negotiate

log = logging.getLogger(__name__)

REQUEST_DEADLINE_SECONDS = 10.0  # accept to the client's close after the whole answer
FIRST_BYTE_SECONDS = 3.0         # accept (and TLS handshake) to the first request byte
MAX_REQUEST_BYTES = 16384        # request line and headers
MAX_HEADERS = 100
MAX_CONNECTIONS = 4096           # held at once (bounded by the open-file limit too)
MAX_PER_ADDRESS = 64             # held at once by one source address
ANSWERING_PER_ADDRESS = 16       # whole requests held (being answered) per source address
ANSWERING_PER_NETWORK = 64       # ... per /24 (IPv4, loopback included) or /64 (IPv6)
AUTH_BURST = 5                   # failed basic-auth checks per address before the rate applies
AUTH_PER_SECOND = 1.0            # then this many per second
AUTH_QUEUE = 16                  # bcrypt checks waiting at most, all addresses together
AUTH_SOURCES = 4096              # addresses whose failures are remembered
WRITE_CHUNK = 65536              # an answer is written this much at a time (bounded buffers)
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


class TlsSource(Protocol):
    """What the server needs of the TLS settings (config.web builds them)."""

    allowed_sans: tuple[str, ...]

    def context(self) -> ssl.SSLContext:
        """The context for a new connection (certificates re-read when they changed)."""


@dataclass(frozen=True)
class RateLimit:
    """The toolkit's `rate_limit`: a token bucket over every request, `burst` deep,
    refilled one per `interval` seconds."""

    interval: float
    burst: int


@dataclass(frozen=True)
class WebConfig:
    """TLS (None: plain HTTP), basic-auth users (empty: no authentication), paths served
    without authentication, headers added to every answer, and a request rate limit."""

    tls: TlsSource | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    excluded_paths: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    rate_limit: RateLimit | None = None
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


def network_of(address: str) -> str:
    """The network an address counts in: its /24 for IPv4 (loopback too), its /64 for IPv6."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Authenticator:
    """Basic-auth check against bcrypt hashes, remembering successes (bcrypt is slow) by a
    SHA-256 of user, password and hash, so a changed hash or password is checked afresh.
    `known` answers from that memory alone (cheap: the event loop calls it); `verify` runs
    bcrypt (in a thread of its own, never the render thread)."""

    def __init__(self) -> None:
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def known(self, users: dict[str, bytes], header: str | None) -> bool | None:
        """True: remembered as good; False: malformed or not basic auth; None: bcrypt must
        decide."""
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        name, password = credentials
        hashed = users.get(name)
        with self._lock:
            return True if hashed is not None and _digest(name, password, hashed) in self._ok \
                else None

    def verify(self, users: dict[str, bytes], header: str | None) -> bool:
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        name, password = credentials
        hashed = users.get(name)
        try:
            matched = bcrypt.checkpw(password, hashed or _DUMMY_HASH)
        except ValueError:  # e.g. a password longer than bcrypt's 72 bytes
            return False
        if not matched or hashed is None:
            return False
        with self._lock:
            if len(self._ok) >= _AUTH_CACHE_SIZE:
                self._ok.clear()
            self._ok.add(_digest(name, password, hashed))
        return True


def _digest(name: str, password: bytes, hashed: bytes) -> bytes:
    return hashlib.sha256(b"\0".join((name.encode(), password, hashed))).digest()


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


class TokenBuckets:
    """Token buckets by key, `burst` deep, refilled at `rate` per second; at most `keys`
    remembered (the fullest are forgotten first: a forgotten key starts full anyway)."""

    def __init__(self, burst: float, rate: float, keys: int = AUTH_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.keys = burst, rate, keys
        self._clock = clock
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str) -> bool:
        """Take a token of `key`; False when it has none."""
        now = self._clock()
        tokens, then = self._tokens.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._tokens[key] = (tokens, now)
            return False
        if key not in self._tokens and len(self._tokens) >= self.keys:
            self._forget(now)
        self._tokens[key] = (tokens - 1, now)
        return True

    def give_back(self, key: str) -> None:
        if key in self._tokens:
            tokens, then = self._tokens[key]
            self._tokens[key] = (min(self.burst, tokens + 1), then)

    def _forget(self, now: float) -> None:
        full = [k for k, (t, then) in self._tokens.items()
                if t + (now - then) * self.rate >= self.burst]
        for key in full or list(self._tokens)[:len(self._tokens) // 2]:
            del self._tokens[key]


class _Drop(Exception):
    """Close the connection without an answer (too large, too slow, not HTTP)."""


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}
_TEXT = "text/plain; charset=utf-8"

Answer = tuple[int, Iterable[bytes], str, list[tuple[str, str]]]


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
    """A stream reader that counts the bytes that arrived and the bytes read, so that bytes
    waiting in it unread are seen."""

    arrived = 0
    taken = 0

    def feed_data(self, data: bytes) -> None:
        self.arrived += len(data)
        super().feed_data(data)

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        self.taken += len(data)
        return data


@dataclass(eq=False)
class _Connection:
    """One accepted connection; `requested` once its whole request arrived (from then on
    it counts against the answering limits), `written` once the whole answer was handed to
    the transport; `answered()` once it also left the process for the socket (then it no
    longer counts)."""

    address: str
    reader: _Reader
    writer: asyncio.StreamWriter
    requested: bool = False
    written: bool = False

    network: str = field(init=False)
    plain: asyncio.WriteTransport = field(init=False)

    def __post_init__(self) -> None:
        self.network = network_of(self.address)  # read on every admission: parsed once
        self.plain = self.writer.transport  # under TLS, the one below the encrypted one

    def answered(self) -> bool:
        """Whether the whole answer is in the socket, read now: a client may have read it
        all and sent its next request before a wait for this condition looks again."""
        return (self.written and not self.writer.transport.get_write_buffer_size()
                and not self.plain.get_write_buffer_size())


class MetricsServer:
    """An event-loop HTTP(S) server for one exposition, run by `serve_forever` in a thread.

    Idle and slow clients cannot crowd out scrapes: a connection must send its first request
    byte (after the TLS handshake) within `first_byte` seconds and finish its request and
    the answer within `deadline`; one source address holds at most `per_address`
    connections and all together at most `max_connections`. When a limit is reached, the
    oldest connection that has not sent a whole request yet (of that address, else of the
    address holding the most; see `_evict`) is closed to make room; only when every held
    connection has sent a whole request and is still being answered is the new one refused.

    Whole requests are limited too (answered, or waiting for an answer): `answering` per
    address, `answering_network` per /24 or /64. Over the first, the address's oldest one is
    closed; over the second, the oldest one of the address holding the most in that network,
    if it holds more than the newcomer's, else the newcomer is closed. So clients that send
    requests and never read the answers hold a bounded share, and another address always
    gets in.

    /metrics is served from the bodies `exposition` keeps (rendered in one thread of their
    own, once per snapshot: per value of `generation()`, which the daemon makes its published
    state; without it, a new object every call, so every scrape renders); bcrypt runs in
    another thread, its failures rate-limited per address. `web_config` can be swapped while
    serving (applies to new connections)."""

    def __init__(self, listen: str | Iterable[str], snapshot: Collector, web_config: WebConfig,
                 live: Collector | None = None, generation: Callable[[], object] = object,
                 deadline: float = REQUEST_DEADLINE_SECONDS,
                 first_byte: float = FIRST_BYTE_SECONDS, per_address: int = MAX_PER_ADDRESS,
                 max_connections: int = MAX_CONNECTIONS,
                 answering: int = ANSWERING_PER_ADDRESS,
                 answering_network: int = ANSWERING_PER_NETWORK) -> None:
        self.exposition = Exposition(snapshot, _Joined(live, self), generation)
        self.web_config = web_config
        self.deadline = deadline
        self.first_byte = first_byte
        self.per_address = per_address
        self.answering = answering
        self.answering_network = answering_network
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_connections = max(1, min(max_connections, soft - FD_RESERVE))
        self.authenticator = Authenticator()
        self.auth_failures = TokenBuckets(AUTH_BURST, AUTH_PER_SECOND)
        # (healthy, why) for GET /health, answered without basic auth; the daemon sets it
        self.health: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        self.evicted = 0
        self.refused = 0
        self.auth_limited = 0
        self.rate_limited = 0
        self._peers: dict[str, list[_Connection]] = {}
        self._requested: dict[str, list[_Connection]] = {}  # by network, oldest first
        self._count = 0
        self._auth_waiting = 0
        self._rate: TokenBuckets | None = None
        self._rate_of: RateLimit | None = None
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="http-render")
        self._auth_pool = ThreadPoolExecutor(1, thread_name_prefix="http-bcrypt")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()
        self.sockets: list[socket.socket] = []
        for value in [listen] if isinstance(listen, str) else listen:
            try:
                self.sockets.append(_bind(*parse_listen(value)))
            except OSError as err:  # its filename: the address that failed
                self.server_close()
                raise OSError(err.errno, err.strerror or str(err), value) from err
        self.server_address = self.sockets[0].getsockname()
        self.server_port = self.server_address[1]

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        scheme = "https" if self.web_config.tls else "http"
        urls = []
        for sock in self.sockets:
            host, port = sock.getsockname()[:2]
            urls.append(f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}")
        return urls

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
        for sock in self.sockets:
            sock.close()
        self._render_pool.shutdown(wait=False)
        self._auth_pool.shutdown(wait=False)

    def prerender(self) -> None:
        """Render the bodies of a newly published snapshot now, in the render thread
        (thread-safe; returns at once)."""
        try:
            self._render_pool.submit(self.exposition.prerender)
        except RuntimeError:  # shut down
            pass

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stopping.is_set():
            return
        servers = [await self._loop.create_server(
            lambda: asyncio.StreamReaderProtocol(_Reader(), self._client), sock=sock)
            for sock in self.sockets]
        await self._stop.wait()
        for server in servers:
            server.close()
        for peers in list(self._peers.values()):
            for connection in peers:
                _reset(connection.writer)

    # -- connection limits --

    def _admit(self, connection: _Connection) -> bool:
        peers = self._peers.get(connection.address, [])
        if len(peers) >= self.per_address and not self._evict(peers):
            return False
        if self._count >= self.max_connections and not any(
                self._evict(p) for p in sorted(self._peers.values(), key=len, reverse=True)):
            return False
        self._peers.setdefault(connection.address, []).append(connection)
        self._count += 1
        return True

    def _evict(self, peers: list[_Connection]) -> bool:
        """Close the oldest of `peers` that has not sent a whole request, passing over ones
        whose bytes wait unread (connections accepted in one burst are admitted before any
        of them is read, and a scraper's request may be among those bytes); else the oldest
        whose whole answer is in its socket (a scraper still reading it loses the rest).
        Oldest first, whether it sent bytes or none: a scraper's connection is silent from
        its accept until its request arrives, and must outlive as many newcomers as its
        address may hold. False when every one of `peers` has sent a whole request and is
        still being answered."""
        waiting = [c for c in peers if not c.requested]
        victim = next((c for c in waiting if not _bytes_unread(c)), None)
        victim = victim or next(iter(waiting), None) or next(
            (c for c in peers if c.answered()), None)
        if victim is None:
            return False
        self._close(victim)
        return True

    def _admit_request(self, connection: _Connection) -> bool:
        """Count a whole request against the answering limits, closing another one when
        over them (see the class docstring); False when the newcomer must go instead."""
        network = self._requested.setdefault(connection.network, [])
        for done in [c for c in network if c.answered()]:
            network.remove(done)  # their own waits may not have looked yet
        mine = [c for c in network if c.address == connection.address]
        if len(mine) >= self.answering:
            self._close(mine[0])
        elif len(network) >= self.answering_network:
            counts: dict[str, int] = {}
            for c in network:
                counts[c.address] = counts.get(c.address, 0) + 1
            most = max(counts, key=counts.__getitem__)
            if counts[most] <= len(mine):
                return False
            self._close(next(c for c in network if c.address == most))
        connection.requested = True
        network.append(connection)
        return True

    def _close(self, connection: _Connection) -> None:
        self._release(connection)
        _reset(connection.writer)
        self.evicted += 1

    def _release(self, connection: _Connection) -> None:
        peers = self._peers.get(connection.address, [])
        if connection in peers:
            peers.remove(connection)
            self._count -= 1
            if not peers:
                del self._peers[connection.address]
        self._unrequest(connection)

    def _unrequest(self, connection: _Connection) -> None:
        """Take the connection out of the answering limits."""
        network = self._requested.get(connection.network, [])
        if connection in network:
            network.remove(connection)
            if not network:
                del self._requested[connection.network]

    # -- one connection --

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(reader, _Reader)
        connection = _Connection(_source(writer), reader, writer)
        if not self._admit(connection):
            self.refused += 1
            log.debug("%s: every connection sent a whole request; refused", connection.address)
            _reset(writer)
            return
        try:
            # spread (3/4 to all of it), so that connections made in one burst do not all
            # end, and reconnect, in one burst that overflows the accept queue
            async with asyncio.timeout(self.deadline * random.uniform(0.75, 1.0)):
                await self._converse(connection, reader, writer)
        except (_Drop, TimeoutError, OSError, ssl.SSLError, EOFError) as err:
            log.debug("%s: connection closed: %s", connection.address,
                      str(err) or type(err).__name__)
        except Exception:  # noqa: BLE001 - a bug answering one client must not stop the server
            log.error("%s: answering failed", connection.address, exc_info=True)
        finally:
            self._release(connection)
            _reset(writer)

    async def _converse(self, connection: _Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        web = self.web_config
        async with asyncio.timeout(self.first_byte):  # the handshake and the first byte
            if web.tls is not None:
                await writer.start_tls(web.tls.context())
                _check_sans(writer, web.tls.allowed_sans)
            data = await reader.read(MAX_REQUEST_BYTES)
        while (end := _header_end(data)) is None:  # bytes after it (pipelined) are ignored
            if not data or len(data) >= MAX_REQUEST_BYTES:
                raise _Drop("no request" if not data else "request too large")
            chunk = await reader.read(MAX_REQUEST_BYTES - len(data))
            if not chunk:
                raise _Drop("closed mid-request")
            data += chunk
        request = _parse_request(data[:end])
        if not self._admit_request(connection):
            self.refused += 1
            raise _Drop("its network has the most whole requests held")
        status, body, content_type, headers = await self._answer(
            request, web, connection.address)
        body = list(body)
        lines = [f"HTTP/1.0 {status} {_REASONS[status]}", "Server: ctprofd",
                 f"Date: {formatdate(usegmt=True)}", f"Content-Type: {content_type}",
                 f"Content-Length: {sum(len(part) for part in body)}", "Connection: close",
                 *(f"{name}: {value}" for name, value in (*headers, *web.headers))]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if request.method != "HEAD":
            for part in body:  # a chunk at a time: a client that does not read holds little
                view = memoryview(part)
                for start in range(0, len(view), WRITE_CHUNK):
                    writer.write(view[start:start + WRITE_CHUNK])
                    await writer.drain()
        await writer.drain()
        connection.written = True
        await _until(connection.answered)
        self._unrequest(connection)  # it holds no answer bytes in the process any more
        await _hand_over(reader, writer)

    async def _answer(self, request: _Request, web: WebConfig, address: str) -> Answer:
        if not self._rate_allows(web.rate_limit):
            self.rate_limited += 1
            return 429, [b"Too Many Requests\n"], _TEXT, [("Retry-After", "1")]
        if request.method not in ("GET", "HEAD"):
            return 405, [b"Method Not Allowed\n"], _TEXT, [("Allow", "GET, HEAD")]
        try:
            path = urlsplit(request.path).path
        except ValueError:  # e.g. http://[::1/metrics: any client could fill the log
            return 400, [b"Bad Request\n"], _TEXT, []
        if path == HEALTH_PATH:  # probes send no credentials; the answer holds no metric data
            healthy, why = self.health()
            return 200 if healthy else 503, [f"{why}\n".encode()], _TEXT, []
        if web.users and path not in web.excluded_paths:
            refused = await self._authenticate(web, request.headers.get("authorization"),
                                               address)
            if refused is not None:
                return refused
        if path == "/metrics":
            return await self._metrics(request.headers)
        if path == "/":
            return 200, [LANDING_PAGE], "text/html; charset=utf-8", []
        return 404, [b"Not Found\n"], _TEXT, []

    def _rate_allows(self, limit: RateLimit | None) -> bool:
        if limit is None:
            return True
        if self._rate_of != limit:
            self._rate_of = limit
            self._rate = TokenBuckets(limit.burst, 1 / limit.interval, keys=1)
        assert self._rate is not None
        return self._rate.take("")

    async def _authenticate(self, web: WebConfig, header: str | None,
                            address: str) -> Answer | None:
        """None when the credentials are good; else the answer (401, or 429 when the
        address failed too often or too many checks are waiting)."""
        known = self.authenticator.known(web.users, header)
        if known is True:
            return None
        if known is None:
            if self._auth_waiting >= AUTH_QUEUE or not self.auth_failures.take(address):
                self.auth_limited += 1
                return 429, [b"Too Many Requests\n"], _TEXT, [("Retry-After", "1")]
            self._auth_waiting += 1
            try:
                known = await asyncio.get_running_loop().run_in_executor(
                    self._auth_pool, self.authenticator.verify, web.users, header)
            finally:
                self._auth_waiting -= 1
            if known:
                self.auth_failures.give_back(address)
                return None
        return 401, [b"Unauthorized\n"], _TEXT, [
            ("WWW-Authenticate", 'Basic realm="ctprofd", charset="UTF-8"')]

    async def _metrics(self, headers: dict[str, str]) -> Answer:
        fmt = negotiate(headers.get("accept"))
        compressed = "gzip" in headers.get("accept-encoding", "").lower()
        body = self.exposition.cached(fmt, compressed)
        if body is None:
            try:
                body = await asyncio.get_running_loop().run_in_executor(
                    self._render_pool, self.exposition.body, fmt, compressed)
            except CollectError:
                return 500, [b"Collecting the metrics failed: see the log.\n"], _TEXT, []
        extra = [("Content-Encoding", "gzip")] if compressed else []
        return 200, body, fmt.content_type, extra

    def families(self) -> Iterator[Metric]:
        """The server's own figures (rendered with the live part)."""
        yield GaugeMetricFamily("ctprofd_http_connections", "HTTP connections held now.",
                                value=self._count)
        yield CounterMetricFamily(
            "ctprofd_http_connections_evicted", "Connections closed to make room under the "
            "connection limits (idle ones, then ones whose answer is in their socket) or the "
            "limits on whole requests held per address and network.", value=self.evicted)
        yield CounterMetricFamily(
            "ctprofd_http_connections_refused", "Connections refused because every held "
            "connection of the address (or of all) had sent a whole request and was still being "
            "answered, or because their network held the most whole requests.",
            value=self.refused)
        limited = CounterMetricFamily(
            "ctprofd_http_requests_limited", "Requests answered 429 Too Many Requests, by "
            "reason: rate_limit (the web config's), auth (no bcrypt check: the address failed "
            "basic auth too often, or too many checks were waiting).", labels=["reason"])
        limited.add_metric(["rate_limit"], self.rate_limited)
        limited.add_metric(["auth"], self.auth_limited)
        yield limited


class _Joined:
    """The live collector: the daemon's live one (process_*, if any) and the server's own."""

    def __init__(self, live: Collector | None, server: MetricsServer) -> None:
        self.live, self.server = live, server

    def collect(self) -> Iterator[Metric]:
        if self.live is not None:
            yield from self.live.collect()
        yield from self.server.families()


def _check_sans(writer: asyncio.StreamWriter, allowed: tuple[str, ...]) -> None:
    """With `client_allowed_sans`, a client certificate must name one of them."""
    if not allowed:
        return
    cert = writer.get_extra_info("peercert") or {}
    names = {value for _, value in cert.get("subjectAltName", ())}
    if not names & set(allowed):
        raise _Drop("client certificate names none of client_allowed_sans")


async def _hand_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End a connection whose whole answer is in its socket: send our end (FIN), wait for the
    client's (reading and discarding what it sends), then until it has acknowledged every
    byte, and close; under TLS, close, which sends close_notify after the answer and waits
    for the client's. The caller's deadline bounds it; past that the connection is reset.
    (A plain close would leave an answer its client never reads to the kernel, an orphaned
    socket sending to a closed window, which no limit of ours counts.)"""
    if writer.can_write_eof():  # plain TCP
        writer.write_eof()
        while await reader.read(MAX_REQUEST_BYTES):
            pass
        # every byte, our FIN included, acknowledged (e.g. it half-closed, still reading)
        await _until(lambda: not _socket_queue(writer, termios.TIOCOUTQ))
    writer.close()
    await writer.wait_closed()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds, checking it at growing intervals (5 ms to 0.2 s): for
    what no event tells (the caller's deadline bounds it)."""
    pause = 0.005
    while not condition():
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a reset, discarding what its socket still holds: the client
    sees the end even if it reads nothing (a closed window holds back a FIN, never a RST)."""
    sock = writer.get_extra_info("socket")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, AttributeError, ValueError):  # already closed
        pass
    writer.transport.abort()


def _bytes_unread(connection: _Connection) -> bool:
    """Whether bytes arrived on the connection that nobody read yet (in the reader, or
    still in the socket)."""
    reader = connection.reader
    if reader.arrived > reader.taken:
        return True
    return _socket_queue(connection.writer, termios.FIONREAD) > 0


def _socket_queue(writer: asyncio.StreamWriter, request: int) -> int:
    """Bytes queued in the connection's socket as `request` counts them (FIONREAD: received,
    unread; TIOCOUTQ: sent, unacknowledged); 0 once the socket is closed."""
    sock = writer.get_extra_info("socket")
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    except (OSError, AttributeError, ValueError):
        return 0


def _source(writer: asyncio.StreamWriter) -> str:
    """The client's address, an IPv4-mapped IPv6 one written as IPv4."""
    peer = writer.get_extra_info("peername")
    address = str(peer[0]) if peer else "?"
    return address.removeprefix("::ffff:")


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one (at most 65536): each held connection
    is a descriptor, and the usual soft limit is 1024. (Linux bounds the hard limit by
    fs.nr_open: it is never RLIM_INFINITY.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on HOST:PORT ("" is every address, dual-stack when IPv6 works)."""
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address[0] == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


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
