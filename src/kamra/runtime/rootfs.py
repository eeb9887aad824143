"""Builds a container's filesystem view inside its fresh mount namespace, then pivots.

Runs in the forked child that becomes the container's init, after the namespaces
were unshared and before exec. Every step is named so a failure says which one.
"""

from __future__ import annotations

import os

from kamra.linux import libc
from kamra.linux.libc import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
)


class StepFailed(Exception):
    def __init__(self, step: str, exc: BaseException):
        detail = getattr(exc, "strerror", None) or str(exc)
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.errno = getattr(exc, "errno", None) or 0


# Character devices every container gets (name, major, minor): nothing else of the host.
DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0)]
DEV_LINKS = [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")]


def _dir(path: str, mode: int = 0o755) -> None:
    if not os.path.isdir(path):
        if os.path.lexists(path):
            os.unlink(path)
        os.makedirs(path, mode)


def _step(name: str, func, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except OSError as exc:
        raise StepFailed(name, exc) from exc


def _populate_dev(dev: str, console: bool) -> tuple[int, int] | None:
    """Fill the container's /dev; with ``console``, return its console pty (master, slave)."""
    libc.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=65536k")
    old = os.umask(0)
    try:
        for name, major, minor in DEVICES:
            os.mknod(os.path.join(dev, name), 0o20666, os.makedev(major, minor))
        for name, target in DEV_LINKS:
            os.symlink(target, os.path.join(dev, name))
        os.mkdir(os.path.join(dev, "pts"), 0o755)
        libc.mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
                   "newinstance,ptmxmode=0666,mode=0620,gid=5")
        for name, mode in (("shm", 0o1777), ("mqueue", 0o1777)):
            os.mkdir(os.path.join(dev, name), mode)
        libc.mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV,
                   "mode=1777,size=65536k")
        libc.mount("mqueue", os.path.join(dev, "mqueue"), "mqueue",
                   MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if not console:
            return None
        # The console is a pty of the container's own devpts instance, as in LXC: the
        # keeper holds its master, and CRIU can checkpoint the container with it (a pty
        # of the host's devpts would be a terminal from outside that CRIU cannot take
        # along; with the master outside, CRIU gives a new one back on restore).
        master, slave = libc.open_pty_peer(os.path.join(dev, "pts", "ptmx"))
        path = os.path.join(dev, "console")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        libc.mount(os.path.join(dev, "pts", str(libc.pty_index(master))), path, None, MS_BIND)
        return master, slave
    finally:
        os.umask(old)


# The /proc files LXCFS virtualizes that every container gets (when lxcfs offers them).
# Kept here, not in kamra.runtime.lxcfs: this runs in the freshly forked init, where
# importing that module (logging, subprocess, ...) cost some 25 ms of every start.
LXCFS_PROC_FILES = ("meminfo", "cpuinfo", "stat", "uptime", "diskstats", "swaps", "loadavg")


def _lxcfs_binds(rootfs: str, lxcfs: str) -> None:
    for name in LXCFS_PROC_FILES:
        source = os.path.join(lxcfs, "proc", name)
        if os.path.exists(source):
            libc.mount(source, os.path.join(rootfs, "proc", name), None, MS_BIND)


def enter_rootfs(rootfs: str, hostname: str, console: bool,
                 lxcfs: str | None = None) -> tuple[int, int] | None:
    """Mount /proc, /sys, /dev, /run, /tmp into ``rootfs`` and pivot_root into it.

    Returns the console pty (master, slave) when ``console`` is asked for."""
    # Private propagation: nothing we mount leaks to the host and the host's later
    # mounts do not appear in the container.
    _step("make mounts private", libc.mount, None, "/", None, MS_REC | MS_PRIVATE)
    _step("bind rootfs", libc.mount, rootfs, rootfs, None, MS_BIND | MS_REC)
    for sub, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                      ("tmp", 0o1777)):
        _step(f"create /{sub}", _dir, os.path.join(rootfs, sub), mode)
    _step("mount /proc", libc.mount, "proc", os.path.join(rootfs, "proc"), "proc",
          MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if lxcfs:
        _step("bind lxcfs over /proc", _lxcfs_binds, rootfs, lxcfs)
    _step("mount /sys", libc.mount, "sysfs", os.path.join(rootfs, "sys"), "sysfs",
          MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    pty = _step("populate /dev", _populate_dev, os.path.join(rootfs, "dev"), console)
    _step("mount /run", libc.mount, "tmpfs", os.path.join(rootfs, "run"), "tmpfs",
          MS_NOSUID | MS_NODEV, "mode=755,size=10%")
    _step("mount /tmp", libc.mount, "tmpfs", os.path.join(rootfs, "tmp"), "tmpfs",
          MS_NOSUID | MS_NODEV | MS_RELATIME, "mode=1777")
    _step("set hostname", libc.sethostname, hostname)
    _step("bring lo up", libc.interface_up, "lo")
    # pivot_root(".", ".") stacks the old root on top of the new one; unmounting it
    # detaches every host mount from this namespace. Unlike chroot, there is no path
    # back to the host's root left to escape through.
    _step("enter rootfs", os.chdir, rootfs)
    _step("pivot_root", libc.pivot_root, ".", ".")
    _step("detach host mounts", libc.umount, ".", MNT_DETACH)
    _step("chdir /", os.chdir, "/")
    return pty
