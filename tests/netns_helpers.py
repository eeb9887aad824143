"""Network namespaces and real traffic for the networking tests.

Namespaces are descriptors (kamra.network.netns.new_netns): closing the last one
destroys the namespace with every interface, route, nft table and qdisc in it, so a
failed test leaves nothing behind. Sockets are created by threads inside a namespace
and stay bound to it; no process is started.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from kamra.network import netns
from kamra.network.rtnl import Rtnl

T = TypeVar("T")


class Lab:
    """The namespaces of one test; ``close()`` destroys them all."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.servers: list[TcpServer] = []

    def netns(self, lo: bool = True) -> int:
        """A new namespace, with lo up unless told otherwise (as on any real host)."""
        fd = netns.new_netns()
        self.fds.append(fd)
        if lo:
            call(fd, _lo_up)
        return fd

    def close(self) -> None:
        for server in self.servers:
            server.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def server(self, ns_fd: int, host: str, port: int) -> TcpServer:
        server = TcpServer(ns_fd, host, port)
        self.servers.append(server)
        return server


def call(ns_fd: int, func: Callable[..., T], *args: object) -> T:
    """Run kamra's library (or anything) inside the namespace ``ns_fd``."""
    return netns.run_in_netns(ns_fd, func, *args)


def _lo_up() -> None:
    with Rtnl() as nl:
        nl.set_link(nl.link_index("lo"), up=True)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.settimeout(0.2)
    return sock


class TcpServer:
    """Answers each connection with the peer address it saw, and records it."""

    def __init__(self, ns_fd: int, host: str, port: int):
        self.sock = call(ns_fd, _listening, host, port)
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            with conn:
                try:
                    conn.sendall(f"{peer[0]}\n".encode())
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _new_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_STREAM)


def tcp_ask(ns_fd: int, host: str, port: int, timeout: float = 5.0) -> str:
    """Connect from inside ``ns_fd``; returns the peer address the server saw."""
    sock = call(ns_fd, _new_socket, _family(host))
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def reachable(ns_fd: int, host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection from ``ns_fd`` gets an answer (drops time out)."""
    try:
        tcp_ask(ns_fd, host, port, timeout)
        return True
    except OSError:
        return False


def throughput(send_ns: int, recv_ns: int, host: str, port: int,
               seconds: float = 3.0, skip: float = 0.7) -> float:
    """Goodput in bits/s of one TCP stream ``send_ns`` -> ``host:port`` in ``recv_ns``.

    Measured at the receiver between ``skip`` seconds after the first byte and the
    sender's end, so slow start and the shaper's initial burst do not count.
    """
    listener = call(recv_ns, _listening, host, port)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def receive() -> None:
        listener.settimeout(10)
        conn, _ = listener.accept()
        total = 0
        with conn:
            conn.settimeout(10)
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                total += len(chunk)
                samples.append((time.monotonic(), total))
        done.set()

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    sender = call(send_ns, _new_socket, _family(host))
    payload = b"\0" * (1 << 16)
    try:
        sender.settimeout(10)
        sender.connect((host, port))
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            sender.send(payload)
        ended = time.monotonic()
    finally:
        sender.close()
    receiver.join(timeout=30)
    listener.close()
    assert samples, "nothing arrived"
    first = samples[0][0]
    window = [(t, n) for t, n in samples if first + skip <= t <= ended]
    assert len(window) >= 2, "too few samples to measure"
    (t0, n0), (t1, n1) = window[0], window[-1]
    return (n1 - n0) * 8 / (t1 - t0)


def link_names(ns_fd: int) -> set[str]:
    def names() -> set[str]:
        with Rtnl() as nl:
            return {msg.get_attr("IFLA_IFNAME") for msg in nl.links()}
    return call(ns_fd, names)


def own_link_names() -> set[str]:
    """Interfaces of the calling thread's namespace (the test process's own)."""
    with Rtnl() as nl:
        return {msg.get_attr("IFLA_IFNAME") for msg in nl.links()}
