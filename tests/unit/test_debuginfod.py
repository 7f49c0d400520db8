"""The debuginfod client (resolve.debuginfod) against real HTTP servers on loopback
(http.server in a thread): what it asks, where a download goes (a hidden part file beside
its target, the target only once whole), the size cap (exactly at it, one byte over, over
it in a later chunk, and an endless body), the timeout, and which failures are remembered
for whom and for how long: a server's answer for one build-id, a server down or too slow
for every build-id; and what `why_not` says of each."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctprofd.resolve.debuginfod import DebuginfodClient, describe_error, urls_from_environment
from support.debuginfod_server import DebuginfodServer

BUILD_ID = "ab" * 20
OTHER_ID = "cd" * 20
WAIT = 30.0  # a hang guard, never a timing claim


@pytest.fixture
def servers() -> Iterator[list[DebuginfodServer]]:
    """Two servers."""
    running = [DebuginfodServer(), DebuginfodServer()]
    yield running
    for server in running:
        server.close()


@pytest.fixture
def refused_url() -> str:
    """The URL of a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that takes connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def downloads(directory: Path) -> list[str]:
    return sorted(os.listdir(directory / "debuginfod"))


def test_each_servers_url_is_taken_without_its_trailing_slashes(tmp_path: Path):
    client = DebuginfodClient(("http://a/X//", "https://b"), str(tmp_path))
    assert client.urls == ("http://a/X", "https://b")
    assert repr(client) == "DebuginfodClient(http://a/X https://b)"


def test_the_defaults_five_seconds_a_gibibyte_and_five_minutes_between_asks(tmp_path: Path):
    client = DebuginfodClient(("http://a/",), str(tmp_path))
    assert (client.timeout, client.max_bytes, client.failure_ttl) == (5.0, 1 << 30, 300.0)


def test_a_debug_file_is_downloaded_once_beside_no_part_file(servers: list[DebuginfodServer],
                                                              tmp_path: Path):
    server = servers[0]
    server.files[BUILD_ID] = b"debug info"
    client = DebuginfodClient((server.url + "//",), str(tmp_path))  # trailing slashes dropped
    target = str(tmp_path / "debuginfod" / f"{BUILD_ID}.debug")
    assert client.fetch(BUILD_ID) == (target, f"debuginfod {server.url}")
    assert Path(target).read_bytes() == b"debug info"
    assert client.fetch(BUILD_ID) == (target, f"debuginfod {server.url}")  # kept: not asked
    assert server.asked == [f"/buildid/{BUILD_ID}/debuginfo"]
    assert downloads(tmp_path) == [f"{BUILD_ID}.debug"]
    assert repr(client) == f"DebuginfodClient({server.url})"


def test_the_bytes_go_to_a_hidden_part_file_beside_the_target_until_whole(
        servers: list[DebuginfodServer], tmp_path: Path):
    server = servers[0]
    server.files[BUILD_ID] = b"0123456789" * 100
    server.hold.add(BUILD_ID)
    client = DebuginfodClient((server.url,), str(tmp_path))
    (tmp_path / "debuginfod").mkdir()
    results: list[tuple[str, str] | None] = []
    fetching = threading.Thread(target=lambda: results.append(client.fetch(BUILD_ID)))
    fetching.start()
    try:
        for _ in range(int(WAIT * 100)):
            parts = [name for name in downloads(tmp_path) if name.startswith(".part-")]
            if parts:
                break
            threading.Event().wait(0.01)
        assert len(parts) == 1 and downloads(tmp_path) == parts  # no target yet
    finally:
        server.release.set()
        fetching.join(WAIT)
    assert results == [(str(tmp_path / "debuginfod" / f"{BUILD_ID}.debug"),
                        f"debuginfod {server.url}")]
    assert downloads(tmp_path) == [f"{BUILD_ID}.debug"]


