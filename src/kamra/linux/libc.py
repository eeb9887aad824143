"""ctypes bindings for the system calls Python's os module lacks.

Every function raises ``OSError`` with the errno and the operation's arguments on
failure; callers translate to ``KernelError`` where they know what the step was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# Namespace flags (linux/sched.h).
CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# Name of each namespace under /proc/PID/ns and its clone flag; order is the setns order
# (mount last, because after it paths resolve inside the container).
NAMESPACES: list[tuple[str, int]] = [
    ("cgroup", CLONE_NEWCGROUP),
    ("ipc", CLONE_NEWIPC),
    ("uts", CLONE_NEWUTS),
    ("net", CLONE_NEWNET),
    ("pid", CLONE_NEWPID),
    ("mnt", CLONE_NEWNS),
]

# Mount flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# prctl options.
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_PIVOT_ROOT = 155
_SYS_CLOSE_RANGE = 436
_SYS_OPEN_TREE = 428
OPEN_TREE_CLONE = 1

# tty ioctls.
TIOCSCTTY = 0x540E
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
TIOCGPTN = 0x80045430
TIOCSWINSZ = 0x5414
TIOCGWINSZ = 0x5413

_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str, *paths: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", *paths[:1])


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {fstype or ''} {source} on {target}", target)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}", target)


def open_tree_clone(path: str) -> int:
    """A file descriptor of a detached copy of the mount at ``path`` alone, without
    what is mounted beneath it (so its own files hidden under those mounts show)."""
    fd = _libc.syscall(_SYS_OPEN_TREE, -100, _b(path), OPEN_TREE_CLONE | os.O_CLOEXEC)
    _check(fd, f"open_tree {path}", path)
    return fd


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root", new_root)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, arg4, arg5)
    _check(result, f"prctl({option})")
    return result


def set_process_name(name: str) -> None:
    buf = ctypes.create_string_buffer(name.encode()[:15])
    _libc.prctl(PR_SET_NAME, ctypes.cast(buf, ctypes.c_void_p).value or 0, 0, 0, 0)


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    """Close descriptors ``first``..``last``: nothing of the host leaks into a container."""
    if _libc.syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(last), 0) < 0:
        os.closerange(first, min(last + 1, os.sysconf("SC_OPEN_MAX")))


def open_pty_peer(ptmx: str = "/dev/ptmx") -> tuple[int, int]:
    """Open a pty pair from the devpts instance behind ``ptmx``; returns (master, slave).

    TIOCGPTPEER opens the slave through the master, never by path, so a hostile
    /dev/pts in a container cannot substitute another file.
    """
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        os.close(master)
        raise
    return master, slave


def pty_index(master: int) -> int:
    """The N of /dev/pts/N behind a pty master."""
    return struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def interface_up(name: str = "lo") -> None:
    """Bring a network interface up with the classic ioctl (no netlink needed for lo)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack("16sH", name.encode(), 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, siocgifflags, req)[:18])[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH", name.encode(), flags | iff_up))
