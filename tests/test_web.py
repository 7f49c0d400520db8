"""The HTTP endpoint over real loopback sockets: pages, exposition formats, TLS with openssl-made
certificates, basic auth, client certificates, and slow or oversized clients."""

from __future__ import annotations

import asyncio
import base64
import errno
import gzip
import http.client
import logging
import re
import select
import socket
import ssl
import subprocess
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from ctprofd.config.settings import ConfigError
from ctprofd.config.web import load_web_config
from ctprofd.export.render import OPENMETRICS, TEXT, Exposition
from ctprofd.export.server import (AUTH_BURST, AUTH_PER_SECOND, MAX_REQUEST_BYTES,
                                   MetricsServer, TokenBuckets, WebConfig, _bytes_unread,
                                   _Connection, _Reader, network_of, parse_listen)
from support.clock import Clock
from support.procs import wait_until
from support.webserver import loop_held


@pytest.fixture
def registry():
    reg = CollectorRegistry()
    Gauge("ctprofd_test_value", "A test gauge.", registry=reg).set(42)
    return reg


@pytest.fixture
def serve(registry):
    servers = []

    def start(web: WebConfig = WebConfig(), deadline: float = 10.0,
              **limits: float) -> MetricsServer:
        server = MetricsServer("127.0.0.1:0", registry, web, deadline=deadline, **limits)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str, headers: dict | None = None, context: ssl.SSLContext | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_from(source: str, url: str, headers: dict) -> int:
    """The status of GET `url` from a client socket bound to the address `source`."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5,
                                            source_address=(source, 0))
    try:
        connection.request("GET", parts.path or "/", headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def openssl_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def web_config(tmp_path: Path, text: str) -> WebConfig:
    path = tmp_path / "web.yaml"
    path.write_text(text)
    return load_web_config(str(path))


def test_landing_page_metrics_and_404(serve):
    server = serve()
    status, headers, body = get(server.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'<a href="/metrics">' in body
    status, headers, body = get(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"ctprofd_test_value 42.0" in body
    assert get(server.url + "/nothing")[0] == 404


def test_openmetrics_and_gzip_are_negotiated(serve):
    server = serve()
    status, headers, body = get(server.url + "/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, headers, body = get(server.url + "/metrics", {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"ctprofd_test_value 42.0" in gzip.decompress(body)


def test_tls_with_a_self_signed_certificate(serve, tmp_path):
    cert, key = openssl_cert(tmp_path, "server")
    server = serve(web_config(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n"
                                        f"  key_file: {key.name}\n"))
    assert server.url.startswith("https://")
    client = ssl.create_default_context(cafile=str(cert))
    status, _, body = get(server.url + "/metrics", context=client)
    assert status == 200 and b"ctprofd_test_value" in body
    with pytest.raises(urllib.error.URLError):  # an unknown CA is refused by the client
        get(server.url + "/metrics", context=ssl.create_default_context())
    plain = server.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        get(plain + "/metrics")
    assert get(server.url + "/", context=client)[0] == 200  # a bad handshake hurt nobody


def test_a_tls_client_reading_to_the_end_gets_the_answer_and_the_servers_close(serve,
                                                                               tmp_path):
    """As `openssl s_client` does: read until the server's close_notify, without using
    Content-Length. With a 300 s deadline only the server's close can end it."""
    cert, key = openssl_cert(tmp_path, "server")
    server = serve(web_config(tmp_path, f"tls_server_config:\n  cert_file: {cert}\n"
                                        f"  key_file: {key.name}\n"), deadline=300)
    client = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=60) as raw_sock:
        with client.wrap_socket(raw_sock, server_hostname="127.0.0.1",
                                suppress_ragged_eofs=False) as s:  # 60 s: a hang guard
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):  # b"" only after the server's close_notify
                reply += chunk
    assert reply.startswith(b"HTTP/1.0 200") and b"ctprofd_test_value 42.0" in reply


