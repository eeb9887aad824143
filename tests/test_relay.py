"""The page relay (kamra.remote.relay) over a real TLS connection on loopback: what one
local socket writes reaches the other intact, whatever the read sizes, and an end on
either side reaches the other; with the page-server protocol tap (AnswerAhead), the
answers it knows are given at once and the others come from the far side."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading

import pytest

from kamra.checkpoint import page_protocol as pp
from kamra.remote import tls
from kamra.remote.relay import BufferPool, Relayed, relay, socket_pair


class Pair:
    """Two relays joined by TLS: ``a`` and ``b`` are the local ends CRIU would hold."""

    def __init__(self, chunk: int, tap_a: bool = False, pool: BufferPool | None = None):
        self.pool = pool
        self.dir = tempfile.TemporaryDirectory()
        cert, key = tls.ensure_certificate(self.dir.name)
        context = tls.server_context(cert, key)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        accepted: list = []
        waiter = threading.Thread(target=lambda: accepted.append(
            context.wrap_socket(listener.accept()[0], server_side=True)))
        waiter.start()
        client, _ = tls.connect(listener.getsockname(), None)
        waiter.join(10)
        listener.close()
        server = accepted[0]
        self.results: dict[str, Relayed] = {}
        self.threads = []
        ends = []
        for side, remote in (("a", client), ("b", server)):
            ours, theirs = socket_pair()
            ends.append(theirs)
            tap = pp.AnswerAhead() if tap_a and side == "a" else None
            thread = threading.Thread(target=self._run,
                                      args=(side, remote, ours, chunk, tap), daemon=True)
            thread.start()
            self.threads.append(thread)
        self.a, self.b = ends

    def _run(self, side: str, remote, ours, chunk: int, tap) -> None:
        try:
            self.results[side] = relay(remote, ours, chunk=chunk, tap=tap,
                                       pool=self.pool if side == "a" else None)
        finally:
            ours.close()
            remote.close()

    def close(self) -> None:
        for end in (self.a, self.b):
            end.close()  # closing twice is harmless
        for thread in self.threads:
            thread.join(10)
        self.dir.cleanup()


@pytest.mark.parametrize("chunk", [1 << 20, 1000])
def test_bytes_arrive_intact_and_ends_pass_through(chunk):
    """1000-byte reads leave most of each 16 KB TLS record decrypted but unread (the
    relay must not then wait on its quiet local side: it once did)."""
    pair = Pair(chunk)
    try:
        data = os.urandom(24 << 20)
        received = hashlib.sha256()
        got = [0]

        def read() -> None:
            pair.b.settimeout(30)
            while chunk_ := pair.b.recv(1 << 16):
                received.update(chunk_)
                got[0] += len(chunk_)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        pair.a.sendall(data)
        pair.a.shutdown(socket.SHUT_WR)  # its relay ends, closing TLS: b reads the end
        reader.join(60)
        assert not reader.is_alive(), f"stalled after {got[0]} of {len(data)} bytes"
        assert received.hexdigest() == hashlib.sha256(data).hexdigest()
        pair.b.close()  # b's side is done too (as a page server exits): its relay ends
        for thread in pair.threads:
            thread.join(10)
        assert pair.results["a"].sent == len(data) and not pair.results["a"].cut
        assert pair.results["b"].received == len(data) and pair.results["b"].cut
    finally:
        pair.close()


def header(cmd: int, nr_pages: int = 0, vaddr: int = 0, dst: int = 0) -> bytes:
    return pp.HEADER.pack(cmd, nr_pages, vaddr, dst)


ADD_PRESENT = pp.PE_PRESENT << pp.PS_CMD_BITS | pp.PS_IOV_ADD_F


def test_answer_ahead_reads_the_page_server_protocol():
    """OPEN2 is answered at once and the server's own answer to it dropped; pages are
    skipped over whatever the read sizes; other answers pass through."""
    pages = os.urandom(3 * pp.PAGE_SIZE)
    stream = (header(pp.PS_IOV_OPEN2, dst=7) + header(ADD_PRESENT, 3, 0x1000, 7) + pages
              + header(pp.PS_IOV_HOLE, 2) + header(pp.PS_IOV_OPEN2, dst=8)
              + header(pp.PS_IOV_PARENT) + header(pp.PS_IOV_FORCE_CLOSE))
    for size in (1, 7, 4096, len(stream)):
        tap = pp.AnswerAhead()
        answered = b"".join(tap.outgoing(stream[i:i + size])
                            for i in range(0, len(stream), size))
        assert answered == pp.NO_PARENT * 2 and tap.answered == 2
        # The server's answers, in order: OPEN2 (dropped), OPEN2 (dropped), PARENT, CLOSE.
        server = b"\x00" + b"\x00" + b"\x01\x00\x00\x00" + b"\x00\x00\x00\x00"
        passed = b"".join(tap.incoming(server[i:i + size])
                          for i in range(0, len(server), size))
        assert passed == b"\x01\x00\x00\x00" + b"\x00\x00\x00\x00"


def test_answer_ahead_refuses_what_it_does_not_know():
    tap = pp.AnswerAhead()
    with pytest.raises(pp.ProtocolError):
        tap.outgoing(header(pp.PS_IOV_GET, 1))  # a lazy stream: not for this tap
    tap = pp.AnswerAhead()
    tap.outgoing(header(pp.PS_IOV_OPEN2))
    with pytest.raises(pp.ProtocolError):
        tap.incoming(b"\x01")  # the server had a parent: our answer was wrong


def test_a_tapped_relay_answers_open_before_the_server_reads():
    """A dump's OPEN2 is answered by its own relay while the far side has read nothing;
    the far side's answer to it never reaches the dump, its closing status does."""
    pair = Pair(1 << 20, tap_a=True)
    try:
        pair.a.settimeout(10)
        pair.b.settimeout(10)
        pages = os.urandom(64 * pp.PAGE_SIZE)
        pair.a.sendall(header(pp.PS_IOV_OPEN2, dst=1))
        assert pair.a.recv(1) == pp.NO_PARENT  # b has not read a byte yet
        pair.a.sendall(header(ADD_PRESENT, 64, 0x10000, 1) + pages
                       + header(pp.PS_IOV_FORCE_CLOSE))
        expected = (header(pp.PS_IOV_OPEN2, dst=1) + header(ADD_PRESENT, 64, 0x10000, 1)
                    + pages + header(pp.PS_IOV_FORCE_CLOSE))
        got = b""
        while len(got) < len(expected):
            got += pair.b.recv(1 << 20)
        assert got == expected  # passed on unchanged
        pair.b.sendall(b"\x00" + b"\x05\x00\x00\x00")  # OPEN2's answer, then the status
        assert pair.a.recv(16) == b"\x05\x00\x00\x00"
        pair.a.close()  # the dump ends first (as CRIU does): its relay ends uncut
        pair.threads[0].join(10)
        pair.b.close()
        pair.threads[1].join(10)
        assert not pair.results["a"].cut
    finally:
        pair.close()


