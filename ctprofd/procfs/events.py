"""The kernel's process events (the proc connector, a netlink socket): which processes
exec'ed, changed owner or were renamed, and which started or ended a thread, since the last
look, so that a snapshot need not read an unchanged process again to find out.

The kernel reports events only to a listener with CAP_NET_ADMIN in its initial pid and user
namespaces, and answers the request to listen with an acknowledgement before the request's
send returns; without our own (every listener gets every listener's), the events are not
used. A socket filter in the kernel passes only what is asked for: the forks and exits of
whole processes, most of a busy host's events, never reach the socket. After events were
lost (the socket's buffer overflowed), `changed` says it cannot tell (None), and the caller
reads processes as it would with no events. Reading has a budget per snapshot: what a host
(or a user starting and ending threads on purpose) does between two snapshots cannot make a
snapshot read long, nor the sets it keeps grow without bound; it only makes the snapshot
read as it would with no events.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_NONE, PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_UID = 0x0, 0x1, 0x2, 0x4
PROC_EVENT_GID, PROC_EVENT_COMM, PROC_EVENT_EXIT = 0x40, 0x200, 0x80000000
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33  # root may set a buffer above net.core.rmem_max
SO_ATTACH_FILTER = 26

# Offsets in one message: nlmsghdr (16 bytes), cn_msg (20), then proc_event: what (u32),
# cpu (u32), timestamp (u64), then the event's data: a thread's and its process's ids
# (exec, id, comm and exit events; a fork's parent's, then its child's), or the error (an
# ack). The kernel sends the whole union (24 bytes) whatever the event.
_ACK = 16 + 12  # cn_msg's ack: an acknowledgement carries the request's + 1
_WHAT = 16 + 20
_DATA = _WHAT + 16
_MESSAGE_MAX = 256  # a comm event, the largest asked for, is 16 + 20 + 16 + 24 bytes

_PROCESS_CHANGES = frozenset({PROC_EVENT_EXEC, PROC_EVENT_UID, PROC_EVENT_GID})
BUFFER_BYTES = 4 * 1024 * 1024  # kernel memory for events between two snapshots
EVENTS_MAX = 65_536  # messages read between two snapshots at most (more than the buffer holds)


@dataclass(frozen=True)
class Changes:
    """What the events named between two snapshots."""

    processes: frozenset[int]  # tgids that exec'ed, changed uid or gid, or were renamed
    threads: frozenset[int]  # tgids that started or ended a thread, exec'ed or renamed one


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_LD, _TAX, _JEQ, _JEQ_X, _RET = 0x20, 0x07, 0x15, 0x1D, 0x06  # classic BPF opcodes


def _big_endian(value: int) -> int:
    """What a load from the packet (big-endian) reads of this machine's bytes of `value`."""
    return int.from_bytes(struct.pack("=I", value), "big")


def _filter_program() -> list[tuple[int, int, int, int]]:
    """A classic BPF program that keeps acks, execs, uid, gid and name changes, and the start
    and end of a thread that is not its group's leader (a fork whose child's id is not its
    group's; an exit alike): the forks and exits of whole processes, most of a busy host's
    events, never reach the socket (a process's start and end show in the /proc listing)."""
    code: list[tuple[int | str, int | str, int | str, int]] = [(_LD, 0, 0, _WHAT)]
    code += [(_JEQ, "keep", 0, _big_endian(kind)) for kind in (
        PROC_EVENT_NONE, PROC_EVENT_EXEC, PROC_EVENT_UID, PROC_EVENT_GID, PROC_EVENT_COMM)]
    code += [(_JEQ, 0, "exit", _big_endian(PROC_EVENT_FORK)),
             (_LD, 0, 0, _DATA + 8), (_TAX, 0, 0, 0), (_LD, 0, 0, _DATA + 12),
             (_JEQ_X, "drop", "keep", 0)]
    code += [("exit", 0, 0, 0)]
    code += [(_JEQ, 0, "drop", _big_endian(PROC_EVENT_EXIT)),
             (_LD, 0, 0, _DATA), (_TAX, 0, 0, 0), (_LD, 0, 0, _DATA + 4),
             (_JEQ_X, "drop", "keep", 0)]
    code += [("drop", 0, 0, 0), (_RET, 0, 0, 0), ("keep", 0, 0, 0), (_RET, 0, 0, 0xFFFFFFFF)]
    return _resolve(code)


def _resolve(code: list[tuple[int | str, int | str, int | str, int]]
             ) -> list[tuple[int, int, int, int]]:
    """Instructions with their jumps to labels (a string in place of an opcode marks where
    the next instruction is) turned into offsets."""
    labels: dict[str, int] = {}
    pc = 0
    for op, *_ in code:
        if isinstance(op, str):
            labels[op] = pc
        else:
            pc += 1
    program = []
    for op, jt, jf, k in code:
        if isinstance(op, str):
            continue
        pc = len(program)
        program.append((op, labels[jt] - pc - 1 if isinstance(jt, str) else jt,
                        labels[jf] - pc - 1 if isinstance(jf, str) else jf, k))
    return program


