"""Messages between kamra hosts: a JSON header and optional raw bytes, length-prefixed.

Frame: 4-byte header length, 8-byte payload length (network order), the header (JSON),
the payload. Files travel as a sequence of ``{"op": "chunk"}`` frames ended by
``{"op": "end"}``, so a receiver never buffers more than one chunk.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import BinaryIO

_FRAME = struct.Struct("!IQ")
MAX_HEADER = 1 << 20
CHUNK = 1 << 20


class WireError(Exception):
    pass


def send(sock: socket.socket, message: dict, payload: bytes = b"") -> None:
    header = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_FRAME.pack(len(header), len(payload)) + header + payload)


def _exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        data = sock.recv(min(remaining, CHUNK))
        if not data:
            raise WireError("the other host closed the connection")
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def recv(sock: socket.socket, max_payload: int = 4 * CHUNK) -> tuple[dict, bytes]:
    head, size = _FRAME.unpack(_exact(sock, _FRAME.size))
    if head > MAX_HEADER or size > max_payload:
        raise WireError(f"oversized message ({head} + {size} bytes)")
    message = json.loads(_exact(sock, head))
    if not isinstance(message, dict):
        raise WireError("malformed message")
    return message, _exact(sock, size) if size else b""


class FileSender:
    """A writable file object whose bytes go out as chunk frames; ``close`` sends the end."""

    def __init__(self, sock: socket.socket, on_sent: Callable[[int], None] | None = None):
        self.sock = sock
        self.buffer = bytearray()
        self.sent = 0
        self.on_sent = on_sent

    def write(self, data: bytes) -> int:
        self.buffer += data
        while len(self.buffer) >= CHUNK:
            self._flush(CHUNK)
        return len(data)

    def _flush(self, size: int) -> None:
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        send(self.sock, {"op": "chunk"}, chunk)
        self.sent += len(chunk)
        if self.on_sent:
            self.on_sent(self.sent)

    def flush(self) -> None:
        pass  # whole chunks only: the end of the stream sends the rest

    def close(self) -> None:
        if self.buffer:
            self._flush(len(self.buffer))
        send(self.sock, {"op": "end", "bytes": self.sent})


def recv_file(sock: socket.socket, out: BinaryIO, limit: int) -> int:
    """Write a file's chunks to ``out``. If writing fails (a full disk), the rest is
    read and dropped and then the error raised, so the next message is in step."""
    got = 0
    failed: OSError | None = None
    while True:
        message, payload = recv(sock)
        if message.get("op") == "end":
            if failed is not None:
                raise failed
            if message.get("bytes") != got:
                raise WireError("the file arrived incomplete")
            return got
        if message.get("op") != "chunk":
            raise WireError(f"expected file data, got {message.get('op')!r}")
        got += len(payload)
        if got > limit:
            raise WireError(f"the file is larger than {limit} bytes")
        if failed is None:
            try:
                out.write(payload)
            except OSError as exc:
                failed = exc
