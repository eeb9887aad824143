"""Carry a local socket's bytes over an authenticated TLS connection, both ways.

CRIU's page server protocol runs over a plain socket it is handed (``ps.fd`` on the
dump side, ``--ps-socket`` on the page server). kamra gives each side one end of a
Unix socketpair and relays the other end over the TLS connection between the two
kamrads, so memory pages cross the network only encrypted and only to the host whose
certificate was pinned: CRIU never listens on a port.

One thread, one loop: an OpenSSL connection must not be read and written from two
threads at once. The TLS socket is non-blocking (a readable TCP socket may carry only
part of a TLS record); the local socket blocks, which is the back-pressure: while CRIU
does not read, the relay does not read from the network either.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kamra.checkpoint.page_protocol import AnswerAhead, ProtocolError

CHUNK = 1 << 20
BUFFER = 4 << 20
# What a stop-and-copy dump may hand over before the relay took it: the pages of a
# 100 MB container, referenced (not copied) by the socket until sent.
AHEAD = 128 << 20
SO_SNDBUFFORCE = 32  # (not in Python's socket module) past net.core.wmem_max; root only


def socket_pair(ahead: int = 0) -> tuple[socket.socket, socket.socket]:
    """(kamrad's end, CRIU's end), with buffers large enough that a relay wakes up once
    per few megabytes of pages rather than once per default-sized buffer. ``ahead``:
    let each end queue that many bytes unread (as root), so that a writer need not
    wait for its reader (see ``AnswerAhead``)."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER)
        if ahead:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, ahead)
            except PermissionError:
                pass  # not root: the wmem_max-sized buffer above
    return ours, theirs


