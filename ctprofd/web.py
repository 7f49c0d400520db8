"""The HTTP endpoint: /metrics, a landing page, TLS and basic auth from an exporter-toolkit
web config file, per-connection deadlines and bounded requests."""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import io
import logging
import os
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import bcrypt
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import ConfigError, Reader, load_yaml, parse_listen, read_text
from .files import read_regular
from .render import CollectError, Renderer

log = logging.getLogger(__name__)

REQUEST_DEADLINE_SECONDS = 10.0
MAX_REQUEST_BYTES = 16384
MAX_CONNECTIONS = 64
HEALTH_PATH = "/health"
_AUTH_CACHE_SIZE = 256
_BCRYPT_RE = re.compile(rb"\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}")
# Checked for unknown users so that a wrong name costs as much as a wrong password.
_DUMMY_HASH = b"$2b$10$IsfneDbUYwE9EcQFv30A1.g/wHm.2ArdLuDeKeKMRGa7zDDYHSPii"
_CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
                "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
_UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
_TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                 "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
             "max_version")
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


def load_web_config(path: str | None) -> WebConfig:
    """Read and validate an exporter-toolkit web config; None gives plain HTTP, no auth.
    Certificate and key files are loaded now, so their errors surface here."""
    if path is None:
        return WebConfig()
    return _WebValidator(path).web_config(load_yaml(read_text(path), path))


class _WebValidator(Reader):
    def web_config(self, raw: dict[str, Any]) -> WebConfig:
        raw = self.mapping(raw, "", ("tls_server_config", "basic_auth_users"))
        tls = raw.get("tls_server_config")
        users = raw.get("basic_auth_users")
        return WebConfig(tls=None if tls is None else self._tls(tls),
                         users={} if users is None else self._users(users),
                         source=self.source)

    def _file(self, raw: dict[str, Any], key: str) -> str | None:
        """A file path; relative paths are relative to the web config file, as in the toolkit."""
        value = self.string(raw.get(key), f"tls_server_config.{key}", nullable=True)
        if not value:
            return None
        path = os.path.join(os.path.dirname(os.path.abspath(self.source)), value)
        try:
            read_regular(path)  # OpenSSL reads by path: refuse a FIFO, device or huge file first
        except FileNotFoundError:
            raise self.fail(f"tls_server_config.{key}", f"no such file: {path}")
        except OSError as err:
            raise self.fail(f"tls_server_config.{key}", f"cannot read {path}: {err.strerror}")
        return path

    def _version(self, raw: dict[str, Any], key: str, default: str) -> ssl.TLSVersion:
        name = self.string(raw.get(key, default), f"tls_server_config.{key}")
        if name not in _TLS_VERSIONS:
            raise self.fail(f"tls_server_config.{key}",
                            f"must be one of {', '.join(_TLS_VERSIONS)}, got {name!r}")
        return _TLS_VERSIONS[name]

    def _tls(self, value: Any) -> ssl.SSLContext:
        raw = self.mapping(value, "tls_server_config", _TLS_KEYS)
        cert, key = self._file(raw, "cert_file"), self._file(raw, "key_file")
        if not cert or not key:
            raise self.fail("tls_server_config", "cert_file and key_file are both required")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self._version(raw, "min_version", "TLS12")
        ctx.maximum_version = self._version(raw, "max_version", "TLS13")
        if ctx.minimum_version > ctx.maximum_version:
            raise self.fail("tls_server_config.min_version", "is above max_version")
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as err:
            raise self.fail("tls_server_config.cert_file",
                            f"cannot load {cert} with key {key}: {_ssl_reason(err)}")
        self._client_auth(raw, ctx)
        return ctx

    def _client_auth(self, raw: dict[str, Any], ctx: ssl.SSLContext) -> None:
        key = "tls_server_config.client_auth_type"
        mode = self.string(raw.get("client_auth_type", "NoClientCert"), key)
        if mode in _UNSUPPORTED_CLIENT_AUTH:
            raise self.fail(key, f"{mode} is not supported (client certificates are always "
                            "verified): use VerifyClientCertIfGiven or RequireAndVerifyClientCert")
        if mode not in _CLIENT_AUTH:
            raise self.fail(key, f"must be one of {', '.join(_CLIENT_AUTH)}, got {mode!r}")
        ca = self._file(raw, "client_ca_file")
        if mode != "NoClientCert" and not ca:
            raise self.fail("tls_server_config.client_ca_file", f"required by {mode}")
        if ca:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as err:
                raise self.fail("tls_server_config.client_ca_file",
                                f"cannot load {ca}: {_ssl_reason(err)}")
        ctx.verify_mode = _CLIENT_AUTH[mode]

    def _users(self, value: Any) -> dict[str, bytes]:
        if not isinstance(value, dict):
            raise self.fail("basic_auth_users", "expected a mapping of user name to bcrypt hash")
        users = {}
        for name, hashed in value.items():
            key = f"basic_auth_users.{name}"
            if not isinstance(name, str) or ":" in name:
                raise self.fail(key, "user names are strings without ':'")
            text = self.string(hashed, key).encode()
            if not _BCRYPT_RE.fullmatch(text):
                raise self.fail(key, "not a bcrypt hash ($2b$<cost>$ followed by 53 characters)")
            users[name] = text
        return users


