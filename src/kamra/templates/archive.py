"""Templates as .tar.zst files: export, and safe import of untrusted archives.

GNU tar does the archiving on both sides, because it carries everything a rootfs
holds (xattrs, ACLs, file capabilities, hard links, sparse files). Python only
compresses, decompresses and, on import, checks every member first (tarcheck) so
that a hostile archive is refused before anything is written.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from kamra.errors import InvalidInput, KamraError, KernelError, NotFound
from kamra.tarzst import atomic_output, feed_tar, tar_to_zstd
from kamra.templates.digest import digest_and_size
from kamra.templates.fsutil import remove_tree, scratch_name
from kamra.templates.model import METADATA, ROOTFS, Progress, TemplateInfo, emit
from kamra.templates.tarcheck import MemberChecker, Summary, symlink_escapes
from kamra.templates.zstdio import ZstdReader

_CHUNK = 1 << 20
_TAR_COMMON = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
# --sparse keeps holes as holes; format 0.0 because 0.1 and 1.0 put tar's pid in a
# header name, and exports should be reproducible.
_SPARSE = ["--sparse", "--sparse-version=0.0"]
# Fixed pax header names and no atime/ctime: the same template exports to the same bytes
# (GNU tar's default header names carry its pid).
_PAX = "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"


def _export_argv(info: TemplateInfo) -> list[str]:
    return ["tar", *_TAR_COMMON, *_SPARSE, "--format=posix", _PAX, "--sort=name",
            "-C", info.path, "-cf", "-", METADATA, ROOTFS]


def stream_template(info: TemplateInfo, out: BinaryIO) -> None:
    """The export archive written to ``out`` as it is made (to another host)."""
    tar_to_zstd(_export_argv(info), out, f"packing template '{info.name}'", level=1)


def export_template(info: TemplateInfo, file_path: str, progress: Progress | None = None) -> None:
    """Write ``file_path`` (a .tar.zst of template.toml and rootfs/) atomically."""
    argv = _export_argv(info)
    with atomic_output(file_path, 0o644) as out:
        tar_to_zstd(argv, out, f"exporting template '{info.name}'",
                    lambda done: emit(progress, "export", min(done, info.size), info.size,
                                      info.name))
    emit(progress, "export", info.size, info.size, info.name)


# ---------------------------------------------------------------- import

def _open_archive(file_path: str) -> BinaryIO:
    try:
        f = open(file_path, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise NotFound(f"archive {file_path} not found") from None
    except IsADirectoryError:
        raise InvalidInput(f"{file_path} is a directory, not a template archive") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {file_path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise InvalidInput(f"{file_path} is not a regular file")
    return f


def _scan(f: BinaryIO, label: str, size: int, progress: Progress | None
          ) -> tuple[Summary, bytes, int]:
    """First pass: check every member, extract nothing. Returns the summary, the hash of
    the compressed bytes and the length of the tar stream, so the second pass can prove
    it read the same file."""
    reader = ZstdReader(f, label, lambda n: emit(progress, "verify", n, size, label))
    checker = MemberChecker()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                checker.check(member)
        while reader.read(_CHUNK):  # the rest: tar padding, and the end of the zstd frame
            pass
    except (tarfile.TarError, ValueError) as exc:  # ValueError: e.g. undecodable pax data
        raise InvalidInput(f"{label} is not a valid tar archive: {exc}") from None
    return checker.finish(), reader.hash.digest(), reader.produced


def _extract(f: BinaryIO, label: str, size: int, into: str, expected: tuple[bytes, int],
             progress: Progress | None) -> str:
    """Second pass: GNU tar unpacks the stream we decompress; returns tar's warnings."""
    reader = ZstdReader(f, label, lambda n: emit(progress, "untar", n, size, label))
    # Limit what tar may write to the two names the check allowed, as a second fence.
    argv = ["tar", *_TAR_COMMON, "--no-wildcards", "-xpf", "-", "-C", into, METADATA, ROOTFS]
    expected_hash, limit = expected

    def chunks() -> Iterator[bytes]:
        while chunk := reader.read(_CHUNK):
            if reader.produced > limit:  # more than the checked stream held
                raise InvalidInput(f"{label} changed while it was being imported")
            yield chunk

    code, warnings = feed_tar(argv, chunks())
    if reader.hash.digest() != expected_hash:
        raise InvalidInput(f"{label} changed while it was being imported")
    if code != 0:
        raise KamraError(f"extracting {label} failed: tar: {warnings or f'exit {code}'}")
    return warnings


def audit_tree(top: str) -> None:
    """Re-check what tar actually wrote, independent of how tarfile parsed the archive."""
    extra = set(os.listdir(top)) - {METADATA, ROOTFS}
    if extra:
        raise InvalidInput(f"archive unpacked to unexpected entries: {', '.join(sorted(extra))}")
    rootfs = os.path.join(top, ROOTFS)
    if not stat.S_ISDIR(os.lstat(rootfs).st_mode):
        raise InvalidInput(f"archive has no {ROOTFS}/ directory")
    def fail(exc: OSError) -> None:
        raise exc  # os.walk would otherwise skip what it cannot read

    for dirpath, dirnames, filenames in os.walk(rootfs, onerror=fail):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            rel = os.path.relpath(path, rootfs)
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) \
                    or stat.S_ISSOCK(mode):
                raise InvalidInput(f"archive unpacked a special file at {ROOTFS}/{rel}")
            if stat.S_ISLNK(mode) and symlink_escapes(rel.split("/"), os.readlink(path)):
                raise InvalidInput(f"archive unpacked a symlink escaping {ROOTFS}/ at "
                                   f"{ROOTFS}/{rel}")


def import_template(file_path: str, dest_dir_parent: str, name: str,
                    progress: Progress | None = None) -> str:
    """Check, unpack and verify ``file_path``; return a dot-dir under ``dest_dir_parent``
    holding the template (its template.toml already names it ``name``), ready to be
    renamed into place. On any failure nothing is left behind."""
    label = f"archive {file_path}"
    with _open_archive(file_path) as f:
        size = os.fstat(f.fileno()).st_size
        summary, file_hash, stream_size = _scan(f, label, size, progress)
        tmp = scratch_name(dest_dir_parent, "import")
        try:
            os.mkdir(tmp, 0o700)
            f.seek(0)
            warnings = _extract(f, label, size, tmp, (file_hash, stream_size), progress)
            audit_tree(tmp)
            info = TemplateInfo.load(tmp)
            digest, actual_size = digest_and_size(
                info.rootfs, lambda n: emit(progress, "digest", n, max(n, summary.total), name))
            if digest != info.digest:
                hint = f"; tar warned: {warnings}" if warnings else ""
                raise InvalidInput(f"archive digest mismatch: template.toml says {info.digest}, "
                                   f"the unpacked rootfs is {digest} (corrupt or tampered "
                                   f"archive{hint})")
            info.name, info.size = name, actual_size
            info.save()
            os.chmod(tmp, 0o755)
            return tmp
        except OSError as exc:
            remove_tree(tmp)
            raise KernelError.from_oserror("import", exc) from None
        except BaseException:
            remove_tree(tmp)
            raise
