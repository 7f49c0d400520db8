"""The HTTP endpoint's answers over real loopback sockets, the server run in this process:
status lines and headers, methods and paths, /health, the formats and gzip of /metrics,
renders and bcrypt in threads of their own, basic auth and its rate limit, the web
config's rate limit, TLS with client certificates, what is logged, the server's own figures,
and the end of every connection (the server's FIN after a whole answer)."""

from __future__ import annotations

import base64
import gc
import email.utils
import gzip
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Gauge

from ctprofd.config.web import load_web_config
from ctprofd.export import server as server_module
from ctprofd.export.server import (AUTH_BURST, LANDING_PAGE, MAX_REQUEST_BYTES, RateLimit,
                                   TokenBuckets, WebConfig)
from support.clock import Clock
from support.procs import wait_until
from support.webserver import (HANG_GUARD, Reply, ask, connect, get, held, loop_held,
                               openssl_cert, read_to_end, send_in_pieces, serving,
                               small_registry, taken, unhandled_task_errors)

PASSWORD_HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
OM = "application/openmetrics-text"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(autouse=True)
def no_task_ends_in_an_unhandled_exception(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every connection's task ends cleanly, whatever the test made it do."""
    yield
    gc.collect()
    assert not unhandled_task_errors(caplog.get_records("call") + caplog.records)


def assert_whole(reply: Reply, status: int, body: bytes | None = None) -> None:
    """A whole answer of `status` (and `body`), its length as said, then the server's FIN."""
    assert reply.status == status, reply.data[:200]
    assert not reply.reset, "reset instead of the server's FIN after a whole answer"
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    if body is not None:
        assert reply.body == body


def test_every_answer_has_the_documented_status_line_and_headers() -> None:
    with serving() as server:
        reply = get(server, "/")
    assert_whole(reply, 200, LANDING_PAGE)
    assert reply.head[0] == "HTTP/1.0 200 OK"
    names = [line.split(":")[0] for line in reply.head[1:]]
    assert names == ["Server", "Date", "Content-Type", "Content-Length", "Connection"]
    headers = reply.headers
    assert headers["Server"] == "ctprofd" and headers["Connection"] == "close"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Date"].endswith(" GMT")
    sent = email.utils.parsedate_to_datetime(headers["Date"]).timestamp()
    assert abs(sent - time.time()) < 3600  # a real date, in GMT (not a clock check)


@pytest.mark.parametrize("request_line, status, reason, body, extra", [
    ("GET /nothing HTTP/1.0", 404, "Not Found", b"Not Found\n", {}),
    ("GET /METRICS HTTP/1.0", 404, "Not Found", b"Not Found\n", {}),
    ("POST /metrics HTTP/1.0", 405, "Method Not Allowed", b"Method Not Allowed\n",
     {"Allow": "GET, HEAD"}),
    ("get /metrics HTTP/1.0", 405, "Method Not Allowed", b"Method Not Allowed\n",
     {"Allow": "GET, HEAD"}),
    ("head / HTTP/1.0", 405, "Method Not Allowed", b"Method Not Allowed\n",
     {"Allow": "GET, HEAD"}),
    ("GET http://[::1/metrics HTTP/1.0", 400, "Bad Request", b"Bad Request\n", {}),
])
def test_errors_are_answered_with_their_status_reason_and_text(
        request_line: str, status: int, reason: str, body: bytes, extra: dict) -> None:
    with serving() as server:
        reply = ask(server, request_line.encode() + b"\r\n\r\n")
    assert_whole(reply, status, body)
    assert reply.head[0] == f"HTTP/1.0 {status} {reason}"
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    for name, value in extra.items():
        assert reply.headers[name] == value


def test_head_answers_the_headers_of_get_without_the_body() -> None:
    with serving(generation=lambda: 1) as server:
        whole = get(server, "/metrics")
        head = ask(server, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert_whole(whole, 200)
    assert head.status == 200 and head.body == b"" and not head.reset
    assert head.headers["Content-Length"] == whole.headers["Content-Length"]
    assert head.data.endswith(b"\r\n\r\n")


def test_a_query_string_does_not_change_the_path() -> None:
    with serving() as server:
        reply = get(server, "/metrics?name[]=x")
        landing = get(server, "/?x=1")
    assert_whole(reply, 200)
    assert b"ctprofd_test_value 42.0" in reply.body
    assert_whole(landing, 200, LANDING_PAGE)


def test_metrics_in_both_formats_plain_and_gzip() -> None:
    with serving() as server:
        text = get(server)
        om = get(server, Accept=OM)
        zipped = get(server, Accept_Encoding="x, GZIP;q=1")
        om_zipped = get(server, Accept=OM, Accept_Encoding="gzip")
        identity = get(server, Accept_Encoding="identity")
    for reply in (text, om, zipped, om_zipped, identity):
        assert_whole(reply, 200)
    assert text.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert om.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert b"ctprofd_test_value 42.0" in text.body and b"# EOF" not in text.body
    assert om.body.endswith(b"# EOF\n") and b"ctprofd_test_value 42.0" in om.body
    for reply in (text, om, identity):
        assert "Content-Encoding" not in reply.headers
    for reply, plain in ((zipped, text), (om_zipped, om)):
        assert reply.headers["Content-Encoding"] == "gzip"
        assert reply.headers["Content-Type"] == plain.headers["Content-Type"]
        assert b"ctprofd_test_value 42.0" in gzip.decompress(reply.body)


def test_a_body_larger_than_a_write_chunk_arrives_whole() -> None:
    """Written a chunk at a time: every byte, in order."""
    registry = CollectorRegistry()
    gauge = Gauge("ctprofd_test_series", "Some series.", ["name"], registry=registry)
    for i in range(3000):
        gauge.labels(f"series-{i:06d}-" + "x" * 40).set(i)
    with serving(registry, generation=lambda: registry) as server:
        reply = get(server)
    assert_whole(reply, 200)
    assert len(reply.body) > 2 * server_module.WRITE_CHUNK
    lines = reply.body.decode().splitlines()
    assert lines[0].startswith("# HELP ctprofd_test_series ")
    values = [int(float(line.split()[-1])) for line in lines
              if line.startswith("ctprofd_test_series{")]
    assert values == list(range(3000))


def test_health_answers_without_credentials_what_the_daemon_says() -> None:
    web = WebConfig(users={"u": PASSWORD_HASH})
    with serving(web=web) as server:
        ok = get(server, "/health")
        server.health = lambda: (False, "no snapshot for 300 s")
        failing = get(server, "/health?x")
        metrics = get(server)
    assert_whole(ok, 200, b"ok\n")
    assert_whole(failing, 503, b"no snapshot for 300 s\n")
    assert failing.head[0] == "HTTP/1.0 503 Service Unavailable"
    assert failing.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert_whole(metrics, 401)


class Failing:
    def collect(self) -> Iterator:
        raise RuntimeError("the collector broke")


def test_a_collector_that_fails_is_answered_500() -> None:
    with serving(Failing()) as server:
        reply = get(server)
        assert_whole(get(server, "/"), 200)
    assert_whole(reply, 500, b"Collecting the metrics failed: see the log.\n")
    assert reply.head[0] == "HTTP/1.0 500 Internal Server Error"


class Threads:
    """A collector noting the thread each collect runs in."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.registry = small_registry()

    def collect(self) -> Iterator:
        self.names.append(threading.current_thread().name)
        return self.registry.collect()


class NotingUsers(dict):
    """A real user table that notes the thread each lookup comes from."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.threads: list[str] = []

    def get(self, key: str, default: object = None) -> object:
        self.threads.append(threading.current_thread().name)
        return super().get(key, default)


def test_renders_and_bcrypt_run_in_threads_of_their_own() -> None:
    """Neither blocks the event loop: renders in "http-render", bcrypt in "http-bcrypt"."""
    collector = Threads()
    users = NotingUsers({"u": PASSWORD_HASH})
    with serving(collector, WebConfig(users=users)) as server:
        for _ in range(2):
            assert_whole(get(server, Authorization=basic("u", "pw")), 200)
        [loop_thread] = [t.name for t in threading.enumerate() if "serve_forever" in t.name]
    assert collector.names and all(n.startswith("http-render_") for n in collector.names)
    # known() in the event loop, verify() in the bcrypt thread; then known() alone
    loop, check, again = users.threads
    assert (loop, again) == (loop_thread, loop_thread) and check.startswith("http-bcrypt_")


class HeldCollector:
    """A real registry's metrics, whose first collection waits until released."""

    def __init__(self) -> None:
        self.registry = small_registry()
        self.entered = threading.Event()
        self.release = threading.Event()

    def collect(self) -> Iterator:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(60)  # a hang guard: the test releases it
        return self.registry.collect()


def test_renders_run_one_at_a_time() -> None:
    """A render asked for while another is in flight (another format of the same snapshot)
    waits for the render thread instead of starting a second one."""
    collector = HeldCollector()
    request = b"GET /metrics HTTP/1.0\r\n%s\r\n"
    with serving(collector) as server:
        first, second = connect(server), connect(server, "127.0.0.2")
        with first, second:
            first.sendall(request % b"")
            assert collector.entered.wait(HANG_GUARD)
            openmetrics = request % b"Accept: application/openmetrics-text; version=1.0.0\r\n"
            second.sendall(openmetrics)
            wait_until(lambda: taken(server, second) == len(openmetrics), "the second read",
                       hang_guard=HANG_GUARD)
            collector.release.set()
            assert [read_to_end(s).status for s in (first, second)] == [200, 200]
    assert not [t for t in threading.enumerate() if t.name == "http-render_1"]


def test_one_render_per_snapshot_and_a_prerender_makes_the_next_one() -> None:
    state = [object()]
    collector = Threads()
    with serving(collector, generation=lambda: state[0]) as server:
        for _ in range(3):
            assert_whole(get(server), 200)
        assert len(collector.names) == 1
        state[0] = object()
        server.prerender()
        wait_until(lambda: len(collector.names) == 2, "the new snapshot rendered",
                   hang_guard=HANG_GUARD)
        reply = get(server)
        assert_whole(reply, 200)
        assert b"ctprofd_test_value 42.0" in reply.body
        assert len(collector.names) == 2
    server.prerender()  # after server_close: nothing, no error


def test_without_a_generation_every_scrape_collects() -> None:
    collector = Threads()
    with serving(collector) as server:
        for _ in range(3):
            assert_whole(get(server), 200)
    assert len(collector.names) == 3


def test_basic_auth_guards_all_but_excluded_paths() -> None:
    web = WebConfig(users={"u": PASSWORD_HASH}, excluded_paths=("/",))
    with serving(web=web) as server:
        refused = get(server)
        wrong = get(server, Authorization=basic("u", "nope"))
        malformed = get(server, Authorization="Bearer x")
        good = get(server, Authorization=basic("u", "pw"))
        landing = get(server, "/")
        missing = get(server, "/nothing")
        found_with_auth = get(server, "/nothing", Authorization=basic("u", "pw"))
    for reply in (refused, wrong, malformed, missing):
        assert_whole(reply, 401, b"Unauthorized\n")
        assert reply.head[0] == "HTTP/1.0 401 Unauthorized"
        assert reply.headers["WWW-Authenticate"] == 'Basic realm="ctprofd", charset="UTF-8"'
    assert_whole(good, 200)
    assert b"ctprofd_test_value 42.0" in good.body
    assert_whole(landing, 200, LANDING_PAGE)
    assert_whole(found_with_auth, 404)


def test_failed_basic_auth_is_rate_limited_per_address() -> None:
    web = WebConfig(users={"u": PASSWORD_HASH})
    with serving(web=web) as server:
        clock = Clock()
        server.auth_failures = TokenBuckets(AUTH_BURST, 1.0, clock=clock)
        wrong = basic("u", "wrong")
        statuses = [get(server, Authorization=wrong).status for _ in range(AUTH_BURST + 2)]
        assert statuses == [401] * AUTH_BURST + [429] * 2
        limited = get(server, Authorization=wrong)
        assert_whole(limited, 429, b"Too Many Requests\n")
        assert limited.head[0] == "HTTP/1.0 429 Too Many Requests"
        assert limited.headers["Retry-After"] == "1"
        assert get(server, Authorization=wrong, source="127.0.0.2").status == 401
        assert get(server, Authorization=basic("u", "pw")).status == 429  # bcrypt needed
        clock.now += 1.0  # one token back
        assert get(server, Authorization=basic("u", "pw")).status == 200
        # a success gives its token back: a failure still gets its check
        assert get(server, Authorization=wrong).status == 401
        assert get(server, Authorization=wrong).status == 429
        assert get(server, Authorization=basic("u", "pw")).status == 200  # known: no bcrypt
        assert server.auth_limited == 5
        assert server.rate_limited == 0


def test_auth_checks_waiting_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for one waiting check, checks one after another all run (each leaves its
    place); with none, every check is answered 429 without bcrypt."""
    web = WebConfig(users={"u": PASSWORD_HASH})
    with serving(web=web) as server:
        monkeypatch.setattr(server_module, "AUTH_QUEUE", 1)
        statuses = [get(server, Authorization=basic("u", "wrong")).status for _ in range(3)]
        assert statuses == [401] * 3
        assert get(server, Authorization=basic("u", "pw")).status == 200
        assert get(server, Authorization=basic("u", "wrong")).status == 401
        monkeypatch.setattr(server_module, "AUTH_QUEUE", 0)
        assert get(server, Authorization=basic("u", "other")).status == 429
        assert get(server, Authorization=basic("u", "pw")).status == 200  # remembered
        assert server.auth_limited == 1


class HeldUsers(dict):
    """A real user table whose lookups from the bcrypt thread wait until released: a
    check held in flight."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, key: str, default: object = None) -> object:
        if threading.current_thread().name.startswith("http-bcrypt"):
            self.entered.set()
            assert self.release.wait(60)  # a hang guard: the test releases it
        return super().get(key, default)


def test_checks_waiting_at_once_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one check in flight and one more waiting for it, a third is answered 429 at
    once, from any address; when they are done, checks run again. Checks run one at a time."""
    monkeypatch.setattr(server_module, "AUTH_QUEUE", 2)
    users = HeldUsers({"u": PASSWORD_HASH})
    with serving(web=WebConfig(users=users)) as server:
        first, second = connect(server), connect(server, "127.0.0.2")
        with first, second:
            first.sendall(b"GET / HTTP/1.0\r\nAuthorization: " + basic("u", "x").encode() +
                          b"\r\n\r\n")
            assert users.entered.wait(HANG_GUARD)
            second.sendall(b"GET / HTTP/1.0\r\nAuthorization: " + basic("u", "y").encode() +
                           b"\r\n\r\n")
            wait_until(lambda: server._auth_waiting == 2, "the second check waiting",
                       hang_guard=HANG_GUARD)
            third = get(server, Authorization=basic("u", "z"), source="127.0.0.3")
            assert third.status == 429 and server.auth_limited == 1
            users.release.set()
            assert [read_to_end(s).status for s in (first, second)] == [401, 401]
        # one bcrypt at a time: the second check, submitted while the first was held, waited
        # for its thread instead of starting a second one
        assert not [t for t in threading.enumerate() if t.name == "http-bcrypt_1"]
        assert get(server, Authorization=basic("u", "pw"), source="127.0.0.3").status == 200
        assert server.auth_limited == 1


def test_the_web_config_rate_limit_applies_to_every_request() -> None:
    limit = RateLimit(interval=3600.0, burst=2)
    with serving(web=WebConfig(rate_limit=limit)) as server:
        first = [get(server, path).status for path in ("/", "/health")]
        limited = get(server, "/nothing", source="127.0.0.2")  # one bucket for all
        assert first == [200, 200]
        assert_whole(limited, 429, b"Too Many Requests\n")
        assert limited.headers["Retry-After"] == "1"
        server.web_config = WebConfig(rate_limit=RateLimit(interval=3600.0, burst=2))
        assert get(server).status == 429  # an equal limit: the same bucket
        server.web_config = WebConfig(rate_limit=RateLimit(interval=3600.0, burst=3))
        assert [get(server, "/").status for _ in range(4)] == [200, 200, 200, 429]
        server.web_config = WebConfig()
        assert [get(server, "/").status for _ in range(4)] == [200] * 4
        assert (server.rate_limited, server.auth_limited) == (3, 0)


def test_a_fast_rate_limit_refills() -> None:
    """One token per microsecond: a request never waits long for one."""
    with serving(web=WebConfig(rate_limit=RateLimit(interval=1e-6, burst=1))) as server:
        assert [get(server, "/").status for _ in range(3)] == [200] * 3


def test_response_headers_of_the_web_config_follow_the_answers_own() -> None:
    web = WebConfig(headers=(("X-Frame-Options", "deny"), ("X-Content-Type-Options", "nosniff")))
    with serving(web=web) as server:
        reply = ask(server, b"POST / HTTP/1.0\r\n\r\n")
    assert reply.head[-3:] == ["Allow: GET, HEAD", "X-Frame-Options: deny",
                               "X-Content-Type-Options: nosniff"]


def test_the_servers_own_figures_with_their_help() -> None:
    web = WebConfig(users={"u": PASSWORD_HASH}, rate_limit=RateLimit(3600.0, 2))
    with serving(web=web, generation=lambda: 1) as server:
        get(server, "/health")
        get(server, "/health")
        get(server, "/health")  # limited
        server.evicted, server.refused, server.auth_limited = 3, 4, 5
        wait_until(lambda: held(server) == 0, "all released", hang_guard=HANG_GUARD)
        families = {f.name: f for f in server.families()}
        assert held(server) == 0
    assert list(families) == ["ctprofd_http_connections", "ctprofd_http_connections_evicted",
                              "ctprofd_http_connections_refused",
                              "ctprofd_http_requests_limited"]
    assert [(f.type, f.documentation) for f in families.values()] == [
        ("gauge", "HTTP connections held now."),
        ("counter", "Connections closed to make room under the connection limits (idle ones, "
                    "then ones whose answer is in their socket) or the limits on whole "
                    "requests held per address and network."),
        ("counter", "Connections refused because every held connection of the address (or "
                    "of all) had sent a whole request and was still being answered, or "
                    "because their network held the most whole requests."),
        ("counter", "Requests answered 429 Too Many Requests, by reason: rate_limit (the web "
                    "config's), auth (no bcrypt check: the address failed basic auth too "
                    "often, or too many checks were waiting).")]
    samples = [(s.name, s.labels, s.value) for f in families.values() for s in f.samples]
    assert samples == [
        ("ctprofd_http_connections", {}, 0),
        ("ctprofd_http_connections_evicted_total", {}, 3),
        ("ctprofd_http_connections_refused_total", {}, 4),
        ("ctprofd_http_requests_limited_total", {"reason": "rate_limit"}, 1),
        ("ctprofd_http_requests_limited_total", {"reason": "auth"}, 5)]


def test_a_scrape_shows_the_servers_figures_with_the_live_collector() -> None:
    live = CollectorRegistry()
    Gauge("ctprofd_test_live", "A live gauge.", registry=live).set(7)
    with serving(live=live, generation=lambda: 1) as server:
        reply = get(server)
    assert_whole(reply, 200)
    assert b"ctprofd_test_value 42.0" in reply.body and b"ctprofd_test_live 7.0" in reply.body
    assert b"\nctprofd_http_connections 1.0\n" in reply.body  # the scrape itself


# -- requests --

def test_a_request_line_needs_three_words_and_http_1() -> None:
    with serving() as server:
        for request in (b"GET /\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET  / HTTP/1.0\r\n\r\n",
                        b"GET / HTTP/1.0 x\r\n\r\n", b"GET / HTTP/1.0 \r\n\r\n",
                        b"not http at all\r\n\r\n"):
            assert ask(server, request) == Reply(b"", True), request
        assert_whole(ask(server, b"GET / HTTP/1.1\n\n"), 200, LANDING_PAGE)  # bare LFs


def test_credentials_are_taken_whole() -> None:
    """A token ending in a letter that is also in the line's end ("X"): every character of
    it is read."""
    token = base64.b64encode(b"ab:secreW").decode()
    assert token.endswith("X")
    web = WebConfig(users={"ab": bcrypt.hashpw(b"secreW", bcrypt.gensalt(4))})
    with serving(web=web) as server:
        assert_whole(get(server, Authorization=f"Basic {token}"), 200)


def test_header_names_are_case_insensitive_and_values_trimmed() -> None:
    with serving() as server:
        reply = ask(server, b"GET /metrics HTTP/1.0\r\nACCEPT-encoding :  GZIP  \r\n"
                            b"no colon here\r\n\r\n")
    assert_whole(reply, 200)
    assert reply.headers["Content-Encoding"] == "gzip"
    assert b"ctprofd_test_value" in gzip.decompress(reply.body)


def test_the_first_blank_line_ends_the_headers_whichever_it_is() -> None:
    """A bare-LF blank line before a CRLF one, or after it: the earlier one ends them."""
    with serving() as server:
        early = ask(server, b"GET /metrics HTTP/1.0\n\nAccept-Encoding: gzip\r\n\r\n")
        late = ask(server, b"GET /metrics HTTP/1.0\r\n\r\nAccept-Encoding: gzip\n\n")
    for reply in (early, late):
        assert_whole(reply, 200)
        assert "Content-Encoding" not in reply.headers


def test_header_lines_are_bounded() -> None:
    """MAX_HEADERS header lines are read; one more and the request is dropped."""
    limit = server_module.MAX_HEADERS
    with serving() as server:
        at = ask(server, b"GET / HTTP/1.0\r\n" + b"a: b\r\n" * limit + b"\r\n")
        over = ask(server, b"GET / HTTP/1.0\r\n" + b"a: b\r\n" * (limit + 1) + b"\r\n")
    assert_whole(at, 200)
    assert over == Reply(b"", True)


def test_a_request_split_over_many_packets_is_read_whole() -> None:
    with serving() as server, connect(server) as sock:
        send_in_pieces(server, sock, b"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n",
                       9)
        reply = read_to_end(sock)
    assert_whole(reply, 200)
    assert reply.headers["Content-Encoding"] == "gzip"


def test_the_request_bound_is_exact_whether_the_request_comes_at_once_or_in_pieces() -> None:
    line = b"GET / HTTP/1.0\r\n"
    pad = MAX_REQUEST_BYTES - len(line) - len(b"X: \r\n\r\n")
    at = line + b"X: " + b"a" * pad + b"\r\n\r\n"
    over = line + b"X: " + b"a" * (pad + 1) + b"\r\n\r\n"
    assert len(at) == MAX_REQUEST_BYTES
    with serving() as server:
        with loop_held(server):  # all of it in the socket at the first read
            whole = [connect(server) for _ in range(2)]
            for sock, data in zip(whole, (at, over)):
                sock.sendall(data)
        replies = [read_to_end(sock) for sock in whole]
        for sock in whole:
            sock.close()
        pieces = []
        for data in (at, over):
            with connect(server) as sock:
                try:
                    send_in_pieces(server, sock, data, 5000)
                except ConnectionResetError:
                    pieces.append(Reply(b"", True))
                    continue
                pieces.append(read_to_end(sock))
    assert_whole(replies[0], 200)
    assert_whole(pieces[0], 200)
    assert replies[1] == pieces[1] == Reply(b"", True)


def test_pipelined_requests_get_the_first_answer_then_the_end() -> None:
    with serving() as server:
        reply = ask(server, b"GET /metrics HTTP/1.1\r\n\r\nGET /nothing HTTP/1.1\r\n\r\n")
        first = ask(server, b"GET /metrics HTTP/1.0\r\n\r\n"
                            b"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
    assert_whole(reply, 200)
    assert b"HTTP/1.0 404" not in reply.data
    assert_whole(first, 200)  # the first request's headers only
    assert "Content-Encoding" not in first.headers
    assert b"ctprofd_test_value 42.0" in first.body


def test_closed_without_a_request_or_mid_request_gets_nothing_and_is_released(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"):
        with serving() as server:
            for data in (b"", b"GET / HTTP/1.0\r\n"):
                with connect(server) as sock:
                    if data:
                        sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    assert read_to_end(sock).data == b""
            wait_until(lambda: held(server) == 0, "both released", hang_guard=HANG_GUARD)
    closed = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    assert closed == ["127.0.0.1: connection closed: no request",
                      "127.0.0.1: connection closed: closed mid-request"]


def test_why_a_connection_was_dropped_is_logged_at_debug(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"):
        with serving() as server:
            assert ask(server, b"GET / HTTP/1.0\r\n" + b"a" * MAX_REQUEST_BYTES) == \
                Reply(b"", True)
            assert ask(server, b"BREW / HTCPCP/1.0\r\n\r\n") == Reply(b"", True)
            assert ask(server, b"A" * 100 + b"\r\n\r\n") == Reply(b"", True)
            assert ask(server, b"GET / HTTP/1.0\r\n" + b"a: b\r\n" * 200 + b"\r\n") == \
                Reply(b"", True)
            with connect(server) as blank:  # a blank line first: refused at once
                blank.sendall(b"\r\n\r\n")  # (no shutdown: the reset may be here already)
                assert read_to_end(blank).data == b""
            server.first_byte = 0.2  # for the connections accepted from now on
            with connect(server) as idle:
                assert read_to_end(idle).reset
    messages = [r.getMessage() for r in caplog.records if r.name == "ctprofd.export.server"]
    assert messages == ["127.0.0.1: connection closed: request too large",
                        "127.0.0.1: connection closed: not an HTTP/1 request line: "
                        "'BREW / HTCPCP/1.0\\r'",
                        "127.0.0.1: connection closed: not an HTTP/1 request line: "
                        f"'{'A' * 80}'",
                        "127.0.0.1: connection closed: too many header lines",
                        "127.0.0.1: connection closed: not an HTTP/1 request line: '\\r'",
                        "127.0.0.1: connection closed: TimeoutError"]
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]


def test_a_failure_answering_one_client_is_logged_and_the_server_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> tuple[bool, str]:
        raise KeyError("health")

    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"):
        with serving() as server:
            server.health = broken
            assert get(server, "/health") == Reply(b"", True)
            assert_whole(get(server, "/"), 200)
            wait_until(lambda: held(server) == 0, "released", hang_guard=HANG_GUARD)
    [error] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert error.levelno == logging.ERROR and error.getMessage() == "127.0.0.1: answering failed"
    assert error.exc_info is not None and error.exc_info[0] is KeyError


# -- TLS --

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {"server": openssl_cert(directory, "server", "IP:127.0.0.1"),
            "scraper": openssl_cert(directory, "scraper", "DNS:scraper,DNS:other"),
            "nosan": openssl_cert(directory, "nosan", "")}


def tls_web(tmp_path: Path, certs: dict, sans: list[str] | None = None) -> WebConfig:
    cert, key = certs["server"]
    text = f"tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
    if sans is not None:
        ca = tmp_path / "ca.pem"
        ca.write_text(certs["scraper"][0].read_text() + certs["nosan"][0].read_text())
        text += (f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n"
                 f"  client_allowed_sans: [{', '.join(sans)}]\n" if sans else
                 f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n")
    path = tmp_path / "web.yml"
    path.write_text(text)
    return load_web_config(str(path))


def tls_get(server: object, certs: dict, client: str | None = None) -> Reply:
    context = ssl.create_default_context(cafile=str(certs["server"][0]))
    if client is not None:
        context.load_cert_chain(*map(str, certs[client]))
    with socket.create_connection(("127.0.0.1", server.server_port),  # type: ignore[attr-defined]
                                  timeout=HANG_GUARD) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1",
                                     suppress_ragged_eofs=False) as tls:
                tls.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                return read_to_end(tls)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return Reply(b"", True)


def test_tls_answers_whole_and_ends_with_close_notify(tmp_path: Path, certs: dict) -> None:
    """Read until the server's close_notify (a ragged end would raise)."""
    with serving(web=tls_web(tmp_path, certs)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        reply = tls_get(server, certs)
        assert_whole(reply, 200)
        assert b"ctprofd_test_value 42.0" in reply.body
        plain = get(server)  # plain HTTP to a TLS port: no answer
        assert plain.status is None
        wait_until(lambda: held(server) == 0, "all released", hang_guard=HANG_GUARD)


def test_client_certificates_must_name_an_allowed_san(tmp_path: Path, certs: dict,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"):
        with serving(web=tls_web(tmp_path, certs, ["nothing", "other"])) as server:
            assert_whole(tls_get(server, certs, "scraper"), 200)
            assert tls_get(server, certs, "nosan").data == b""
            assert tls_get(server, certs).data == b""  # none at all
        with serving(web=tls_web(tmp_path, certs, ["nothing"])) as server:
            assert tls_get(server, certs, "scraper").data == b""
        with serving(web=tls_web(tmp_path, certs, [])) as server:  # any verified one
            assert_whole(tls_get(server, certs, "nosan"), 200)
    refused = [r.getMessage() for r in caplog.records
               if "client_allowed_sans" in r.getMessage()]
    assert refused == ["127.0.0.1: connection closed: client certificate names none of "
                       "client_allowed_sans"] * 2
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]


def test_a_swapped_web_config_applies_to_new_connections(tmp_path: Path, certs: dict) -> None:
    with serving() as server:
        assert_whole(get(server), 200)
        server.web_config = tls_web(tmp_path, certs)
        assert_whole(tls_get(server, certs), 200)
        server.web_config = WebConfig(users={"u": PASSWORD_HASH})
        assert_whole(get(server), 401)


def test_shutdown_resets_held_connections_and_stops_serving() -> None:
    with serving() as server:
        idle = connect(server)
        talking = connect(server)
        talking.sendall(b"GET / HTTP/1.0\r\n")
        wait_until(lambda: held(server) == 2, "both held", hang_guard=HANG_GUARD)
        server.shutdown()
        with idle, talking:
            assert read_to_end(idle) == Reply(b"", True)
            assert read_to_end(talking) == Reply(b"", True)
        port = server.server_port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD)


def test_a_server_shut_down_before_it_serves_returns_at_once() -> None:
    server = server_module.MetricsServer("127.0.0.1:0", small_registry(), WebConfig())
    server.shutdown()  # before serve_forever: it must not wait
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    assert not thread.is_alive()
    server.shutdown()  # the loop has ended: nothing to stop
    server.server_close()
