"""Reading other processes' memory with process_vm_readv: many small ranges in few calls."""

from __future__ import annotations

import array
import ctypes
import errno
import os

IOV_MAX = 1024
_WORD = (1 << 64) - 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def read_ranges(pid: int, ranges: list[tuple[int, int]]) -> list[bytes | OSError]:
    """Read each (address, length) range of `pid`'s memory.

    Ranges are batched IOV_MAX to a call. The kernel stops at the first range it cannot
    read; that range gets an OSError and the rest are retried in a fresh call, so one bad
    address costs one more call, not the batch.
    """
    results: list[bytes | OSError] = []
    while len(results) < len(ranges):
        batch = ranges[len(results):len(results) + IOV_MAX]
        total = sum(length for _, length in batch)
        buffer = ctypes.create_string_buffer(total)
        local = _IoVec(ctypes.addressof(buffer), total)
        # the remote iovecs as one flat array of words (a ctypes object per range cost more
        # than the call); addresses wrap to 64 bits, as ctypes' c_void_p did
        remote = array.array("Q", [word & _WORD for pair in batch for word in pair])
        got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, remote.buffer_info()[0],
                                     len(batch), 0)
        if got < 0:
            err = ctypes.get_errno()
            failure = OSError(err, os.strerror(err))
            # Only an address fault is specific to one range; anything else (ESRCH, EPERM)
            # would fail every range the same way.
            results.extend([failure] * (1 if err == errno.EFAULT else len(ranges) - len(results)))
            continue
        data = buffer.raw[:got]
        offset = 0
        for _, length in batch:
            if offset + length > got:
                break
            results.append(data[offset:offset + length])
            offset += length
        if len(results) < len(ranges) and offset < total:
            results.append(OSError(errno.EFAULT, "range not readable"))
    return results


def read_range(pid: int, address: int, length: int) -> bytes | OSError:
    """`read_ranges` of one range, with less around the call (a first snapshot reads one
    per process: its AT_RANDOM bytes)."""
    buffer = ctypes.create_string_buffer(length)
    local = _IoVec(ctypes.addressof(buffer), length)
    remote = _IoVec(address & _WORD, length)
    got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        err = ctypes.get_errno()
        return OSError(err, os.strerror(err))
    if got < length:
        return OSError(errno.EFAULT, "range not readable")
    return buffer.raw
