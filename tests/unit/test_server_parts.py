"""The HTTP endpoint's parts that need no connection: listen addresses and the sockets bound
for them, networks, basic-auth credentials and their memory, token buckets, and the
open-file limit."""

from __future__ import annotations

import base64
import resource
import socket

import bcrypt
import pytest

from ctprofd.export import server as server_module
from ctprofd.export.server import (FD_RESERVE, MAX_CONNECTIONS, Authenticator, MetricsServer,
                                   TokenBuckets, WebConfig, network_of, parse_listen,
                                   raise_fd_limit)
from support.clock import Clock
from support.webserver import small_registry

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4))
OTHER_HASH = bcrypt.hashpw(b"other", bcrypt.gensalt(4))


def basic(user: str | bytes, password: str | bytes) -> str:
    user = user.encode() if isinstance(user, str) else user
    password = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(user + b":" + password).decode()


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:65535", ("127.0.0.1", 65535)), (":0", ("", 0)), (":19455", ("", 19455)),
    ("[::1]:80", ("::1", 80)), ("[::]:9", ("::", 9)), ("host:1:2", None),
    ("127.0.0.1:65536", None), ("host:70000", None), ("host:abc", None), ("host", None),
    ("host:", None), ("host:-1", None), ("[::1:80", None), ("::1]:80", None), ("::1:80", None),
])
def test_parse_listen_takes_host_port_and_bracketed_ipv6(value: str,
                                                         expected: tuple | None) -> None:
    """The port is after the last colon, 0-65535; an IPv6 host must be in brackets."""
    if expected is None:
        with pytest.raises(ValueError) as info:
            parse_listen(value)
        assert repr(value) in str(info.value)
    else:
        assert parse_listen(value) == expected


def test_an_ipv6_host_without_brackets_is_told_how_to_write_it() -> None:
    with pytest.raises(ValueError, match=r"put an IPv6 address in brackets, e\.g\. \[::1\]"):
        parse_listen("::1:19455")


@pytest.mark.parametrize("address, network", [
    ("127.0.0.77", "127.0.0.0/24"), ("127.1.2.3", "127.1.2.0/24"), ("10.0.0.255", "10.0.0.0/24"),
    ("2001:db8::1", "2001:db8::/64"), ("2001:db8:0:0:ffff::1", "2001:db8::/64"),
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"), ("?", "?"), ("not-an-ip", "not-an-ip"),
])
def test_an_address_counts_in_its_24_or_64(address: str, network: str) -> None:
    """What is not an IP address (an unknown peer) is a network of its own."""
    assert network_of(address) == network


def test_good_credentials_are_verified_by_bcrypt_then_known_without_it() -> None:
    users = {"prometheus": HASH}
    auth = Authenticator()
    good = basic("prometheus", "s3cret")
    assert auth.known(users, good) is None  # bcrypt must decide
    assert auth.verify(users, good) is True
    assert auth.known(users, good) is True
    # another authenticator remembers nothing: the memory is per instance
    assert Authenticator().known(users, good) is None


@pytest.mark.parametrize("header", [
    None, "", "Bearer abc", "Basic", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode(),
    "Basicx " + base64.b64encode(b"prometheus:s3cret").decode(),
    # characters outside base64's alphabet are refused, not skipped
    "Basic cHJvbWV0aGV1czpz!M2NyZXQ=", "Basic cHJvbWV0aGV1czpzM2NyZXQ=\x00",
])
def test_a_header_that_is_not_basic_credentials_is_refused_without_bcrypt(
        header: str | None) -> None:
    users = {"prometheus": HASH}
    auth = Authenticator()
    assert auth.known(users, header) is False
    assert auth.verify(users, header) is False


def test_the_scheme_is_case_insensitive_and_the_password_may_hold_colons() -> None:
    users = {"prometheus": bcrypt.hashpw(b"a:b", bcrypt.gensalt(4))}
    auth = Authenticator()
    token = base64.b64encode(b"prometheus:a:b").decode()
    assert auth.verify(users, f"bAsIc   {token}  ") is True
    assert auth.known(users, f"BASIC {token}") is True


