"""The HTTP endpoint's bounds over real loopback sockets, the server run in this process:
deadlines, connections held per address and in all, whole requests held per address and
per network, which connection makes room, and how connections end (the hand-over after a
whole answer, a reset when cut off) and are uncounted."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import Iterator

import pytest

from ctprofd.export.server import (MetricsServer, WebConfig, _bytes_unread, _Connection,
                                   _Reader)
from support.procs import wait_until
from support.webserver import (HANG_GUARD, Huge, Reply, connect, exchange, get, held,
                               loop_held, read_to_end, refused_at_once, reset_by_server,
                               serving, small_registry, taken, unhandled_task_errors)

STALLED_RCVBUF = 4096
RESET = Reply(b"", True)  # ended by a reset, nothing sent before it


def status_line(sock: socket.socket, request: bytes = b"GET / HTTP/1.0\r\n\r\n") -> bytes:
    return exchange(sock, request).data.split(b"\r\n", 1)[0]


def stalled(server: MetricsServer, source: str, count: int = 1) -> list[socket.socket]:
    """`count` connections from `source` that send a whole request and never read."""
    socks = []
    for _ in range(count):
        sock = connect(server, source, rcvbuf=STALLED_RCVBUF)
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        socks.append(sock)
    return socks


def requested(server: MetricsServer, address: str | None = None) -> int:
    """Whole requests the server counts against its answering limits."""
    while True:
        try:
            return sum(1 for n in list(server._requested.values()) for c in list(n)
                       if address is None or c.address == address)
        except RuntimeError:
            continue


def answered_from(server: MetricsServer, address: str) -> int:
    """Connections from `address` whose whole request arrived and whose whole answer is in
    their socket (no count of requests alone tells it: before a request is read, nothing
    counts it either)."""
    while True:
        try:
            return sum(1 for c in list(server._peers.get(address, []))
                       if c.requested and c.answered())
        except RuntimeError:
            continue


def held_from(server: MetricsServer, address: str) -> int:
    while True:
        try:
            return len(list(server._peers.get(address, [])))
        except RuntimeError:
            continue


@pytest.fixture
def huge() -> Iterator[Huge]:
    yield Huge()


@pytest.fixture(autouse=True)
def no_task_ends_in_an_unhandled_exception(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every connection's task ends cleanly, whatever the test made it do."""
    yield
    gc.collect()
    assert not unhandled_task_errors(caplog.get_records("call") + caplog.records)


# -- deadlines --

def test_a_connection_without_a_first_byte_is_reset_and_released() -> None:
    with serving(first_byte=0.2) as server, connect(server) as idle:
        assert read_to_end(idle) == RESET
        wait_until(lambda: held(server) == 0, "released", hang_guard=HANG_GUARD)
        server.first_byte = 60  # for the connections accepted from now on
        assert_whole_200(get(server))


def test_a_trickling_request_is_cut_off_by_the_deadline() -> None:
    with serving(deadline=0.3, first_byte=60) as server, connect(server) as trickle:
        trickle.sendall(b"GET / HTTP/1.0\r\n")
        assert read_to_end(trickle) == RESET
        wait_until(lambda: held(server) == 0, "released", hang_guard=HANG_GUARD)
        assert (server.evicted, server.refused) == (0, 0)


def test_an_answer_never_read_ends_in_a_reset_at_the_deadline(huge: Huge) -> None:
    with serving(huge, deadline=0.5, generation=lambda: 1) as server:
        [unread] = stalled(server, "127.0.0.2")
        with unread:
            assert reset_by_server(unread)
        wait_until(lambda: held(server) == 0, "released", hang_guard=HANG_GUARD)


def assert_whole_200(reply: Reply) -> None:
    assert reply.status == 200 and not reply.reset
    assert int(reply.headers["Content-Length"]) == len(reply.body)


# -- the hand-over --

def test_a_half_closed_client_reads_the_whole_answer_then_the_servers_end(huge: Huge) -> None:
    """The server's FIN after the answer, once the client ended its side: no reset, and the
    connection is released."""
    with serving(huge, generation=lambda: 1) as server:
        with connect(server) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            reply = read_to_end(sock)
            assert_whole_200(reply)
            assert len(reply.body) > 8_000_000
        wait_until(lambda: held(server) == 0, "released", hang_guard=HANG_GUARD)