def test_client_certificates_are_required_and_verified(serve, tmp_path):
    cert, key = openssl_cert(tmp_path, "server")
    client_cert, client_key = openssl_cert(tmp_path, "client")
    server = serve(web_config(tmp_path, f"""
tls_server_config:
  cert_file: {cert}
  key_file: {key}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {client_cert}
"""))
    anonymous = ssl.create_default_context(cafile=str(cert))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        get(server.url + "/metrics", context=anonymous)
    identified = ssl.create_default_context(cafile=str(cert))
    identified.load_cert_chain(str(client_cert), str(client_key))
    assert get(server.url + "/metrics", context=identified)[0] == 200


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth(serve, tmp_path):
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    server = serve(web_config(tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n"))
    status, headers, _ = get(server.url + "/metrics")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert get(server.url + "/metrics", basic("prometheus", "wrong"))[0] == 401
    assert get(server.url + "/metrics", basic("nobody", "s3cret"))[0] == 401
    assert get(server.url + "/metrics", {"Authorization": "Basic !!!"})[0] == 401
    assert get(server.url + "/metrics", {"Authorization": "Bearer x"})[0] == 401
    for _ in range(2):  # the second time from the cache of successful checks
        status, _, body = get(server.url + "/metrics", basic("prometheus", "s3cret"))
        assert status == 200 and b"ctprofd_test_value" in body
    assert get(server.url + "/", basic("prometheus", "s3cret"))[0] == 200
    assert get(server.url + "/metrics", basic("prometheus", "s3cret" + "x" * 80))[0] == 401


def test_a_swapped_web_config_applies_to_new_connections(serve, tmp_path):
    server = serve()
    assert get(server.url + "/metrics")[0] == 200
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    server.web_config = web_config(tmp_path, f"basic_auth_users:\n  u: '{hashed}'\n")
    assert get(server.url + "/metrics")[0] == 401
    assert get(server.url + "/metrics", basic("u", "pw"))[0] == 200


def test_slowloris_does_not_block_a_concurrent_scrape_and_is_cut_off(serve):
    server = serve(deadline=1.0)
    port = server.server_port
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"GET /metrics HTTP/1.1\r\n")
    status, _, body = get(server.url + "/metrics")
    assert status == 200 and b"ctprofd_test_value" in body
    started = time.monotonic()
    trickle.settimeout(0.2)
    closed = False
    while not closed and time.monotonic() - started < 120:  # a byte at a time; a hang guard
        try:
            trickle.sendall(b"X")
            closed = trickle.recv(1) == b""
        except TimeoutError:
            continue
        except OSError:
            closed = True
    assert closed, "a trickling client was not cut off by the deadline"
    assert closed_by_server(idle)  # the idle one too
    idle.close()
    trickle.close()


def test_oversized_request_is_dropped(serve):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=5) as s:
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 40000 + b"\r\n\r\n")
            reply = s.recv(100)
        except ConnectionResetError:
            reply = b""
    assert reply == b""
    assert get(server.url + "/metrics")[0] == 200


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (waits up to 10 s for it to happen)."""
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def refused_at_once(server: MetricsServer, source: str) -> bool:
    """Whether a new connection from `source` is closed by the server before any request
    (the reset may come before connect() has returned)."""
    try:
        newcomer = connect_from(server, source)
    except ConnectionResetError:
        return True
    with newcomer:
        return closed_by_server(newcomer)


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` on `sock`; everything the server answers before closing (b"" when it
    reset the connection instead)."""
    sock.settimeout(10)
    try:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        return b""
    return reply


