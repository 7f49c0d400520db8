"""probe.memory.read_ranges on real memory: this process's own pages (process_vm_readv
reads them as another process's), an unmapped page between two mapped ones, a range that
runs into it, more ranges than one call takes, and a pid that no longer exists."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess

import pytest

from ctprofd.probe.memory import IOV_MAX, read_ranges

PAGE = mmap.PAGESIZE


@pytest.fixture
def pages():
    """Three pages: the first two readable and filled with a pattern, the third unmapped
    (a readable mapping shrunk by munmap), so a range running past page 2 faults."""
    area = mmap.mmap(-1, 3 * PAGE)
    area.write(bytes((i * 7 + 3) & 0xFF for i in range(3 * PAGE)))
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + 2 * PAGE, PAGE, 0) == 0  # PROT_NONE: not readable
    content = area[:2 * PAGE]
    yield base, content
    assert libc.mprotect(base + 2 * PAGE, PAGE, mmap.PROT_READ | mmap.PROT_WRITE) == 0
    del base
    area.close()


def test_each_range_is_read_in_order(pages):
    base, content = pages
    ranges = [(base + 5, 8), (base, 1), (base + PAGE - 3, 6), (base + 100, 0),
              (base + 2 * PAGE - 16, 16)]
    assert read_ranges(os.getpid(), ranges) == [content[a - base:a - base + n] for a, n in ranges]


def test_an_unreadable_range_costs_itself_only(pages):
    base, content = pages
    ranges = [(base, 4), (base + 2 * PAGE, 8), (base + 8, 4), (base + 2 * PAGE - 4, 8),
              (base + 16, 2), (0, 8)]
    results = read_ranges(os.getpid(), ranges)
    assert results[0] == content[:4]
    assert isinstance(results[1], OSError) and results[1].errno == errno.EFAULT
    assert results[2] == content[8:12]
    # runs from the last readable bytes into the unreadable page: a partial read is no read
    assert isinstance(results[3], OSError) and results[3].errno == errno.EFAULT
    assert str(results[3]) == f"[Errno {errno.EFAULT}] range not readable"
    assert results[4] == content[16:18]
    assert isinstance(results[5], OSError) and results[5].errno == errno.EFAULT
    assert len(results) == len(ranges)


def test_more_ranges_than_one_call_takes(pages):
    base, content = pages
    count = 2 * IOV_MAX + 3
    ranges = [(base + i % (2 * PAGE - 2), 2) for i in range(count)]
    ranges[IOV_MAX] = (base + 2 * PAGE, 4)  # the first of the second call fails alone
    results = read_ranges(os.getpid(), ranges)
    assert len(results) == count
    for i, ((address, length), got) in enumerate(zip(ranges, results)):
        if i == IOV_MAX:
            assert isinstance(got, OSError)
        else:
            assert got == content[address - base:address - base + length], i


def test_addresses_wrap_to_64_bits(pages):
    base, content = pages
    assert read_ranges(os.getpid(), [(base + (1 << 64), 4)]) == [content[:4]]
    kernel = read_ranges(os.getpid(), [((1 << 64) - 4096, 8)])  # above 2**63: unsigned
    assert isinstance(kernel[0], OSError) and kernel[0].errno == errno.EFAULT


def test_ranges_of_no_bytes_read_as_empty(pages):
    base, _ = pages
    assert read_ranges(os.getpid(), [(base, 0), (base + 8, 0)]) == [b"", b""]
    assert read_ranges(os.getpid(), []) == []


def test_a_process_gone_fails_every_range_with_its_error(pages):
    base, _ = pages
    child = subprocess.Popen(["true"])
    child.wait(timeout=60)  # reaped: its pid names no process (until reused, unlikely now)
    results = read_ranges(child.pid, [(base, 4), (base + 8, 4), (base + 16, 4)])
    assert len(results) == 3
    assert all(isinstance(r, OSError) and r.errno == errno.ESRCH for r in results)
    assert str(results[0]) == f"[Errno {errno.ESRCH}] No such process"