def _attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    instructions = (_SockFilter * len(program))(*program)
    fprog = _SockFprog(len(program), instructions)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def _request(op: int, ack: int) -> bytes:
    """A netlink message asking the proc connector to start or stop sending events; the
    kernel's acknowledgement carries `ack` + 1."""
    payload = struct.pack("=I", op)
    cn_msg = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0)
    return struct.pack("=IHHII", 16 + len(cn_msg) + len(payload), NLMSG_DONE, 0, 0, 0) \
        + cn_msg + payload


class ProcessEvents:
    """A listener for the processes that exec'ed, changed uid or gid or were renamed, and
    that started or ended a thread."""

    def __init__(self, buffer_bytes: int = BUFFER_BYTES, events_max: int = EVENTS_MAX) -> None:
        self._events_max = events_max
        self._left = events_max  # messages still to be read before the next `changed`
        self._ack = int.from_bytes(os.urandom(4), "little") >> 1  # our ack carries it + 1
        self._acknowledged = False
        self._lost = False  # events were lost since the last `changed`
        self._cut = False  # ... and the budget ran out with messages still queued
        self._processes: set[int] = set()  # what the messages read since then named
        self._threads: set[int] = set()
        self._buffer = bytearray(_MESSAGE_MAX)
        self.error: str | None = None  # why there are no events, once known
        self._sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        except OSError as err:
            self.error = f"no proc connector: {os.strerror(err.errno or 0)}"
            return
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            _attach_filter(sock, _filter_program())
            sock.bind((0, CN_IDX_PROC))
            sock.send(_request(PROC_CN_MCAST_LISTEN, self._ack))
        except OSError as err:
            sock.close()
            self.error = f"proc connector refused: {os.strerror(err.errno or 0)}"
            return
        self._sock = sock
        self._read()  # the ack, queued before send returned
        if not self._acknowledged:
            self.error = self.error or ("no acknowledgement from the proc connector (not the "
                                        "kernel's initial pid or user namespace)")
            self.close()

    def close(self) -> None:
        """Stop listening (the kernel counts listeners, and sends events while any is left)."""
        if self._sock is None:
            return
        try:
            self._sock.send(_request(PROC_CN_MCAST_IGNORE, self._ack))
        except OSError:
            pass
        self._sock.close()
        self._sock = None

    def changed(self) -> Changes | None:
        """What the events named since the last call, or None when that cannot be told: no
        acknowledgement, events lost since the last call, or more of them than one
        snapshot reads (the rest are read by the next call, which cannot tell either)."""
        if self._sock is None:
            return None
        self._read()
        heard = self._acknowledged and not self._lost and not self._cut
        changes = Changes(frozenset(self._processes), frozenset(self._threads)) if heard else None
        self._processes.clear()
        self._threads.clear()
        self._lost, self._cut, self._left = self._cut, False, self._events_max
        return changes

    def threads_changed(self, tgid: int) -> bool:
        """Whether `tgid` started or ended a thread (or exec'ed, or renamed one) since the
        last `changed`, or that cannot be told; what this reads is kept for the next
        `changed`."""
        if self._sock is None:
            return True
        self._read()
        return self._lost or self._cut or tgid in self._threads

    def _read(self) -> None:
        """Read the queued messages, within what is left of the budget."""
        assert self._sock is not None
        buffer, recv_into, unpack = self._buffer, self._sock.recv_into, struct.unpack_from
        processes, threads = self._processes, self._threads
        while self._left > 0:
            try:
                size = recv_into(buffer)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._lost = True  # the buffer overflowed: events were dropped
                self._left -= 1
                continue
            self._left -= 1
            if size < _DATA + 16:
                continue
            what, = unpack("=I", buffer, _WHAT)
            pid, tgid = unpack("=II", buffer, _DATA + 8 if what == PROC_EVENT_FORK else _DATA)
            if what == PROC_EVENT_NONE:
                self._acknowledge(unpack("=I", buffer, _ACK)[0], pid)
                continue
            threads.add(tgid)
            if what in _PROCESS_CHANGES or (what == PROC_EVENT_COMM and pid == tgid):
                processes.add(tgid)
        self._cut = True

    def _acknowledge(self, ack: int, error: int) -> None:
        if ack != self._ack + 1:
            return  # another listener's
        if error == 0:
            self._acknowledged = True
        else:
            self.error = f"proc connector refused: {os.strerror(error)}"