def raw(server: MetricsServer, data: bytes) -> bytes:
    """Send `data` on a fresh connection; everything the server answers before closing."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        return exchange(s, data)


def test_a_connection_without_a_first_byte_is_closed_early(serve):
    server = serve(first_byte=0.3)  # the request deadline stays at 10 s
    idle = socket.create_connection(("127.0.0.1", server.server_port))
    assert closed_by_server(idle)
    assert get(server.url + "/metrics")[0] == 200


def test_one_address_over_its_limit_loses_its_oldest_idle_connection(serve):
    server = serve(per_address=4)
    idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(4)]
    assert get(server.url + "/metrics")[0] == 200  # takes the place of the oldest idle one
    assert closed_by_server(idle[0])
    for s in idle[1:]:  # the others still hold their places
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(10)
        assert s.recv(12) == b"HTTP/1.0 200"
    assert server.evicted == 1
    for s in idle:
        s.close()


def test_when_full_the_address_holding_most_gives_way(serve):
    server = serve(max_connections=6)
    held = [connect_from(server, source)  # 2 from 127.0.0.2 first (the oldest), 4 from .3
            for source in ["127.0.0.2"] * 2 + ["127.0.0.3"] * 4]
    wait_until(lambda: server._count == 6, "all six held")
    assert get(server.url + "/metrics")[0] == 200
    assert closed_by_server(held[2])  # the oldest of 127.0.0.3, not the oldest of all
    assert [answered(s) for s in (held[0], held[1], held[3])] == [b"HTTP/1.0 200 OK"] * 3
    assert server.evicted == 1
    for s in held:
        s.close()


def test_a_megabyte_request_line_and_a_header_flood_are_dropped(serve):
    server = serve()
    assert raw(server, b"GET /" + b"a" * (1 << 20) + b" HTTP/1.0\r\n\r\n") == b""
    assert raw(server, b"GET / HTTP/1.0\r\n" + b"a: b\r\n" * 1000 + b"\r\n") == b""
    assert raw(server, b"GET / HTTP/1.0\r\n" + b"X: y\r\n" * 200000) == b""
    assert get(server.url + "/metrics")[0] == 200


def test_pipelined_requests_get_the_first_answer_then_a_close(serve):
    server = serve()
    reply = raw(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing HTTP/1.1\r\n"
                        b"Host: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"ctprofd_test_value 42.0" in body
    assert b"HTTP/1.0 404" not in reply
    length = int(next(line for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")).split(b":")[1])
    assert len(body) == length


def test_head_answers_without_a_body_and_other_methods_are_refused(serve):
    server = serve()
    head = raw(server, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert b"\r\nServer: ctprofd\r\n" in head
    assert raw(server, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert raw(server, b"not http at all\r\n\r\n") == b""


@pytest.mark.parametrize("text, expected", [
    ("tls_config: {}\n", "tls_config: unknown key"),
    ("tls_server_config:\n  cert_file: CERT\n",
     "tls_server_config: cert_file and key_file are both required"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: nothing.key\n",
     "tls_server_config.key_file: no such file: "),
    ("tls_server_config:\n  cert_file: KEY\n  key_file: KEY\n",
     "tls_server_config.cert_file: cannot load "),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  cipher_suites: [RC4]\n",
     "tls_server_config.cipher_suites[0]: unknown or insecure cipher suite 'RC4'"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n"
     "  curve_preferences: [X25519, CurveP256]\n",
     "tls_server_config.curve_preferences: Python's ssl module can restrict"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  client_allowed_sans: [a]\n",
     "tls_server_config.client_allowed_sans: needs client_auth_type"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
     "http_server_config.headers.X-Frame-Options: must be one of deny, sameorigin"),
    ("http_server_config:\n  headers:\n    X-XSS-Protection: \"\u20ac\"\n",
     "http_server_config.headers.X-XSS-Protection: '\u20ac' cannot be sent: a header value "
     "is latin-1 text"),
    ("http_server_config:\n  headers:\n    Set-Cookie: a\n",
     "http_server_config.headers.Set-Cookie: unknown key"),
    ("http_server_config:\n  http2: maybe\n", "http_server_config.http2: expected true or false"),
    ("rate_limit:\n  interval: soon\n", "rate_limit.interval: not a duration"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  min_version: TLS14\n",
     "tls_server_config.min_version: must be one of TLS10, TLS11, TLS12, TLS13"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n  min_version: TLS13\n"
     "  max_version: TLS12\n", "tls_server_config.min_version: is above max_version"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n"
     "  client_auth_type: RequireAnyClientCert\n",
     "tls_server_config.client_auth_type: RequireAnyClientCert is not supported"),
    ("tls_server_config:\n  cert_file: CERT\n  key_file: KEY\n"
     "  client_auth_type: VerifyClientCertIfGiven\n",
     "tls_server_config.client_ca_file: required by VerifyClientCertIfGiven"),
    ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: not a bcrypt hash"),
    ("basic_auth_users: [alice]\n", "basic_auth_users: expected a mapping"),
    ("basic_auth_users:\n  alice: 12\n", "basic_auth_users.alice: expected a string"),
])
def test_web_config_errors_are_one_line(tmp_path, text, expected):
    cert, key = openssl_cert(tmp_path, "server")
    path = tmp_path / "web.yaml"
    path.write_text(text.replace("CERT", str(cert)).replace("KEY", str(key)))
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {expected}")


def test_inline_pem_errors_name_the_inline_key(tmp_path):
    """Not cert_file and a /proc/self/fd path the user never wrote."""
    cert, key = openssl_cert(tmp_path, "server")
    cases = [(f"cert: not a certificate\n  key_file: {key}\n",
              f"tls_server_config.cert: cannot load the certificate (inline PEM) with the key "
              f"{key}: "),
             (f"cert_file: {cert}\n  key: not a key\n",
              f"tls_server_config.cert_file: cannot load the certificate {cert} with the key "
              "(inline PEM): "),
             (f"cert_file: {cert}\n  key_file: {key}\n  client_ca: not a certificate\n",
              "tls_server_config.client_ca: cannot load the inline PEM: ")]
    path = tmp_path / "web.yaml"
    for text, expected in cases:
        path.write_text(f"tls_server_config:\n  {text}")
        with pytest.raises(ConfigError) as info:
            load_web_config(str(path))
        message = str(info.value)
        assert "\n" not in message and "/proc/" not in message
        assert message.startswith(f"{path}: {expected}"), message


def test_no_web_config_is_plain_http_without_auth():
    assert load_web_config(None) == WebConfig()


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:65535", ("127.0.0.1", 65535)), (":0", ("", 0)), (":19455", ("", 19455)),
    ("[::1]:80", ("::1", 80)), ("10.0.0.1:0", ("10.0.0.1", 0)),
    ("127.0.0.1:65536", None), ("host:70000", None), ("host:abc", None), ("host", None),
    ("[::1:80", None), ("::1]:80", None),
])
def test_parse_listen(value, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse_listen(value)
    else:
        assert parse_listen(value) == expected


TOOLKIT_EXAMPLE = """\
# TLS and basic authentication configuration example.
#
# Additionally, a certificate and a key file are needed.
tls_server_config:
  cert_file: server.crt
  key_file: server.key

# Usernames and passwords required to connect.
# Passwords are hashed with bcrypt: https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md#about-bcrypt.
basic_auth_users:
  alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze
  bob: $2y$10$hLqFl9jSjoAAy95Z/zw8Ye8wkdMBM8c5Bn1ptYqP/AXyV0.oy0S8m

# Exclude /-/healthy and /-/ready from basic authentication
basic_auth_excluded_paths:
- /-/healthy
- /-/ready
"""


def test_the_toolkit_documentation_example_loads(tmp_path):
    """exporter-toolkit's docs/web-config.yml, verbatim, beside its two files."""
    openssl_cert(tmp_path, "server")
    web = web_config(tmp_path, TOOLKIT_EXAMPLE)
    assert set(web.users) == {"alice", "bob"}
    assert web.excluded_paths == ("/-/healthy", "/-/ready")
    assert web.tls is not None and web.tls.context().verify_mode == ssl.CERT_NONE