class BufferPool:
    """Chunks for a tapped relay to read a dump's pages into, reused, and made (so
    touched) before the freeze by ``warm``. Read into new memory, every page of it is
    faulted in while the tasks are frozen: about 4 us a page in this project's VMs (the
    host takes back freed memory at once), 100 ms of CPU for 100 MB; into these, none."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def warm(self, size: int) -> None:
        """Have ``size`` bytes of chunks ready (at most ``AHEAD``)."""
        wanted = min(size, AHEAD) // self.chunk
        made = [bytearray(self.chunk) for _ in range(wanted - len(self._free))]  # zeroed
        with self._lock:
            self._free.extend(made)

    def take(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.chunk)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            self._free.append(buffer)


def _send_tls(sock: ssl.SSLSocket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (ssl.SSLWantWriteError, BlockingIOError):
            select.select([], [sock], [])
        except ssl.SSLWantReadError:
            select.select([sock], [], [])


@dataclass
class Relayed:
    sent: int = 0  # bytes from the local side to the remote one
    received: int = 0
    cut: bool = False  # the remote side ended first: the local side's peer was cut off


def relay(remote: ssl.SSLSocket, local: socket.socket,
          on_sent: Callable[[int], None] | None = None, chunk: int = CHUNK,
          tap: AnswerAhead | None = None, pool: BufferPool | None = None) -> Relayed:
    """Copy until the local socket ends; returns what went each way. The caller closes
    ``remote`` afterwards: a TLS connection cannot be half-closed from Python, and the
    local side ending means its peer process is done (it wrote its last answer first).
    The remote side ending is passed on as a shutdown of writing; what the local side
    says after that has nowhere to go. ``chunk``: the most moved per read.

    ``tap``: the local side is a CRIU dump streaming pages; a thread reads it ahead of
    the network (up to ``AHEAD`` bytes held here) and gives the answers ``AnswerAhead``
    knows at once, so the dump does not wait for the network; a stream it does not
    understand is cut like a broken connection. It reads into ``pool``'s chunks (a new
    pool if None)."""
    remote.setblocking(False)
    local.setblocking(True)
    done = Relayed()
    remote_open = True
    inbox = memoryview(bytearray(chunk))
    pool = pool or BufferPool(chunk)
    ahead = _ReadAhead(local, tap, pool) if tap is not None else None
    watched = ahead.wakeup if ahead is not None else local

    def cut() -> None:
        nonlocal remote_open
        remote_open = False
        done.cut = True
        _shutdown(local)

    try:
        while True:
            if remote_open and remote.pending():  # decrypted already: no wait for it
                ready = [remote, *select.select([watched], [], [], 0)[0]]
            else:
                ready = select.select([watched, remote] if remote_open else [watched],
                                      [], [])[0]
            if remote_open and remote in ready:
                incoming = _drain(remote, inbox)
                if incoming == b"":
                    cut()
                elif incoming:
                    done.received += len(incoming)
                    try:
                        local.sendall(tap.incoming(incoming) if tap else incoming)
                    except ProtocolError:
                        cut()
                    except OSError:
                        pass  # the local peer is gone: its end shows up as EOF below
            if watched not in ready:
                continue
            for data, buffer in (ahead.take() if ahead is not None
                                 else [(local.recv(chunk), None)]):
                try:
                    if not data:
                        return done
                    if data is _BROKEN:
                        if remote_open:
                            cut()
                        continue
                    if remote_open:
                        try:
                            _send_tls(remote, data)
                            done.sent += len(data)
                            if on_sent is not None:
                                on_sent(done.sent)
                        except OSError:
                            cut()
                finally:
                    if buffer is not None:  # sent (TLS copied it) or dropped
                        pool.give(buffer)
    finally:
        remote.setblocking(True)
        if ahead is not None:
            ahead.close()


_BROKEN = b"broken"  # (compared by identity) the tapped stream broke the protocol


class _ReadAhead:
    """Reads a tapped local socket in a thread, as fast as it is written, into a queue
    of at most ``AHEAD`` bytes held in ``pool``'s chunks; ``wakeup`` becomes readable
    when there is something to ``take``: (data, chunk) pairs, each chunk to be given
    back to the pool once its data went. Ends with b"" (the local side ended) after
    ``_BROKEN`` if the tap refused the stream (then what follows is read and dropped, so
    the writer never blocks)."""

    def __init__(self, local: socket.socket, tap: AnswerAhead, pool: BufferPool):
        self._local, self._tap, self._pool = local, tap, pool
        self._queue: list[tuple[bytes | memoryview, bytearray | None]] = []
        self._queued = 0
        self._room = threading.Condition()
        self._closed = False
        self.wakeup, self._wake = socket.socketpair()
        self.wakeup.setblocking(False)
        self._wake.setblocking(False)
        threading.Thread(target=self._run, name="kamra-read-ahead", daemon=True).start()

    def _run(self) -> None:
        broken = False
        while True:
            with self._room:
                while self._queued >= AHEAD and not self._closed:
                    self._room.wait()
                if self._closed:
                    return
            buffer: bytearray | None = self._pool.take()
            try:
                size = self._local.recv_into(buffer)
            except OSError:
                size = 0
            data: bytes | memoryview = memoryview(buffer)[:size] if size else b""
            if not size:
                self._pool.give(buffer)
                buffer = None
            if data and not broken:
                try:
                    if early := self._tap.outgoing(data):
                        self._local.sendall(early)
                except ProtocolError:
                    broken = True
                    self._pool.give(buffer)
                    data, buffer = _BROKEN, None
                except OSError:
                    pass  # the local peer is gone: its end comes next
            elif broken and data:
                self._pool.give(buffer)
                continue
            with self._room:
                self._queue.append((data, buffer))
                self._queued += len(data)
            try:
                self._wake.send(b"!")
            except (BlockingIOError, OSError):
                pass  # a wakeup is pending already
            if not data:
                return

    def take(self) -> list[tuple[bytes | memoryview, bytearray | None]]:
        try:
            while self.wakeup.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._room:
            taken, self._queue = self._queue, []
            self._queued = 0
            self._room.notify()
        return taken

    def close(self) -> None:
        with self._room:
            self._closed = True
            self._room.notify()
        self.wakeup.close()
        self._wake.close()


def _drain(sock: ssl.SSLSocket, inbox: memoryview) -> memoryview | bytes | None:
    """What the TLS connection has for us now, up to the size of ``inbox``: b"" at its
    end, None if nothing yet. TLS hands over one record (16 KB) per read; gathering
    them makes one local write per megabyte instead of a wakeup, a read and a write per
    record (100 MB through two relays and TLS on loopback: 207-275 ms before, 133-207 ms
    after, against 125-150 ms for bare TLS)."""
    size = 0
    while size < len(inbox):
        try:
            got = sock.recv_into(inbox[size:])
        except (ssl.SSLWantReadError, BlockingIOError):
            break
        except OSError:
            got = 0
        if not got:
            if not size:
                return b""
            break  # the end shows up again at the next read
        size += got
    return inbox[:size] if size else None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
