"""kamra.checkpoint.tmpfs: a carried tmpfs is unpacked into a fresh tmpfs exactly, and an
archive that would write outside it is refused before anything is mounted into place."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile

import pytest

from kamra.checkpoint import tmpfs
from kamra.errors import KamraError


def _tar(path: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "",
          size: int = 0, uid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size, info.uid = kind, mode, linkname, size, uid
    return info


def _mount(key: str = "kamra-tmp") -> dict:
    return {"mountpoint": "/tmp", "key": key, "mount_id": 1, "flags": 0,
            "options": "mode=1777,size=1m", "source": "tmpfs"}


@pytest.fixture
def staging(tmp_path):
    path = str(tmp_path / "staging")
    yield path
    tmpfs.unstage(path)
    assert not os.path.exists(path)


def test_a_carried_tmpfs_comes_back_with_modes_owners_links_and_devices(tmp_path, staging):
    images = str(tmp_path / "images")
    os.mkdir(images)
    _tar(os.path.join(images, "kamra-tmp.tar"), [
        (_info(".", tarfile.DIRTYPE, 0o1777), None),
        (_info("d", tarfile.DIRTYPE, 0o1711, uid=1000), None),
        (_info("d/f", mode=0o4750, size=4, uid=1000), b"data"),
        (_info("d/hard", tarfile.LNKTYPE, 0o4750, linkname="d/f", uid=1000), None),
        (_info("d/link", tarfile.SYMTYPE, linkname="/etc/passwd"), None),  # inside only
        (_info("d/fifo", tarfile.FIFOTYPE, 0o600), None),
        (_info("null", tarfile.CHRTYPE, 0o666), None),
    ])
    (option,) = tmpfs.stage([_mount()], images, staging)
    target = os.path.join(staging, "kamra-tmp")
    assert option == f"mnt[kamra-tmp]:{target}"
    with open("/proc/self/mountinfo") as f:
        assert any(line.split()[4] == target and " - tmpfs " in line for line in f)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o1777
    d = os.stat(os.path.join(target, "d"))
    assert (stat.S_IMODE(d.st_mode), d.st_uid) == (0o1711, 1000)  # sticky bit kept
    f = os.stat(os.path.join(target, "d", "f"))
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_nlink) == (0o4750, 1000, 2)
    assert os.readlink(os.path.join(target, "d", "link")) == "/etc/passwd"
    assert stat.S_ISFIFO(os.stat(os.path.join(target, "d", "fifo")).st_mode)
    assert stat.S_ISCHR(os.lstat(os.path.join(target, "null")).st_mode)


@pytest.mark.parametrize("members", [
    [(_info("/abs", size=1), b"x")],
    [(_info("../up", size=1), b"x")],
    [(_info("a", tarfile.SYMTYPE, linkname="/"), None), (_info("a/x", size=1), b"x")],
    [(_info("a", tarfile.SYMTYPE, linkname=".."), None),
     (_info("b", tarfile.LNKTYPE, linkname="a/etc"), None)],
    [(_info("h", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)],
], ids=["absolute", "dotdot", "through-symlink", "hard-link-through-symlink",
        "hard-link-out"])
def test_a_hostile_tmpfs_archive_is_refused(tmp_path, staging, members):
    images = str(tmp_path / "images")
    os.mkdir(images)
    _tar(os.path.join(images, "kamra-tmp.tar"), members)
    before = set(os.listdir(tmp_path / "images"))
    with pytest.raises(KamraError, match="outside"):
        tmpfs.stage([_mount()], images, staging)
    assert set(os.listdir(tmp_path / "images")) == before  # nothing written beside it
    assert os.listdir(os.path.join(staging, "kamra-tmp")) == []


def test_an_unknown_mount_key_is_refused(tmp_path, staging):
    with pytest.raises(KamraError, match="unknown mount"):
        tmpfs.stage([_mount("../../etc")], str(tmp_path), staging)


def test_save_takes_a_mounts_own_files_and_refuses_one_that_changed(tmp_path):
    """A real mount namespace: the tar holds the tmpfs's files, those hidden under a
    mount inside it too, and nothing of that mount; once the container mounts over it,
    saving refuses (the dump then fails and the container runs on)."""
    script = ("mount -t tmpfs -o size=1m,mode=1777 tmpfs /tmp && echo hi > /tmp/f && "
              "mkdir /tmp/d && echo under > /tmp/d/under && "
              "mount -t tmpfs tmpfs /tmp/d && echo over > /tmp/d/over && "
              "echo ready && exec sleep 60")
    # unshare(1) makes the new namespace's mounts private: nothing reaches the host.
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        carried = [c for c in tmpfs.own_mounts(proc.pid) if c.mountpoint == "/tmp"]
        assert len(carried) == 1 and "size=1024k" in carried[0].options
        images = str(tmp_path)
        (saved,) = tmpfs.save(proc.pid, carried, images)
        assert saved["key"] == "kamra-tmp"
        with tarfile.open(os.path.join(images, "kamra-tmp.tar")) as tar:
            names = {m.name.removeprefix("./") for m in tar.getmembers()}
            assert tar.extractfile("./f").read() == b"hi\n"  # type: ignore[union-attr]
        assert {"f", "d", "d/under"} <= names and "d/over" not in names
        subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "mount", "-t", "tmpfs",
                        "tmpfs", "/tmp"], check=True)
        with pytest.raises(KamraError, match="changed during the checkpoint"):
            tmpfs.save(proc.pid, carried, images)
    finally:
        proc.kill()
        proc.wait()
