"""Length-prefixed JSON messages with file descriptors over a Unix stream socket.

This is the wire format between kamrad and the keeper, and between the CLI and a
session (exec, console) once kamrad has handed it over. Descriptors ride as
SCM_RIGHTS on the message's first byte.
"""

from __future__ import annotations

import array
import json
import socket
import struct

_HEADER = struct.Struct("!I")
MAX_FDS = 8
MAX_MESSAGE = 1 << 20


def send(sock: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    data = _HEADER.pack(len(body)) + body
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        data, anc, _flags, _addr = sock.recvmsg(
            remaining, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            return None
        chunks.append(data)
        remaining -= len(data)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """Receive one message; (None, []) at end of stream. Received fds are the caller's."""
    fds: list[int] = []
    header = _recv_exact(sock, _HEADER.size, fds)
    if header is None:
        return None, fds
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    body = _recv_exact(sock, size, fds) if size else b""
    if body is None:
        return None, fds
    return json.loads(body), fds
