"""The HTTP endpoint over real loopback sockets: pages, exposition formats, TLS with openssl-made
certificates, basic auth, client certificates, and slow or oversized clients."""

from __future__ import annotations

import base64
import gzip
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from ctprofd.config.settings import ConfigError
from ctprofd.config.web import load_web_config
from ctprofd.export.server import MetricsServer, WebConfig, parse_listen


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
    idle.settimeout(120)  # a hang guard
    assert idle.recv(1) == b""  # the idle one too
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


def raw(server: MetricsServer, data: bytes) -> bytes:
    """Send `data` on a fresh connection; everything the server answers before closing."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        try:
            s.sendall(data)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
    return reply


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
    held = [socket.create_connection(("127.0.0.1", server.server_port),
                                     source_address=(f"127.0.0.{2 + i // 3}", 0))
            for i in range(6)]  # 3 from 127.0.0.2, 3 from 127.0.0.3
    assert get(server.url + "/metrics")[0] == 200
    assert closed_by_server(held[0])
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
