"""Opening the files a target controls (files.target): never out of the root given, never
through a symlink, only a regular file within its size bound, and no descriptor left
open when one is refused. Real files, real /proc links, the real openat2."""

import errno
import os
import subprocess

import pytest

from ctprofd.files.regular import FileRefused
from ctprofd.files.target import open_beneath, open_followed


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def root(tmp_path):
    """A directory standing for /proc/PID/root, with a file inside and a secret beside."""
    inside = tmp_path / "root"
    (inside / "lib").mkdir(parents=True)
    (inside / "lib" / "libjemalloc.so").write_bytes(b"\x7fELF" + b"\0" * 60)
    (tmp_path / "secret").write_bytes(b"root's only")
    return inside


def test_a_file_inside_the_root_is_opened(root):
    fd, st = open_beneath(str(root), "/lib/libjemalloc.so", 64)
    try:
        assert st.st_size == 64 and os.read(fd, 4) == b"\x7fELF"
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", ["/../secret", "/lib/../../secret"])
def test_dot_dot_never_leaves_the_root(root, path):
    before = open_descriptors()
    with pytest.raises(OSError) as refused:
        open_beneath(str(root), path, 1 << 20)
    assert refused.value.errno == errno.EXDEV
    assert (refused.value.strerror, refused.value.filename) == (os.strerror(errno.EXDEV), path)
    assert open_descriptors() == before


def test_the_root_itself_is_a_directory_and_a_root_that_is_none_is_refused(root, tmp_path):
    with pytest.raises(FileRefused) as refused:
        open_beneath(str(root), "/", 1 << 20)
    assert (refused.value.strerror, refused.value.filename) == (
        "not a regular file (a directory)", "/")
    os.mkfifo(tmp_path / "fifo")  # opened as a directory: never waited on for a writer
    with pytest.raises(NotADirectoryError):
        open_beneath(str(tmp_path / "fifo"), "/lib/libjemalloc.so", 1 << 20)


def test_only_slashes_are_stripped_from_the_path(root):
    (root / "Xlib.so").write_bytes(b"X")
    (root / "lib.so").write_bytes(b"not this one")
    fd, st = open_beneath(str(root), "/Xlib.so", 64)
    os.close(fd)
    assert st.st_size == 1


@pytest.mark.parametrize("link", ["../secret", "/etc/hostname", "libjemalloc.so"])
def test_no_symlink_is_followed_even_one_inside_the_root(root, link):
    (root / "lib" / "link.so").symlink_to(link)
    before = open_descriptors()
    with pytest.raises(OSError) as refused:
        open_beneath(str(root), "/lib/link.so", 1 << 20)
    assert refused.value.errno == errno.ELOOP
    assert open_descriptors() == before


def test_a_symlinked_directory_on_the_way_is_refused(root):
    (root / "usr").symlink_to(root.parent)  # /usr -> outside the root
    with pytest.raises(OSError) as refused:
        open_beneath(str(root), "/usr/secret", 1 << 20)
    assert refused.value.errno == errno.ELOOP


def test_a_real_process_root_is_a_root_too(root):
    # /proc/PID/root of this process is "/": even there `..` is refused, not taken as "/",
    # and a magic link is refused
    proc_root = f"/proc/{os.getpid()}/root"
    with pytest.raises(OSError) as refused:
        open_beneath(proc_root, "/../etc/hostname", 1 << 20)
    assert refused.value.errno == errno.EXDEV
    fd, _ = open_beneath(proc_root, "/etc/hostname", 1 << 20)
    os.close(fd)
    with pytest.raises(OSError) as refused:
        open_beneath(proc_root, f"/proc/{os.getpid()}/exe", 1 << 30)
    assert refused.value.errno == errno.ELOOP


@pytest.mark.parametrize("limit,refused", [(63, True), (64, False)])
def test_the_size_bound_holds_beneath_and_a_refused_descriptor_is_closed(root, limit, refused):
    before = open_descriptors()
    if refused:
        with pytest.raises(FileRefused, match="too large") as error:
            open_beneath(str(root), "/lib/libjemalloc.so", limit)
        assert error.value.filename == "/lib/libjemalloc.so"
    else:
        fd, _ = open_beneath(str(root), "/lib/libjemalloc.so", limit)
        os.close(fd)
    assert open_descriptors() == before


def test_a_fifo_is_refused_without_blocking_and_closed(root):
    os.mkfifo(root / "lib" / "fifo.so")
    before = open_descriptors()
    for opener in (lambda: open_beneath(str(root), "/lib/fifo.so", 1 << 20),
                   lambda: open_followed(str(root / "lib" / "fifo.so"), 1 << 20)):
        with pytest.raises(FileRefused, match="not a regular file") as refused:
            opener()
        assert refused.value.filename.endswith("/lib/fifo.so")
        assert open_descriptors() == before


@pytest.fixture
def running_cat():
    """A real process: `cat`, whose exe and mapped objects ctprofd would open.

    Popen returns when the exec has begun, before the kernel has mapped the new image's
    interpreter; a line echoed back proves the program runs, with its objects mapped."""
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        child.stdin.write(b"ready\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"ready\n"
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdin.close()
        child.stdout.close()


def map_files_link(pid: int) -> tuple[str, int]:
    """A /proc/PID/map_files link of `pid`'s libc (or first mapped object) and its size."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/") and ".so" in fields[5]:
                return f"/proc/{pid}/map_files/{fields[0]}", os.stat(fields[5]).st_size
    raise AssertionError(f"pid {pid} maps no shared object")


def test_a_targets_exe_and_mapped_objects_are_held_to_the_size_bound(running_cat):
    exe = f"/proc/{running_cat}/exe"
    links = [(exe, os.stat(exe).st_size), map_files_link(running_cat)]
    before = open_descriptors()
    for link, size in links:
        with pytest.raises(FileRefused, match=f"too large \\({size} bytes, limit {size - 1}\\)"):
            open_followed(link, size - 1)
        assert open_descriptors() == before
        fd, st = open_followed(link, size)  # followed: the kernel's link, not a symlink
        os.close(fd)
        assert st.st_size == size
    assert open_descriptors() == before