def test_every_toolkit_key_is_honoured(serve, tmp_path):
    cert, key = openssl_cert(tmp_path, "server")
    client_cert, client_key = openssl_cert(tmp_path, "client")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    server = serve(web_config(tmp_path, f"""
tls_server_config:
  cert: |
{textwrap.indent(cert.read_text(), "    ")}
  key: |
{textwrap.indent(key.read_text(), "    ")}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {client_cert.name}
  client_allowed_sans: [127.0.0.1]
  min_version: TLS12
  max_version: TLS12
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256]
  prefer_server_cipher_suites: true
  curve_preferences: [CurveP384]
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    Strict-Transport-Security: max-age=31536000
    Content-Security-Policy: ""
basic_auth_users:
  u: '{hashed}'
basic_auth_excluded_paths: [/]
rate_limit:
  interval: 1ms
  burst: 100
"""))
    client = ssl.create_default_context(cafile=str(cert))
    client.load_cert_chain(str(client_cert), str(client_key))
    status, headers, _ = get(server.url + "/metrics", basic("u", "pw"), context=client)
    assert status == 200
    assert (headers["X-Frame-Options"], headers["X-Content-Type-Options"],
            headers["Strict-Transport-Security"]) == ("deny", "nosniff", "max-age=31536000")
    assert "Content-Security-Policy" not in headers  # blank: unset
    assert get(server.url + "/", context=client)[0] == 200  # excluded from basic auth
    assert get(server.url + "/metrics", context=client)[0] == 401
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as raw_sock:
        with client.wrap_socket(raw_sock, server_hostname="127.0.0.1") as tls:
            assert tls.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"
    other_curve = ssl.create_default_context(cafile=str(cert))
    other_curve.load_cert_chain(str(client_cert), str(client_key))
    other_curve.set_ecdh_curve("prime256v1")
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        get(server.url + "/", context=other_curve)


def test_a_certificate_replaced_on_disk_is_served_on_the_next_connection(serve, tmp_path):
    cert, key = openssl_cert(tmp_path, "server")
    server = serve(web_config(tmp_path, f"tls_server_config:\n  cert_file: {cert.name}\n"
                                        f"  key_file: {key.name}\n"))

    def served() -> bytes:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with context.wrap_socket(s) as tls:
                return tls.getpeercert(binary_form=True)

    first = served()
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new_cert, new_key = openssl_cert(new_dir, "server")
    half = tmp_path / "half.crt"  # a rotation seen half-done: a new cert with the old key
    half.write_bytes(new_cert.read_bytes())
    half.replace(cert)
    assert served() == first  # the broken pair is not served; the last good one is
    new_key.replace(key)
    renewed = served()
    assert renewed != first
    assert renewed == ssl.PEM_cert_to_DER_cert(new_cert.read_text())


def test_an_unparseable_accept_gets_the_text_format_without_a_traceback(serve, caplog):
    server = serve()
    with caplog.at_level(logging.DEBUG, "ctprofd"):
        for accept in ("application/openmetrics-text; version=abc", "application/openmetrics-"
                       "text; version=2.0.0", ";;;,,=", "application/openmetrics-text; version=1.0.0"):
            status, headers, body = get(server.url + "/metrics", {"Accept": accept})
            assert status == 200, accept
            om = accept.endswith("1.0.0")
            assert headers["Content-Type"].startswith(
                "application/openmetrics-text" if om else "text/plain; version=0.0.4"), accept
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_gzip_bodies_of_both_formats_decompress_to_one_exposition(serve):
    """Each format's gzip body (its snapshot and live parts, two gzip members) decompresses
    to that format's plain body: one generation (the server's static one), and nothing in
    the live part moves between these requests."""
    server = serve()
    for accept, content_type in (("text/plain", "text/plain; version=0.0.4"),
                                 ("application/openmetrics-text", "application/openmetrics-text")):
        _, plain_headers, plain = get(server.url + "/metrics", {"Accept": accept})
        _, headers, body = get(server.url + "/metrics", {"Accept-Encoding": "gzip",
                                                         "Accept": accept})
        assert "Content-Encoding" not in plain_headers
        assert headers["Content-Encoding"] == "gzip"
        assert plain_headers["Content-Type"].startswith(content_type)
        assert headers["Content-Type"] == plain_headers["Content-Type"]
        text = gzip.decompress(body)
        assert text == plain, accept
        assert b"ctprofd_test_value 42.0" in text and b"ctprofd_http_connections " in text
        if accept == "text/plain":
            assert b"# EOF" not in text
        else:
            assert text.count(b"# EOF\n") == 1 and text.endswith(b"# EOF\n")


def test_one_render_per_snapshot_whatever_the_number_of_scrapes(registry):
    state = [object()]
    calls = []

    class Counting:
        def collect(self):
            calls.append(1)
            return registry.collect()

    server = MetricsServer("127.0.0.1:0", Counting(), WebConfig(), generation=lambda: state[0])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for _ in range(20):
            assert get(server.url + "/metrics")[0] == 200
        assert len(calls) == 1
        state[0] = object()  # a new snapshot published
        server.prerender()
        wait_until(lambda: len(calls) == 2, "the new snapshot rendered")
        for _ in range(20):
            assert b"ctprofd_test_value" in get(server.url + "/metrics")[2]
        assert len(calls) == 2
    finally:
        server.shutdown()
        server.server_close()


