"""GNU tar piped through zstd into a file written atomically: what template exports and
checkpoint archives share."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import zstandard

from kamra.errors import InvalidInput, KamraError, NotFound

CHUNK = 1 << 20


def stderr_tail(f: BinaryIO) -> str:
    """The last two non-empty lines tar wrote to ``f``."""
    f.seek(0)
    lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
    return " | ".join([line for line in lines if line][-2:])


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file that appears at ``path`` complete (fsync'd, then renamed) or not at all."""
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise NotFound(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(target):
        raise InvalidInput(f"cannot write {path}: it is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=directory)
    try:
        with open(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def tar_to_zstd(argv: list[str], out: BinaryIO, what: str,
                progress: Callable[[int], None] | None = None, level: int = 3,
                ok_codes: tuple[int, ...] = (0,)) -> None:
    """Run ``argv`` (a tar writing to stdout) and compress its output into ``out``; a
    failing tar raises KamraError naming ``what`` and tar's own words. ``ok_codes``:
    tar's exit statuses that are not a failure (1: a file changed while it was read)."""
    # The content checksum lets any zstd reader detect a corrupted file, not just kamra.
    cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err)
        assert proc.stdout is not None
        done = 0
        try:
            with cctx.stream_writer(out, closefd=False) as writer:
                while chunk := proc.stdout.read(CHUNK):
                    writer.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if code not in ok_codes:
            raise KamraError(f"{what} failed: tar: {stderr_tail(err)}")


def feed_tar(argv: list[str], chunks: Iterable[bytes]) -> tuple[int, str]:
    """Run ``argv`` (a tar reading stdin) on ``chunks``; (its exit status, its last
    words). If producing a chunk raises, tar is killed and the error goes on."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=err)
        assert proc.stdin is not None
        try:
            with contextlib.suppress(BrokenPipeError):  # tar stopped early: it says why
                for chunk in chunks:
                    proc.stdin.write(chunk)
                proc.stdin.close()
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return code, stderr_tail(err)
