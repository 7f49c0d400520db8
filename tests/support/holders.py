"""Another tracer: a python3 script, under a name of the test's choosing (`gdb`, `ctprofd`),
that keeps one thread seized (traced, left running) until it is sent a line.

    holders   fixture: hold(name, tid) -> Spawned, each holder killed at teardown
    hold_script(directory, name) -> the script's path
    let_go(holder)   the holder exits, letting the thread go
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.procs import Spawned

HOLDER = """#!{python}
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
tid = int(sys.argv[1])
if libc.ptrace(0x4206, tid, None, None) != 0:  # PTRACE_SEIZE: traced, left running
    sys.exit(f"PTRACE_SEIZE {{tid}}: errno {{ctypes.get_errno()}}")
print("HELD", flush=True)
sys.stdin.readline()  # held until told; exiting lets it go
"""
EXIT_WAIT = 60.0  # seconds: a bound that ends a hang, never a timing claim


def hold_script(directory: Path, name: str) -> Path:
    """The holder script written as `directory/name`, executable."""
    script = directory / name
    script.write_text(HOLDER.format(python=sys.executable))
    script.chmod(0o755)
    return script


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[Callable[[str, int], Spawned]]:
    started: list[Spawned] = []

    def hold(name: str, tid: int) -> Spawned:
        """A process whose script is called `name` that keeps `tid` seized until sent a line."""
        holder = Spawned([hold_script(tmp_path, name), str(tid)])
        started.append(holder)
        holder.wait_for("HELD")
        return holder
    yield hold
    for holder in started:
        holder.kill()


def let_go(holder: Spawned) -> None:
    """Tell the holder to exit (letting its thread go) and wait until it has."""
    holder.send("go")
    assert holder.proc.wait(timeout=EXIT_WAIT) == 0