def test_without_a_cache_dir_downloads_go_to_a_temporary_directory_close_removes(
        servers: list[DebuginfodServer]):
    server = servers[0]
    server.files[BUILD_ID] = b"x"
    client = DebuginfodClient((server.url,), None)
    found = client.fetch(BUILD_ID)
    assert found is not None
    scratch = Path(found[0]).parents[1]
    assert scratch.parent == Path(tempfile.gettempdir())
    assert scratch.name.startswith("ctprofd-debuginfod-") and Path(found[0]).read_bytes() == b"x"
    assert client.fetch(BUILD_ID) == found  # the same directory while open
    client.close()
    assert not scratch.exists()
    client.close()  # twice: nothing left to remove
    again = client.fetch(BUILD_ID)  # a new temporary directory after close
    assert again is not None and Path(again[0]).parents[1] != scratch
    client.close()
    assert not Path(again[0]).exists()


def test_a_download_directory_that_cannot_be_made_is_said(servers: list[DebuginfodServer], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture):
    (tmp_path / "file").write_text("")
    client = DebuginfodClient((servers[0].url,), str(tmp_path / "file"))
    with caplog.at_level(logging.WARNING, logger="ctprofd.resolve.debuginfod"):
        assert client.fetch(BUILD_ID) is None
    assert [r.getMessage() for r in caplog.records] == [
        "debuginfod: cannot create download directory: Not a directory"]
    assert servers[0].asked == []


def test_no_servers_or_an_implausible_build_id_asks_nothing(servers: list[DebuginfodServer],
                                                             tmp_path: Path):
    server = servers[0]
    assert DebuginfodClient((), str(tmp_path)).fetch(BUILD_ID) is None
    client = DebuginfodClient((server.url,), str(tmp_path))
    for build_id in ("ab" * 3 + "a", "AB" * 20, "ab" * 64 + "0", "../" + BUILD_ID, ""):
        assert client.fetch(build_id) is None
    assert server.asked == [] and not (tmp_path / "debuginfod").exists()
    for build_id in ("ab" * 4, "ab" * 64):  # the shortest and longest taken
        assert client.fetch(build_id) is None
    assert server.asked == [f"/buildid/{'ab' * 4}/debuginfo", f"/buildid/{'ab' * 64}/debuginfo"]


def test_a_build_id_a_server_lacks_is_not_asked_of_it_again_but_others_are(
        servers: list[DebuginfodServer], tmp_path: Path):
    first, second = servers
    second.files[OTHER_ID] = b"other"
    client = DebuginfodClient((first.url, second.url), str(tmp_path))
    assert client.fetch(BUILD_ID) is None
    assert client.why_not(BUILD_ID) == f"debuginfod: not on {first.url}; not on {second.url}"
    assert client.fetch(BUILD_ID) is None  # remembered: neither is asked again
    assert client.fetch(OTHER_ID) == (str(tmp_path / "debuginfod" / f"{OTHER_ID}.debug"),
                                      f"debuginfod {second.url}")
    assert first.asked == [f"/buildid/{BUILD_ID}/debuginfo", f"/buildid/{OTHER_ID}/debuginfo"]
    assert second.asked == [f"/buildid/{BUILD_ID}/debuginfo", f"/buildid/{OTHER_ID}/debuginfo"]


def test_an_error_status_is_said_with_its_code(servers: list[DebuginfodServer], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture):
    server = servers[0]
    server.codes[BUILD_ID] = 500
    client = DebuginfodClient((server.url,), str(tmp_path))
    with caplog.at_level(logging.DEBUG, logger="ctprofd.resolve.debuginfod"):
        assert client.fetch(BUILD_ID) is None
    assert client.why_not(BUILD_ID) == f"debuginfod: {server.url}: HTTP 500"
    assert [r.getMessage() for r in caplog.records] == [
        f"debuginfod {server.url}: {BUILD_ID}: HTTP 500"]
    assert client.why_not(OTHER_ID) == f"debuginfod: not asked: {server.url}"


def test_a_remembered_failure_is_forgotten_after_its_time(servers: list[DebuginfodServer],
                                                          tmp_path: Path, refused_url: str):
    server = servers[0]
    client = DebuginfodClient((refused_url, server.url), str(tmp_path), failure_ttl=0.0)
    assert client.fetch(BUILD_ID) is None
    server.files[BUILD_ID] = b"now"
    assert client.fetch(BUILD_ID) is not None  # both failures over: both asked again
    assert server.asked == [f"/buildid/{BUILD_ID}/debuginfo"] * 2


