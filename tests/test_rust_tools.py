"""Rust tools from PyPI that link jemalloc statically (tikv-jemallocator: `_rjem_`, in a
stripped PIE, no debug info anywhere): ruff and uv, pinned in
tests/rust-tools-requirements.txt and installed by scripts/setup.sh --test. Their counters
are found by the scan of the code (gcc's compare with memory first, an `add` of the counter
from memory), equal to the DWARF offsets of the same jemalloc version built here with the
same options; ruff is read live while `ruff server` works on LSP requests, uv while `uv run`
waits for its child. No arena layout table matches their jemalloc (5.3.0-1-ge13ca99, linked
where the Rust build put it), so their totals are per-thread sums, and say so
(docs/totals.md, "Without DWARF: layout tables").

Not compared exactly: a static `_rjem_` build exports no mallctl (its local symbol is
stripped) and no preloaded shim can interpose on it, so the live test checks that the
counters are read and move with the work, not their values."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctprofd.probe.capture import Capturer, CaptureSettings
from ctprofd.report.snapshot import THREADS
from ctprofd.resolve.layout import TsdLayout, inspect_object, layout_from_dwarf
from support.procs import assert_no_thread_stopped_or_traced

TOOLS = Path("/var/cache/ctprofd/rust-tools-venv")
RUFF = TOOLS / "bin/ruff"
UV = TOOLS / "bin/uv"
RJEM = Path("/var/cache/ctprofd/jemalloc-5.3.0-rjem/lib/libjemalloc.so.2")
REPLY_BUDGET = 60.0  # seconds for ruff to answer one request
# why their totals are per-thread sums: no table for their jemalloc (the layout's arena_missing)
NO_TABLE = r"no arena layout table for jemalloc 5\.3\.0-1-ge13ca99 \(tables: "
pytestmark = pytest.mark.usefixtures("no_debuginfod")  # no debug info anywhere


def tool(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"no {path}: run scripts/setup.sh --test", pytrace=False)
    return path


def ruff() -> Path:
    return tool(RUFF)


def rjem_dwarf() -> TsdLayout:
    """The DWARF offsets of jemalloc 5.3 built here as tikv-jemalloc-sys configures it."""
    with open(RJEM, "rb") as stream:
        facts = inspect_object(stream, str(RJEM), True)
        stream.seek(0)
        layout = layout_from_dwarf(stream, facts, str(RJEM), "embedded")
    assert isinstance(layout, TsdLayout), layout
    return layout


def rjem_pahole() -> tuple[int, int]:
    """The offsets of tsd_s's thread_allocated and thread_deallocated members in the same
    build as pahole (dwarves) reads them: a DWARF reader that is not ctprofd's."""
    out = subprocess.run(["pahole", "-C", "tsd_s", str(RJEM)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    offsets = [re.findall(rf"_{member}; */\* +(\d+) ", out)
               for member in ("thread_allocated", "thread_deallocated")]
    assert all(len(found) == 1 for found in offsets), out
    return int(offsets[0][0]), int(offsets[1][0])


@pytest.mark.parametrize("binary", [RUFF, UV], ids=["ruff", "uv"])
def test_offsets_from_the_code_equal_the_dwarf_of_its_jemalloc(tmp_path, binary):
    result = subprocess.run(
        [sys.executable, "-m", "ctprofd", "offsets", "--json", str(tool(binary)),
         "--debug-dir", str(tmp_path / "empty"), "--cache-dir", ""], capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["source"] == "code: scan of the executable segment"
    dwarf = rjem_dwarf()
    assert (found["allocated_offset"], found["deallocated_offset"]) == (
        dwarf.allocated_offset, dwarf.deallocated_offset)
    assert (found["allocated_offset"], found["deallocated_offset"]) == rjem_pahole()
    assert found["static_block_offset"] is not None  # local-exec, below the thread pointer
    assert found["arena"] is None and re.match(NO_TABLE, found["arena_missing"]), found


def assert_per_thread_totals_and_why(process) -> None:
    """The documented fallback: per-thread sums, with the reason naming the missing table."""
    assert process.totals_source == THREADS
    assert re.match(f"no arena layout: {NO_TABLE}", process.totals_reason), (
        process.totals_reason)


class Lsp:
    """`ruff server` spoken to over its stdin/stdout, each reply awaited within a budget."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([str(ruff()), "server"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=cwd)
        self.buffer = b""
        self.next_id = 0

    def send(self, method: str, params: dict, request: bool = True) -> int | None:
        message = {"jsonrpc": "2.0", "method": method, "params": params}
        if request:
            self.next_id += 1
            message["id"] = self.next_id
        body = json.dumps(message).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()
        return message.get("id")

    def wait_for(self, match) -> dict:
        """The first message `match` accepts."""
        deadline = time.monotonic() + REPLY_BUDGET
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                length = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    self.buffer = rest[length:]
                    message = json.loads(rest[:length])
                    if match(message):
                        return message
                    continue
            left = deadline - time.monotonic()
            assert left > 0, "ruff server did not answer in time"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = self.proc.stdout.raw.read(65536)
                assert chunk, "ruff server closed its output"
                self.buffer += chunk

    def request(self, method: str, params: dict) -> dict:
        sent = self.send(method, params)
        return self.wait_for(lambda m: m.get("id") == sent and "method" not in m)

    def close(self) -> None:
        try:
            self.request("shutdown", {})
            self.send("exit", {}, request=False)
            self.proc.wait(timeout=REPLY_BUDGET)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def big_module(functions: int) -> str:
    return "".join(f"import os\ndef f{i}(a, b):\n    x = {i}\n    return a+b  \n\n"
                   for i in range(functions))


def test_ruff_server_counters_move_as_it_works(tmp_path):
    lsp = Lsp(tmp_path)
    try:
        lsp.request("initialize", {"processId": None, "rootUri": tmp_path.as_uri(),
                                   "capabilities": {}})
        lsp.send("initialized", {}, request=False)
        engine = Capturer(CaptureSettings(debug_dirs=()))
        before = engine.capture(pids=[lsp.proc.pid])
        assert before.summary.failed == 0, before.failures
        [idle] = before.processes
        uri = (tmp_path / "big.py").as_uri()
        lsp.send("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": 1, "text": big_module(3000)}},
            request=False)
        diagnostics = lsp.wait_for(lambda m: m.get("method") ==
                                   "textDocument/publishDiagnostics"
                                   and m["params"]["uri"] == uri)
        assert len(diagnostics["params"]["diagnostics"]) >= 3000  # F401 per import, at least
        after = engine.capture(pids=[lsp.proc.pid])
        assert after.summary.failed == 0, after.failures
        [worked] = after.processes
        [layout] = engine.cache.layouts()
        assert layout.source == "code: scan of the executable segment"
        # the words read are the checked counters (the rjem build's DWARF), not any growing word
        dwarf = rjem_dwarf()
        assert (layout.allocated_offset, layout.deallocated_offset) == (
            dwarf.allocated_offset, dwarf.deallocated_offset)
        # linting 3000 functions allocates at least the 100 kB of text it was sent
        assert worked.allocated_bytes - idle.allocated_bytes > len(big_module(3000))
        assert worked.deallocated_bytes > idle.deallocated_bytes
        assert 0 < worked.allocated_bytes - worked.deallocated_bytes
        assert_per_thread_totals_and_why(worked)
        assert_no_thread_stopped_or_traced(lsp.proc.pid)
    finally:
        lsp.close()


def test_uv_run_is_read_with_per_thread_totals(spawn_process, tmp_path):
    """uv stays the parent of what `uv run` starts (offline, no project, no cache): read
    while its child waits, through the code scan, with per-thread totals that say why."""
    uv = spawn_process([tool(UV), "run", "--offline", "--no-project", "--no-config",
                        "--no-cache", "--python", "/usr/bin/python3", "python3", "-c",
                        "import sys; print('READY', flush=True); sys.stdin.readline()"],
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                       timeout=REPLY_BUDGET)
    engine = Capturer(CaptureSettings(debug_dirs=()))
    try:
        snapshot = engine.capture(pids=[uv.pid])
    finally:
        engine.close()
    assert snapshot.summary.failed == 0, snapshot.failures
    [process] = snapshot.processes
    assert process.allocated_bytes > 0 and process.threads
    assert [layout.source for layout in engine.cache.layouts()] == [
        "code: scan of the executable segment"]
    assert_per_thread_totals_and_why(process)
    assert_no_thread_stopped_or_traced(uv.pid)