class Counting:
    """A collector counting its collects."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry, self.calls = registry, 0

    def collect(self):
        self.calls += 1
        return self.registry.collect()


OM_ACCEPT = "application/openmetrics-text"
EVERY_BODY = [{}, {"Accept": OM_ACCEPT}, {"Accept-Encoding": "gzip"},
              {"Accept": OM_ACCEPT, "Accept-Encoding": "gzip"}]


def test_one_collect_per_snapshot_whatever_the_formats_scraped(registry):
    state = [object()]
    counting = Counting(registry)
    server = MetricsServer("127.0.0.1:0", counting, WebConfig(), generation=lambda: state[0])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for headers in EVERY_BODY:  # each format and compression asked for a first time
            assert get(server.url + "/metrics", headers)[0] == 200
        for _ in range(3):
            before = counting.calls
            state[0] = object()  # a new snapshot published
            server.prerender()
            wait_until(lambda: counting.calls > before, "the new snapshot rendered")
            for headers in EVERY_BODY * 3:
                status, _, body = get(server.url + "/metrics", headers)
                assert status == 200
                text = gzip.decompress(body) if "Accept-Encoding" in headers else body
                assert b"ctprofd_test_value 42.0" in text
            assert counting.calls == before + 1
    finally:
        server.shutdown()
        server.server_close()


def test_the_gzip_live_part_compresses_the_plain_one(registry):
    live = Counting(CollectorRegistry())
    exposition = Exposition(registry, live, lambda: registry, clock=lambda: 100.0)
    for fmt in (TEXT, OPENMETRICS):
        plain = exposition.body(fmt, False)
        assert [gzip.decompress(part) for part in exposition.body(fmt, True)] == list(plain)
    assert live.calls == 2  # once per format: the clock stands still


def test_without_a_generation_every_scrape_serves_the_collector_as_it_is():
    """No generation: nothing says when the figures change, so none is served stale."""
    registry = CollectorRegistry()
    gauge = Gauge("ctprofd_test_changing", "A gauge that changes.", registry=registry)
    server = MetricsServer("127.0.0.1:0", registry, WebConfig())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for value in (1, 2, 3):
            gauge.set(value)
            for headers in EVERY_BODY:
                _, _, body = get(server.url + "/metrics", headers)
                text = gzip.decompress(body) if "Accept-Encoding" in headers else body
                assert f"ctprofd_test_changing {value}.0".encode() in text
    finally:
        server.shutdown()
        server.server_close()


def test_the_connections_gauge_returns_to_zero_after_connections_close(serve):
    server = serve(first_byte=0.5)
    idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(5)]
    for _ in range(5):
        assert get(server.url + "/metrics")[0] == 200
    assert raw(server, b"GET / HTTP/1.0\r\n" + b"a: b\r\n" * 1000 + b"\r\n") == b""
    for s in idle[:2]:
        s.close()  # closed by the client; the others by the first-byte deadline
    wait_until(lambda: server._count == 0 and not server._peers and not server._requested,
               "every connection released")
    held = next(f for f in server.families() if f.name == "ctprofd_http_connections")
    assert held.samples[0].value == 0  # what the gauge shows (a scrape would count itself)
    for s in idle:
        s.close()


def connect_from(server: MetricsServer, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_port), timeout=10,
                                    source_address=(source, 0))


def answered(sock: socket.socket, request: bytes = b"GET / HTTP/1.0\r\n\r\n") -> bytes:
    """Send `request` on `sock`; its status line (b"" when the server closed it instead)."""
    return exchange(sock, request).split(b"\r\n", 1)[0]


def held_gauge(server: MetricsServer) -> float:
    """ctprofd_http_connections as a scrape shows it (the scrape's own connection counts)."""
    status, _, body = get(server.url + "/metrics")
    assert status == 200
    line = next(line for line in body.decode().splitlines()
                if line.startswith("ctprofd_http_connections "))
    return float(line.split()[1])


def test_closed_connections_are_uncounted_and_their_places_given_again(serve):
    """The accounting of every way a connection ends (closed by its client before a byte,
    mid-request, or after its answer) returns to where it started: the gauge a scrape shows
    is back to 1 (the scrape itself), and the address's full allowance of connections and
    whole requests is served again without evicting or refusing anyone. A leak in any count
    (the total, an address's list, a network's whole requests) shows here."""
    server = serve(deadline=300, first_byte=300, per_address=4, answering=2)  # no deadline ends one
    idle = [connect_from(server, "127.0.0.2") for _ in range(3)]
    talking = connect_from(server, "127.0.0.2")
    talking.sendall(b"GET / HTTP/1.0\r\n")
    wait_until(lambda: server._count == 4, "four held")
    for _ in range(6):  # more than `per_address` and `answering`, one after another
        assert held_gauge(server) >= 5  # never 1 while those four are held
    for s in [*idle, talking]:
        s.close()
    wait_until(lambda: held_gauge(server) == 1, "the gauge back to the scrape alone",
               hang_guard=60, poll=0.05)
    again = [connect_from(server, "127.0.0.2") for _ in range(4)]  # the limit, held at once
    wait_until(lambda: server._count == 4, "the four held", hang_guard=60)
    assert [answered(s) for s in again] == [b"HTTP/1.0 200 OK"] * 4
    assert (server.evicted, server.refused) == (0, 0)
    for s in again:
        s.close()


def documented_request_bound() -> int:
    """The request bound docs/daemon.md states ("a request line plus headers over N KiB ...
    is dropped unanswered")."""
    text = (Path(__file__).parent.parent / "docs" / "daemon.md").read_text()
    found = re.search(r"a request line plus headers over (\d+) KiB[^;]*dropped unanswered", text)
    assert found, "docs/daemon.md no longer states the request bound"
    return int(found[1]) * 1024


def in_one_burst(server: MetricsServer, data: bytes) -> bytes:
    """Send `data` while the event loop is held, so that all of it waits in the socket when
    the server first reads; the status line answered (b"" when dropped unanswered)."""
    with loop_held(server):
        s = connect_from(server, "127.0.0.1")
        s.sendall(data)
    with s:
        return answered(s, b"")


def test_a_request_is_bounded_as_documented_exactly(serve):
    """At the documented bound the request is answered; one byte over, dropped unanswered,
    also when the whole request is already there at the first read."""
    server = serve()
    bound = documented_request_bound()
    line = b"GET / HTTP/1.0\r\n"
    pad = bound - len(line) - len(b"X: \r\n\r\n")
    assert in_one_burst(server, line + b"X: " + b"a" * pad + b"\r\n\r\n") == b"HTTP/1.0 200 OK"
    assert in_one_burst(server, line + b"X: " + b"a" * (pad + 1) + b"\r\n\r\n") == b""
    assert raw(server, line + b"X: " + b"a" * (pad + 1) + b"\r\n\r\n") == b""  # in pieces too
    assert raw(server, line + b"X: " + b"a" * pad + b"\r\n\r\n").startswith(b"HTTP/1.0 200")


def test_a_scrapers_silent_connection_outlives_older_trickling_ones(serve):
    """A scraper's connection sends nothing from its accept until its request arrives;
    in that time a newcomer of its address closes the oldest connection without a whole
    request, though that one sent bytes (a trickle), not the scraper's."""
    server = serve(per_address=3)
    trickling = [connect_from(server, "127.0.0.1") for _ in range(2)]
    for s in trickling:
        s.sendall(b"GET / HTTP/1.0\r\n")
    wait_until(lambda: sum(c.reader.taken for p in server._peers.values() for c in p) == 32,
               "the trickles read")
    scraper = connect_from(server, "127.0.0.1")
    wait_until(lambda: server._count == 3, "all three held")
    newcomer = connect_from(server, "127.0.0.1")
    assert closed_by_server(trickling[0])
    assert answered(scraper, b"GET /metrics HTTP/1.0\r\n\r\n") == b"HTTP/1.0 200 OK"
    assert answered(trickling[1], b"\r\n") == b"HTTP/1.0 200 OK"
    assert server.evicted == 1
    for s in (*trickling, scraper, newcomer):
        s.close()


def test_in_a_burst_the_silent_one_is_evicted_though_the_older_ones_bytes_are_unread(serve):
    """Connections accepted together are admitted before any is read: the older one's
    partial request still waits in its socket, and is seen there."""
    server = serve(per_address=2)
    with loop_held(server):
        talking = connect_from(server, "127.0.0.1")
        talking.sendall(b"GET / HTTP/1.0\r\n")
        silent = connect_from(server, "127.0.0.1")
        scraper = connect_from(server, "127.0.0.1")
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert answered(scraper, b"") == b"HTTP/1.0 200 OK"
    assert closed_by_server(silent)
    assert answered(talking, b"\r\n") == b"HTTP/1.0 200 OK"
    assert server.evicted == 1
    for s in (talking, silent, scraper):
        s.close()


async def paired_connection(address: str) -> tuple[_Connection, socket.socket]:
    """A connection from `address` on a real socket pair, and the pair's other end."""
    ours, theirs = socket.socketpair()
    reader = _Reader()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: asyncio.StreamReaderProtocol(reader), sock=ours)
    return _Connection(address, reader, asyncio.StreamWriter(transport, protocol, reader,
                                                             loop)), theirs


