"""Messages between kamra hosts: a JSON header and optional raw bytes, length-prefixed.

Frame: 4-byte header length, 8-byte payload length (network order), the header (JSON),
the payload. Files travel as a sequence of ``{"op": "chunk"}`` frames ended by
``{"op": "end"}``, so a receiver never buffers more than one chunk. A directory of
plain files (CRIU's images) travels as they are: small files together in
``{"op": "images", "files": [[name, size], ...]}`` frames, a large one as
``{"op": "image", "name": ...}`` and its chunks, then ``{"op": "images-end"}``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
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


_BATCH = CHUNK  # small files travel together, up to this many bytes a frame
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def plain_files(directory: str) -> list[str] | None:
    """The names of the files in ``directory`` if it holds plain files only (what
    ``send_files`` can send); None otherwise."""
    names = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False) or not _FILE_NAME.fullmatch(entry.name):
                return None
            names.append(entry.name)
    return sorted(names)


def send_files(sock: socket.socket, directory: str, names: list[str]) -> int:
    """Send the files ``names`` of ``directory``; returns the bytes of their content."""
    sent = 0
    batch: list[list] = []
    payload = bytearray()

    def flush() -> None:
        if batch:
            send(sock, {"op": "images", "files": batch}, bytes(payload))
            batch.clear()
            payload.clear()

    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            if os.fstat(f.fileno()).st_size > _BATCH:
                flush()
                send(sock, {"op": "image", "name": name})
                sender = FileSender(sock)
                shutil.copyfileobj(f, sender, CHUNK)
                sender.close()
                sent += sender.sent
                continue
            data = f.read()
        if len(payload) + len(data) > _BATCH:
            flush()
        batch.append([name, len(data)])
        payload += data
        sent += len(data)
    flush()
    send(sock, {"op": "images-end", "count": len(names)})
    return sent


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def recv_files(sock: socket.socket, directory: str, limit: int) -> int:
    """Receive what ``send_files`` sent into the existing ``directory`` (new files only:
    a name that exists is refused). As with ``recv_file``, a failing write (a full
    disk) is raised once all of it was read."""
    got = count = 0
    failed: OSError | None = None

    def create(name: object) -> BinaryIO:
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
            raise WireError(f"bad file name {name!r}")
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | os.O_NOFOLLOW | os.O_CLOEXEC, stat.S_IRUSR | stat.S_IWUSR)
        return open(fd, "wb")  # noqa: SIM115 - closed by the caller

    while True:
        message, payload = recv(sock)
        op = message.get("op")
        if op == "images-end":
            if failed is not None:
                raise failed
            if message.get("count") != count:
                raise WireError("the files arrived incomplete")
            return got
        if op == "images":
            files = message.get("files")
            if not isinstance(files, list) or not all(
                    isinstance(entry, list) and len(entry) == 2
                    and isinstance(entry[1], int) and entry[1] >= 0 for entry in files
            ) or sum(entry[1] for entry in files) != len(payload):
                raise WireError("malformed file batch")
            offset = 0
            for name, size in files:
                got += size
                if got > limit:
                    raise WireError(f"the files are larger than {limit} bytes")
                try:
                    if failed is None:
                        with create(name) as out:
                            out.write(payload[offset:offset + size])
                except OSError as exc:
                    failed = exc
                offset += size
                count += 1
        elif op == "image":
            out: BinaryIO | _Discard = _Discard()
            try:
                if failed is None:
                    out = create(message.get("name"))
            except OSError as exc:
                failed = exc
            try:
                got += recv_file(sock, out, limit - got)  # type: ignore[arg-type]
            except OSError as exc:
                failed = failed or exc
            finally:
                if not isinstance(out, _Discard):
                    out.close()
            count += 1
        else:
            raise WireError(f"expected files, got {op!r}")
