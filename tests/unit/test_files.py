"""files.regular, files.atomic and files.lock on real files: a FIFO, a socket, a device, a
symlink, /proc files whose size says 0, a real tmpfs filled to the last byte, and a lock held
through another open file description (flock conflicts between those even in one process)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctprofd.files import lock
from ctprofd.files.atomic import MIN_RESERVE, ReservedWriter, write_json
from ctprofd.files.regular import FileRefused, check_regular, read_regular
from support.disk import fill, tmpfs

MIB = 1 << 20


# -- files.regular ------------------------------------------------------------------------

def test_a_file_of_exactly_the_limit_is_read_whole_and_one_byte_more_is_refused(tmp_path):
    data = bytes(range(256)) * 700  # 175 KiB: read in several chunks
    path = tmp_path / "config"
    path.write_bytes(data)
    assert read_regular(str(path), len(data)) == data
    with pytest.raises(FileRefused) as refused:
        read_regular(str(path), len(data) - 1)
    assert refused.value.strerror == f"too large ({len(data)} bytes, limit {len(data) - 1})"
    assert refused.value.filename == str(path)
    assert refused.value.errno == 0  # not a system error: errno 1 would print as EPERM
    assert read_regular(str(path)) == data  # the default limit, 1 MiB, holds it


def test_the_default_limit_is_one_mebibyte(tmp_path):
    path = tmp_path / "config"
    path.write_bytes(b"x" * MIB)
    assert len(read_regular(str(path))) == MIB
    path.write_bytes(b"x" * (MIB + 1))
    with pytest.raises(FileRefused, match=f"limit {MIB}\\)"):
        read_regular(str(path))


def test_a_file_whose_size_says_less_than_it_holds_is_bounded_by_what_is_read():
    """/proc files say 0 bytes; what a read returns is bounded all the same."""
    cmdline = Path("/proc/self/cmdline").read_bytes()
    assert os.stat("/proc/self/cmdline").st_size == 0
    assert read_regular("/proc/self/cmdline", len(cmdline)) == cmdline
    with pytest.raises(FileRefused) as refused:
        read_regular("/proc/self/cmdline", len(cmdline) - 1)
    assert refused.value.strerror == (f"too large (grew past the limit of {len(cmdline) - 1} "
                                      "bytes)")
    assert refused.value.filename == "/proc/self/cmdline"
    assert refused.value.errno == 0


def test_a_file_read_in_chunks_is_refused_one_byte_past_the_limit():
    """/proc/PID/environ of 300 kB, returned 64 KiB a read: with a limit of two reads
    exactly, the byte after them is still read to refuse the file."""
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={f"BIG{i}": "x" * 100_000 for i in range(3)})
    try:
        child.stdin.write(b"ready\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"ready\n"
        environ = f"/proc/{child.pid}/environ"
        with pytest.raises(FileRefused, match="grew past the limit of 131072 bytes"):
            read_regular(environ, 2 << 16)
        assert len(read_regular(environ, 400_000)) > 300_000
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdin.close()
        child.stdout.close()


def kind_refused(path: str) -> str:
    with pytest.raises(FileRefused) as refused:
        read_regular(path)
    assert refused.value.filename == path
    assert refused.value.errno == 0
    return refused.value.strerror


def test_what_is_not_a_regular_file_is_named(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would never return
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "socket"))
    block = tmp_path / "block"
    os.mknod(block, stat.S_IFBLK | 0o600, os.makedev(7, 0))  # a loop device
    try:
        assert kind_refused(str(fifo)) == "not a regular file (a FIFO)"
        assert kind_refused(str(tmp_path)) == "not a regular file (a directory)"
        assert kind_refused("/dev/null") == "not a regular file (a character device)"
        assert kind_refused(str(block)) == "not a regular file (a block device)"
    finally:
        server.close()
    fd = os.open(str(tmp_path / "socket"), os.O_PATH)
    link = tmp_path / "link"
    link.symlink_to("config")
    link_fd = os.open(str(link), os.O_PATH | os.O_NOFOLLOW)
    try:
        with pytest.raises(FileRefused, match=r"^.*not a regular file \(a socket\)"):
            check_regular(fd, 10, "socket")
        with pytest.raises(FileRefused, match=r"not a regular file \(a special file\)"):
            check_regular(link_fd, 10, "link")
    finally:
        os.close(fd)
        os.close(link_fd)


def test_check_regular_returns_the_files_status(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    fd = os.open(path, os.O_RDONLY)
    try:
        info = check_regular(fd, 5, str(path))
        assert (info.st_size, info.st_ino) == (5, os.stat(path).st_ino)
    finally:
        os.close(fd)


# -- files.atomic -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real tmpfs of 6 MiB at tmp_path/disk (another filesystem than tmp_path's, so a
    rename from elsewhere would fail), unmounted at teardown."""
    with tmpfs(tmp_path / "disk", "6m") as disk:
        yield disk


