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
import shutil
import stat
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


def _newer(since: float | None) -> list[str]:
    # GNU tar's --newer compares both the data (mtime) and the status (ctime) change
    # times, so a chmod, an xattr or a rename counts as a change too.
    return [] if since is None else [f"--newer=@{since:.6f}"]


def _upper_argv(upper_dir: str) -> list[str]:
    return ["-C", os.path.dirname(upper_dir), "--transform",
            f"s,^{os.path.basename(upper_dir)},upper,S", os.path.basename(upper_dir)]


def _argv(staging: str, manifest: dict[str, Any], checkpoint_dir: str | None,
          upper_dir: str, since: float | None = None) -> list[str]:
    with open(os.path.join(staging, MANIFEST), "w") as f:
        json.dump({**manifest, "format": FORMAT}, f)
    argv = ["tar", *_TAR, *_newer(since), "-cf", "-", "-C", staging, MANIFEST]
    if checkpoint_dir is not None:
        argv += ["-C", os.path.dirname(checkpoint_dir), "--transform",
                 f"s,^{os.path.basename(checkpoint_dir)},checkpoint,S",
                 os.path.basename(checkpoint_dir)]
    return argv + _upper_argv(upper_dir)


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
           upper_dir: str, since: float | None = None) -> None:
    """The same archive, written to ``out`` as it is made (a migration: no file, and the
    fastest compression, as the bytes are on their way to the other host at once).
    With ``since``, upper/ holds only what changed after that time (a migration's last
    round: the manifest's ``upper_paths`` then says what exists)."""
    with tempfile.TemporaryDirectory(prefix="kamra-export-") as staging:
        tar_to_zstd(_argv(staging, manifest, checkpoint_dir, upper_dir, since), out,
                    "packing the container", level=1)


# A round copies the files of a container that runs: a file may change, shrink or go
# while tar reads it. Not an error: changed after the round's mark, it goes again in the
# next round or in the last delta, taken frozen or stopped (tar's exit status 1).
_WHILE_RUNNING = ["--ignore-failed-read", "--warning=no-file-changed",
                  "--warning=no-file-removed", "--warning=no-file-shrank"]


def stream_files(out: BinaryIO, upper_dir: str, since: float | None) -> None:
    """A round of a migration's file copy: upper/ only, or what changed since ``since``."""
    tar_to_zstd(["tar", *_TAR, *_WHILE_RUNNING, *_newer(since), "-cf", "-",
                 *_upper_argv(upper_dir)], out, "packing the container's files", level=1,
                ok_codes=(0, 1))


def upper_paths(upper_dir: str) -> list[str]:
    """Every path in the upper directory, relative to it (what a delta must leave)."""
    found = []
    for top, dirs, files in os.walk(upper_dir):
        rel = os.path.relpath(top, upper_dir)
        for entry in dirs + files:
            found.append(entry if rel == "." else f"{rel}/{entry}")
    return found


def merge(delta: str, base: str) -> None:
    """Move the tree ``delta`` (a later round, unpacked on its own) over ``base``: its
    entries replace base's, a directory in both is merged and takes delta's metadata
    (mode, owner, xattrs such as overlay's opaque mark, times). ``delta`` is consumed."""
    for entry in os.listdir(delta):
        new, old = os.path.join(delta, entry), os.path.join(base, entry)
        new_is_dir = stat.S_ISDIR(os.lstat(new).st_mode)
        try:
            old_is_dir: bool | None = stat.S_ISDIR(os.lstat(old).st_mode)
        except FileNotFoundError:
            old_is_dir = None
        if new_is_dir and old_is_dir:
            merge(new, old)
            continue
        if old_is_dir:
            shutil.rmtree(old)
        elif old_is_dir is not None and new_is_dir:
            os.unlink(old)
        os.replace(new, old)
    _copy_metadata(delta, base)


def _copy_metadata(src: str, dst: str) -> None:
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    wanted = {name: os.getxattr(src, name) for name in os.listxattr(src)}
    for name in os.listxattr(dst):
        if name not in wanted:
            os.removexattr(dst, name)
    for name, value in wanted.items():
        os.setxattr(dst, name, value)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def prune(upper_dir: str, keep: list[str]) -> int:
    """Remove what is not in ``keep`` (deleted on the source since an earlier round)."""
    wanted = set(keep)
    removed = 0
    for top, dirs, files in os.walk(upper_dir, topdown=True):
        rel = os.path.relpath(top, upper_dir)
        for entry in list(dirs) + files:
            path = entry if rel == "." else f"{rel}/{entry}"
            if path in wanted:
                continue
            full = os.path.join(top, entry)
            if entry in dirs and not os.path.islink(full):
                shutil.rmtree(full)
                dirs.remove(entry)
            else:
                os.unlink(full)
            removed += 1
    return removed


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
        target = member.linkname.rstrip("/").split("/")
        if target[0] not in PARTS or ".." in target or member.linkname.startswith("/"):
            return f"hard link {member.name!r} points outside the archive"
        for i in range(1, len(target)):
            if "/".join(target[:i]) in links:
                return f"hard link {member.name!r} points through a symlink"
    if member.isdev() or member.isfifo():
        whiteout = member.ischr() and member.devmajor == 0 and member.devminor == 0
        if not (whiteout and parts[0] == "upper"):
            return f"member {member.name!r} is a device or FIFO"
    return None


def read(path: str, manifest_needed: bool = True) -> dict[str, Any]:
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
    if not manifest_needed and manifest is None:
        return {}
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
