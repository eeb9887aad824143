"""Per-container locks: two commands on one container are serialised, never interleaved.

flock on a per-name file works between threads (each acquisition opens its own file
description) and between processes (two engines on one root).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def locked(lock_dir: str, name: str) -> Iterator[None]:
    fd = os.open(os.path.join(lock_dir, name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
