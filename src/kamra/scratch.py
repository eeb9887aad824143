"""Short-lived directories in memory, for files that must exist only for a moment.

A migration's CRIU dump writes some eighty small image files that are read once, sent
to the target and thrown away. On a disk each file's creation costs the frozen container
time (here, ext4 on a virtual disk: about 0.1 ms a file for CRIU, 25 ms a dump in all);
on a tmpfs almost nothing. ``/dev/shm`` is the tmpfs every Linux host has; each
directory is made there with ``mkdtemp`` (a fresh name, mode 0700, so nobody else can
squat or read it), named after the kamra root so that kamrad, starting, removes only
its own leftovers. Without a tmpfs there, the caller's fallback on disk is used.

A migration's target keeps the images it receives there too (the checkpoint directory
of the arriving container is then a symlink to it): ``remove_tree`` removes such a
link together with the directory in memory.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

MEMORY = "/dev/shm"


def _is_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(fields[1] == path and fields[2] == "tmpfs"
                       for fields in (line.split() for line in f) if len(fields) > 2)
    except OSError:
        return False


def _prefix(root_id: str) -> str:
    return f"kamra-{root_id}-"


def in_memory(root_id: str, purpose: str, fallback: str) -> str:
    """A new empty directory for ``purpose`` on the memory tmpfs, or ``fallback``
    (created empty) if there is none. The caller removes it."""
    if _is_tmpfs(MEMORY):
        try:
            return tempfile.mkdtemp(prefix=f"{_prefix(root_id)}{purpose}-", dir=MEMORY)
        except OSError:
            pass  # full or read-only: the disk will do
    shutil.rmtree(fallback, ignore_errors=True)
    os.makedirs(fallback, 0o700)
    return fallback


def sweep(root_id: str) -> list[str]:
    """Remove what an earlier kamrad of this root left in memory (it crashed midway)."""
    removed = []
    try:
        entries = os.listdir(MEMORY)
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(MEMORY, entry)
        if entry.startswith(_prefix(root_id)) and os.path.isdir(path) \
                and not os.path.islink(path) and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _ours(target: str) -> bool:
    return os.path.dirname(target) == MEMORY and os.path.basename(target).startswith("kamra-")


def remove_tree(path: str) -> None:
    """Remove the directory ``path``, or the symlink ``path`` and the directory in
    memory it points to (one ``in_memory`` made; any other target is left alone)."""
    if os.path.islink(path):
        target = os.readlink(path)
        os.unlink(path)
        if _ours(target):
            shutil.rmtree(target, ignore_errors=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def adopt(directory: str, path: str) -> None:
    """Make ``directory`` (maybe ``in_memory``) available as ``path``: renamed there if
    both are on one filesystem, else ``path`` becomes a symlink to it."""
    try:
        os.rename(directory, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        os.symlink(directory, path)
