"""Copy-on-write root filesystems: an overlay upper dir over the shared template rootfs.

Creating a container makes three empty directories, whatever the template's size.
The overlay is mounted with paths relative to the data root (after a chdir, as
Docker does), so the data root's path never appears in the container's
/proc/self/mountinfo.
"""

from __future__ import annotations

import os
import shutil
import threading

from kamra.linux import libc
from kamra.storage.base import StorageBackend

# chdir is process-wide: serialise the mounts that rely on it.
_CWD_LOCK = threading.Lock()


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


class OverlayStorage(StorageBackend):
    name = "overlay"

    def create(self, container_dir: str, template_rootfs: str) -> None:
        for sub in ("upper", "work", "rootfs"):
            os.makedirs(os.path.join(container_dir, sub), mode=0o755, exist_ok=True)

    def mount(self, container_dir: str, template_rootfs: str) -> str:
        target = os.path.join(container_dir, "rootfs")
        if self.is_mounted(container_dir):
            return target
        lower = os.path.relpath(template_rootfs, self.root)
        upper = os.path.relpath(os.path.join(container_dir, "upper"), self.root)
        work = os.path.relpath(os.path.join(container_dir, "work"), self.root)
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        with _CWD_LOCK:
            previous = os.open(".", os.O_PATH | os.O_CLOEXEC)
            try:
                os.chdir(self.root)
                libc.mount("overlay", target, "overlay", 0, options)
            finally:
                os.fchdir(previous)
                os.close(previous)
        return target

    def unmount(self, container_dir: str) -> None:
        target = os.path.join(container_dir, "rootfs")
        if not self.is_mounted(container_dir):
            return
        try:
            libc.umount(target)
        except OSError:
            libc.umount(target, libc.MNT_DETACH)

    def is_mounted(self, container_dir: str) -> bool:
        return is_mountpoint(os.path.join(container_dir, "rootfs"))

    def destroy(self, container_dir: str) -> None:
        self.unmount(container_dir)
        if os.path.isdir(container_dir):
            shutil.rmtree(container_dir)