def test_write_json_replaces_the_file_whole_and_leaves_nothing_beside_it(small_disk):
    path = small_disk / "state.json"
    data = {"b": [1, 2], "a": "é"}
    assert write_json(str(path), data) == len(json.dumps(data)) + 1
    assert path.read_text() == json.dumps(data) + "\n"
    assert write_json(str(path), data, indent=2) == len(json.dumps(data, indent=2)) + 1
    assert path.read_text() == json.dumps(data, indent=2) + "\n"
    assert os.listdir(small_disk) == ["state.json"]


def test_write_json_relative_to_the_working_directory(small_disk, monkeypatch):
    monkeypatch.chdir(small_disk)
    write_json("state.json", [1])
    assert (small_disk / "state.json").read_text() == "[1]\n"
    assert os.listdir(small_disk) == ["state.json"]


def test_a_write_json_that_fails_removes_its_temporary_file(small_disk):
    (small_disk / "state.json").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(IsADirectoryError):
        write_json(str(small_disk / "state.json"), {"a": 1})
    assert os.listdir(small_disk) == ["state.json"]


def reserve_size(writer: ReservedWriter) -> int:
    info = os.stat(writer.reserve)
    assert info.st_blocks * 512 >= info.st_size  # allocated, not a sparse file
    return info.st_size


def test_a_state_file_is_written_on_a_full_disk_in_the_space_set_aside(small_disk, caplog):
    caplog.set_level(logging.WARNING, logger="ctprofd.files.atomic")
    path = small_disk / "state.json"
    writer = ReservedWriter(str(path), "the counters restart from the last state written")
    assert writer.reserve == str(small_disk / ".state.json.reserve")
    assert writer.write({"n": 1})
    assert reserve_size(writer) == MIN_RESERVE
    big = {"n": "x" * (600 << 10)}
    assert writer.write(big)
    size = path.stat().st_size
    assert reserve_size(writer) == 2 * size  # above MIN_RESERVE: twice the file
    assert writer.write({"n": 2})  # smaller: the reserve is kept as it is
    assert reserve_size(writer) == 2 * size
    assert caplog.messages == [] and writer.failures == 0

    fill(small_disk, "filler")
    assert writer.write(big)  # written in the reserve's space
    assert json.loads(path.read_text()) == big
    assert os.stat(writer.reserve).st_size == 0  # given up; made again when there is room
    assert caplog.messages == [f"the disk of {path} is full: written in the space set aside "
                               f"for it ({writer.reserve})"]
    assert writer.write(big)  # the reserve's space less one file is left: room again
    assert caplog.messages[1:] == [f"{path} written again with room to spare"]
    assert writer.failures == 0

    bigger = {"n": "y" * (MIB + 1000)}
    assert not writer.write(bigger)
    assert not writer.write(bigger)
    assert writer.failures == 2
    assert caplog.messages[2:] == [f"cannot write {path} (No space left on device); the "
                                   "counters restart from the last state written"]
    assert json.loads(path.read_text()) == big
    assert sorted(os.listdir(small_disk)) == ["filler", "state.json"]

    os.unlink(small_disk / "filler")
    assert writer.write(bigger)
    assert caplog.messages[3:] == [f"{path} written again with room to spare"]
    assert reserve_size(writer) == 2 * path.stat().st_size
    assert writer.write(bigger)
    assert len(caplog.messages) == 4 and writer.failures == 2


def test_a_write_that_fails_for_another_reason_keeps_the_reserve(small_disk, caplog):
    caplog.set_level(logging.WARNING, logger="ctprofd.files.atomic")
    path = small_disk / "state.json"
    writer = ReservedWriter(str(path), "costs")
    assert writer.write([1])
    path.unlink()
    path.mkdir()  # not a disk full: nothing to give up
    assert not writer.write([2])
    assert reserve_size(writer) == MIN_RESERVE
    assert writer.failures == 1
    assert caplog.messages == [f"cannot write {path} (Is a directory); costs"]


def test_a_full_disk_without_a_reserve_is_a_failure(small_disk, caplog):
    caplog.set_level(logging.WARNING, logger="ctprofd.files.atomic")
    path = small_disk / "state.json"
    fill(small_disk, "filler")
    writer = ReservedWriter(str(path), "costs")
    assert not writer.write({"n": "x" * 8192})
    assert writer.failures == 1 and not os.path.exists(writer.reserve)
    assert caplog.messages == [f"cannot write {path} (No space left on device); costs"]


def test_the_reserve_is_never_a_symlink_followed(small_disk):
    path = small_disk / "state.json"
    writer = ReservedWriter(str(path), "costs")
    os.symlink(small_disk / "elsewhere", writer.reserve)
    assert writer.write([1])  # the reserve is best effort: the state is written
    assert not os.path.exists(small_disk / "elsewhere")
    assert os.path.islink(writer.reserve)


def test_the_reserve_is_readable_by_its_owner_only(small_disk):
    writer = ReservedWriter(str(small_disk / "state.json"), "costs")
    old = os.umask(0)
    try:
        assert writer.write([1])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(writer.reserve).st_mode) == 0o600


