"""An attacker for the HTTP endpoint, run as its own program (as another user): holds many
connections that never send a request, and others that trickle a request a byte at a time,
and opens a new one whenever the server closes one.

    python3 idle_clients.py PORT IDLE_SPREAD ADDRESSES CROWD

IDLE_SPREAD idle connections are spread over ADDRESSES loopback source addresses
(127.0.1.1, ...); CROWD connections come from 127.0.0.1 (the scraper's address), every other
one trickling. Prints READY once every connection was opened; on each stdin line prints
`connects=N` (connections opened so far, reopened ones included); exits when stdin closes.
"""

from __future__ import annotations

import selectors
import socket
import sys
import time

TRICKLE = b"GET /metrics HTTP/1.1\r\nX-Slow: "
REOPEN_DELAY = 0.2  # after a close (the attacker reopened 8 a second in all)


def main() -> None:
    port, spread, addresses, crowd = map(int, sys.argv[1:])
    sources = [f"127.0.1.{1 + i % addresses}" for i in range(spread)] + ["127.0.0.1"] * crowd
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    connects = 0
    trickled: dict[socket.socket, int] = {}  # trickling connection -> bytes sent
    reopen: list[tuple[float, str, bool]] = []

    def open_one(source: str, trickle: bool) -> None:
        nonlocal connects
        sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        sock.setblocking(False)
        connects += 1
        selector.register(sock, selectors.EVENT_READ, (source, trickle))
        if trickle:
            trickled[sock] = 0

    for i, source in enumerate(sources):
        open_one(source, source == "127.0.0.1" and i % 2 == 0)
    print("READY", flush=True)
    next_byte = time.monotonic()
    while True:
        for key, _ in selector.select(0.1):
            if key.data == "stdin":
                if not sys.stdin.readline():
                    return
                print(f"connects={connects}", flush=True)
                continue
            try:
                gone = key.fileobj.recv(4096) == b""
            except OSError:
                gone = True
            if gone:
                selector.unregister(key.fileobj)
                trickled.pop(key.fileobj, None)
                key.fileobj.close()
                reopen.append((time.monotonic() + REOPEN_DELAY, *key.data))
        now = time.monotonic()
        for when, source, trickle in [r for r in reopen if r[0] <= now]:
            reopen.remove((when, source, trickle))
            try:
                open_one(source, trickle)
            except OSError:
                reopen.append((now + REOPEN_DELAY, source, trickle))
        if now >= next_byte:  # a byte of a request that never ends, every half second
            next_byte = now + 0.5
            for sock, sent in trickled.items():
                try:
                    sock.send(TRICKLE[sent:sent + 1] or b"X")
                    trickled[sock] = sent + 1
                except OSError:
                    pass


if __name__ == "__main__":
    main()
