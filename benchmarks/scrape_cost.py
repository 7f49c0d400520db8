"""What a scrape costs, and whether attackers can crowd scrapes out.

A MetricsServer (in a process of its own) serves SERIES series shaped like ctprofd's
(labels pid, comm, unit). One client scrapes /metrics over loopback, one request at a time:

  baseline   the per-scrape render that ctprofd did before (the generation changes on every
             scrape, so every scrape renders)
  cached     bodies rendered once per snapshot (a new snapshot is published every second and
             rendered at once, as the daemon does after each snapshot)

then, with the cached server, two attacks from another process while the client keeps
scraping from 127.0.0.1:

  unread     64 loopback addresses (127.0.0.2-65) x 64 connections, each sending a whole
             request and never reading the answer, reconnecting when closed
  bad-auth   64 connections from 127.0.0.2 sending wrong basic-auth passwords (bcrypt cost
             10), reconnecting after each answer; the scraper's password is right

Reported: scrape latency p50/p99, and the share of scrapes answered within 1 s.

Run: .venv/bin/python -m benchmarks.scrape_cost [--quick]
"""

from __future__ import annotations

import base64
import multiprocessing
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .report import log, machine, parser, write_result
from .stats import distribution

SERIES = 10000
PASSWORD = b"scraper-password"
FLOOD = Path(__file__).resolve().parents[1] / "tests" / "support" / "request_flood.py"


def _serve(port_out, mode: str, series: int, hashed: bytes | None) -> None:
    """The server process: `mode` baseline or cached."""
    from prometheus_client import CollectorRegistry, Gauge

    from ctprofd.export.server import MetricsServer, WebConfig, raise_fd_limit

    raise_fd_limit()
    registry = CollectorRegistry()
    gauge = Gauge("ctprofd_live_bytes", "Live bytes.", ["pid", "comm", "unit"],
                  registry=registry)
    for i in range(series):
        gauge.labels(str(100000 + i), f"worker-{i % 97}", f"svc-{i % 13}.service").set(i * 4096)
    state = {"generation": object()}
    if mode == "baseline":
        generation = lambda: object()  # noqa: E731 - a new one every scrape: render every scrape
    else:
        generation = lambda: state["generation"]  # noqa: E731
    web = WebConfig(users={"prometheus": hashed}) if hashed else WebConfig()
    server = MetricsServer("127.0.0.1:0", registry, web, generation=generation)

    def snapshots() -> None:  # a snapshot published every second, as the daemon does
        while True:
            time.sleep(1.0)
            state["generation"] = object()
            server.prerender()

    if mode == "cached":
        threading.Thread(target=snapshots, daemon=True).start()
    port_out.send(server.server_port)
    server.serve_forever()


def _attack(kind: str, port: int, password: bytes) -> subprocess.Popen:
    """The attacker: tests/support/request_flood.py (what tests/test_attacks.py runs),
    started in a process of its own; it prints READY once every connection is open."""
    wrong = "Basic " + base64.b64encode(b"prometheus:" + password).decode()
    argv = ([str(port), "unread", "64", "64"] if kind == "unread"
            else [str(port), "bad-auth", "1", "64", wrong])
    attacker = subprocess.Popen([sys.executable, str(FLOOD), *argv], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    assert attacker.stdout is not None and attacker.stdout.readline().strip() == "READY"
    return attacker


def _scrape(port: int, auth: bool) -> float | None:
    """Seconds to a whole answer, or None if it failed."""
    header = (f"Authorization: Basic {base64.b64encode(b'prometheus:' + PASSWORD).decode()}"
              "\r\n" if auth else "")
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET /metrics HTTP/1.0\r\nAccept-Encoding: gzip\r\n{header}\r\n"
                      .encode())
            data = b""
            while chunk := s.recv(1 << 20):
                data += chunk
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.0 200"):
        return None
    return time.perf_counter() - started


def _phase(name: str, mode: str, scrapes: int, series: int, attack: str | None = None,
           duration: float = 0.0) -> dict:
    import bcrypt
    hashed = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(10)) if attack == "bad-auth" else None
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(False)
    server = ctx.Process(target=_serve, args=(send, mode, series, hashed), daemon=True)
    server.start()
    port = receive.recv()
    attacker = None
    try:
        for _ in range(3):  # warm-up: the first render
            _scrape(port, hashed is not None)
        if attack:
            attacker = _attack(attack, port, b"wrong")
        latencies, failed = [], 0
        deadline = time.monotonic() + duration
        while len(latencies) + failed < scrapes or time.monotonic() < deadline:
            took = _scrape(port, hashed is not None)
            if took is None:
                failed += 1
            else:
                latencies.append(took)
            if attack:
                time.sleep(0.1)
    finally:
        if attacker:
            attacker.kill()
            attacker.wait()
        server.kill()
    total = len(latencies) + failed
    within = sum(1 for t in latencies if t <= 1.0)
    result = {"scrapes": total, "failed": failed, "within_1s": within,
              "within_1s_share": round(within / total, 4),
              "latency_ms": distribution([t * 1000 for t in latencies])}
    log(f"{name}: {result}")
    return result


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    started, host = time.time(), machine()
    series = 500 if args.quick else SERIES
    scrapes = 20 if args.quick else 200
    attack_seconds = 5 if args.quick else 30
    results = {"series": series,
               "baseline": _phase("baseline", "baseline", scrapes, series),
               "cached": _phase("cached", "cached", scrapes, series)}
    results["p50_ratio"] = round(results["cached"]["latency_ms"]["p50"]
                                 / results["baseline"]["latency_ms"]["p50"], 4)
    for attack in ("unread", "bad-auth"):
        results[attack] = _phase(attack, "cached", 10, series, attack, attack_seconds)
    path = write_result("scrape_cost", args, started, host, results)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