def test_a_server_down_is_not_asked_again_for_any_build_id_and_the_next_one_is(
        servers: list[DebuginfodServer], tmp_path: Path, refused_url: str,
        caplog: pytest.LogCaptureFixture):
    server = servers[0]
    server.files[OTHER_ID] = b"other"
    client = DebuginfodClient((refused_url, server.url), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ctprofd.resolve.debuginfod"):
        assert client.fetch(BUILD_ID) is None
    assert client.why_not(BUILD_ID) == (f"debuginfod: {refused_url}: cannot connect "
                                        f"(Connection refused); not on {server.url}")
    assert [r.getMessage() for r in caplog.records] == [
        f"debuginfod {refused_url}: cannot connect (Connection refused); not asking it again "
        "for 300 s"]
    assert client.fetch(OTHER_ID) is not None
    assert client.why_not("ef" * 20) == (f"debuginfod: {refused_url}: cannot connect "
                                         f"(Connection refused); not asked: {server.url}")
    assert len(caplog.records) == 1  # the server down was not asked for OTHER_ID


def test_a_server_that_does_not_answer_times_out(silent_url: str, tmp_path: Path):
    client = DebuginfodClient((silent_url,), str(tmp_path), timeout=0.05)
    assert client.fetch(BUILD_ID) is None
    assert client.why_not(BUILD_ID) == f"debuginfod: {silent_url}: timed out"
    assert downloads(tmp_path) == []  # the part file removed


@pytest.mark.parametrize("size, cap, taken", [
    (100, 100, True), (101, 100, False),
    ((1 << 20) + 11, (1 << 20) + 10, False),  # over the cap in its second chunk
    ((1 << 20) + 10, (1 << 20) + 10, True)])
def test_the_size_cap_from_its_last_byte_taken(servers: list[DebuginfodServer], tmp_path: Path,
                                               size: int, cap: int, taken: bool):
    server = servers[0]
    server.files[BUILD_ID] = b"d" * size
    client = DebuginfodClient((server.url,), str(tmp_path), max_bytes=cap)
    found = client.fetch(BUILD_ID)
    if taken:
        assert found is not None and Path(found[0]).stat().st_size == size
    else:
        assert found is None
        assert client.why_not(BUILD_ID) == f"debuginfod: {server.url}: debug file over {cap} bytes"
        assert downloads(tmp_path) == []


def test_an_endless_body_is_cut_off_at_the_cap(servers: list[DebuginfodServer], tmp_path: Path):
    server = servers[0]
    server.endless.add(BUILD_ID)
    client = DebuginfodClient((server.url,), str(tmp_path), max_bytes=1 << 20)
    assert client.fetch(BUILD_ID) is None
    assert client.why_not(BUILD_ID) == (f"debuginfod: {server.url}: debug file over "
                                        f"{1 << 20} bytes")
    assert downloads(tmp_path) == []


def test_network_failures_as_an_operator_reads_them():
    import urllib.error
    assert describe_error(urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))) \
        == "cannot resolve the host name (Name or service not known)"
    assert describe_error(urllib.error.URLError(TimeoutError())) == "timed out"
    assert describe_error(socket.timeout("timed out")) == "timed out"
    assert describe_error(ConnectionResetError(104, "Connection reset by peer")) == (
        "cannot connect (Connection reset by peer)")
    assert describe_error(urllib.error.URLError(ConnectionAbortedError())) == (
        "cannot connect (ConnectionAbortedError)")
    assert describe_error(OSError(113, "No route to host")) == (
        "connection failed (No route to host)")
    assert describe_error(urllib.error.URLError(OSError("no strerror"))) == (
        "connection failed (no strerror)")
    assert describe_error(urllib.error.URLError("unknown url type: ftp")) == (
        "unknown url type: ftp")
    assert describe_error(ValueError("debug file over 5 bytes")) == "debug file over 5 bytes"


def test_the_servers_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEBUGINFOD_URLS", " http://a/  https://b\thttp://c ")
    assert urls_from_environment() == ("http://a/", "https://b", "http://c")
    monkeypatch.delenv("DEBUGINFOD_URLS")
    assert urls_from_environment() == ()
