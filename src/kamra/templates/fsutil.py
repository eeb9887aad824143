"""Removing template trees without ever reaching into a mounted filesystem."""

from __future__ import annotations

import os
import secrets
import shutil

from kamra.errors import KernelError, ResourceBusy


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in this mount namespace."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return found


def _refuse_mounts(path: str) -> None:
    mounted = mounts_under(path)
    if mounted:
        raise ResourceBusy(f"cannot remove {path}: {mounted[0]} is mounted inside it "
                           f"(unmount it with 'umount -l {mounted[0]}' first)")


def remove_tree(path: str) -> None:
    """rmtree, refusing if anything is mounted inside: a bind-mounted /dev or /proc left
    behind by a crashed build would otherwise have the host's files deleted through it."""
    if not os.path.lexists(path):
        return
    _refuse_mounts(path)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise KernelError.from_oserror("remove", exc) from None


def scratch_name(parent: str, prefix: str) -> str:
    """A fresh dot-name under ``parent`` (dot-dirs are never listed as templates)."""
    return os.path.join(parent, f".{prefix}-{secrets.token_hex(6)}")


def discard(path: str) -> None:
    """Remove a directory so that it disappears from its name at once: rename it to a
    .trash- dot-dir first, so a crash mid-removal never leaves a half-deleted template
    under its real name."""
    if not os.path.lexists(path):
        return
    _refuse_mounts(path)
    trash = scratch_name(os.path.dirname(path.rstrip("/")), "trash")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise KernelError.from_oserror("rename", exc) from None
    remove_tree(trash)
