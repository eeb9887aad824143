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


def test_adopted_memory_dir_is_a_symlink_removed_with_its_target(tmp_path):
    images = scratch.in_memory("t0000004", "arrival", str(tmp_path / "fallback"))
    try:
        with open(os.path.join(images, "core-1.img"), "w") as f:
            f.write("image")
        checkpoint = str(tmp_path / "checkpoint")  # on the disk: another filesystem
        scratch.adopt(images, checkpoint)
        assert os.path.islink(checkpoint) and os.readlink(checkpoint) == images
        with open(os.path.join(checkpoint, "core-1.img")) as f:
            assert f.read() == "image"
        scratch.remove_tree(checkpoint)
        assert not os.path.lexists(checkpoint) and not os.path.exists(images)
    finally:
        scratch.sweep("t0000004")


def test_adopt_on_one_filesystem_renames(tmp_path):
    (tmp_path / "staged").mkdir()
    scratch.adopt(str(tmp_path / "staged"), str(tmp_path / "checkpoint"))
    assert (tmp_path / "checkpoint").is_dir() and not (tmp_path / "checkpoint").is_symlink()
    scratch.remove_tree(str(tmp_path / "checkpoint"))
    assert not (tmp_path / "checkpoint").exists()


def test_remove_tree_leaves_a_target_it_did_not_make(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "file").write_text("keep")
    os.symlink(tmp_path / "precious", tmp_path / "checkpoint")
    scratch.remove_tree(str(tmp_path / "checkpoint"))
    assert not (tmp_path / "checkpoint").exists()
    assert (tmp_path / "precious" / "file").read_text() == "keep"
