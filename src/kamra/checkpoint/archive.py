"""A checkpointed container as one portable file (``kamra checkpoint --export``).

A zstd-compressed tar (GNU tar, like template archives, for xattrs and overlay
whiteouts) holding, in this order:

  kamra-checkpoint.json   the container's record, addresses, port forwards and the
                          checkpoint's own metadata (format 1)
  checkpoint/             CRIU's images and logs
  upper/                  the container's files: its overlay upper directory

The template is not inside: the importing host must hold the same template (same
digest). Importing checks every member before GNU tar writes anything: names stay in
those two directories, no member goes through a symlink, and the only special files
are overlay whiteouts (character devices 0:0).
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from typing import Any, BinaryIO

from kamra.errors import InvalidInput, KamraError, NotFound
from kamra.tarzst import atomic_output, feed_tar, tar_to_zstd
from kamra.templates.zstdio import ZstdReader

MANIFEST = "kamra-checkpoint.json"
FORMAT = 1
PARTS = ("checkpoint", "upper")
_CHUNK = 1 << 20
_TAR = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner", "--sparse"]


def _argv(staging: str, manifest: dict[str, Any], checkpoint_dir: str | None,
          upper_dir: str) -> list[str]:
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump({**manifest, "format": FORMAT}, f)
    argv = ["tar", *_TAR, "-cf", "-", "-C", staging, MANIFEST]
    if checkpoint_dir is not None:
        argv += ["-C", os.path.dirname(checkpoint_dir), "--transform",
                 f"s,^{os.path.basename(checkpoint_dir)},checkpoint,S",
                 os.path.basename(checkpoint_dir)]
    return argv + ["-C", os.path.dirname(upper_dir), "--transform",
                   f"s,^{os.path.basename(upper_dir)},upper,S", os.path.basename(upper_dir)]


def write(path: str, manifest: dict[str, Any], checkpoint_dir: str | None,
          upper_dir: str) -> int:
    """Write the archive to ``path`` atomically; returns its size in bytes. Without a
    ``checkpoint_dir`` it holds the files only (a stopped container)."""
    with tempfile.TemporaryDirectory(prefix="kamra-export-") as staging:
        argv = _argv(staging, manifest, checkpoint_dir, upper_dir)
        with atomic_output(path, 0o600) as out:  # 0600: it holds process memory
            tar_to_zstd(argv, out, f"writing {path}")
    return os.stat(path).st_size


def stream(out: BinaryIO, manifest: dict[str, Any], checkpoint_dir: str | None,
           upper_dir: str) -> None:
    """The same archive, written to ``out`` as it is made (a migration: no file, and the
    fastest compression, as the bytes are on their way to the other host at once)."""
    with tempfile.TemporaryDirectory(prefix="kamra-export-") as staging:
        tar_to_zstd(_argv(staging, manifest, checkpoint_dir, upper_dir), out,
                    "packing the container", level=1)


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise NotFound(f"archive {path} not found") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None


def _problem(member: tarfile.TarInfo, links: set[str]) -> str | None:
    name = member.name.rstrip("/")
    parts = name.split("/")
    if name == MANIFEST:
        return None if member.isfile() else "the manifest is not a file"
    if member.name.startswith("/") or ".." in parts or parts[0] not in PARTS:
        return f"member {member.name!r} lies outside checkpoint/ and upper/"
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            return f"member {member.name!r} goes through a symlink"
    if member.issym():
        links.add(name)
    if member.islnk():
        target = member.linkname.split("/")
        if target[0] not in PARTS or ".." in target:
            return f"hard link {member.name!r} points outside the archive"
    if member.isdev() or member.isfifo():
        whiteout = member.ischr() and member.devmajor == 0 and member.devminor == 0
        if not (whiteout and parts[0] == "upper"):
            return f"member {member.name!r} is a device or FIFO"
    return None


def read(path: str) -> dict[str, Any]:
    """Check every member; return the manifest. Nothing is written."""
    label = f"archive {path}"
    manifest: dict[str, Any] | None = None
    links: set[str] = set()
    with _open(path) as f:
        reader = ZstdReader(f, label, lambda n: None)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    problem = _problem(member, links)
                    if problem:
                        raise InvalidInput(f"{label} is refused: {problem}")
                    if member.name == MANIFEST:
                        data = tar.extractfile(member)
                        manifest = json.loads(data.read()) if data else None
        except (tarfile.TarError, ValueError) as exc:
            raise InvalidInput(f"{label} is not a kamra checkpoint archive: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidInput(f"{label} is not a kamra checkpoint archive (format {FORMAT})")
    return manifest


def extract(path: str, into: str) -> None:
    """Unpack checkpoint/ and upper/ into ``into`` (after ``read`` accepted the file)."""
    with _open(path) as f:
        reader = ZstdReader(f, f"archive {path}", lambda n: None)
        # Members that are not in the archive (no checkpoint/ for a stopped container)
        # are not an error: every member was checked by ``read`` already.
        code, warnings = feed_tar(["tar", *_TAR, "-xpf", "-", "-C", into],
                                  iter(lambda: reader.read(_CHUNK), b""))
    if code != 0:
        raise KamraError(f"unpacking {path} failed: tar: {warnings}")
