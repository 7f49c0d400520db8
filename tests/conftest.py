"""Shared pytest fixtures: the debug jemalloc, the built fixture programs, spawners.

    jemalloc_dir     (session) Path of the debug jemalloc build; fails, never skips
    fixture_bins     (session) support.build.FixtureBins: every built program/variant
    spawn_fixture    factory (binary, nthreads, *, prefix=(), timeout=60, **popen_kw) -> Fixture
    spawn_process    factory (argv, *, prefix=(), ready="READY", timeout=60, **popen_kw) -> Spawned
    no_debuginfod    DEBUGINFOD_URLS unset for the test (tests of binaries with no debug info)

Everything the spawners start is SIGKILLed at the test's teardown. Helpers for
tests (import them): support.procs.assert_no_thread_stopped_or_traced,
expected_worker_counters, DROP_PTRACE_PREFIX; support.elf for ELF checks.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:  # for `import support` under any import mode
    sys.path.insert(0, _TESTS_DIR)

from support.build import FixtureBins, Variant, build_all, default_jemalloc_dir, jemalloc_dir_problem  # noqa: E402
from support.procs import DEFAULT_TIMEOUT, READY, Fixture, Spawned  # noqa: E402


@pytest.fixture(scope="session")
def jemalloc_dir() -> Path:
    """The debug jemalloc build ($CTPROFD_JEMALLOC_DIR or /var/cache/ctprofd/jemalloc-5.3.0)."""
    path = default_jemalloc_dir()
    problem = jemalloc_dir_problem(path)
    if problem:
        pytest.fail(problem, pytrace=False)
    return path


@pytest.fixture(scope="session")
def fixture_bins(jemalloc_dir: Path) -> Iterator[FixtureBins]:
    """All fixture programs, built once into a world-readable temp dir.

    Not under pytest's tmp_path (mode 0700): tests may run fixtures as another
    user. Set CTPROFD_KEEP_FIXTURES=1 to keep the dir after the session.
    """
    root = Path(tempfile.mkdtemp(prefix="ctprofd-fixtures-"))
    os.chmod(root, 0o755)
    try:
        yield build_all(root, jemalloc_dir)
    finally:
        if not os.environ.get("CTPROFD_KEEP_FIXTURES"):
            shutil.rmtree(root, ignore_errors=True)


def _binary_path(binary: Variant | str | os.PathLike[str]) -> str:
    return str(binary.binary if isinstance(binary, Variant) else binary)


@pytest.fixture
def spawn_fixture() -> Iterator[Callable[..., Fixture]]:
    """Factory running alloc_threads: spawn(binary, nthreads, *, prefix=(), timeout=60, **popen_kw).

    `binary` is a Variant (e.g. fixture_bins["static"]) or a path. `prefix` is a
    command put before it (e.g. DROP_PTRACE_PREFIX, or ["strace", "-f", ...]).
    Returns once the program printed READY (FixtureError after `timeout`).
    """
    spawned: list[Fixture] = []

    def spawn(binary: Variant | str | os.PathLike[str], nthreads: int, *, prefix: Sequence[str] = (),
              timeout: float = DEFAULT_TIMEOUT, **popen_kw: object) -> Fixture:
        fixture = Fixture(_binary_path(binary), nthreads, prefix=prefix, timeout=timeout, **popen_kw)
        spawned.append(fixture)
        return fixture

    yield spawn
    for fixture in spawned:
        fixture.kill()


@pytest.fixture
def spawn_process() -> Iterator[Callable[..., Spawned]]:
    """Factory for other programs (churn, alloc_loop, ...):
    spawn(argv, *, prefix=(), ready="READY", timeout=60, **popen_kw).

    Waits for the line `ready` unless it is None. `proc.pid` is the process
    started (so `prefix` should exec).
    """
    spawned: list[Spawned] = []

    def spawn(argv: Sequence[str | os.PathLike[str]], *, prefix: Sequence[str] = (),
              ready: str | None = READY, timeout: float = DEFAULT_TIMEOUT, **popen_kw: object) -> Spawned:
        process = Spawned(argv, prefix=prefix, **popen_kw)
        spawned.append(process)
        if ready is not None:
            process.wait_for(ready, timeout)
        return process

    yield spawn
    for process in spawned:
        process.kill()


@pytest.fixture
def no_debuginfod(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEBUGINFOD_URLS unset for the test: a Capturer asks the servers it names, and so do
    the ctprofd commands a test starts (they inherit the environment)."""
    monkeypatch.delenv("DEBUGINFOD_URLS", raising=False)
