"""Where an object's external debug file is looked for (resolve.debuginfo), on real files:
gdb's order, what each place is trusted for, and what the search says about the places it
found nothing in or refused. A real debuginfod-protocol server on loopback for the last
place."""

from __future__ import annotations

import http.server
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctprofd.resolve.debuginfo import (Candidate, DebugSearch, ObjectDir, build_id_path,
                                       debug_files, owner_refusal, stream_crc32)
from ctprofd.resolve.debuginfod import DebuginfodClient

BUILD_ID = "ab" + "cd" * 19
LINK = ("libx.so.debug", 0x1234ABCD)
USER = 1000


def put(path: Path, data: bytes = b"debug", uid: int = 0, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def search_all(build_id: str | None, link: tuple[str, int] | None, dirs: list[ObjectDir],
               search: DebugSearch, owner: int = 0) -> tuple[list[Candidate], list[str]]:
    tried: list[str] = []
    found = list(debug_files(build_id, link, dirs, search, tried, owner))
    for candidate in found:
        candidate.stream.close()
    return found, tried


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


def test_the_build_id_path_splits_off_the_first_byte():
    assert build_id_path("/usr/lib/debug", BUILD_ID) == (
        f"/usr/lib/debug/.build-id/ab/{'cd' * 19}.debug")


def test_the_crc_covers_the_whole_file_in_chunks_and_leaves_the_offset(tree: Path):
    data = os.urandom((5 << 19) + 7)  # 2.5 MiB and a bit: three reads of 1 MiB
    path = put(tree / "f", data)
    with path.open("rb") as stream:
        stream.seek(100)
        assert stream_crc32(stream) == zlib.crc32(data)
        assert stream.tell() == 100
    assert stream_crc32(put(tree / "empty", b"").open("rb")) == 0


@pytest.mark.parametrize("uid, mode, owner, why", [
    (0, 0o644, USER, None),  # root's
    (USER, 0o600, USER, None),  # the object owner's
    (USER, 0o644, 0, "owned by uid 1000, neither the object's owner (uid 0) nor root"),
    (2000, 0o644, USER, "owned by uid 2000, neither the object's owner (uid 1000) nor root"),
    (0, 0o664, USER, "writable by group (mode 664)"),
    (0, 0o646, USER, "writable by others (mode 646)"),
    (0, 0o666, USER, "writable by group (mode 666)"),
    (0, 0o647, USER, "writable by others (mode 647)"),  # others' execute bit is no group's
    (0, 0o4755, USER, None),
])
def test_a_file_beside_an_object_vouches_only_when_its_owners_and_not_writable_by_others(
        tree: Path, uid: int, mode: int, owner: int, why: str | None):
    st = put(tree / "f", uid=uid, mode=mode).stat()
    assert owner_refusal(st, owner) == why


def test_every_place_in_gdbs_order_with_the_debuglinks_crc_and_the_view(tree: Path):
    first, second = tree / "debug1", tree / "debug2"
    objdir = tree / "opt" / "lib"
    put(Path(build_id_path(str(second), BUILD_ID)))
    beside = put(objdir / LINK[0])
    sub = put(objdir / ".debug" / LINK[0])
    operator = put(first / str(objdir).lstrip("/") / LINK[0])
    first.mkdir(exist_ok=True)
    found, tried = search_all(BUILD_ID, LINK, [ObjectDir("/", str(objdir), "view")],
                              DebugSearch((str(first), str(second))))
    assert [(c.source, c.crc, c.view) for c in found] == [
        (f"build-id {build_id_path(str(second), BUILD_ID)}", None, ""),
        (f"debuglink {beside}", LINK[1], "view"),
        (f"debuglink {sub}", LINK[1], "view"),
        (f"debuglink {operator}", LINK[1], ""),
    ]
    assert tried == [f"no .build-id/ab/{'cd' * 19}.debug"]  # a missing file is no refusal


def test_each_object_dir_is_searched_beneath_its_own_root(tree: Path):
    root = tree / "container"
    put(root / "lib" / LINK[0])
    put(tree / "lib" / LINK[0])  # the same path outside that root: not the container's
    found, _ = search_all(None, LINK, [ObjectDir(str(root), "/lib", "pid 7")],
                          DebugSearch(()))
    assert [(c.source, c.view) for c in found] == [(f"debuglink /lib/{LINK[0]}", "pid 7")]


def test_the_operators_copy_of_an_object_dir_is_under_each_debug_dir(tree: Path):
    debug = tree / "debug"
    operator = put(debug / "Xopt" / "lib" / LINK[0])  # for /Xopt/lib, which need not exist
    found, _ = search_all(None, LINK, [ObjectDir("/", "/Xopt/lib")], DebugSearch((str(debug),)))
    assert [c.source for c in found] == [f"debuglink {operator}"]


def test_nothing_found_says_each_missing_place(tree: Path):
    found, tried = search_all(BUILD_ID, LINK, [ObjectDir("/", str(tree))],
                              DebugSearch((str(tree / "debug"),)))
    assert found == []
    assert tried == [f"no .build-id/ab/{'cd' * 19}.debug", f"debuglink {LINK[0]} not found"]
    found, tried = search_all(None, None, [ObjectDir("/", str(tree))],
                              DebugSearch((str(tree),)))
    assert (found, tried) == ([], ["no .gnu_debuglink"])


def test_refused_files_are_said_closed_and_the_search_goes_on(tree: Path):
    objdir = tree / "lib"
    fifo = Path(build_id_path(str(tree / "d1"), BUILD_ID))
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    good = put(Path(build_id_path(str(tree / "d2"), BUILD_ID)))
    big = put(objdir / LINK[0], b"x" * 101)
    foreign = put(objdir / ".debug" / LINK[0], uid=2000)
    before = open_fds()
    found, tried = search_all(BUILD_ID, LINK, [ObjectDir("/", str(objdir))],
                              DebugSearch((str(tree / "d1"), str(tree / "d2")), max_bytes=100),
                              owner=USER)
    assert open_fds() == before
    assert [c.source for c in found] == [f"build-id {good}"]
    assert tried == [
        f"{fifo}: not a regular file (a FIFO)",
        f"no .build-id/ab/{'cd' * 19}.debug",
        f"debuglink {big}: too large (101 bytes, limit 100)",
        f"debuglink {foreign}: refused: owned by uid 2000, neither the object's owner "
        f"(uid 1000) nor root",
        f"debuglink {LINK[0]} not found",
    ]


def test_beside_the_object_no_symlink_is_followed_in_the_operators_dirs_one_is(tree: Path):
    target = put(tree / "elsewhere" / "real.debug")
    objdir = tree / "lib"
    objdir.mkdir()
    (objdir / LINK[0]).symlink_to(target)
    debug = tree / "debug"
    operator = debug / str(objdir).lstrip("/") / LINK[0]
    operator.parent.mkdir(parents=True)
    operator.symlink_to(target)
    found, tried = search_all(None, LINK, [ObjectDir("/", str(objdir))],
                              DebugSearch((str(debug),)))
    assert [c.source for c in found] == [f"debuglink {operator}"]
    assert tried == [f"debuglink {objdir / LINK[0]}: Too many levels of symbolic links"]


class _Debuginfod(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def debuginfod() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Debuginfod)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_debuginfod_comes_last_and_says_why_it_found_nothing(tree: Path, debuginfod: str):
    _Debuginfod.files = {f"/buildid/{BUILD_ID}/debuginfo": b"served"}
    client = DebuginfodClient((debuginfod,), str(tree / "cache"))
    put(tree / "lib" / LINK[0])
    tried: list[str] = []
    found = list(debug_files(BUILD_ID, LINK, [ObjectDir("/", str(tree / "lib"))],
                             DebugSearch((), client), tried, 0))
    assert [c.source for c in found] == [f"debuglink {tree / 'lib' / LINK[0]}",
                                         f"debuginfod {debuginfod}"]
    assert found[1].crc is None and found[1].stream.read() == b"served"
    for candidate in found:
        candidate.stream.close()
    other = "ef" * 20
    found, tried = search_all(other, None, [], DebugSearch((), client))
    assert found == []
    assert tried == [f"no .build-id/ef/{'ef' * 19}.debug", "no .gnu_debuglink",
                     f"debuginfod: not on {debuginfod}"]


def test_a_download_over_the_search_bound_is_refused(tree: Path, debuginfod: str):
    _Debuginfod.files = {f"/buildid/{BUILD_ID}/debuginfo": b"x" * 200}
    client = DebuginfodClient((debuginfod,), str(tree / "cache"))
    found, tried = search_all(BUILD_ID, None, [], DebugSearch((), client, max_bytes=100))
    target = tree / "cache" / "debuginfod" / f"{BUILD_ID}.debug"
    assert found == []
    assert tried[-1] == f"{target}: too large (200 bytes, limit 100)"


def test_no_build_id_asks_no_build_id_place(tree: Path, debuginfod: str):
    _Debuginfod.files = {}
    client = DebuginfodClient((debuginfod,), str(tree / "cache"))
    found, tried = search_all(None, None, [], DebugSearch((str(tree),), client))
    assert (found, tried) == ([], ["no .gnu_debuglink"])
    assert not (tree / "cache").exists()  # the server was not asked
