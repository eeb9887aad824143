"""Just enough of CRIU's page-server protocol to spare the dump a round trip per process.

A dump streaming to a page server (``criu/page-xfer.c``) opens each process's page images
with ``PS_IOV_OPEN2`` and then waits for the server's one-byte answer (whether a parent
checkpoint holds earlier pages) before sending that process's pages. Between two kamra
hosts that answer travels back through the whole pipe: the source's relay, TLS, the
target's relay and page server, after every byte sent before it. So the dump stops at
each process until the previous one's pages reached the target's disk, and the rest of
the dump (mounts, namespaces) can only start once all pages arrived.

The answer is known in advance: kamra never pre-dumps, so no parent exists on the
target (its page server writes into an empty staging directory). ``AnswerAhead`` sits
in the source's relay: it answers ``PS_IOV_OPEN2`` at once with "no parent", passes the
command on, and drops the target's own answer when it comes (checking it said the same).
Every other answer (the closing ``PS_IOV_FORCE_CLOSE``'s status, above all) still comes
from the target, so the dump still ends only once the target has every page, and a
failing page server still fails the dump. With a large socket buffer between CRIU and
the relay, the dump then hands over its pages at memory speed and goes on with the
namespaces while the pages cross.

Only for stop-and-copy streams: a lazy dump's page server is on the source (the target
asks with ``PS_IOV_GET``), and that stream is passed on as it is.
"""

from __future__ import annotations

import struct
from collections import deque

PAGE_SIZE = 4096
# struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; } on x86-64
HEADER = struct.Struct("=I4xQQQ")
PS_IOV_ADD = 1
PS_IOV_HOLE = 2
PS_IOV_OPEN = 3
PS_IOV_OPEN2 = 4
PS_IOV_PARENT = 5
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
PS_CMD_MASK = 0xFFFF
PS_CMD_BITS = 16
PE_PRESENT = 1 << 2  # pages follow the command
NO_PARENT = b"\x00"
# Said to a lazy dump's page server in place of the lazy-pages daemon's requests: no
# command it knows, whatever 32 of these bytes it reads as one, so it fails (and CRIU
# resumes the dumped tasks) instead of taking the end of the stream as all pages sent
# (and killing them).
ABORT = b"\xff" * (2 * HEADER.size)


class ProtocolError(Exception):
    """The stream is not what a stop-and-copy dump sends: stop relaying it."""


class AnswerAhead:
    """Reads the dump's commands as they pass (``outgoing``) and the server's answers
    (``incoming``); see the module docstring."""

    def __init__(self) -> None:
        self._header = bytearray()  # a command split across reads
        self._skip = 0  # page bytes still to pass before the next command
        self._answers: deque[list] = deque()  # [bytes left, dropped?] per awaited answer
        self.answered = 0  # OPEN2s answered here

    def outgoing(self, data: bytes | memoryview) -> bytes:
        """``data`` goes on to the server unchanged; returns what to answer the dump
        with at once."""
        view = memoryview(data)
        reply = b""
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = HEADER.size - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) < HEADER.size:
                break
            cmd, nr_pages, _vaddr, _dst = HEADER.unpack(self._header)
            self._header.clear()
            reply += self._command(cmd, nr_pages)
        return reply

    def _command(self, cmd: int, nr_pages: int) -> bytes:
        kind, flags = cmd & PS_CMD_MASK, cmd >> PS_CMD_BITS
        if kind == PS_IOV_OPEN2:
            self._answers.append([1, True])
            self.answered += 1
            return NO_PARENT
        if kind in (PS_IOV_PARENT, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
            self._answers.append([4, False])  # an int the dump waits for
        elif kind == PS_IOV_ADD or (kind == PS_IOV_ADD_F and flags & PE_PRESENT):
            self._skip = nr_pages * PAGE_SIZE
        elif kind not in (PS_IOV_ADD_F, PS_IOV_HOLE, PS_IOV_OPEN):
            raise ProtocolError(f"unexpected page-server command {cmd:#x}")
        return b""

    def incoming(self, data: bytes | memoryview) -> bytes:
        """What of the server's ``data`` goes on to the dump (its OPEN2 answers,
        already given, do not)."""
        passed = bytearray()
        view = memoryview(data)
        while view:
            if not self._answers:
                passed += view  # nothing awaited: not ours to judge
                break
            answer = self._answers[0]
            step = min(answer[0], len(view))
            if answer[1]:
                if bytes(view[:step]) != NO_PARENT * step:
                    raise ProtocolError("the page server found a parent checkpoint")
            else:
                passed += view[:step]
            view = view[step:]
            answer[0] -= step
            if not answer[0]:
                self._answers.popleft()
        return bytes(passed)
