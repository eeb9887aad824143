"""Copy-on-write root filesystems: an overlay upper dir over the shared template rootfs.

Creating a container makes three empty directories, whatever the template's size.
The overlay is mounted with paths relative to the data root (after a chdir, as
Docker does), so the data root's path never appears in the container's
/proc/self/mountinfo.

With a disk quota (``limits.disk``) the upper and work dirs live instead in an ext4
image of the quota's size, ``disk.img``, loop-mounted at ``disk/`` before the overlay
and unmounted after it (see ``kamra.storage.quota``). Which layout a container has is
decided by one fact on disk, whether ``disk.img`` exists; the configuration only
decides the size, and ``set_quota`` converts between the two:

* adding a quota to a stopped container moves its files into a new image
  (``cp -a --preserve=all``: owners, modes, times, hard links, whiteouts and every
  xattr, trusted.overlay.* included), refused if they do not fit;
* removing it moves them back out the same way;
* resizing: grow live (online ext4 resize), shrink only while stopped, and only to a
  size the data fits in (the refusal names the used size);
* adding or removing a quota while the container runs is refused: its writable layer
  cannot move under a mounted overlay.

Each conversion commits with one rename or unlink of the image, so a crash leaves the
old layout or the new one; ``_recover`` removes what a crash left half-made.
"""

from __future__ import annotations

import os
import shutil
import threading

from kamra.errors import Conflict
from kamra.linux import libc
from kamra.storage.base import DiskUsage, StorageBackend
from kamra.storage.quota import (
    IMAGE,
    MOUNT,
    DiskImage,
    copy_tree,
    fsync_file,
    human,
    syncfs,
)

# chdir is process-wide: serialise the mounts that rely on it.
_CWD_LOCK = threading.Lock()
STAGING = "upper.new"  # the upper dir moving out of an image


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_usage(top: str) -> tuple[int, int]:
    """Bytes (allocated) and inodes under ``top``, by walking it."""
    used = inodes = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for entry in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, entry))
            except OSError:
                continue
            used += st.st_blocks * 512
            inodes += 1
    return used, inodes


