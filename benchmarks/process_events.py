"""What listening to the kernel's process events costs the host's other processes: the
kernel builds a message for every fork, exec and exit while any process listens, and runs
each listener's socket filter on it. Measured where it is largest, on programs that do
nothing but that, in rounds alternating without and with a listener (`ProcessEvents`, as
the daemon opens it) in this process:

  fork_exit  a Python process that forks children that exit at once, and reaps them
             (os.fork / os._exit / os.waitpid), FORKS times: wall per fork
  spawn      a shell that runs /bin/true SPAWNS times (fork, exec, exit): wall per spawn

Per round, the with/without ratio of each; the medians and their spread are the result.
Other listeners on the host (another ctprofd) make the kernel build the messages in both
arms: their count is recorded from /proc/net/netlink before and after.

Run: .venv/bin/python -m benchmarks.process_events [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import time

from .report import log, machine, parser, write_result
from .stats import distribution

from ctprofd.procfs.events import NETLINK_CONNECTOR, ProcessEvents  # noqa: E402

FORK_EXIT = """
import os, sys, time
n = int(sys.argv[1])
start = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(time.perf_counter() - start)
"""


def fork_exit(forks: int) -> float:
    """Seconds per fork of a child that exits at once, measured inside the forking process."""
    out = subprocess.run([sys.executable, "-c", FORK_EXIT, str(forks)], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    return float(out) / forks


def spawn(spawns: int) -> float:
    """Seconds per /bin/true run by a shell loop."""
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", f"i=0; while [ $i -lt {spawns} ]; do /bin/true; "
                    "i=$((i+1)); done"], check=True, timeout=600)
    return (time.perf_counter() - start) / spawns


def connector_sockets() -> int:
    """Netlink connector sockets on the host (listeners of the proc connector among them)."""
    with open("/proc/net/netlink") as f:
        next(f)
        return sum(1 for line in f if int(line.split()[1]) == NETLINK_CONNECTOR)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="rounds of each arm (default 20; --quick 2)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 20)
    forks, spawns = (200, 50) if args.quick else (3000, 600)
    started, host = time.time(), machine()
    results: dict = {"forks_per_round": forks, "spawns_per_round": spawns, "rounds": rounds,
                     "connector_sockets_before": connector_sockets()}
    costs: dict[str, dict[str, list[float]]] = {
        name: {"without": [], "with": []} for name in ("fork_exit", "spawn")}
    for i in range(rounds):
        for arm in (("without", "with") if i % 2 == 0 else ("with", "without")):
            events = ProcessEvents() if arm == "with" else None
            if events is not None and events.error is not None:
                raise SystemExit(f"no process events here: {events.error}")
            try:
                costs["fork_exit"][arm].append(fork_exit(forks))
                costs["spawn"][arm].append(spawn(spawns))
                if events is not None:
                    events.changed()  # read what came, as the daemon would
            finally:
                if events is not None:
                    events.close()
        log(f"round {i + 1}/{rounds}: " + ", ".join(
            f"{name} {c['without'][-1] * 1e6:.1f} / {c['with'][-1] * 1e6:.1f} us"
            for name, c in costs.items()))
    for name, arms in costs.items():
        ratios = [w / o for w, o in zip(arms["with"], arms["without"])]
        results[name] = {"without_seconds": distribution(arms["without"]),
                         "with_seconds": distribution(arms["with"]),
                         "ratio_with_to_without": distribution(ratios, digits=4)}
        log(f"{name}: ratio with/without p50 {results[name]['ratio_with_to_without']['p50']}")
    results["connector_sockets_after"] = connector_sockets()
    write_result("process_events", args, started, host, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
