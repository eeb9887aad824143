"""Crash-safe file writes: temp file, fsync, rename. A reader sees old or new, never torn."""

from __future__ import annotations

import os
import tempfile


def write_file(path: str, data: bytes | str, mode: int = 0o644) -> None:
    raw = data.encode() if isinstance(data, str) else data
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.write(fd, raw)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
