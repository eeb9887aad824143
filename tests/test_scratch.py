"""kamra.scratch: private directories on the memory tmpfs, and the sweep of a root's
leftovers that touches no other root's."""

from __future__ import annotations

import os
import stat
import tempfile

from kamra import scratch


def test_memory_dirs_are_private_and_swept_per_root():
    mine = scratch.in_memory("t0000001", "dump", "/nonexistent/fallback")
    other = scratch.in_memory("t0000002", "dump", "/nonexistent/fallback")
    try:
        for path in (mine, other):
            assert os.path.dirname(path) == scratch.MEMORY
            st = os.lstat(path)
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert os.path.basename(mine).startswith("kamra-t0000001-dump-")
        assert scratch.sweep("t0000001") == [mine]
        assert not os.path.exists(mine) and os.path.isdir(other)
    finally:
        scratch.sweep("t0000002")
    assert not os.path.exists(other)


def test_without_a_memory_tmpfs_the_fallback_on_disk_is_used(monkeypatch):
    with tempfile.TemporaryDirectory() as disk:
        monkeypatch.setattr(scratch, "MEMORY", disk)  # a directory, not a tmpfs mount
        fallback = os.path.join(disk, "checkpoint.new")
        os.makedirs(os.path.join(fallback, "stale"))
        assert scratch.in_memory("t0000003", "dump", fallback) == fallback
        assert os.listdir(fallback) == []  # made afresh