def test_the_server_waits_for_the_clients_end_before_closing(
        caplog: pytest.LogCaptureFixture) -> None:
    """After the answer and its FIN, the connection is held until the client closes (its
    bytes after the request are read and dropped meanwhile); then released, and nothing is
    logged."""
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"), serving(deadline=60) as server:
        with connect(server) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = read_to_end(sock)  # ends at the server's FIN
            assert reply.status == 200 and not reply.reset
            sock.sendall(b"x" * 100_000)  # read and dropped by the server
            wait_until(lambda: taken(server, sock) >= 100_000 + 18, "the bytes read",
                       hang_guard=HANG_GUARD)
            assert held(server) == 1
        wait_until(lambda: held(server) == 0, "released after the client's close",
                   hang_guard=HANG_GUARD)
        assert (server.evicted, server.refused) == (0, 0)
    assert not [r for r in caplog.records if r.name == "ctprofd.export.server"]


# -- connections per address and in all --

def test_one_address_over_its_limit_loses_its_oldest_idle_connection() -> None:
    with serving(per_address=3) as server:
        idle = [connect(server, "127.0.0.2") for _ in range(3)]
        wait_until(lambda: held(server) == 3, "three held", hang_guard=HANG_GUARD)
        other = connect(server, "127.0.0.3")  # another address is not counted with them
        wait_until(lambda: held(server) == 4, "four held", hang_guard=HANG_GUARD)
        assert server.evicted == 0
        newcomer = connect(server, "127.0.0.2")
        assert read_to_end(idle[0]) == RESET
        assert status_line(newcomer) == b"HTTP/1.0 200 OK"
        assert [status_line(s) for s in (*idle[1:], other)] == [b"HTTP/1.0 200 OK"] * 3
        assert (server.evicted, server.refused) == (1, 0)
        for sock in (*idle, other, newcomer):
            sock.close()


def test_a_scrapers_silent_connection_outlives_older_trickling_ones() -> None:
    """Oldest first, whether it sent bytes or none."""
    with serving(per_address=3) as server:
        trickling = [connect(server) for _ in range(2)]
        for sock in trickling:
            sock.sendall(b"GET / HTTP/1.0\r\n")
        wait_until(lambda: all(taken(server, s) == 16 for s in trickling), "trickles read",
                   hang_guard=HANG_GUARD)
        scraper = connect(server)
        wait_until(lambda: held(server) == 3, "all three held", hang_guard=HANG_GUARD)
        newcomer = connect(server)
        assert read_to_end(trickling[0]) == RESET
        assert status_line(scraper, b"GET /metrics HTTP/1.0\r\n\r\n") == b"HTTP/1.0 200 OK"
        assert status_line(trickling[1], b"\r\n") == b"HTTP/1.0 200 OK"
        assert status_line(newcomer) == b"HTTP/1.0 200 OK"
        assert server.evicted == 1
        for sock in (*trickling, scraper, newcomer):
            sock.close()


def test_in_a_burst_the_silent_one_goes_though_the_older_ones_bytes_are_unread() -> None:
    """Connections accepted together are admitted before any is read: the older one's
    partial request still waits in its socket, and is seen there."""
    with serving(per_address=2) as server:
        with loop_held(server):
            talking = connect(server)
            talking.sendall(b"G")  # a single byte is seen too
            silent = connect(server)
            scraper = connect(server)
            scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert status_line(scraper, b"") == b"HTTP/1.0 200 OK"
        assert read_to_end(silent) == RESET
        assert status_line(talking, b"ET / HTTP/1.0\r\n\r\n") == b"HTTP/1.0 200 OK"
        assert server.evicted == 1
        for sock in (talking, silent, scraper):
            sock.close()


def test_in_a_burst_with_every_older_one_talking_the_oldest_goes() -> None:
    """When each connection without a whole request has bytes unread, the oldest goes."""
    with serving(per_address=2) as server:
        with loop_held(server):
            first = connect(server)
            first.sendall(b"GET / HTTP/1.0\r\n")
            second = connect(server)
            second.sendall(b"GET / HTTP/1.0\r\n")
            third = connect(server)
            third.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert status_line(third, b"") == b"HTTP/1.0 200 OK"
        assert read_to_end(first) == RESET
        assert status_line(second, b"\r\n") == b"HTTP/1.0 200 OK"
        assert server.evicted == 1
        for sock in (first, second, third):
            sock.close()


def test_when_full_the_oldest_idle_one_of_the_address_holding_most_gives_way() -> None:
    with serving(max_connections=6) as server:
        socks = [connect(server, source) for source in ["127.0.0.2"] * 2 + ["127.0.0.3"] * 4]
        wait_until(lambda: held(server) == 6, "all six held", hang_guard=HANG_GUARD)
        assert status_line(connect(server, "127.0.0.4")) == b"HTTP/1.0 200 OK"
        assert read_to_end(socks[2]) == RESET  # the oldest of 127.0.0.3, not the oldest of all
        assert [status_line(s) for s in (socks[0], socks[1], socks[3])] == \
            [b"HTTP/1.0 200 OK"] * 3
        assert (server.evicted, server.refused) == (1, 0)
        for sock in socks:
            sock.close()


