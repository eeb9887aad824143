"""A directory of CRIU's images between hosts (kamra.remote.wire): what arrives is what
was sent, and a bad name or a short transfer is an error, never a file elsewhere."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from kamra.remote import wire


def _transfer(src: str, dst: str, names: list[str]) -> tuple[int, int]:
    left, right = socket.socketpair()
    sent: list[int] = []
    sender = threading.Thread(target=lambda: sent.append(wire.send_files(left, src, names)))
    sender.start()
    try:
        got = wire.recv_files(right, dst, 1 << 30)
    finally:
        sender.join(10)
        left.close()
        right.close()
    return sent[0], got


def test_files_arrive_as_they_were(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    contents = {f"core-{i}.img": os.urandom(i * 1000) for i in range(40)}  # batched
    contents["pages-1.img"] = os.urandom(3 * wire.CHUNK + 5)  # chunked on its own
    contents["empty.img"] = b""
    for name, data in contents.items():
        (src / name).write_bytes(data)
    names = wire.plain_files(str(src))
    assert names == sorted(contents)
    sent, got = _transfer(str(src), str(dst), names)
    assert sent == got == sum(len(d) for d in contents.values())
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == contents
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in dst.iterdir())


def test_only_plain_files_are_sent_this_way(tmp_path):
    (tmp_path / "core-1.img").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert wire.plain_files(str(tmp_path)) is None
    os.rmdir(tmp_path / "sub")
    os.symlink("core-1.img", tmp_path / "link")
    assert wire.plain_files(str(tmp_path)) is None


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 300])
def test_a_bad_name_is_refused(tmp_path, name):
    left, right = socket.socketpair()
    with left, right:
        wire.send(left, {"op": "images", "files": [[name, 1]]}, b"x")
        with pytest.raises(wire.WireError, match="bad file name"):
            wire.recv_files(right, str(tmp_path), 1 << 20)
    assert os.listdir(tmp_path) == []
    assert not (tmp_path.parent / "escape").exists()


def test_an_existing_file_is_not_overwritten(tmp_path):
    (tmp_path / "core-1.img").write_bytes(b"mine")
    left, right = socket.socketpair()
    with left, right:
        wire.send(left, {"op": "images", "files": [["core-1.img", 5]]}, b"yours")
        wire.send(left, {"op": "images-end", "count": 1})
        with pytest.raises(FileExistsError):
            wire.recv_files(right, str(tmp_path), 1 << 20)
    assert (tmp_path / "core-1.img").read_bytes() == b"mine"


@pytest.mark.parametrize("frames, error", [
    ([({"op": "images", "files": [["a.img", 2]]}, b"abc")], "malformed"),
    ([({"op": "images", "files": [["a.img", "2"]]}, b"ab")], "malformed"),
    ([({"op": "images", "files": [["a.img", 2]]}, b"ab"),
      ({"op": "images-end", "count": 2}, b"")], "incomplete"),
    ([({"op": "chunk"}, b"ab")], "expected files"),
    ([({"op": "images", "files": [["a.img", 4]]}, b"abcd")], "larger than"),
])
def test_malformed_transfers_are_errors(tmp_path, frames, error):
    left, right = socket.socketpair()
    with left, right:
        for message, payload in frames:
            wire.send(left, message, payload)
        with pytest.raises(wire.WireError, match=error):
            wire.recv_files(right, str(tmp_path), 3)
