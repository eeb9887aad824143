"""Content digest of a directory tree: what a template *is*, independent of where it lies.

Covers, per entry in sorted order: relative path, file type, permission bits (with
setuid/setgid/sticky), uid, gid, xattrs (ACLs and file capabilities are xattrs too),
file contents, symlink targets and device numbers. Leaves out mtimes, inode numbers
and hard-link structure, so a tree that went through tar and back keeps its digest.
Every field is length-prefixed, so no two different trees feed the same byte stream.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
from collections.abc import Callable

from kamra.errors import KernelError

CHUNK = 1 << 20
_REPORT_EVERY = 16 << 20

_TYPES = {
    stat.S_IFDIR: b"d",
    stat.S_IFREG: b"f",
    stat.S_IFLNK: b"l",
    stat.S_IFCHR: b"c",
    stat.S_IFBLK: b"b",
    stat.S_IFIFO: b"p",
}


def _blob(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        # Filesystems without xattr support (or symlinks on some) simply have none.
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    pairs = []
    for name in names:
        raw = name.encode()
        try:
            pairs.append((raw, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed between list and get
                raise
    return sorted(pairs)


class _Walker:
    def __init__(self, progress: Callable[[int], None] | None):
        self.hash = hashlib.sha256()
        self.size = 0
        self._seen: set[tuple[int, int]] = set()
        self._buf = bytearray(CHUNK)
        self._progress = progress
        self._hashed = 0
        self._reported = 0

    def walk(self, top: bytes) -> None:
        # An explicit stack, not recursion: an untrusted tree may be deeper than Python's
        # recursion limit. Children are pushed in reverse so they pop in sorted order.
        stack = [(top, b"")]
        while stack:
            path, rel = stack.pop()
            for name in self.entry(path, rel):
                stack.append((path + b"/" + name, rel + b"/" + name if rel else name))

    def entry(self, path: bytes, rel: bytes) -> list[bytes]:
        """Hash one entry; return a directory's children, in reverse sorted order."""
        st = os.lstat(path)
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            # Sockets are runtime artefacts that tar cannot carry; they are not content.
            return []
        update = self.hash.update
        update(kind)
        update(_blob(rel))
        update(struct.pack("<III", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
        xattrs = _xattrs(path)
        update(struct.pack("<I", len(xattrs)))
        for name, value in xattrs:
            update(_blob(name))
            update(_blob(value))
        if kind == b"f":
            self._contents(path, st)
        elif kind == b"l":
            update(_blob(os.readlink(path)))
        elif kind in (b"c", b"b"):
            update(struct.pack("<II", os.major(st.st_rdev), os.minor(st.st_rdev)))
        elif kind == b"d":
            return sorted(os.listdir(path), reverse=True)
        return []

    def _contents(self, path: bytes, st: os.stat_result) -> None:
        if (st.st_dev, st.st_ino) not in self._seen:
            self._seen.add((st.st_dev, st.st_ino))
            self.size += st.st_size
        self.hash.update(struct.pack("<Q", st.st_size))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            view = memoryview(self._buf)
            total = 0
            with open(fd, "rb", buffering=0, closefd=False) as f:
                while n := f.readinto(self._buf):
                    self.hash.update(view[:n])
                    total += n
        finally:
            os.close(fd)
        if total != st.st_size:
            # The length was hashed up front; a file changing under us must not pass silently.
            raise KernelError("digest", errno.EAGAIN, f"{os.fsdecode(path)} changed while hashing")
        self._hashed += total
        if self._progress is not None and self._hashed - self._reported >= _REPORT_EVERY:
            self._reported = self._hashed
            self._progress(self._hashed)


def digest_and_size(rootfs: str, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Return ("sha256:<hex>", apparent bytes of regular files, hard links counted once).

    ``progress(bytes_hashed)`` is called every few MiB.
    """
    walker = _Walker(progress)
    try:
        walker.walk(os.fsencode(rootfs))
    except OSError as exc:
        raise KernelError.from_oserror("digest", exc) from None
    if progress is not None:
        progress(walker._hashed)
    return "sha256:" + walker.hash.hexdigest(), walker.size


def tree_digest(rootfs: str) -> str:
    return digest_and_size(rootfs)[0]
