"""The kernel's process events (the proc connector, a netlink socket): which processes
exec'ed, changed owner or were renamed since the last look, so that a snapshot need not
read an unchanged process again to find out.

The kernel reports events only to a listener in its initial pid and user namespaces with
CAP_NET_ADMIN, and answers the request to listen with an acknowledgement before the
request's send returns; without our own (every listener gets every listener's), the
events are not used. After events were lost (the socket's buffer overflowed), `changed`
says it cannot tell (None) and the caller reads processes again as it would with no events. A socket filter in the kernel
passes only the events asked for, so forks and exits (most of a busy host's events) cost
the socket nothing. Reading the events has a budget per call: what a host does between two
snapshots cannot make one call run long or the set it returns grow without bound.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
PROC_EVENT_NONE, PROC_EVENT_EXEC, PROC_EVENT_UID = 0x0, 0x2, 0x4
PROC_EVENT_GID, PROC_EVENT_COMM = 0x40, 0x200
CHANGES = (PROC_EVENT_EXEC, PROC_EVENT_UID, PROC_EVENT_GID, PROC_EVENT_COMM)
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33  # root may set a buffer above net.core.rmem_max
SO_ATTACH_FILTER = 26

# Offsets in one message: nlmsghdr (16 bytes), cn_msg (20), then proc_event: what (u32),
# cpu (u32), timestamp (u64), then the event's data, whose first two words are the
# thread's and its process's ids (exec, id and comm events), or the error (an ack).
_ACK = 16 + 12  # cn_msg's ack: an acknowledgement carries the request's + 1
_WHAT = 16 + 20
_DATA = _WHAT + 16
_MESSAGE_MAX = 256  # a comm event, the largest asked for, is 16 + 20 + 16 + 24 bytes

BUFFER_BYTES = 4 * 1024 * 1024  # kernel memory for events between two snapshots
EVENTS_MAX = 200_000  # messages one call reads at most


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06


def _filter_program(kinds: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """A classic BPF program that keeps the messages whose `what` is one of `kinds` or an
    ack. A load from the packet reads big-endian: the constants are this machine's bytes
    of each value read that way."""
    wanted = (PROC_EVENT_NONE,) + kinds
    program = [(_BPF_LD_W_ABS, 0, 0, _WHAT)]
    for i, kind in enumerate(wanted):
        program.append((_BPF_JEQ_K, len(wanted) - i, 0,
                        int.from_bytes(struct.pack("=I", kind), "big")))
    program += [(_BPF_RET_K, 0, 0, 0), (_BPF_RET_K, 0, 0, 0xFFFFFFFF)]
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
    """A listener for the processes that exec'ed, changed uid or gid, or were renamed."""

    def __init__(self, buffer_bytes: int = BUFFER_BYTES, events_max: int = EVENTS_MAX) -> None:
        self._events_max = events_max
        self._ack = int.from_bytes(os.urandom(4), "little") >> 1  # our ack carries it + 1
        self._acknowledged = False
        self._lost = False  # events were lost since the last call
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
            _attach_filter(sock, _filter_program(CHANGES))
            sock.bind((0, CN_IDX_PROC))
            sock.send(_request(PROC_CN_MCAST_LISTEN, self._ack))
        except OSError as err:
            sock.close()
            self.error = f"proc connector refused: {os.strerror(err.errno or 0)}"
            return
        self._sock = sock
        self._read_into(set())  # the ack, queued before send returned
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

    def changed(self) -> set[int] | None:
        """The tgids that exec'ed, changed uid or gid, or were renamed since the last call,
        or None when that cannot be told: no acknowledgement yet (another namespace, or no
        privilege to listen), events lost since the last call, or more of them than one call
        reads (the rest are read by the next call)."""
        if self._sock is None:
            return None
        tgids: set[int] = set()
        complete = self._read_into(tgids)
        lost, self._lost = self._lost, not complete  # what is cut short is lost to the next
        if not self._acknowledged or lost or not complete:
            return None
        return tgids

    def _read_into(self, tgids: set[int]) -> bool:
        """Read the queued messages into `tgids`; False when the budget ran out first."""
        assert self._sock is not None
        buffer, recv_into = self._buffer, self._sock.recv_into
        for _ in range(self._events_max):
            try:
                size = recv_into(buffer)
            except BlockingIOError:
                return True
            except OSError as err:
                if err.errno == errno.ENOBUFS:  # the buffer overflowed: events were dropped
                    self._lost = True
                    continue
                raise
            if size < _DATA + 8:
                continue
            what, = struct.unpack_from("=I", buffer, _WHAT)
            if what == PROC_EVENT_NONE:
                ack, = struct.unpack_from("=I", buffer, _ACK)
                error, = struct.unpack_from("=I", buffer, _DATA)
                if ack != self._ack + 1:
                    continue  # another listener's
                if error == 0:
                    self._acknowledged = True
                else:
                    self.error = f"proc connector refused: {os.strerror(error)}"
                continue
            tgids.add(struct.unpack_from("=I", buffer, _DATA + 4)[0])
        return False
