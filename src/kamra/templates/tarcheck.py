"""Rules a template archive must follow before any byte of it lands on disk.

An archive is exactly what export writes: ``template.toml`` and ``rootfs/...``, made of
regular files, directories, symlinks and hard links. Everything is judged lexically,
from the archive alone, and the first violation is reported with the member's name.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field

from kamra.errors import InvalidInput
from kamra.templates.model import METADATA, ROOTFS

MAX_TOTAL = 16 << 30  # uncompressed bytes of file contents
MAX_MEMBERS = 2_000_000
MAX_METADATA = 1 << 20
MAX_PATH = 4096
# overlayfs reads these from a lower layer (redirects, metacopy, opaque dirs): an archive
# must not be able to steer how overlays built on the template behave.
_FORBIDDEN_XATTRS = ("trusted.overlay.", "user.overlay.")


def _show(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:117] + "...")


def path_problem(name: str) -> str:
    """What is wrong with an archive path ("" if nothing): anything that could leave the
    target directory, or that GNU tar and Python's tarfile might read differently."""
    if not name:
        return "is empty"
    if len(name) > MAX_PATH:
        return f"is longer than {MAX_PATH} bytes"
    if name.startswith("/"):
        return "is an absolute path"
    parts = name.rstrip("/").split("/")
    if ".." in parts:
        return "has a '..' component"
    if "" in parts or "." in parts:
        return "has an empty or '.' component"
    return ""


def split_path(name: str) -> list[str]:
    problem = path_problem(name)
    if problem:
        raise InvalidInput(f"archive member {_show(name)} {problem}")
    return name.rstrip("/").split("/")


def symlink_escapes(link_parts: list[str], target: str) -> bool:
    """Whether a relative symlink at rootfs/<link_parts> climbs above rootfs/ when its
    target is resolved lexically from the link's directory. Absolute targets are read
    inside the container's root, so they cannot escape and are allowed."""
    if target.startswith("/"):
        return False
    stack = list(link_parts[:-1])
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(part)
    return False


@dataclass
class Summary:
    members: int = 0
    total: int = 0
    has_metadata: bool = False
    has_rootfs: bool = False
    regular: set[str] = field(default_factory=set)


class MemberChecker:
    """Feed every member in archive order with ``check``; call ``finish`` at the end."""

    def __init__(self, max_total: int | None = None, max_members: int | None = None):
        # Read at call time, so the caps can be tuned on the module.
        self.max_total = MAX_TOTAL if max_total is None else max_total
        self.max_members = MAX_MEMBERS if max_members is None else max_members
        self.summary = Summary()
        self._seen: set[str] = set()
        self._symlinks: set[str] = set()
        self._parents: dict[str, str] = {}  # directory path -> first member found under it

    def check(self, member: tarfile.TarInfo) -> None:
        s = self.summary
        s.members += 1
        if s.members > self.max_members:
            raise InvalidInput(f"archive has more than {self.max_members} members")
        parts = split_path(member.name)
        path = "/".join(parts)
        bad = self._kind_problem(member, parts)
        if bad:
            raise InvalidInput(f"archive member {_show(member.name)} {bad}")
        if path in self._seen:
            raise InvalidInput(f"archive member {_show(member.name)} appears twice")
        self._check_parents(member, parts)
        self._check_xattrs(member)
        self._seen.add(path)
        if member.isreg():
            s.total += member.size
            if s.total > self.max_total:
                raise InvalidInput(f"archive holds more than {self.max_total >> 30} GiB "
                                   f"(at member {_show(member.name)})")
            if parts[0] == ROOTFS:  # hard links may only point at rootfs files
                s.regular.add(path)
        elif member.issym():
            self._symlinks.add(path)
        if path == METADATA:
            s.has_metadata = True
        elif path == ROOTFS:
            s.has_rootfs = True

    def _kind_problem(self, m: tarfile.TarInfo, parts: list[str]) -> str:
        if m.ischr() or m.isblk():
            return "is a device node (kamra creates /dev itself; archives may not carry any)"
        if m.isfifo():
            return "is a FIFO"
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            return f"has an unsupported type {m.type!r}"
        if m.name.endswith("/") and not m.isdir():
            # GNU tar would make a directory of it, tarfile a file: no two readings allowed.
            return "ends with '/' but is not a directory"
        if parts[0] == METADATA:
            if len(parts) > 1 or not m.isreg():
                return f"must be a regular file named {METADATA}"
            if m.size > MAX_METADATA:
                return f"is larger than {MAX_METADATA} bytes"
            return ""
        if parts[0] != ROOTFS:
            return f"is outside {ROOTFS}/ (only {METADATA} and {ROOTFS}/ may be archived)"
        if len(parts) == 1 and not m.isdir():
            return f"must be a directory ({ROOTFS}/)"
        if m.issym():
            if not m.linkname:
                return "is a symlink with an empty target"
            if symlink_escapes(parts[1:], m.linkname):
                return f"is a symlink whose target {_show(m.linkname)} escapes {ROOTFS}/"
        if m.islnk():
            problem = path_problem(m.linkname)
            if problem:
                return f"is a hard link whose target {_show(m.linkname)} {problem}"
            if m.linkname.rstrip("/") not in self.summary.regular:
                return (f"is a hard link to {_show(m.linkname)}, which is not an earlier "
                        f"regular file under {ROOTFS}/")
        return ""

    def _check_parents(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        name = member.name
        path = "/".join(parts)
        if member.issym() and path in self._parents:
            # tar would have to turn a directory already holding files into a symlink.
            raise InvalidInput(f"archive member {_show(name)} is a symlink, but the earlier "
                               f"member {_show(self._parents[path])} lies beneath it")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in self._symlinks:
                raise InvalidInput(f"archive member {_show(name)} goes through the symlink "
                                   f"member {_show(parent)}")
            self._parents.setdefault(parent, name)

    def _check_xattrs(self, member: tarfile.TarInfo) -> None:
        for key in member.pax_headers:
            if key.startswith("SCHILY.xattr.") and key[13:].startswith(_FORBIDDEN_XATTRS):
                raise InvalidInput(f"archive member {_show(member.name)} carries the overlayfs "
                                   f"xattr {key[13:]!r}")

    def finish(self) -> Summary:
        if not self.summary.has_metadata:
            raise InvalidInput(f"archive has no {METADATA}: not a kamra template archive")
        if not self.summary.has_rootfs:
            raise InvalidInput(f"archive has no {ROOTFS}/ directory: not a kamra template "
                               "archive")
        return self.summary
