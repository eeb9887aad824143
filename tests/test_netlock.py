"""kamra's restore lock (kamra.checkpoint.netlock) in a real network namespace: nothing
gets in or out while it holds but CRIU's marked packets; released, traffic flows at once
and the table goes away."""

from __future__ import annotations

import os
import socket
import time

import pytest

from kamra.checkpoint.netlock import SOCCR_MARK, TABLE, RestoreLock
from kamra.linux import libc
from kamra.network import netns
from kamra.network.nft import open_backend


def _connects(port: int) -> str:
    sock = socket.socket()
    sock.settimeout(0.5)
    try:
        sock.connect(("127.0.0.1", port))
        return "connected"
    except TimeoutError:
        return "dropped"
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        sock.close()


def _datagram_arrives(mark: int) -> bool:
    """A UDP datagram over loopback, sent with ``mark`` on its socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.3)
        if mark:
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        try:
            tx.sendto(b"x", rx.getsockname())
            return rx.recv(1) == b"x"
        except (TimeoutError, PermissionError):  # dropped on the way in, or out (EPERM)
            return False


def _tables() -> str:
    backend = open_backend()
    try:
        return backend.run("list tables")[1]
    finally:
        backend.close()


@pytest.fixture
def ns():
    fd = netns.new_netns()
    netns.run_in_netns(fd, libc.interface_up, "lo")
    yield fd
    os.close(fd)


def test_the_restore_lock_holds_then_lets_traffic_through(ns):
    listener = netns.run_in_netns(ns, socket.create_server, ("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        assert netns.run_in_netns(ns, _connects, port) == "connected"
        lock = RestoreLock(ns)
        try:
            assert netns.run_in_netns(ns, _connects, port) == "dropped"
            assert netns.run_in_netns(ns, _datagram_arrives, SOCCR_MARK)  # CRIU's own
            assert not netns.run_in_netns(ns, _datagram_arrives, 0)
            began = time.monotonic()
            lock.release()
            assert netns.run_in_netns(ns, _connects, port) == "connected"
            assert time.monotonic() - began < 0.5  # (not a timing check: dropped is 0.5 s)
        finally:
            lock.close()
        deadline = time.monotonic() + 5
        while TABLE.split()[-1] in netns.run_in_netns(ns, _tables):
            assert time.monotonic() < deadline, "the lock's table stayed"
            time.sleep(0.05)
    finally:
        listener.close()


def test_a_restore_lock_closed_unreleased_leaves_the_namespace_locked(ns):
    """A failed restore's namespace goes with its tasks: closing the lock only frees
    kamra's handle and never opens the namespace by mistake."""
    lock = RestoreLock(ns)
    lock.close()
    assert TABLE.split()[-1] in netns.run_in_netns(ns, _tables)
