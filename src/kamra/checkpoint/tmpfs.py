"""The container's own tmpfs mounts (/dev, /dev/shm, /run, /tmp) travel as kamra's files.

CRIU saves a tmpfs by running ``tar --gzip`` over it (a fork, two execs and a gzip for
every one) and restores it with another tar: on this machine some 6 ms per mount on the
dump and 6-16 ms on the restore, about 60 ms of every checkpoint's frozen time for the
four tmpfs mounts kamra gives a container, usually holding a few kilobytes.

So kamra declares those mounts external to CRIU and carries their contents itself: at
post-dump (the tasks frozen, so nothing changes them) it writes each one's files to an
uncompressed tar next to CRIU's images, read from a detached clone of that mount alone
(``open_tree``), which shows the files hidden under mounts inside it (``/dev/pts``, say)
and nothing of those mounts. The restore mounts a fresh tmpfs with the same options in
a private staging directory, unpacks the files, and hands it to CRIU as the external
mount; CRIU binds it in place and mounts the rest on top. Files the tasks hold open,
deleted ones too, are CRIU's as before: it only finds them on a mount kamra made.

Only mounts exactly as kamra made them go this way: a tmpfs at one of those points, the
only mount there. Anything else (the container mounted over one, or its own tmpfs
elsewhere) stays with CRIU. A checkpoint without these files restores as before.
"""

from __future__ import annotations

import os
import tarfile
import threading
from dataclasses import asdict, dataclass

from kamra.errors import KamraError
from kamra.linux import libc

# Mount point inside the container -> the key CRIU knows it by.
OWN_MOUNTS = {"/dev": "kamra-dev", "/dev/shm": "kamra-dev-shm", "/run": "kamra-run",
              "/tmp": "kamra-tmp"}
_FLAGS = {"ro": libc.MS_RDONLY, "nosuid": libc.MS_NOSUID, "nodev": libc.MS_NODEV,
          "noexec": libc.MS_NOEXEC, "relatime": libc.MS_RELATIME}


@dataclass
class Carried:
    """One tmpfs whose files kamra carries: where, CRIU's key, how it was mounted."""

    mountpoint: str
    key: str
    mount_id: int
    flags: int  # per-mount flags (MS_NOSUID, ...)
    options: str  # tmpfs's own (size=, mode=, ...)
    source: str = "tmpfs"  # what mountinfo shows as the device ("shm" for /dev/shm)

    @property
    def file(self) -> str:
        return f"{self.key}.tar"


def own_mounts(pid: int) -> list[Carried]:
    """The tmpfs mounts kamra made that are still as it made them, in the mount
    namespace of ``pid``."""
    seen: dict[str, list[Carried | None]] = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4]  # (none of OWN_MOUNTS needs mountinfo's escapes)
            if point not in OWN_MOUNTS:
                continue
            if fields[sep + 1] != "tmpfs" or fields[3] != "/":
                seen.setdefault(point, []).append(None)
                continue
            flags = sum(_FLAGS.get(o, 0) for o in fields[5].split(","))
            options = ",".join(o for o in fields[sep + 3].split(",") if o not in ("rw", "ro"))
            seen.setdefault(point, []).append(
                Carried(point, OWN_MOUNTS[point], int(fields[0]), flags, options,
                        fields[sep + 2]))
    return [found[0] for found in seen.values() if len(found) == 1 and found[0] is not None]


def externals(carried: list[Carried]) -> list[str]:
    """CRIU's dump options for them: not its to save."""
    return [f"mnt[{c.mountpoint}]:{c.key}" for c in carried]