def test_when_full_and_the_largest_holder_is_all_requests_the_next_one_gives_way(
        huge: Huge) -> None:
    with serving(huge, max_connections=4, generation=lambda: 1) as server:
        busy = stalled(server, "127.0.0.3", 3)
        wait_until(lambda: requested(server, "127.0.0.3") == 3, "three whole requests",
                   hang_guard=HANG_GUARD)
        idle = connect(server, "127.0.0.2")
        wait_until(lambda: held(server) == 4, "four held", hang_guard=HANG_GUARD)
        newcomer = connect(server, "127.0.0.4")
        assert read_to_end(idle) == RESET
        wait_until(lambda: held_from(server, "127.0.0.4") == 1, "the newcomer held",
                   hang_guard=HANG_GUARD)
        assert requested(server, "127.0.0.3") == 3
        assert (server.evicted, server.refused) == (1, 0)
        for sock in (*busy, idle, newcomer):
            sock.close()


def test_when_every_held_connection_sent_a_whole_request_the_newcomer_is_refused(
        huge: Huge, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"):
        with serving(huge, per_address=2, max_connections=3, generation=lambda: 1) as server:
            busy = stalled(server, "127.0.0.2", 2)
            wait_until(lambda: requested(server, "127.0.0.2") == 2, "both whole requests held",
                       hang_guard=HANG_GUARD)
            assert refused_at_once(server, "127.0.0.2")
            assert (server.refused, server.evicted, requested(server, "127.0.0.2")) == (1, 0, 2)
            other = stalled(server, "127.0.0.3")  # the third place
            wait_until(lambda: requested(server) == 3, "three whole requests held",
                       hang_guard=HANG_GUARD)
            assert refused_at_once(server, "127.0.0.4")
            assert (server.refused, server.evicted, held(server)) == (2, 0, 3)
            for sock in (*busy, *other):
                sock.close()
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == ["127.0.0.2: every connection sent a whole request; refused",
                     "127.0.0.4: every connection sent a whole request; refused"]


def test_an_ipv4_client_of_a_dual_stack_socket_counts_under_its_ipv4_address(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"):
        with serving(listen="[::]:0") as server:
            for host in ("127.0.0.1", "::1"):
                with socket.create_connection((host, server.server_port),
                                              timeout=HANG_GUARD) as sock:
                    sock.sendall(b"nonsense\r\n\r\n")
                    read_to_end(sock)
    sources = [r.getMessage().split(": ")[0] for r in caplog.records
               if "connection closed" in r.getMessage()]
    assert sources == ["127.0.0.1", "::1"]


# -- whole requests per address and per network --

def test_whole_requests_never_read_are_limited_per_address(huge: Huge) -> None:
    with serving(huge, answering=2, generation=lambda: 1) as server:
        first = stalled(server, "127.0.0.2", 2)
        wait_until(lambda: requested(server, "127.0.0.2") == 2, "two held",
                   hang_guard=HANG_GUARD)
        assert server.evicted == 0
        [third] = stalled(server, "127.0.0.2")
        assert reset_by_server(first[0])  # the oldest whole request
        wait_until(lambda: requested(server, "127.0.0.2") == 2, "two held again",
                   hang_guard=HANG_GUARD)
        assert (server.evicted, server.refused) == (1, 0)
        assert_whole_200(get(server, "/", source="127.0.0.3"))  # others are served
        for sock in (*first, third):
            sock.close()


def test_a_network_at_its_limit_makes_room_from_the_address_holding_most(huge: Huge) -> None:
    with serving(huge, answering=3, answering_network=4, generation=lambda: 1) as server:
        fewer = stalled(server, "127.0.0.3", 1)  # the first address of the network
        wait_until(lambda: requested(server) == 1, "one held", hang_guard=HANG_GUARD)
        most = stalled(server, "127.0.0.2", 3)
        wait_until(lambda: requested(server) == 4, "four held", hang_guard=HANG_GUARD)
        assert server.evicted == 0
        newcomer = stalled(server, "127.0.0.4", 1)
        assert reset_by_server(most[0])  # the oldest of the address holding the most
        wait_until(lambda: requested(server, "127.0.0.4") == 1, "the newcomer counted",
                   hang_guard=HANG_GUARD)
        assert (requested(server, "127.0.0.2"), requested(server, "127.0.0.3")) == (2, 1)
        assert (server.evicted, server.refused) == (1, 0)
        # another network is not counted with them
        assert_whole_200(get(server, "/", source="127.0.1.1"))
        assert (server.evicted, server.refused, requested(server)) == (1, 0, 4)
        for sock in (*most, *fewer, *newcomer):
            sock.close()


def test_a_newcomer_holding_as_many_as_the_most_is_refused(
        huge: Huge, caplog: pytest.LogCaptureFixture) -> None:
    """In a full network where every address holds one, a second request of one of them
    holds as many as the most: it goes, not another address's request; a third address's
    first request takes the place of the oldest."""
    with caplog.at_level(logging.DEBUG, "ctprofd.export.server"), \
            serving(huge, answering=3, answering_network=2, generation=lambda: 1) as server:
        socks = stalled(server, "127.0.0.2") + stalled(server, "127.0.0.3")
        wait_until(lambda: requested(server) == 2, "two held", hang_guard=HANG_GUARD)
        [second] = stalled(server, "127.0.0.3")
        assert read_to_end(second) == RESET
        assert (server.refused, server.evicted, requested(server)) == (1, 0, 2)
        [newcomer] = stalled(server, "127.0.0.4")
        assert reset_by_server(socks[0])
        wait_until(lambda: requested(server, "127.0.0.4") == 1, "the newcomer counted",
                   hang_guard=HANG_GUARD)
        assert (server.refused, server.evicted, requested(server)) == (1, 1, 2)
        [again] = stalled(server, "127.0.0.4")
        assert read_to_end(again) == RESET
        assert (server.refused, server.evicted, requested(server)) == (2, 1, 2)
        for sock in (*socks, second, newcomer, again):
            sock.close()
    refusals = [r.getMessage() for r in caplog.records if "network" in r.getMessage()]
    assert refusals == ["127.0.0.3: connection closed: its network has the most whole "
                        "requests held", "127.0.0.4: connection closed: its network has the "
                        "most whole requests held"]


def test_answers_in_their_sockets_leave_the_limits_and_go_for_room_after_idle_ones() -> None:
    """A connection whose answer has left the process holds nothing of ours but a
    descriptor: it no longer counts as a whole request, and goes for a newcomer after the
    idle ones (its client may still be reading)."""
    with serving(per_address=2, answering=1, deadline=300, first_byte=300) as server:
        [first] = stalled(server, "127.0.0.2")  # a small answer: all in the socket
        wait_until(lambda: answered_from(server, "127.0.0.2") == 1 and requested(server) == 0,
                   "its answer in its socket", hang_guard=HANG_GUARD)
        idle = connect(server, "127.0.0.2")
        wait_until(lambda: held_from(server, "127.0.0.2") == 2, "the idle one held",
                   hang_guard=HANG_GUARD)
        [second] = stalled(server, "127.0.0.2")  # the idle one goes, not the answered one
        assert read_to_end(idle) == RESET
        wait_until(lambda: answered_from(server, "127.0.0.2") == 2 and requested(server) == 0,
                   "the second answered", hang_guard=HANG_GUARD)
        assert (server.evicted, server.refused) == (1, 0)
        [third] = stalled(server, "127.0.0.2")  # now the oldest answered one goes
        assert reset_by_server(first)
        assert (server.evicted, server.refused) == (2, 0)
        reply = read_to_end(second)  # the second's answer whole, then the server's FIN
        assert_whole_200(reply)
        for sock in (first, idle, second, third):
            sock.close()


def test_closed_connections_are_uncounted_and_their_places_given_again() -> None:
    """Every way a connection ends (closed before a byte, mid-request, after its answer,
    cut off by a deadline) gives its place back: the address's whole allowance is served
    again without evicting or refusing anyone."""
    with serving(per_address=4, answering=1) as server:
        before = connect(server, "127.0.0.2")
        talking = connect(server, "127.0.0.2")
        talking.sendall(b"GET / HTTP/1.0\r\n")
        answered = connect(server, "127.0.0.2")
        assert status_line(answered) == b"HTTP/1.0 200 OK"
        wait_until(lambda: held(server) == 3, "three held", hang_guard=HANG_GUARD)
        server.first_byte = 0.3  # for the connections accepted from now on
        early = connect(server, "127.0.0.2")
        wait_until(lambda: held(server) == 4, "four held", hang_guard=HANG_GUARD)
        for sock in (before, talking, answered):
            sock.close()
        assert read_to_end(early) == RESET  # the first-byte deadline
        early.close()
        server.first_byte = 60
        wait_until(lambda: held(server) == 0 and not server._peers and not server._requested,
                   "every connection released", hang_guard=HANG_GUARD)
        again = [connect(server, "127.0.0.2") for _ in range(4)]
        wait_until(lambda: held(server) == 4, "four held again", hang_guard=HANG_GUARD)
        assert [status_line(s) for s in again] == [b"HTTP/1.0 200 OK"] * 4
        assert (server.evicted, server.refused) == (0, 0)
        for sock in again:
            sock.close()


def test_an_evicted_connection_gives_its_place_at_once() -> None:
    """Counted out when it is closed for room, not when its own task ends later: a full
    server takes one newcomer per connection it closes."""
    with serving(max_connections=2, per_address=2) as server:
        socks = [connect(server, "127.0.0.2") for _ in range(2)]
        wait_until(lambda: held(server) == 2, "two held", hang_guard=HANG_GUARD)
        with loop_held(server):  # both newcomers admitted in one turn of the loop
            newcomers = [connect(server, "127.0.0.3") for _ in range(2)]
        assert [read_to_end(s) for s in socks] == [RESET] * 2
        assert [status_line(s) for s in newcomers] == [b"HTTP/1.0 200 OK"] * 2
        assert (server.evicted, server.refused) == (2, 0)
        for sock in (*socks, *newcomers):
            sock.close()


# -- the accounting itself, on real TCP pairs --

async def tcp_connection(address: str) -> tuple[_Connection, socket.socket]:
    """A connection as the server holds one, from `address`, on a real loopback TCP pair;
    and the client's end."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname(), timeout=HANG_GUARD)
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    reader = _Reader()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: asyncio.StreamReaderProtocol(reader), sock=ours)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return _Connection(address, reader, writer), client


def test_bytes_the_loop_took_from_the_socket_but_nobody_read_count_as_unread() -> None:
    async def main() -> list[bool]:
        connection, client = await tcp_connection("127.0.0.1")
        reader = connection.reader
        seen = [_bytes_unread(connection)]
        client.sendall(b"GET / HTTP/1.0\r\n")
        while not reader.arrived:
            await asyncio.sleep(0.01)
        seen.append(_bytes_unread(connection))  # in the reader, none in the socket
        client.sendall(b"\r\n")
        while reader.arrived < 18:  # counted over every chunk that arrives
            await asyncio.sleep(0.01)
        assert await reader.read(5) == b"GET /"
        seen.append(_bytes_unread(connection))  # the rest still in the reader
        await reader.read(100)
        seen.append(_bytes_unread(connection))
        seen.append((reader.arrived, reader.taken) == (18, 18))
        connection.writer.transport.abort()
        seen.append(_bytes_unread(connection))  # closed: nothing
        client.close()
        return seen

    assert asyncio.run(main()) == [False, True, True, False, True, False]


@pytest.mark.parametrize("left_in_process, admitted", [(0, True), (4 << 20, False)])
def test_an_answer_all_in_its_socket_stops_counting_before_its_wait_looks_again(
        left_in_process: int, admitted: bool) -> None:
    """The answering limits read the sockets when they decide: only an answer with bytes
    still in the process counts."""
    async def main() -> tuple[bool, list[str]]:
        server = MetricsServer("127.0.0.1:0", small_registry(), WebConfig(),
                               answering_network=2)
        pairs = [await tcp_connection(a) for a in ("127.0.0.1", "127.0.0.2", "127.0.0.1")]
        first, other, scraper = (c for c, _ in pairs)
        try:
            for connection in (first, other):
                assert server._admit_request(connection)
            first.writer.write(b"x" * max(left_in_process, 1))  # the client reads none
            first.written = True
            while left_in_process == 0 and first.writer.transport.get_write_buffer_size():
                await asyncio.sleep(0.01)
            return (server._admit_request(scraper),
                    [c.address for c in server._requested["127.0.0.0/24"]])
        finally:
            for connection, client in pairs:
                connection.writer.transport.abort()
                client.close()
            server.server_close()

    held_now = ["127.0.0.2", "127.0.0.1"] if admitted else ["127.0.0.1", "127.0.0.2"]
    assert asyncio.run(main()) == (admitted, held_now)


def test_an_answer_not_all_written_is_not_in_its_socket() -> None:
    async def main() -> list[bool]:
        connection, client = await tcp_connection("127.0.0.1")
        seen = [connection.answered()]  # nothing written yet
        connection.written = True
        seen.append(connection.answered())
        connection.writer.write(b"x" * (8 << 20))  # more than the socket takes
        await asyncio.sleep(0)
        seen.append(connection.answered())
        connection.writer.transport.abort()
        client.close()
        return seen

    assert asyncio.run(main()) == [False, True, False]