@pytest.mark.parametrize("user, password", [
    ("prometheus", "wrong"), ("nobody", "s3cret"), ("Prometheus", "s3cret"),
    ("prometheus", "s3cret" + "x" * 80),  # past bcrypt's 72 bytes: refused, no exception
    ("", ""), ("prometheus", ""),
])
def test_wrong_credentials_are_refused_and_never_remembered(user: str, password: str) -> None:
    users = {"prometheus": HASH, "other": OTHER_HASH}
    auth = Authenticator()
    header = basic(user, password)
    assert auth.verify(users, header) is False
    assert auth.known(users, header) is None


def test_a_user_name_not_in_utf8_is_compared_as_decoded_with_replacement() -> None:
    users = {"caf\ufffd": HASH}
    auth = Authenticator()
    assert auth.verify(users, basic(b"caf\xe9", b"s3cret")) is True


def test_a_changed_hash_or_password_is_checked_afresh() -> None:
    auth = Authenticator()
    good = basic("prometheus", "s3cret")
    assert auth.verify({"prometheus": HASH}, good)
    other = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4))  # the same password, a new hash
    assert auth.known({"prometheus": other}, good) is None
    assert auth.known({"prometheus": HASH}, basic("prometheus", "s3cret2")) is None
    assert auth.known({"someone": HASH}, good) is None  # the name is part of it too


def test_the_memory_of_good_credentials_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """At its bound the memory is emptied before the next one is remembered."""
    monkeypatch.setattr(server_module, "_AUTH_CACHE_SIZE", 2)
    passwords = [b"p0", b"p1", b"p2"]
    users = {p.decode(): bcrypt.hashpw(p, bcrypt.gensalt(4)) for p in passwords}
    auth = Authenticator()
    headers = [basic(p.decode(), p) for p in passwords]
    assert auth.verify(users, headers[0]) and auth.verify(users, headers[1])
    assert [auth.known(users, h) for h in headers] == [True, True, None]
    assert auth.verify(users, headers[2])
    assert [auth.known(users, h) for h in headers] == [None, None, True]


def test_a_bucket_gives_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(3, 2.0, clock=clock)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")  # a bucket per key
    clock.now += 0.25  # half a token
    assert not buckets.take("a")
    clock.now += 0.25  # the half kept from the refused take, and another half
    assert buckets.take("a") and not buckets.take("a")
    clock.now += 100  # never more than the burst
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]


def test_a_bucket_needs_a_whole_token() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, 1.0, clock=clock)
    assert buckets.take("a")
    clock.now += 0.99
    assert not buckets.take("a")
    clock.now += 0.01
    assert buckets.take("a")


def test_a_token_given_back_is_taken_again_up_to_the_burst() -> None:
    clock = Clock()
    buckets = TokenBuckets(2, 0.001, clock=clock)
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")
    buckets.give_back("a")
    assert buckets.take("a") and not buckets.take("a")
    buckets.give_back("a")
    buckets.give_back("a")
    buckets.give_back("a")  # past the burst: kept at it
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    buckets.give_back("never-seen")  # a key never taken from starts full anyway
    assert [buckets.take("never-seen") for _ in range(3)] == [True, True, False]


def test_a_given_back_token_keeps_the_time_of_the_last_take() -> None:
    """Giving back does not restart the refill: the time since the last take still
    counts."""
    clock = Clock()
    buckets = TokenBuckets(2, 1.0, clock=clock)
    assert buckets.take("a") and buckets.take("a")
    clock.now += 0.5
    buckets.give_back("a")  # 1 token, and half a token's time already passed
    clock.now += 0.5
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")


def test_at_its_bound_the_full_buckets_are_forgotten_first() -> None:
    clock = Clock()
    buckets = TokenBuckets(2, 2.0, keys=2, clock=clock)
    assert buckets.take("a") and buckets.take("a")  # a: empty
    assert buckets.take("b")  # b: one left
    clock.now += 0.5  # a: one token; b: full again, exactly
    assert buckets.take("c")  # a third key: b, the full one, is forgotten
    assert buckets.take("a") and not buckets.take("a")  # a was remembered


