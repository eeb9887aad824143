"""A relay (see ``kamra.remote.relay``) whose TLS connection may break and be replaced.

Lazy pages keep a container's memory on the source after it resumed on the target, so a
cut of the page connection must not end the transfer: both kamrads keep their CRIU's
local socket, the source connects again, and each side resends what the other had not
received. To know that, the bytes travel in frames, and each side acknowledges what it
received every megabyte; what is acknowledged is dropped from the resend buffer.

Frame: kind (1 byte), length (4 bytes), payload. DATA carries bytes of the stream, ACK
an 8-byte count of bytes received so far, END says the local side finished (its peer
then ends its CRIU's input). A connection that ends without END is a cut.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import ssl
import struct
from collections.abc import Callable

from kamra.remote.relay import CHUNK, Relayed, _drain, _send_tls, _shutdown

log = logging.getLogger("kamra.remote")

_HEAD = struct.Struct("!BI")
_COUNT = struct.Struct("!Q")
DATA, ACK, END = 0, 1, 2
ACK_EVERY = 1 << 20

# renew(received) -> (a new connection, what the peer received), or give up: None ends
# the local side's stream; bytes are said to the local side first (its peer's last
# words, e.g. a command that makes it fail rather than end well).
Renew = Callable[[int], "tuple[ssl.SSLSocket, int] | bytes | None"]


class Stream:
    """One side's state across connections."""

    def __init__(self, local: socket.socket, on_sent: Callable[[int], None] | None = None):
        self.local = local
        self.on_sent = on_sent
        self.sent = 0  # stream bytes taken from the local side
        self.received = 0  # stream bytes given to the local side
        self.acked_sent = 0  # what we last told the peer we received
        self.unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self.local_done = False  # our END went (or must go again after a renew)
        self.peer_done = False
        self.cuts = 0
        self.current: ssl.SSLSocket | None = None  # the connection in use

    def _frame(self, kind: int, payload: bytes = b"") -> bytes:
        return _HEAD.pack(kind, len(payload)) + payload

    def _drop_acked(self, upto: int) -> None:
        while self.unacked:
            start, data = self.unacked[0]
            if start + len(data) <= upto:
                self.unacked.popleft()
            elif start < upto:
                self.unacked[0] = (upto, data[upto - start:])
                break
            else:
                break

    def run(self, remote: ssl.SSLSocket, renew: Renew) -> Relayed:
        """Relay until both sides finished; on a cut, ``renew`` and go on."""
        while True:
            self.current = remote
            if self._over(remote):
                return Relayed(self.sent, self.received, cut=False)
            self.current = None
            remote.close()
            self.cuts += 1
            log.warning("the page stream broke (%d bytes out, %d in): reconnecting",
                        self.sent, self.received)
            renewed = renew(self.received)
            if renewed is None or isinstance(renewed, bytes):
                if renewed:
                    try:
                        self.local.sendall(renewed)
                    except OSError:
                        pass  # the local side is gone already
                _shutdown(self.local)
                return Relayed(self.sent, self.received, cut=True)
            remote, peer_received = renewed
            self._drop_acked(peer_received)
            try:  # what the peer lost on the way, then our END again if it went
                for _, data in self.unacked:
                    _send_tls(remote, self._frame(DATA, data))
                if self.local_done:
                    _send_tls(remote, self._frame(END))
            except OSError:
                continue

    def _over(self, remote: ssl.SSLSocket) -> bool:
        """One connection's life: True when the stream ended, False on a cut."""
        remote.setblocking(False)
        self.local.setblocking(True)
        pending = bytearray()
        inbox = memoryview(bytearray(CHUNK))
        try:
            while not (self.local_done and self.peer_done):
                watch = [remote] if self.local_done else [self.local, remote]
                if remote.pending():
                    ready = [remote, *select.select([] if self.local_done else [self.local],
                                                    [], [], 0)[0]]
                else:
                    ready = select.select(watch, [], [])[0]
                if remote in ready:
                    got = _drain(remote, inbox)
                    if got == b"":
                        return False
                    if got:
                        pending += got
                        self._frames(pending, remote)
                if self.local in ready:
                    data = self.local.recv(CHUNK)
                    if not data:
                        self.local_done = True
                        _send_tls(remote, self._frame(END))
                        continue
                    self.unacked.append((self.sent, data))
                    self.sent += len(data)
                    _send_tls(remote, self._frame(DATA, data))
                    if self.on_sent is not None:
                        self.on_sent(self.sent)
            return True
        except OSError:
            return False
        finally:
            try:
                remote.setblocking(True)
            except OSError:
                pass

    def _frames(self, pending: bytearray, remote: ssl.SSLSocket) -> None:
        """Act on the whole frames at the start of ``pending`` and remove them."""
        at = 0
        while len(pending) - at >= _HEAD.size:
            kind, size = _HEAD.unpack_from(pending, at)
            if len(pending) - at < _HEAD.size + size:
                break
            payload = bytes(pending[at + _HEAD.size:at + _HEAD.size + size])
            at += _HEAD.size + size
            if kind == DATA:
                try:
                    self.local.sendall(payload)
                except OSError:
                    pass  # CRIU went away: its end shows up as EOF
                self.received += len(payload)
                if self.received - self.acked_sent >= ACK_EVERY:
                    self.acked_sent = self.received
                    _send_tls(remote, self._frame(ACK, _COUNT.pack(self.received)))
            elif kind == ACK:
                self._drop_acked(_COUNT.unpack(payload)[0])
            elif kind == END:
                self.peer_done = True
                _shutdown(self.local)
        del pending[:at]