class OverlayStorage(StorageBackend):
    name = "overlay"

    def create(self, container_dir: str, template_rootfs: str,
               quota: int | None = None) -> None:
        os.makedirs(os.path.join(container_dir, "rootfs"), mode=0o755, exist_ok=True)
        if quota is None:
            for sub in ("upper", "work"):
                os.makedirs(os.path.join(container_dir, sub), mode=0o755, exist_ok=True)
        else:
            self._make_image(container_dir, quota, None)

    def _layers(self, container_dir: str) -> tuple[str, str]:
        base = container_dir
        if DiskImage(container_dir).exists():
            base = os.path.join(container_dir, MOUNT)
        return os.path.join(base, "upper"), os.path.join(base, "work")

    def upper_dir(self, container_dir: str) -> str:
        return self._layers(container_dir)[0]

    def mount(self, container_dir: str, template_rootfs: str) -> str:
        target = os.path.join(container_dir, "rootfs")
        if self.is_mounted(container_dir):
            return target
        self._recover(container_dir)
        image = DiskImage(container_dir)
        if image.exists():
            image.mount()
        try:
            upper, work = self._layers(container_dir)
            lower = os.path.relpath(template_rootfs, self.root)
            upper = os.path.relpath(upper, self.root)
            work = os.path.relpath(work, self.root)
            options = f"lowerdir={lower},upperdir={upper},workdir={work}"
            with _CWD_LOCK:
                previous = os.open(".", os.O_PATH | os.O_CLOEXEC)
                try:
                    os.chdir(self.root)
                    libc.mount("overlay", target, "overlay", 0, options)
                finally:
                    os.fchdir(previous)
                    os.close(previous)
        except BaseException:
            image.unmount()
            raise
        return target

    def unmount(self, container_dir: str) -> None:
        """The overlay first, then the image under it (whose loop device then goes)."""
        target = os.path.join(container_dir, "rootfs")
        if self.is_mounted(container_dir):
            try:
                libc.umount(target)
            except OSError:
                libc.umount(target, libc.MNT_DETACH)
        DiskImage(container_dir).unmount()

    def is_mounted(self, container_dir: str) -> bool:
        return is_mountpoint(os.path.join(container_dir, "rootfs"))

    def destroy(self, container_dir: str) -> None:
        self.unmount(container_dir)
        if os.path.isdir(container_dir):
            # A replaced checkpoint may still be going in the background meanwhile
            # (kamra.engine.checkpoint._remove_later): what it removed first is fine.
            shutil.rmtree(container_dir, onerror=_unless_gone)

    # -- disk quota ---------------------------------------------------------------------
    def usage(self, container_dir: str) -> DiskUsage:
        """With a quota: the image's filesystem counters (statvfs while mounted, its
        superblock while not); the limits are the image's size and inode count.
        Without: a walk of the upper dir (the kernel keeps no per-directory counter)."""
        image = DiskImage(container_dir)
        if image.exists():
            u = image.usage()
            return DiskUsage(used=u.used, inodes=u.inodes, limit=u.total,
                             inodes_limit=u.inodes_total)
        used, inodes = tree_usage(os.path.join(container_dir, "upper"))
        return DiskUsage(used=used, inodes=inodes)

    def set_quota(self, container_dir: str, quota: int | None) -> None:
        name = os.path.basename(container_dir)
        image = DiskImage(container_dir)
        if image.is_mounted() or self.is_mounted(container_dir):
            if image.exists() and quota is not None:
                image.set_limit_online(quota, repr(name))
            elif image.exists() != (quota is not None):
                what = "added" if quota is not None else "removed"
                raise Conflict(f"limits.disk cannot be {what} while {name!r} runs (its "
                               "files would move under a mounted overlay): stop it first")
            return
        self._recover(container_dir)
        if quota is None:
            if image.exists():
                self._move_out(container_dir)
        elif image.exists():
            image.set_limit_offline(quota, repr(name))
        else:
            self._make_image(container_dir, quota, os.path.join(container_dir, "upper"))

    def _make_image(self, container_dir: str, quota: int, source: str | None) -> None:
        """Make ``disk.img`` holding ``source`` as its upper dir (or an empty one)."""
        image = DiskImage(container_dir)
        new = DiskImage(container_dir, IMAGE + ".new")
        try:
            new.make(quota)
            new.mount(quota)
            try:
                disk = new.mountpoint
                os.mkdir(os.path.join(disk, "work"), 0o755)
                if source is not None and os.path.isdir(source):
                    used, inodes = tree_usage(source)
                    st = os.statvfs(disk)
                    if used > st.f_bavail * st.f_frsize or inodes > st.f_favail:
                        raise Conflict(
                            f"limits.disk={human(quota)} is too small for "
                            f"{os.path.basename(container_dir)!r}: it has written "
                            f"{human(used)} in {inodes} inodes, and the quota's filesystem "
                            f"holds {human(st.f_bavail * st.f_frsize)} in {st.f_favail}; "
                            "choose a larger size, or free space inside first")
                    copy_tree(source, os.path.join(disk, "upper"))
                else:
                    os.mkdir(os.path.join(disk, "upper"), 0o755)
            finally:
                new.unmount()
            fsync_file(new.path)
            image.save_limit(quota)  # ignored (and removed by _recover) until the rename
            os.rename(new.path, image.path)  # the commit: from here on, the image is used
            _fsync_dir(container_dir)
        except BaseException:
            if os.path.exists(new.path):
                os.unlink(new.path)
            raise
        self._recover(container_dir)  # the host's upper/ and work/ are now stale

    def _move_out(self, container_dir: str) -> None:
        """Move the upper dir out of ``disk.img`` back onto the host; remove the image."""
        image = DiskImage(container_dir)
        staging = os.path.join(container_dir, STAGING)
        if os.path.lexists(staging):
            shutil.rmtree(staging)
        image.mount()
        try:
            copy_tree(os.path.join(image.mountpoint, "upper"), staging)
            syncfs(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            image.unmount()
        os.unlink(image.path)  # the commit: from here on, the host's upper dir is used
        _fsync_dir(container_dir)
        self._recover(container_dir)  # finishes the move, removes disk.limit

    def _recover(self, container_dir: str) -> None:
        """Finish or undo a conversion a crash interrupted (never while mounted)."""
        image = DiskImage(container_dir)
        if image.is_mounted():
            return
        half_made = os.path.join(container_dir, IMAGE + ".new")
        if os.path.exists(half_made):
            os.unlink(half_made)
        upper = os.path.join(container_dir, "upper")
        work = os.path.join(container_dir, "work")
        staging = os.path.join(container_dir, STAGING)
        if image.exists():
            for stale in (upper, work, staging):
                if os.path.lexists(stale):
                    shutil.rmtree(stale)
            return
        if os.path.lexists(image.limit_path):  # of an image never committed, or removed
            os.unlink(image.limit_path)
        if os.path.isdir(staging):
            if os.path.lexists(upper):  # upper is in place: the staging copy is stale
                shutil.rmtree(staging)
            else:  # the image was removed: finish the move-out
                os.rename(staging, upper)
                if os.path.lexists(work):
                    shutil.rmtree(work)
                os.mkdir(work, 0o755)
        try:
            os.rmdir(image.mountpoint)  # an empty mount point, left by the last image
        except OSError:
            pass


def _unless_gone(func: object, path: str, exc_info: tuple) -> None:
    """shutil.rmtree's onerror: a file something else removed first is no error."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]