def test_at_its_bound_with_none_full_the_older_half_is_forgotten() -> None:
    clock = Clock()
    buckets = TokenBuckets(1, 0.001, keys=4, clock=clock)
    for key in "abcd":
        assert buckets.take(key)  # each empty now
    assert buckets.take("e")  # a and b forgotten (they start full again), c and d not
    assert [buckets.take(key) for key in "cdeb"] == [False, False, False, True]


def test_a_refused_take_does_not_make_room() -> None:
    """Only a key that gets a token is remembered: refusals never evict others."""
    clock = Clock()
    buckets = TokenBuckets(1, 0.001, keys=1, clock=clock)
    assert buckets.take("a") and not buckets.take("a")
    assert not buckets.take("a")
    assert not buckets.take("a")  # still remembered, still empty


@pytest.fixture
def nofile() -> tuple[int, int]:
    """The open-file limits, restored after the test."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(nofile: tuple[int, int]) -> None:
    """Here the hard limit is under 65536 (and cannot be raised: no CAP_SYS_RESOURCE); only
    the soft one is lowered for the test."""
    _, hard = nofile
    assert hard < 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    raise_fd_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    raise_fd_limit()  # nothing left to raise
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_connections_held_at_once_leave_descriptors_to_the_rest(nofile: tuple[int, int]) -> None:
    """At most the open-file limit less FD_RESERVE, and always at least one."""
    soft, hard = nofile
    for limit, wanted, expected in [(FD_RESERVE + 10, MAX_CONNECTIONS, 10),
                                    (FD_RESERVE + 10, 5, 5), (FD_RESERVE, 100, 1),
                                    (soft, MAX_CONNECTIONS, min(MAX_CONNECTIONS,
                                                                soft - FD_RESERVE))]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        server = MetricsServer("127.0.0.1:0", small_registry(), WebConfig(),
                               max_connections=wanted)
        server.server_close()
        assert server.max_connections == expected, (limit, wanted)


def test_listening_on_several_addresses_reports_a_url_for_each() -> None:
    server = MetricsServer(["127.0.0.1:0", "[::1]:0"], small_registry(), WebConfig())
    try:
        ports = [s.getsockname()[1] for s in server.sockets]
        assert server.urls == [f"http://127.0.0.1:{ports[0]}", f"http://[::1]:{ports[1]}"]
        assert server.url == server.urls[0]
        assert server.server_address == ("127.0.0.1", ports[0])
        assert server.server_port == ports[0] > 0
        assert [s.family for s in server.sockets] == [socket.AF_INET, socket.AF_INET6]
        assert all(s.type == socket.SOCK_STREAM for s in server.sockets)
        for sock in server.sockets:  # listening: a client connects
            with socket.create_connection(sock.getsockname()[:2], timeout=10):
                pass
    finally:
        server.server_close()
    assert all(s.fileno() == -1 for s in server.sockets)


def test_every_address_is_dual_stack() -> None:
    """"" is every address: IPv6 and IPv4 on one socket."""
    server = MetricsServer(":0", small_registry(), WebConfig())
    try:
        [sock] = server.sockets
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::"
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, server.server_port), timeout=10):
                pass
    finally:
        server.server_close()


def test_a_name_is_resolved_for_the_bind() -> None:
    server = MetricsServer("localhost:0", small_registry(), WebConfig())
    try:
        [sock] = server.sockets
        assert sock.getsockname()[0] in ("127.0.0.1", "::1")
        assert sock.type == socket.SOCK_STREAM
    finally:
        server.server_close()


def test_an_address_that_cannot_be_bound_is_named_and_nothing_is_left_open() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        free = first.getsockname()[1]
        first.close()
        with pytest.raises(OSError) as info:
            MetricsServer([f"127.0.0.1:{free}", f"127.0.0.1:{port}"], small_registry(),
                          WebConfig())
        err = info.value
        assert err.filename == f"127.0.0.1:{port}"
        assert err.errno == 98 and err.strerror == "Address already in use"
        # the first address was bound and is closed again: it can be bound now
        again = socket.socket()
        again.bind(("127.0.0.1", free))
        again.close()
    finally:
        taken.close()