def save(pid: int, carried: list[Carried], images: str) -> list[dict]:
    """Write each mount's files into ``images`` (the tasks of ``pid`` frozen); returns
    what the restore needs to know, for the checkpoint's metadata. Raises if the mounts
    changed since the dump began (CRIU then resumes the tasks: nothing is lost)."""
    now = {c.mountpoint: c.mount_id for c in own_mounts(pid)}
    for c in carried:
        if now.get(c.mountpoint) != c.mount_id:
            raise KamraError(f"the container's mount at {c.mountpoint} changed during the "
                             "checkpoint; try again")
    clones = _clones(pid, [c.mountpoint for c in carried])
    try:
        for c, fd in zip(carried, clones, strict=True):
            with tarfile.open(os.path.join(images, c.file), "w",
                              format=tarfile.PAX_FORMAT) as tar:
                # Sockets are left out (tarfile skips them), as GNU tar does for CRIU:
                # the tasks bind theirs again on restore.
                tar.add(f"/proc/self/fd/{fd}/.", arcname=".")
    finally:
        for fd in clones:
            os.close(fd)
    return [asdict(c) for c in carried]


def _clones(pid: int, points: list[str]) -> list[int]:
    """Detached clones of the mounts at ``points`` in the mount namespace of ``pid``.
    The kernel clones only mounts of the caller's own namespace, so a short-lived thread
    with its own filesystem context joins that namespace to make them."""
    made: list[int] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            libc.unshare(libc.CLONE_FS)
            ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc.setns(ns, libc.CLONE_NEWNS)
            finally:
                os.close(ns)
            for point in points:
                made.append(libc.open_tree_clone(point))
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=run, name="kamra-tmpfs-clone")
    thread.start()
    thread.join()
    if failed:
        for fd in made:
            os.close(fd)
        raise failed[0]
    return made


def _checked(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, if none would land outside the fresh tmpfs it is unpacked into (an
    imported archive may be hostile): no absolute names, no "..", nothing through a
    symlink of the archive, no hard link to outside it."""
    links: set[str] = set()
    members = tar.getmembers()
    for member in members:
        for name, what in ((member.name, "member"),
                           (member.linkname if member.islnk() else "", "hard link")):
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or ".." in parts or any(
                    "/".join(parts[:i]) in links for i in range(1, len(parts) + (
                        what == "hard link"))):
                raise KamraError(f"{what} {name!r} of a tmpfs in the checkpoint points "
                                 "outside it")
        if member.issym():
            links.add("/".join(p for p in member.name.split("/") if p not in ("", ".")))
    return members


def stage(mounts: list[dict], images: str, staging: str) -> list[str]:
    """Mount and fill a tmpfs for each of ``mounts`` (the checkpoint's metadata) in
    ``staging``, a new directory; returns CRIU's restore options binding them in.
    ``unstage(staging)`` afterwards, whatever happened."""
    if not mounts:
        return []
    os.makedirs(staging, 0o700)
    found = []
    for raw in mounts:
        c = Carried(**raw)
        if c.key not in OWN_MOUNTS.values():
            raise KamraError(f"the checkpoint names an unknown mount {c.key!r}")
        target = os.path.join(staging, c.key)
        os.mkdir(target)
        libc.mount(c.source, target, "tmpfs", c.flags & ~libc.MS_RDONLY, c.options)
        try:
            with tarfile.open(os.path.join(images, c.file)) as tar:
                tar.extractall(target, _checked(tar), numeric_owner=True)
        except (OSError, tarfile.TarError) as exc:
            raise KamraError(f"the checkpoint's {c.mountpoint} could not be unpacked: "
                             f"{exc}") from None
        if c.flags & libc.MS_RDONLY:
            libc.mount(None, target, None, libc.MS_REMOUNT | libc.MS_BIND | c.flags)
        found.append(f"mnt[{c.key}]:{target}")
    return found


def unstage(staging: str) -> None:
    """Detach the staging mounts (the container's binds keep what they hold)."""
    if not os.path.isdir(staging):
        return
    for name in os.listdir(staging):
        try:
            libc.umount(os.path.join(staging, name), libc.MNT_DETACH)
        except OSError:
            pass  # not mounted: staging failed before
        os.rmdir(os.path.join(staging, name))
    os.rmdir(staging)