# -- files.lock ---------------------------------------------------------------------------

def test_a_directory_has_one_owner_whose_pid_the_lock_names(tmp_path):
    (tmp_path / ".lock").write_text("123456789012345\n")  # longer than a pid: truncated
    assert lock.holder(str(tmp_path)) is None
    fd = lock.acquire(str(tmp_path))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        assert lock.holder(str(tmp_path)) == os.getpid()
        with pytest.raises(lock.DirectoryBusy) as busy:
            lock.acquire(str(tmp_path))  # another open file description: flock conflicts
        assert str(busy.value) == f"{tmp_path} is in use by pid {os.getpid()}"
        assert (busy.value.directory, busy.value.pid) == (str(tmp_path), os.getpid())
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(lock.DirectoryBusy):
            lock.acquire(str(tmp_path))
        assert len(os.listdir("/proc/self/fd")) == before  # the refused descriptor closed
    finally:
        os.close(fd)
    assert lock.holder(str(tmp_path)) is None
    os.close(lock.acquire(str(tmp_path)))


@pytest.mark.parametrize("content", [b"not a pid", b"\xff\xfe 12"])
def test_a_holder_that_wrote_no_pid_is_another_process(tmp_path, content):
    (tmp_path / ".lock").write_bytes(content)
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert lock.holder(str(tmp_path)) == 0
        with pytest.raises(lock.DirectoryBusy) as busy:
            lock.acquire(str(tmp_path))
        assert str(busy.value) == f"{tmp_path} is in use by another process"
        assert busy.value.pid == 0
    finally:
        os.close(fd)


def test_only_the_first_32_bytes_of_the_lock_file_are_read(tmp_path):
    (tmp_path / ".lock").write_bytes(b" " * 30 + b"42" + b"7")
    fd = os.open(tmp_path / ".lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert lock.holder(str(tmp_path)) == 42
    finally:
        os.close(fd)


def test_a_holder_that_lets_go_while_acquire_waits_is_waited_out(tmp_path, monkeypatch):
    """`acquire` pauses between attempts (ATTEMPTS in all); here the holder lets go at the
    first pause: the lock is taken, not refused."""
    held = lock.acquire(str(tmp_path))
    pauses = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 3:
            os.close(held)
    monkeypatch.setattr(lock, "time", types.SimpleNamespace(sleep=pause))
    os.close(lock.acquire(str(tmp_path)))
    assert pauses == [lock.PAUSE] * 3


def test_acquire_gives_up_after_its_attempts(tmp_path, monkeypatch):
    held = lock.acquire(str(tmp_path))
    pauses = []
    monkeypatch.setattr(lock, "time", types.SimpleNamespace(sleep=pauses.append))
    try:
        with pytest.raises(lock.DirectoryBusy):
            lock.acquire(str(tmp_path))
    finally:
        os.close(held)
    assert len(pauses) == lock.ATTEMPTS - 1


def test_the_lock_is_held_by_another_process_until_it_exits(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ctprofd.files import lock; "
         f"lock.acquire({str(tmp_path)!r}); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    try:
        assert child.stdout.readline() == b"held\n"
        assert lock.holder(str(tmp_path)) == child.pid
        with pytest.raises(lock.DirectoryBusy, match=f"in use by pid {child.pid}$"):
            lock.acquire(str(tmp_path))
    finally:
        child.stdin.close()
        child.wait(timeout=60)
        child.stdout.close()
    assert lock.holder(str(tmp_path)) is None


def test_a_lock_file_that_is_not_a_regular_file_is_refused_with_what_to_do(tmp_path):
    symlink, fifo = tmp_path / "symlink", tmp_path / "fifo"
    symlink.mkdir()
    fifo.mkdir()
    (symlink / ".lock").symlink_to(tmp_path / "target")
    os.mkfifo(fifo / ".lock")
    with pytest.raises(lock.LockRefused) as refused:
        lock.acquire(str(symlink))
    assert (refused.value.errno, refused.value.strerror) == (
        errno.ELOOP, f"{symlink / '.lock'} is a symlink, not a lock file: remove it")
    assert not (tmp_path / "target").exists()
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(lock.LockRefused) as refused:
        lock.acquire(str(fifo))  # a FIFO without a writer: refused, not waited on
    assert (refused.value.errno, refused.value.strerror) == (
        errno.EINVAL, f"{fifo / '.lock'} is not a regular file (a FIFO): remove it")
    assert len(os.listdir("/proc/self/fd")) == before
    assert lock.holder(str(symlink)) is None and lock.holder(str(fifo)) is None
    with pytest.raises(FileNotFoundError):
        lock.acquire(str(tmp_path / "missing"))
    assert lock.holder(str(tmp_path / "missing")) is None


def test_a_new_lock_file_is_readable_by_all_and_written_by_its_owner(tmp_path):
    old = os.umask(0)
    try:
        os.close(lock.acquire(str(tmp_path)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / ".lock").st_mode) == 0o644
