"""Console stream framing, shared by the keeper and the clients attached to a console.

Client to keeper: frames of one type byte, a 2-byte length and a payload:
``d`` input bytes for the container's console, ``w`` a window size (rows, cols).
Keeper to client: raw console output, then end of stream when the init exits.
"""

from __future__ import annotations

import struct

DATA = b"d"
WINSIZE = b"w"
_HEAD = struct.Struct("!cH")


def frame_data(data: bytes) -> bytes:
    out = bytearray()
    for start in range(0, len(data), 65535):
        chunk = data[start:start + 65535]
        out += _HEAD.pack(DATA, len(chunk)) + chunk
    return bytes(out)


def frame_winsize(rows: int, cols: int) -> bytes:
    payload = struct.pack("!HH", rows, cols)
    return _HEAD.pack(WINSIZE, len(payload)) + payload


def parse_frames(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    """Remove and return every whole frame at the start of ``buffer``."""
    frames = []
    while len(buffer) >= _HEAD.size:
        kind, size = _HEAD.unpack_from(buffer)
        if len(buffer) < _HEAD.size + size:
            break
        frames.append((kind, bytes(buffer[_HEAD.size:_HEAD.size + size])))
        del buffer[:_HEAD.size + size]
    return frames


def parse_winsize(payload: bytes) -> tuple[int, int]:
    rows, cols = struct.unpack("!HH", payload)
    return rows, cols


class ConsoleLog:
    """console.log capped in size: past the cap it is rotated to console.log.1."""

    def __init__(self, path: str, cap: int = 1 << 20):
        self.path = path
        self.cap = cap
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the init

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
            if self._file.tell() > self.cap:
                self._file.close()
                import os

                os.replace(self.path, self.path + ".1")
                self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
        except OSError:
            pass  # a full disk must not take the console down with it

    def close(self) -> None:
        self._file.close()