def test_bytes_the_loop_took_from_the_socket_but_nobody_read_count_as_unread():
    """A connection admitted in the loop turn its request arrived in has the request in its
    reader, no longer in its socket: those bytes count as unread too (not evicted first)."""
    async def main() -> list[bool]:
        connection, theirs = await paired_connection("127.0.0.1")
        reader = connection.reader
        seen = [_bytes_unread(connection)]
        theirs.sendall(b"GET / HTTP/1.0\r\n")
        while not reader.arrived:
            await asyncio.sleep(0.01)
        seen.append(_bytes_unread(connection))  # in the reader, none in the socket
        await reader.read(MAX_REQUEST_BYTES)
        seen.append(_bytes_unread(connection))
        connection.writer.transport.abort()
        theirs.close()
        return seen

    assert asyncio.run(main()) == [False, True, False]


@pytest.mark.parametrize("left_in_process, admitted", [(0, True), (4 << 20, False)])
def test_an_answer_all_in_its_socket_stops_counting_before_its_wait_looks_again(
        left_in_process, admitted):
    """A scraper may read its whole answer and send its next request before the wait on
    the first connection sees that the answer left the process; in a network at its limit
    where no address holds more than one, that stale count would refuse the scraper's own
    next request. The answering limits read the sockets at the time they decide: only an
    answer with bytes still in the process counts."""
    async def main() -> tuple[bool, list[str]]:
        server = MetricsServer("127.0.0.1:0", CollectorRegistry(), WebConfig(),
                               answering_network=2)
        pairs = [await paired_connection(a) for a in ("127.0.0.1", "127.0.0.2", "127.0.0.1")]
        first, other, scraper = (c for c, _ in pairs)
        try:
            for connection in (first, other):
                assert server._admit_request(connection)
            first.writer.write(b"x" * max(left_in_process, 1))  # the peer reads none
            first.written = True
            await asyncio.sleep(0)  # the loop's turn to write what the socket takes
            return (server._admit_request(scraper),
                    [c.address for c in server._requested["127.0.0.0/24"]])
        finally:
            for connection, theirs in pairs:
                connection.writer.transport.abort()
                theirs.close()
            server.server_close()

    held = ["127.0.0.2", "127.0.0.1"] if admitted else ["127.0.0.1", "127.0.0.2"]
    assert asyncio.run(main()) == (admitted, held)