def _ssl_reason(err: Exception) -> str:
    return getattr(err, "reason", None) or getattr(err, "strerror", None) or str(err)


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


class _RequestTooSlowOrLarge(ConnectionAbortedError):
    """The client overran the per-connection deadline or the request size bound."""


class _DeadlineReader(io.RawIOBase):
    """Socket reads bounded in total bytes and in total time, so a client that trickles
    bytes cannot hold a worker past the deadline."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        self._sock = sock
        self._deadline = deadline
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0 or self._left <= 0:
            raise _RequestTooSlowOrLarge("request deadline or size bound exceeded")
        self._sock.settimeout(remaining)
        view = memoryview(buffer)[:self._left]
        try:
            n = self._sock.recv_into(view)
        except TimeoutError:
            raise _RequestTooSlowOrLarge("request deadline exceeded") from None
        self._left -= n
        return n


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.0"
    server_version = "ctprofd"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by a bounded reader; closing drops its socket reference
        self.rfile = io.BufferedReader(_DeadlineReader(
            self.connection, self.server.connection_deadline(), MAX_REQUEST_BYTES))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == HEALTH_PATH:  # probes send no credentials; the answer holds no metric data
            healthy, why = self.server.health()
            self._reply(200 if healthy else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
            return
        web = self.server.web_config
        if not self.server.authenticator.allowed(web.users, self.headers.get("Authorization")):
            self._reply(401, b"Unauthorized\n", "text/plain; charset=utf-8",
                        [("WWW-Authenticate", 'Basic realm="ctprofd", charset="UTF-8"')])
            return
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            try:
                body = self.server.renderer.render(encoder)
            except CollectError:
                self._reply(500, b"Collecting the metrics failed: see the log.\n",
                            "text/plain; charset=utf-8")
                return
            headers = []
            if "gzip" in (self.headers.get("Accept-Encoding") or ""):
                body = gzip.compress(body)
                headers.append(("Content-Encoding", "gzip"))
            self._reply(200, body, content_type, headers)
        elif path == "/":
            self._reply(200, LANDING_PAGE, "text/html; charset=utf-8")
        else:
            self._reply(404, b"Not Found\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str,
               headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer(ThreadingHTTPServer):
    """A threaded HTTP(S) server for one registry. Each connection gets its own thread, a
    deadline (TLS handshake, request and response), and at most MAX_CONNECTIONS run at once;
    `web_config` can be swapped while serving (applies to new connections)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, listen: str, registry: CollectorRegistry, web_config: WebConfig,
                 deadline: float = REQUEST_DEADLINE_SECONDS) -> None:
        host, port = parse_listen(listen)
        self.registry = registry
        self.renderer = Renderer(registry)
        self.web_config = web_config
        self.deadline = deadline
        self.authenticator = Authenticator()
        # (healthy, why) for GET /health, answered without basic auth; the daemon sets it
        self.health: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._local = threading.local()
        self.address_family, address = _resolve(host, port)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup; dual-stack for the any address."""
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.web_config.tls else "http"
        return f"{scheme}://{host}:{self.server_port}"

    def connection_deadline(self) -> float:
        """Monotonic time by which the current thread's connection must be done."""
        return self._local.deadline

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("%s: too many connections, closed", client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        self._local.deadline = time.monotonic() + self.deadline
        request.settimeout(self.deadline)
        tls = self.web_config.tls
        if tls is None:
            super().finish_request(request, client_address)
            return
        with tls.wrap_socket(request, server_side=True) as wrapped:
            super().finish_request(wrapped, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client-side failures (bad TLS, timeouts, resets) are the client's: debug only."""
        log.debug("%s: connection failed", client_address, exc_info=True)


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
