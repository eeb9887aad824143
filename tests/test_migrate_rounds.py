"""A migration's file rounds: a full copy, then deltas, then a prune, with real GNU tar.

The target's copy after the rounds must equal the source's upper directory at the end:
new, changed, re-permissioned, renamed and deleted files, a directory replaced by a
file, a symlink, an overlay whiteout and a directory made opaque.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time

import pytest

from kamra.checkpoint import archive


def _tree(root: str) -> dict[str, tuple]:
    found = {}
    for top, dirs, files in os.walk(root):
        for entry in dirs + files:
            full = os.path.join(top, entry)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode):
                content = st.st_rdev
            xattrs = {} if stat.S_ISLNK(st.st_mode) else \
                {n: os.getxattr(full, n) for n in os.listxattr(full)}
            found[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), content, xattrs)
    return found


def _round(upper: str, target: str, since: float | None) -> None:
    """As the target does it: each round unpacked on its own, then merged."""
    unpacked = tempfile.mkdtemp(dir=os.path.dirname(target))
    try:
        with tempfile.NamedTemporaryFile(suffix=".tar.zst") as f:
            archive.stream_files(f, upper, since)
            f.flush()
            archive.read(f.name, manifest_needed=False)
            archive.extract(f.name, unpacked)
        if os.path.isdir(os.path.join(target, "upper")):
            archive.merge(os.path.join(unpacked, "upper"), os.path.join(target, "upper"))
        else:
            os.rename(os.path.join(unpacked, "upper"), os.path.join(target, "upper"))
    finally:
        shutil.rmtree(unpacked)


@pytest.fixture
def dirs():
    base = tempfile.mkdtemp(prefix="kamra-rounds-")
    upper = os.path.join(base, "src", "upper")
    target = os.path.join(base, "dst")
    os.makedirs(upper)
    os.makedirs(target)
    yield upper, target
    shutil.rmtree(base)


def test_rounds_then_a_prune_reproduce_the_source(dirs):
    upper, target = dirs
    os.makedirs(os.path.join(upper, "etc", "conf.d"))
    os.makedirs(os.path.join(upper, "var", "cache"))
    for path, data in (("etc/hostname", b"one\n"), ("etc/conf.d/a", b"a"),
                       ("var/cache/big", os.urandom(1 << 20)), ("gone", b"x"),
                       ("old-name", b"renamed")):
        with open(os.path.join(upper, path), "wb") as f:
            f.write(data)
    _round(upper, target, None)
    since = time.time() - 1.0
    time.sleep(0.05)
    # Changes while the first round was on its way.
    with open(os.path.join(upper, "etc", "hostname"), "wb") as f:
        f.write(b"two\n")
    os.chmod(os.path.join(upper, "etc", "conf.d", "a"), 0o600)
    os.setxattr(os.path.join(upper, "etc", "conf.d"), "trusted.overlay.opaque", b"y")
    os.unlink(os.path.join(upper, "gone"))
    os.mknod(os.path.join(upper, "gone"), stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout
    os.rename(os.path.join(upper, "old-name"), os.path.join(upper, "new-name"))
    shutil.rmtree(os.path.join(upper, "var", "cache"))
    with open(os.path.join(upper, "var", "cache"), "wb") as f:
        f.write(b"now a file")
    os.symlink("etc/hostname", os.path.join(upper, "link"))
    _round(upper, target, since)
    removed = archive.prune(os.path.join(target, "upper"), archive.upper_paths(upper))
    assert removed == 1  # old-name
    assert _tree(os.path.join(target, "upper")) == _tree(upper)


def test_a_delta_holds_only_what_changed(dirs):
    upper, target = dirs
    with open(os.path.join(upper, "big"), "wb") as f:
        f.write(os.urandom(4 << 20))
    since = time.time() + 1.0  # nothing changed after this
    with tempfile.TemporaryFile() as full, tempfile.TemporaryFile() as delta:
        archive.stream_files(full, upper, None)
        archive.stream_files(delta, upper, since)
        assert full.tell() > 4 << 20
        assert delta.tell() < 64 << 10


def test_kamrad_removes_what_interrupted_migrations_left(cli, root):
    """Pages, file rounds and archives of migrations a kamrad stop cut short."""
    run = os.path.join(root, "run")
    os.makedirs(os.path.join(run, "incoming-pages-abc123"))
    with open(os.path.join(run, "incoming-pages-abc123", "pages-1.img"), "wb") as f:
        f.write(b"\0" * 4096)
    with open(os.path.join(run, "incoming-web-a1b2c3"), "wb") as f:
        f.write(b"partial archive")
    cli.run("list", check=True)  # starts kamrad
    assert [e for e in os.listdir(run) if e.startswith("incoming-")] == []


def test_a_round_takes_files_that_change_or_go_while_it_reads():
    """A round copies a running container's files: one growing while tar reads it (as
    a journal does) and one deleted meanwhile are no error; the round is a valid
    archive, and the grown file is newer than the round's mark, so the next delta
    takes it again."""
    import io
    import threading

    with tempfile.TemporaryDirectory() as work:
        upper = os.path.join(work, "upper")
        os.makedirs(os.path.join(upper, "var", "log"))
        journal = os.path.join(upper, "var", "log", "journal")
        with open(journal, "wb") as f:
            f.write(os.urandom(64 << 20))
        for i in range(200):
            with open(os.path.join(upper, f"gone{i}"), "w") as f:
                f.write("x")
        mark = time.time() - 1
        stop = threading.Event()

        def churn() -> None:
            i = 0
            while not stop.is_set():
                with open(journal, "ab") as f:
                    f.write(b"y" * 4096)
                if i < 200:
                    os.unlink(os.path.join(upper, f"gone{i}"))
                i += 1

        writer = threading.Thread(target=churn)
        writer.start()
        out = io.BytesIO()
        try:
            archive.stream_files(out, upper, None)
        finally:
            stop.set()
            writer.join()
        assert out.getbuffer().nbytes > 0
        target = os.path.join(work, "copy")
        os.makedirs(target)
        path = os.path.join(work, "round.tar.zst")
        with open(path, "wb") as f:
            f.write(out.getvalue())
        archive.extract(path, target)
        assert os.path.getsize(os.path.join(target, "upper", "var", "log", "journal")) >= 64 << 20
        assert os.stat(journal).st_mtime > mark
