"""The page relay (kamra.remote.relay) over a real TLS connection on loopback: what one
local socket writes reaches the other intact, whatever the read sizes, and an end on
either side reaches the other."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading

import pytest

from kamra.remote import tls
from kamra.remote.relay import Relayed, relay, socket_pair


class Pair:
    """Two relays joined by TLS: ``a`` and ``b`` are the local ends CRIU would hold."""

    def __init__(self, chunk: int):
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
            thread = threading.Thread(target=self._run, args=(side, remote, ours, chunk),
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
        self.a, self.b = ends

    def _run(self, side: str, remote, ours, chunk: int) -> None:
        try:
            self.results[side] = relay(remote, ours, chunk=chunk)
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
