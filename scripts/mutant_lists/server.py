"""Hand mutants of ctprofd/export/server.py's connection accounting, request bound and
eviction order (scripts/hand_mutants.py; scores in docs/testing.md)."""

F = "ctprofd/export/server.py"
MUTANTS = [
    ("released connection not uncounted", F,
     "            self._count -= 1\n",
     "            pass\n"),
    ("released connection kept in its address's list", F,
     "            peers.remove(connection)\n",
     "            pass\n"),
    ("released whole request kept in its network's list", F,
     "            network.remove(connection)\n",
     "            pass\n"),
    ("a connection that ends not released", F,
     "        finally:\n            self._release(connection)\n",
     "        finally:\n"),
    ("an evicted connection not released at once", F,
     "        self._release(connection)\n        _reset(connection.writer)\n"
     "        self.evicted += 1",
     "        _reset(connection.writer)\n        self.evicted += 1"),
    ("request bound raised to 32 KiB", F,
     "MAX_REQUEST_BYTES = 16384 ",
     "MAX_REQUEST_BYTES = 32768 "),
    ("request bound removed", F,
     "            if not data or len(data) >= MAX_REQUEST_BYTES:\n"
     "                raise _Drop(\"no request\" if not data else \"request too large\")\n"
     "            chunk = await reader.read(MAX_REQUEST_BYTES - len(data))\n",
     "            if not data:\n"
     "                raise _Drop(\"no request\")\n"
     "            chunk = await reader.read(1 << 20)\n"),
    ("first read unbounded", F,
     "            data = await reader.read(MAX_REQUEST_BYTES)\n",
     "            data = await reader.read(1 << 20)\n"),
    ("request bound >= to >", F,
     "if not data or len(data) >= MAX_REQUEST_BYTES:",
     "if not data or len(data) > MAX_REQUEST_BYTES:"),
    ("header-line bound removed", F,
     "    if len(lines) > MAX_HEADERS + 3:\n",
     "    if False:\n"),
    ("bytes waiting unread not passed over", F,
     "        victim = next((c for c in waiting if not _bytes_unread(c)), None)\n",
     "        victim = next(iter(waiting), None)\n"),
    ("the newest evicted first", F,
     "        victim = next((c for c in waiting if not _bytes_unread(c)), None)\n",
     "        victim = next((c for c in reversed(waiting) if not _bytes_unread(c)), None)\n"),
    ("a silent connection evicted before an older trickling one", F,
     "        victim = next((c for c in waiting if not _bytes_unread(c)), None)\n",
     "        victim = next((c for c in waiting if not c.reader.arrived\n"
     "                       and not _bytes_unread(c)), None) or next(\n"
     "            (c for c in waiting if not _bytes_unread(c)), None)\n"),
    ("bytes still in the socket not seen", F,
     "    if reader.arrived > reader.taken:\n        return True\n"
     "    return _socket_queue(connection.writer, termios.FIONREAD) > 0\n",
     "    return reader.arrived > reader.taken\n"),
    ("bytes in the reader not seen", F,
     "    if reader.arrived > reader.taken:\n        return True\n",
     ""),
    ("a whole request evicted", F,
     "        waiting = [c for c in peers if not c.requested]\n",
     "        waiting = list(peers)\n"),
    ("when full, not the address holding the most", F,
     "self._evict(p) for p in sorted(self._peers.values(), key=len, reverse=True)):",
     "self._evict(p) for p in list(self._peers.values())):"),
    ("per-address limit >= to >", F,
     "        if len(peers) >= self.per_address and not self._evict(peers):",
     "        if len(peers) > self.per_address and not self._evict(peers):"),
    ("total limit >= to >", F,
     "        if self._count >= self.max_connections and not any(",
     "        if self._count > self.max_connections and not any("),
    ("a connection cut off closed, not reset", F,
     "        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack(\"ii\", 1, 0))\n",
     "        pass\n"),
    ("closed before the client acknowledged the answer", F,
     "        await _until(lambda: not _socket_queue(writer, termios.TIOCOUTQ))",
     "        pass"),
    ("an answer in the socket still counted as a whole request", F,
     "        self._unrequest(connection)  # it holds",
     "        pass  # it holds"),
    ("an answered connection never closed for room", F,
     "        victim = victim or next(iter(waiting), None) or next(\n"
     "            (c for c in peers if c.answered()), None)\n",
     "        victim = victim or next(iter(waiting), None)\n"),
    ("an answered connection closed before an idle one", F,
     "        victim = victim or next(iter(waiting), None) or next(\n"
     "            (c for c in peers if c.answered()), None)\n",
     "        victim = next((c for c in peers if c.answered()), None) or victim or next(\n"
     "            iter(waiting), None)\n"),
    ("an answer all in its socket counted until its own wait looks again", F,
     "        for done in [c for c in network if c.answered()]:\n"
     "            network.remove(done)  # their own waits may not have looked yet\n",
     ""),
    ("an answer counted out while bytes of it are still in the process", F,
     "        return (self.written and not self.writer.transport.get_write_buffer_size()\n"
     "                and not self.plain.get_write_buffer_size())\n",
     "        return self.written\n"),
]