def stalled(server: MetricsServer, source: str, count: int) -> list[socket.socket]:
    """`count` connections from `source` that send a whole request and never read."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((source, 0))
        s.connect(("127.0.0.1", server.server_port))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        socks.append(s)
    return socks


@pytest.fixture
def big_registry():
    """About 5 MB of text: an answer that cannot fit in the socket buffers."""
    reg = CollectorRegistry()
    gauge = Gauge("ctprofd_test_series", "Many series.", ["name"], registry=reg)
    for i in range(40000):
        gauge.labels(f"series-{i:06d}-" + "x" * 60).set(i)
    return reg


@pytest.fixture
def medium_registry():
    """About 150 kB of text: far more than a client window of 4 KiB, all of it taken by the
    server's socket on loopback."""
    reg = CollectorRegistry()
    gauge = Gauge("ctprofd_test_series", "Some series.", ["name"], registry=reg)
    for i in range(2000):
        gauge.labels(f"series-{i:06d}-" + "x" * 40).set(i)
    return reg


def reset_by_server(sock: socket.socket) -> bool:
    """Whether the server ended `sock` with a reset (waits for the end, a 60 s hang guard)."""
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    assert poller.poll(60_000), "the server never ended the connection"
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET


def served_by(server: MetricsServer, address: str) -> list:
    """The connections held from `address`, oldest first."""
    return list(server._peers.get(address, []))


def answers_in_sockets(server: MetricsServer, address: str) -> list[bool]:
    """Whether each connection held from `address` has its whole answer in its socket."""
    return [c.answered() for c in served_by(server, address)]


def test_an_answer_never_read_ends_in_a_reset_the_client_sees(medium_registry):
    """A closed window holds back the FIN of a plain close: the client would never see the
    end, and the server's socket would live on in the kernel (orphaned, out of every limit)."""
    server = MetricsServer("127.0.0.1:0", medium_registry, WebConfig(), deadline=1.0,
                           generation=lambda: medium_registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        [unread] = stalled(server, "127.0.0.2", 1)
        assert reset_by_server(unread)
        half = socket.socket()  # the same after the client's own end (nc -N, say)
        half.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        half.connect(("127.0.0.1", server.server_port))
        half.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        half.shutdown(socket.SHUT_WR)
        assert reset_by_server(half)
        wait_until(lambda: server._count == 0, "both released")
    finally:
        server.shutdown()
        server.server_close()
    unread.close()
    half.close()


def test_a_half_closed_client_reads_the_whole_answer_then_the_end(medium_registry):
    server = MetricsServer("127.0.0.1:0", medium_registry, WebConfig(),
                           generation=lambda: medium_registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            wait_until(lambda: answers_in_sockets(server, "127.0.0.1") == [True],
                       "the answer in the socket and our end after it")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])
        assert head.startswith(b"HTTP/1.0 200") and len(body) == length > 100_000
    finally:
        server.shutdown()
        server.server_close()


