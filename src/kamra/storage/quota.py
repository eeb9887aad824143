"""Disk quotas: a container's writable layer on its own loop-mounted ext4 image.

OpenVZ's ploop idea, kept small. A container with ``limits.disk`` has
``<container_dir>/disk.img``, a sparse file holding an ext4 filesystem; while the
container runs the image is attached to a loop device and mounted at
``<container_dir>/disk``, and the overlay's ``upper`` and ``work`` directories are
``disk/upper`` and ``disk/work``. Writing past the quota fails with ENOSPC inside the
container and the host's disk is untouched.

The image is made larger than the quota (``ceiling``: four times it, at least 16 GiB;
sparse, so that costs nothing) and the quota itself is ext4's own ``reserved_clusters``
(/sys/fs/ext4/<dev>/reserved_clusters): clusters no allocation may take, whoever asks --
unlike the root-reserved blocks and ext4 quotas, CAP_SYS_RESOURCE does not bypass them
(ext4_has_free_clusters). Reserving everything past the quota leaves exactly the quota
to write. Changing the reservation is one write to sysfs, which is what makes growing a
running container's quota work on any host: resizing a mounted ext4
(EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which some hosts (this project's CI among
them) withhold. ``df`` inside shows the image's size with the quota as "Avail".

The quota is kept beside the image in ``disk.limit`` (the reservation lives in kernel
memory only and is set again at every mount).

Loop devices are attached with ``LO_FLAGS_AUTOCLEAR``: the kernel detaches one when
its last user goes, so unmounting the image (or a crash of the process that attached
it before it mounted) leaves no loop device behind. Direct I/O is asked for, so the
image's pages are not cached twice; the image is mounted with ``discard``, so deleting
files inside punches holes in it again.

Resizing:
  * a quota within the image's room, mounted or not: only the reservation changes.
  * a quota past that room, mounted: extend the file, ``LOOP_SET_CAPACITY``, then
    ``EXT4_IOC_RESIZE_FS`` (what ``resize2fs`` does online), which needs
    CAP_SYS_RESOURCE; without it the grow is refused with that reason before anything
    changes. Unmounted: ``e2fsck -f -p`` then ``resize2fs``.
  * a quota below what the container already holds is refused, naming the used size;
    a running container's quota never shrinks (the contract of ``kamra set``).

mkfs of a sparse image takes milliseconds (no inode tables are written:
``assume_storage_prezeroed``, true of a fresh sparse file).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass

from kamra.errors import Conflict, KamraError, KernelError, ResourceBusy
from kamra.linux import libc
from kamra.linux.caps import has_cap

_libc = ctypes.CDLL(None, use_errno=True)

BLOCK = 4096
IMAGE = "disk.img"
MOUNT = "disk"

# <linux/loop.h>, <linux/ext4.h>
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
EXT4_IOC_RESIZE_FS = 0x40086610
LOOP_MAJOR = 7
CAP_SYS_RESOURCE = 24

MKFS_OPTIONS = ["-q", "-F", "-b", str(BLOCK), "-T", "default", "-m", "0",
                "-E", "nodiscard,assume_storage_prezeroed=1"]
MOUNT_OPTIONS = "discard"


MIN_CEILING = 16 << 30
LIMIT = "disk.limit"


def ceiling(quota: int) -> int:
    """The image size for ``quota``: room for the quota to grow fourfold while running."""
    return max(MIN_CEILING, 4 * quota) // BLOCK * BLOCK


def default_reserve(blocks: int) -> int:
    """ext4's own reservation for a filesystem of ``blocks`` (2%, at most 4096)."""
    return min(blocks // 50, 4096)


def human(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return f"{n}B"


@dataclass
class Usage:
    """What a filesystem holds, as statvfs(2) counts it (bytes and inodes)."""

    used: int
    total: int
    inodes: int
    inodes_total: int


def _tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise KamraError(f"limits.disk needs {name} (Debian package e2fsprogs): install it")
    return path


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess:
    result = subprocess.run([_tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise KamraError(f"{what} failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    return result


# -- loop devices -------------------------------------------------------------------------

def _loop_config(backing_fd: int, path: str, flags: int) -> bytes:
    name = os.fsencode(path)[:63]
    info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, 0, 0, 0, 0, 0, flags, name,
                       b"", b"", 0, 0)  # struct loop_info64
    return struct.pack("=II", backing_fd, BLOCK) + info + bytes(64)  # struct loop_config


def attach(path: str) -> tuple[str, int]:
    """Attach ``path`` to a free loop device (autoclear): its path and an open descriptor.

    The kernel detaches the device when its last user goes: open (mount) it before
    closing that descriptor."""
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(20):  # another process may take the free device first: EBUSY
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            device = f"/dev/loop{number}"
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                _configure(fd, backing, path)
                return device, fd
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EBUSY:
                    raise KernelError.from_oserror(f"attach {path} to {device}", exc) from None
        raise KamraError(f"attach {path}: no free loop device (every one was taken first)")
    finally:
        os.close(backing)


def _configure(fd: int, backing: int, path: str) -> None:
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE,
                    _loop_config(backing, path, LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # No direct I/O on the backing filesystem (or its block size differs).
        fcntl.ioctl(fd, LOOP_CONFIGURE, _loop_config(backing, path, LO_FLAGS_AUTOCLEAR))


def device_of(mountpoint: str) -> str:
    """The loop device mounted at ``mountpoint``."""
    dev = os.stat(mountpoint).st_dev
    if os.major(dev) != LOOP_MAJOR:
        raise KamraError(f"{mountpoint} is not a loop-mounted image")
    with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/uevent") as f:
        name = dict(line.strip().split("=", 1) for line in f if "=" in line)["DEVNAME"]
    return f"/dev/{name}"


def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (tests, diagnostics)."""
    found = []
    real = os.path.realpath(path)
    for entry in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{entry}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing == real or backing.removesuffix(" (deleted)") == real:
            found.append(f"/dev/{entry}")
    return found


# -- the image ----------------------------------------------------------------------------

class DiskImage:
    """``<container_dir>/disk.img``, mounted at ``<container_dir>/disk``."""

    def __init__(self, container_dir: str, name: str = IMAGE):
        self.path = os.path.join(container_dir, name)
        self.mountpoint = os.path.join(container_dir, MOUNT)
        self.limit_path = os.path.join(container_dir, LIMIT)

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def size(self) -> int:
        return os.stat(self.path).st_size

    def is_mounted(self) -> bool:
        return os.path.ismount(self.mountpoint)

    def limit(self) -> int:
        """The quota in bytes (an image made before disk.limit existed: its size)."""
        try:
            with open(self.limit_path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return self.size()

    def save_limit(self, quota: int) -> None:
        """Write ``disk.limit`` atomically (the engine's config stays the record)."""
        temp = self.limit_path + ".tmp"
        with open(temp, "w") as f:
            f.write(f"{quota // BLOCK * BLOCK}\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, self.limit_path)

    def make(self, quota: int) -> None:
        """A fresh sparse image with an empty ext4 filesystem, room for ``quota``."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, ceiling(quota))
        finally:
            os.close(fd)
        _run(["mkfs.ext4", *MKFS_OPTIONS, self.path], f"mkfs.ext4 {self.path}")

    def _reserve_file(self) -> str:
        return f"/sys/fs/ext4/{os.path.basename(device_of(self.mountpoint))}/reserved_clusters"

    def room(self) -> int:
        """Mounted: the most data the filesystem can hold, in bytes (statvfs's f_blocks:
        the blocks less ext4's own metadata)."""
        st = os.statvfs(self.mountpoint)
        return st.f_blocks * st.f_frsize

    def enforce(self, quota: int) -> None:
        """Mounted: reserve every block past ``quota`` so that no write can take it."""
        st = os.statvfs(self.mountpoint)
        blocks = quota // st.f_frsize
        reserve = st.f_blocks - blocks if blocks < st.f_blocks else default_reserve(st.f_blocks)
        try:
            with open(self._reserve_file(), "w") as f:
                f.write(str(reserve))
        except OSError as exc:
            raise KernelError.from_oserror(f"reserve the space past the quota of {self.path}",
                                           exc) from None

    def mount(self, quota: int | None = None) -> None:
        """Mount and enforce ``quota`` (default: the saved one)."""
        if self.is_mounted():
            return
        if not wait_detached(self.path):
            # A lazily detached mount of it lives on (a process still held it at the last
            # unmount): a second loop device on the same file would corrupt it.
            raise ResourceBusy(f"{self.path} is still attached to "
                               f"{', '.join(loops_backed_by(self.path))}, held by a process "
                               "of its last run: try again once that process has ended")
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
        device, fd = attach(self.path)
        try:
            libc.mount(device, self.mountpoint, "ext4", 0, MOUNT_OPTIONS)
        except OSError as exc:
            raise KernelError.from_oserror(f"mount {self.path}", exc) from None
        finally:
            os.close(fd)  # the mount holds the device now; after a failure, it goes
        try:
            self.enforce(self.limit() if quota is None else quota)
        except BaseException:
            self.unmount()
            raise

    def unmount(self) -> None:
        """Unmount; the loop device then goes away (autoclear). Idempotent."""
        if not self.is_mounted():
            return
        try:
            libc.umount(self.mountpoint)
        except OSError:
            # Still held (a process in the middle of dying): detach it now, the kernel
            # releases the filesystem and then its loop device when the last user goes.
            libc.umount(self.mountpoint, libc.MNT_DETACH)

    def usage(self) -> Usage:
        """Mounted: statvfs. Unmounted: the same figures from the ext4 superblock."""
        if self.is_mounted():
            st = os.statvfs(self.mountpoint)
            return Usage(used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                         total=self.limit(), inodes=st.f_files - st.f_ffree,
                         inodes_total=st.f_files)
        sb = read_superblock(self.path)
        data_blocks = sb["blocks"] - sb["overhead"]
        return Usage(used=(data_blocks - sb["free_blocks"]) * sb["block_size"],
                     total=self.limit(), inodes=sb["inodes"] - sb["free_inodes"],
                     inodes_total=sb["inodes"])

    def _too_small(self, quota: int, what: str) -> Conflict:
        usage = self.usage()
        return Conflict(f"limits.disk={human(quota)} is too small for {what}: it uses "
                        f"{human(usage.used)} in {usage.inodes} inodes; "
                        "free space inside first, or choose a larger size")

    def set_limit_online(self, quota: int, what: str) -> None:
        """Change the mounted image's quota, live: growing only."""
        if quota < self.limit():
            raise Conflict(f"limits.disk cannot shrink while {what} runs: "
                           "stop it first, or grow it instead")
        if quota > self.room():
            self.grow_online(ceiling(quota), what)
        self.enforce(quota)
        self.save_limit(quota)

    def set_limit_offline(self, quota: int, what: str) -> None:
        """Change the unmounted image's quota: refused below what it holds."""
        if quota < self.usage().used:
            raise self._too_small(quota, what)
        if ceiling(quota) > self.size():
            self.grow_offline(ceiling(quota), what)
        self.save_limit(quota)

    def grow_online(self, size: int, what: str) -> None:
        """Grow the mounted image's filesystem to ``size`` bytes, live."""
        old = self.size()
        if size <= old:
            return
        if not has_cap(CAP_SYS_RESOURCE):
            # The kernel's rule (ext4_resize_begin); checked first so nothing changes.
            raise Conflict(f"limits.disk cannot grow while {what} runs on this host: "
                           "resizing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, "
                           "which kamra does not have here; stop it first, then set it")
        device = device_of(self.mountpoint)
        try:
            self._set_size(device, size)
            fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", size // BLOCK))
            finally:
                os.close(fd)
        except OSError as exc:
            # The filesystem still ends where it did: giving the file back its old size
            # (and the device its old capacity) loses nothing.
            try:
                self._set_size(device, old)
            except OSError:
                pass
            raise KernelError.from_oserror(f"grow {self.path} to {human(size)}", exc) from None

    def _set_size(self, device: str, size: int) -> None:
        """Make the image file ``size`` bytes and its loop device see that."""
        with open(self.path, "r+b") as f:
            f.truncate(size)
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, LOOP_SET_CAPACITY, 0)
        finally:
            os.close(fd)

    def grow_offline(self, size: int, what: str) -> None:
        """Grow the unmounted image's filesystem to ``size`` bytes."""
        if self.size() >= size:
            return
        _run(["e2fsck", "-f", "-p", self.path], f"e2fsck {self.path}")
        with open(self.path, "r+b") as f:
            f.truncate(size)
        _run(["resize2fs", self.path, f"{size // 1024}K"], f"resize2fs {self.path}")


def read_superblock(path: str) -> dict[str, int]:
    """The counters of an unmounted ext4 image (written back at unmount)."""
    with open(path, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise KamraError(f"{path} holds no ext4 filesystem")
    inodes, blocks_lo, _, free_lo, free_inodes = struct.unpack_from("<5I", sb, 0)
    log_block = struct.unpack_from("<I", sb, 0x18)[0]
    is_64bit = struct.unpack_from("<I", sb, 0x60)[0] & 0x80
    blocks_hi, free_hi = (struct.unpack_from("<I", sb, 0x150)[0],
                          struct.unpack_from("<I", sb, 0x158)[0]) if is_64bit else (0, 0)
    return {"inodes": inodes, "free_inodes": free_inodes, "block_size": 1024 << log_block,
            "blocks": blocks_hi << 32 | blocks_lo, "free_blocks": free_hi << 32 | free_lo,
            "overhead": struct.unpack_from("<I", sb, 0x248)[0]}


def copy_tree(source: str, target: str) -> None:
    """Copy a directory with everything overlayfs keeps in it: owners, modes, times, hard
    links, device nodes (whiteouts) and every xattr (trusted.overlay.* included)."""
    _run(["cp", "-a", "--preserve=all", "--no-target-directory", source, target],
         f"copy {source} to {target}")


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """syncfs(2): write back the filesystem holding ``path`` (not every filesystem)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) < 0:
            err = ctypes.get_errno()
            raise KernelError(f"syncfs {path}", err)
    finally:
        os.close(fd)


def wait_detached(path: str, timeout: float = 2.0) -> bool:
    """True once no loop device is backed by ``path`` (autoclear runs at the last close)."""
    deadline = time.monotonic() + timeout
    while loops_backed_by(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
