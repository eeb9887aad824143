"""Network namespaces as file descriptors, without moving the calling process.

A network namespace is per thread in Linux: a thread may ``unshare(CLONE_NEWNET)`` or
``setns`` into one on its own, even in a multi-threaded process. So kamrad (many
threads) never changes its own namespace: a short-lived thread enters the target
namespace, creates what must live there (a namespace, a netlink socket, an open
``/proc/sys`` file) and exits. Sockets stay bound to the namespace they were created
in, and a namespace lives as long as a descriptor, a socket or a process holds it,
so no ``/run/netns`` bind mount and no helper process is needed.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from kamra.errors import KernelError
from kamra.linux import libc
from kamra.network.rtnl import Rtnl

if TYPE_CHECKING:
    from pyroute2 import IPRoute

T = TypeVar("T")

NETLINK_ROUTE = 0


class NetnsThread:
    """Start ``func(*args)`` now in a thread that joins ``ns_fd``; ``join()`` returns its result.

    Lets the host side and the container side of a veth be configured in parallel.
    The exception ``func`` raises is re-raised by ``join()``. The thread exits after
    the call, so nothing else ever runs in that namespace by accident.
    """

    def __init__(self, ns_fd: int, func: Callable[..., object], *args: object):
        self._result: list[object] = []
        self._failure: list[BaseException] = []

        def body() -> None:
            try:
                libc.setns(ns_fd, libc.CLONE_NEWNET)
            except OSError as exc:
                self._failure.append(KernelError("setns into a network namespace",
                                                 exc.errno or errno.EIO))
                return
            try:
                self._result.append(func(*args))
            except BaseException as exc:  # noqa: BLE001 - re-raised by join()
                self._failure.append(exc)

        self._thread = threading.Thread(target=body, name="kamra-netns", daemon=True)
        self._thread.start()

    def join(self) -> object:
        self._thread.join()
        if self._failure:
            raise self._failure[0]
        return self._result[0]


def run_in_netns(ns_fd: int, func: Callable[..., T], *args: object) -> T:
    """Call ``func(*args)`` in a fresh thread that has joined the namespace ``ns_fd``."""
    return NetnsThread(ns_fd, func, *args).join()  # type: ignore[return-value]


def _open_own_netns() -> int:
    # thread-self, not self: /proc/self/ns/net is the thread group leader's namespace.
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def _unshare_and_open() -> int:
    libc.unshare(libc.CLONE_NEWNET)
    return _open_own_netns()


def new_netns() -> int:
    """A descriptor (O_RDONLY, close-on-exec) of a new, empty network namespace.

    Made by a short-lived thread; the namespace lives until the descriptor (and any
    socket, interface peer or process in it) is gone. Closing it is the caller's job.
    """
    result: list[int] = []
    failure: list[OSError] = []

    def body() -> None:
        try:
            result.append(_unshare_and_open())
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=body, name="kamra-newns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise KernelError("create a network namespace", failure[0].errno or errno.EIO)
    return result[0]


def current_netns() -> int:
    """A descriptor of the calling thread's network namespace."""
    return _open_own_netns()


def netns_of_pid(pid: int) -> int:
    """A descriptor of process ``pid``'s network namespace."""
    try:
        return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError(f"open the network namespace of pid {pid}",
                          exc.errno or errno.EIO) from exc


def same_netns(fd_a: int, fd_b: int) -> bool:
    a, b = os.fstat(fd_a), os.fstat(fd_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _netlink_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)


def ipr_in(ns_fd: int) -> IPRoute:
    """An IPRoute whose netlink socket lives in the namespace ``ns_fd``.

    The socket is created by a thread inside the namespace and handed to pyroute2
    (``use_socket``). pyroute2 keeps per-thread state: use the object from the
    thread that called this (pyroute2 refuses another thread), and close it.
    """
    from pyroute2 import IPRoute  # the full IPRoute is slow to import: only when asked

    try:
        sock = run_in_netns(ns_fd, _netlink_socket)
    except OSError as exc:
        raise KernelError("open a netlink socket in the container's namespace",
                          exc.errno or errno.EIO) from exc
    try:
        return IPRoute(use_socket=sock)
    except BaseException:
        sock.close()
        raise


def rtnl_in(ns_fd: int) -> Rtnl:
    """kamra's own synchronous rtnetlink client, its socket in the namespace ``ns_fd``.

    Unlike ``ipr_in`` usable from any thread; the fast choice on the start path.
    """
    try:
        return run_in_netns(ns_fd, Rtnl)
    except OSError as exc:
        raise KernelError("open a netlink socket in a network namespace",
                          exc.errno or errno.EIO) from exc


def _sysctl_path(key: str) -> str:
    # "net.ipv4.ip_forward" and "net/ipv4/ip_forward" both work; interface names may
    # hold dots, so a key with slashes is taken as a path as is.
    relative = key if "/" in key else key.replace(".", "/")
    return os.path.join("/proc/sys", relative)


def read_sysctl(key: str) -> str:
    """Read a sysctl in the calling thread's network namespace (/proc/sys/net is per thread)."""
    try:
        with open(_sysctl_path(key)) as f:
            return f.read().strip()
    except OSError as exc:
        raise KernelError(f"read sysctl {key}", exc.errno or errno.EIO) from exc


def write_sysctl(key: str, value: str | int, ns_fd: int | None = None) -> None:
    """Set a sysctl in the calling thread's namespace, or in ``ns_fd`` when given.

    Writes only when the value differs: some writes (ip_forward) have side effects
    even when they change nothing.
    """
    if ns_fd is not None:
        run_in_netns(ns_fd, write_sysctl, key, value)
        return
    text = str(value)
    try:
        path = _sysctl_path(key)
        with open(path, "r+") as f:
            if f.read().strip() == text:
                return
            f.seek(0)
            f.write(text)
    except OSError as exc:
        raise KernelError(f"set sysctl {key}={text}", exc.errno or errno.EIO) from exc
