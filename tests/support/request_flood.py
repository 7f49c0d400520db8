"""An attacker for the HTTP endpoint, run as its own program (as another user): connections
that each send a whole request, and reopen as soon as the server closes them.

    python3 request_flood.py PORT unread ADDRESSES PER_ADDRESS
    python3 request_flood.py PORT bad-auth ADDRESSES PER_ADDRESS AUTHORIZATION

`unread`: GET /metrics and never read the answer (a closed connection is noticed by
EPOLLRDHUP, without reading). `bad-auth`: GET /metrics with the Authorization header given
(a wrong password), reading the answer. Sources are 127.0.0.2, 127.0.0.3, ... (ADDRESSES of
them, PER_ADDRESS connections each). Prints READY once every connection was opened; on each
stdin line prints `connects=N` (connections opened so far); exits when stdin closes.
"""

from __future__ import annotations

import resource
import select
import socket
import sys


def main() -> None:
    port, mode, addresses, per_address = int(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:5])
    header = f"Authorization: {sys.argv[5]}\r\n" if mode == "bad-auth" else ""
    request = f"GET /metrics HTTP/1.0\r\n{header}\r\n".encode()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    poll = select.epoll()
    poll.register(sys.stdin.fileno(), select.EPOLLIN)
    sockets: dict[int, tuple[socket.socket, str]] = {}
    closed: list[str] = []  # sources whose connection is to be opened again
    connects = 0

    def open_one(source: str) -> None:
        """Open a connection from `source` and send the request (tried again later if
        that fails)."""
        nonlocal connects
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((source, 0))
        sock.settimeout(1.0)  # a full accept queue must not stall every other connection
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
        except OSError:
            sock.close()
            closed.append(source)
            return
        connects += 1
        sock.setblocking(False)
        events = select.EPOLLRDHUP if mode == "unread" else select.EPOLLIN | select.EPOLLRDHUP
        poll.register(sock.fileno(), events)
        sockets[sock.fileno()] = (sock, source)

    for source in [f"127.0.0.{2 + a}" for a in range(addresses) for _ in range(per_address)]:
        open_one(source)
    print("READY", flush=True)
    while True:
        for fd, events in poll.poll(0.05):
            if fd == sys.stdin.fileno():
                if not sys.stdin.readline():
                    return
                print(f"connects={connects}", flush=True)
                continue
            sock, source = sockets[fd]
            if mode == "bad-auth" and not events & select.EPOLLRDHUP:
                try:
                    if sock.recv(65536):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
            poll.unregister(fd)
            del sockets[fd]
            sock.close()
            closed.append(source)
        reopen = closed[:]
        closed.clear()
        for source in reopen:
            open_one(source)


if __name__ == "__main__":
    main()
