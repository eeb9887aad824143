"""The checkpoint archive's member check: hostile archives are refused before anything
is written (kamra restore --import, a migration's archives)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import zstandard

from kamra.checkpoint import archive
from kamra.errors import InvalidInput


def _hostile(path: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = tarfile.TarInfo(archive.MANIFEST)
        body = b'{"format": 1}'
        head.size = len(body)
        tar.addfile(head, io.BytesIO(body))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw.getvalue()))
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "",
            data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers (0:0 is a whiteout)
    return info, data


@pytest.mark.parametrize("members, reason", [
    ([_member("../escape")], "lies outside"),
    ([_member("elsewhere/file")], "lies outside"),
    ([_member("upper/link", tarfile.SYMTYPE, "OUTSIDE"), _member("upper/link/passwd")],
     "goes through a symlink"),
    ([_member("upper/link", tarfile.SYMTYPE, "OUTSIDE"),
      _member("upper/shadow", tarfile.LNKTYPE, "upper/link/secret")],
     "points through a symlink"),
    ([_member("upper/x", tarfile.LNKTYPE, "/etc/shadow")], "points outside"),
    ([_member("upper/null", tarfile.CHRTYPE)], "device or FIFO"),
], ids=["dotdot", "other-top", "through-symlink", "hardlink-through-symlink",
        "hardlink-outside", "device"])
def test_hostile_members_are_refused(tmp_path, members, reason):
    outside = tmp_path / "outside"  # where the symlinks point
    outside.mkdir()
    (outside / "secret").write_text("host's")
    for info, _ in members:
        if info.linkname == "OUTSIDE":
            info.linkname = str(outside)
    path = _hostile(str(tmp_path / "bad.tar.zst"), [_member("upper", tarfile.DIRTYPE)]
                    + members)
    before = set(os.listdir(tmp_path))
    with pytest.raises(InvalidInput, match=reason):
        archive.read(path)
    assert set(os.listdir(tmp_path)) == before
    assert os.listdir(outside) == ["secret"]