def test_a_tapped_relay_cuts_a_stream_it_does_not_understand():
    pair = Pair(1 << 20, tap_a=True)
    try:
        pair.a.settimeout(10)
        pair.a.sendall(header(0x77))
        assert pair.a.recv(16) == b""  # cut: the dump sees the end, as on a broken link
        pair.a.close()
        pair.b.close()
        for thread in pair.threads:
            thread.join(10)
        assert pair.results["a"].cut
    finally:
        pair.close()


class CountingPool(BufferPool):
    def __init__(self) -> None:
        super().__init__()
        self.taken = self.given = 0
        self._count = threading.Lock()  # (given from two threads)

    def take(self) -> bytearray:
        with self._count:
            self.taken += 1
        return super().take()

    def give(self, buffer: bytearray) -> None:
        with self._count:
            self.given += 1
        super().give(buffer)


def test_a_tapped_relay_reads_into_its_pool_and_gives_every_chunk_back():
    """The dump's pages go through reused chunks made before the freeze; 48 MB through a
    pool warmed with 4 MB arrive intact, and every chunk is back in the pool at the end."""
    pool = CountingPool()
    pool.warm(4 << 20)
    pair = Pair(1 << 20, tap_a=True, pool=pool)
    try:
        pair.a.settimeout(30)
        pair.b.settimeout(30)
        pages = os.urandom(12288 * pp.PAGE_SIZE)
        sent = (header(pp.PS_IOV_OPEN2, dst=1) + header(ADD_PRESENT, 12288, 0x10000, 1)
                + pages + header(pp.PS_IOV_FORCE_CLOSE))
        writer = threading.Thread(target=pair.a.sendall, args=(sent,))
        writer.start()
        assert pair.a.recv(1) == pp.NO_PARENT
        received = hashlib.sha256()
        size = 0
        while size < len(sent):
            data = pair.b.recv(1 << 20)
            assert data
            received.update(data)
            size += len(data)
        writer.join(30)
        assert received.digest() == hashlib.sha256(sent).digest()
        pair.b.sendall(b"\x00" + b"\x00\x00\x00\x00")
        assert pair.a.recv(16) == b"\x00\x00\x00\x00"
        pair.a.close()
        pair.threads[0].join(10)
        assert pool.taken >= 48  # the pages went through the pool's chunks
        assert pool.given == pool.taken  # and every chunk came back
    finally:
        pair.close()
