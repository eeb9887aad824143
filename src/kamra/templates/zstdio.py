"""A zstd decompressing reader for untrusted input.

zstandard's own stream_reader returns a short stream, without error, when the input
ends inside a frame; a truncated download must be an error here. Output is bounded
too: zstd can expand 4 bytes into a 128 KiB block, so the input is fed in small
slices to keep one call's output small whatever the archive holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from kamra.errors import InvalidInput

_READ = 1 << 20
_SLICE = 2048  # at most 2 KiB * 32768 = 64 MiB of output per decompress() call
_MAGIC = b"\x28\xb5\x2f\xfd"


class ZstdReader:
    """Decompressed bytes of ``source`` through ``read(n)``; ``hash`` covers the raw input."""

    def __init__(self, source: BinaryIO, label: str,
                 on_input: Callable[[int], None] | None = None):
        self._source = source
        self._label = label
        self._on_input = on_input
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # bytes of an unfinished frame were fed
        self._frames = 0
        self._buf = bytearray()
        self._eof = False
        self.consumed = 0  # compressed bytes read
        self.produced = 0  # decompressed bytes handed out
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buf) < n) and not self._eof:
            self._fill()
        if n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:n])
            del self._buf[:n]  # cheap: bytearray deletes from the front in O(1)
        self.produced += len(out)
        return out

    def _fill(self) -> None:
        chunk = self._source.read(_READ)
        if not chunk:
            self._eof = True
            if self._in_frame:
                raise InvalidInput(f"{self._label} is truncated (the zstd stream ends "
                                   "inside a frame)")
            if self._frames == 0:
                raise InvalidInput(f"{self._label} is empty, not a zstd-compressed archive")
            return
        if self.consumed == 0 and not chunk.startswith(_MAGIC):
            raise InvalidInput(f"{self._label} is not a zstd-compressed archive (.tar.zst)")
        self.consumed += len(chunk)
        self.hash.update(chunk)
        view = memoryview(chunk)
        for start in range(0, len(view), _SLICE):
            self._feed(view[start:start + _SLICE])
        if self._on_input is not None:
            self._on_input(self.consumed)

    def _feed(self, data: memoryview | bytes) -> None:
        while data:
            try:
                self._buf += self._obj.decompress(data)
            except zstandard.ZstdError as exc:
                raise InvalidInput(f"{self._label} is corrupt: {exc}") from None
            self._in_frame = True
            if not self._obj.eof:
                return
            # A frame ended; what follows belongs to the next frame (zstd -T writes several).
            self._frames += 1
            self._in_frame = False
            data = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