def test_answers_in_the_socket_leave_the_answering_limits_and_make_room_after_idle_ones(
        medium_registry):
    """A connection whose answer has left the process holds nothing of ours but a descriptor:
    it no longer counts as a whole request, and it goes for a newcomer, after the idle ones
    (its client may still be reading)."""
    server = MetricsServer("127.0.0.1:0", medium_registry, WebConfig(), per_address=2,
                           answering=1, deadline=300, first_byte=300,
                           generation=lambda: medium_registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        [first] = stalled(server, "127.0.0.2", 1)
        wait_until(lambda: answers_in_sockets(server, "127.0.0.2") == [True], "its answer sent")
        idle = connect_from(server, "127.0.0.2")
        wait_until(lambda: len(served_by(server, "127.0.0.2")) == 2, "the idle one held")
        [second] = stalled(server, "127.0.0.2", 1)  # over per_address: the idle one goes
        assert closed_by_server(idle)
        wait_until(lambda: answers_in_sockets(server, "127.0.0.2") == [True] * 2,
                   "the second's answer sent")  # answering=1 did not close the first
        assert (requested(server), server.evicted, server.refused) == (0, 1, 0)
        [third] = stalled(server, "127.0.0.2", 1)  # now the oldest answered one goes
        assert reset_by_server(first)
        assert (server.evicted, server.refused) == (2, 0)
        second.settimeout(10)
        reply = b""
        while chunk := second.recv(65536):  # all of it, then our end
            reply += chunk
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"\n")
        second.close()
        wait_until(lambda: answers_in_sockets(server, "127.0.0.2") == [True],
                   "the second released, the third answered")
    finally:
        server.shutdown()
        server.server_close()
    for s in (first, idle, second, third):
        s.close()


def requested(server: MetricsServer, address: str | None = None) -> int:
    return sum(1 for n in list(server._requested.values()) for c in list(n)
               if address is None or c.address == address)


def test_whole_requests_that_are_never_read_are_limited_per_address(big_registry):
    server = MetricsServer("127.0.0.1:0", big_registry, WebConfig(), answering=3,
                           generation=lambda: big_registry)  # unchanging: rendered once
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        socks = stalled(server, "127.0.0.2", 6)
        wait_until(lambda: server.evicted >= 3, "the oldest whole requests closed")
        assert requested(server, "127.0.0.2") <= 3
        status, _, body = get(server.url + "/metrics")  # from 127.0.0.1
        assert status == 200 and body.endswith(b"\n")
    finally:
        server.shutdown()
        server.server_close()
    for s in socks:
        s.close()


def test_a_network_full_of_unread_answers_makes_room_for_another_address(big_registry):
    server = MetricsServer("127.0.0.1:0", big_registry, WebConfig(), answering=2,
                           answering_network=8, generation=lambda: big_registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        socks = [s for i in range(8) for s in stalled(server, f"127.0.0.{10 + i}", 2)]
        wait_until(lambda: server.evicted + server.refused >= 8 and requested(server) == 8,
                   "the /24 held at its limit")
        for _ in range(3):  # 127.0.0.1 holds none: the address holding the most gives way
            status, _, body = get(server.url + "/metrics")
            assert status == 200 and body.endswith(b"\n")
        assert requested(server) <= 8
    finally:
        server.shutdown()
        server.server_close()
    for s in socks:
        s.close()


def test_when_every_held_connection_sent_a_whole_request_the_newcomer_is_refused(big_registry):
    server = MetricsServer("127.0.0.1:0", big_registry, WebConfig(), per_address=2,
                           generation=lambda: big_registry)  # unchanging: rendered once
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        socks = stalled(server, "127.0.0.2", 2)  # answers that cannot fit in the buffers
        wait_until(lambda: requested(server, "127.0.0.2") == 2, "both whole requests held")
        assert refused_at_once(server, "127.0.0.2")
        assert (server.refused, server.evicted, requested(server, "127.0.0.2")) == (1, 0, 2)
    finally:
        server.shutdown()
        server.server_close()
    for s in socks:
        s.close()


def test_failed_basic_auth_is_rate_limited_per_address_without_bcrypt(serve, tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    server = serve(web_config(tmp_path, f"basic_auth_users:\n  u: '{hashed}'\n"))
    # the refill moves when the test says, not with how fast the host answers
    clock = Clock()
    server.auth_failures = TokenBuckets(AUTH_BURST, AUTH_PER_SECOND, clock=clock)
    assert get(server.url + "/metrics", basic("u", "pw"))[0] == 200  # remembered
    statuses = [get(server.url + "/metrics", basic("u", "wrong"))[0] for _ in range(20)]
    assert statuses.count(401) >= AUTH_BURST and 429 in statuses
    assert statuses[:AUTH_BURST] == [401] * AUTH_BURST
    assert statuses == [401] * AUTH_BURST + [429] * (20 - AUTH_BURST)
    assert get(server.url + "/metrics", basic("u", "pw"))[0] == 200  # no bcrypt needed
    assert get(server.url, basic("u", "wrong"))[0] == 429
    # per address: another loopback address has a bucket of its own
    assert get_from("127.0.0.2", server.url + "/metrics", basic("u", "wrong")) == 401
    assert get(server.url, basic("u", "wrong"))[0] == 429  # 127.0.0.1 is still limited
    clock.now += 1 / AUTH_PER_SECOND  # one token back
    assert get(server.url, basic("u", "wrong"))[0] == 401
    assert get(server.url, basic("u", "wrong"))[0] == 429
    status, _, body = get(server.url + "/metrics", basic("u", "pw"))
    assert status == 200 and b'ctprofd_http_requests_limited_total{reason="auth"}' in body


def test_network_of():
    assert network_of("127.0.0.77") == "127.0.0.0/24"
    assert network_of("127.1.2.3") == "127.1.2.0/24"
    assert network_of("2001:db8::1") == "2001:db8::/64"
