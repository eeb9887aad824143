"""The interface every cgroup driver implements, and host mode detection."""

from __future__ import annotations

import errno
import os
import time
from abc import ABC, abstractmethod

from kamra.cgroups.limits import bfq_active

PAYLOAD = "payload"


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, super options) of every cgroup mount."""
    mounts = []
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _source, superopts = (right.split() + ["", "", ""])[:3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append((fields[4], fstype, superopts.split(",")))
    return mounts


def detect_mode(mountinfo: str = "/proc/self/mountinfo") -> str:
    """"v2" (unified only), "v1" (legacy only) or "hybrid" (v1 controllers + cgroup2)."""
    kinds = {fstype for _, fstype, _ in read_mounts(mountinfo)}
    if kinds == {"cgroup2"}:
        return "v2"
    if "cgroup" in kinds and "cgroup2" in kinds:
        return "hybrid"
    if "cgroup" in kinds:
        return "v1"
    raise RuntimeError("no cgroup filesystem is mounted: mount cgroup2 on /sys/fs/cgroup")


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """Controller (or "" for cgroup2, "name=x" for named) -> our own cgroup path."""
    own: dict[str, str] = {}
    with open(proc_cgroup) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def wait_empty(procs_files: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(read_pids(p) for p in procs_files):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def read_pids(procs_file: str) -> list[int]:
    try:
        with open(procs_file) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def rmdir_retry(path: str, timeout: float = 2.0) -> bool:
    """rmdir a cgroup; True when gone. A parent stays busy for a moment after its last
    child was removed (the child's state is released asynchronously), so EBUSY is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def rmdir_tree(path: str) -> None:
    """Remove a cgroup and its children, deepest first (cgroupfs allows only rmdir)."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            _rmdir_or_raise(os.path.join(dirpath, d))
    _rmdir_or_raise(path)


def _rmdir_or_raise(path: str) -> None:
    # A process that died but is not reaped yet still counts in its cgroup: wait for it.
    if not rmdir_retry(path, timeout=10):
        os.rmdir(path)  # raises the real error


class CgroupDriver(ABC):
    """Placement, listing and killing of a container's processes by cgroup."""

    name = "abstract"
    # Whether a populated cgroup can be renamed (v1 only): lets a launcher migrate into a
    # spare cgroup ahead of time, off the start path.
    supports_rename = False

    def rename(self, old: str, new: str) -> None:
        raise NotImplementedError(f"cgroup {self.name} cannot rename a cgroup")

    def spares(self) -> list[str]:
        """Names of spare cgroups (``.standby-*``) left by an earlier kamrad."""
        return []

    @classmethod
    @abstractmethod
    def from_host(cls, root_id: str, mountinfo: str, proc_cgroup: str) -> CgroupDriver: ...

    @abstractmethod
    def create(self, container: str) -> None:
        """Create the container's cgroup and its payload leaf (idempotent)."""

    @abstractmethod
    def procs_files(self, container: str) -> list[str]:
        """cgroup.procs files a process writes its pid to, to join the container."""

    @abstractmethod
    def pids(self, container: str) -> list[int]:
        """Every process in the container's cgroup, recursively."""

    @abstractmethod
    def kill(self, container: str) -> None:
        """SIGKILL every process in the container, with no chance to escape by forking."""

    @abstractmethod
    def remove(self, container: str) -> None:
        """Remove the container's cgroups (they must be empty)."""

    @abstractmethod
    def cleanup(self) -> None:
        """Remove kamra's per-root cgroup if no container uses it any more."""

    # --- resource limits and accounting (see kamra.cgroups.limits and .stats) ----------

    def apply_limits(self, container: str, limits: dict[str, object],
                     io_device: str | None = None) -> None:
        """Write the kernel limits for normalized ``limits.*`` values on the container's
        cgroup. The dict is the whole set: an absent key means no limit (or the default),
        so applying a smaller dict removes limits. ``io_device`` ("MAJ:MIN", see
        ``block_device_of``) is needed for the I/O throttles. Memory limits are written
        first, so a memory value that cannot hold (ResourceBusy) changes nothing.
        Raises InvalidInput, ResourceBusy, KernelError (a write the kernel refused) or
        KamraError (the host lacks the controller)."""
        raise NotImplementedError(f"cgroup {self.name} cannot apply limits")

    def check_memory_limit(self, container: str, value: int) -> None:
        """Raise ResourceBusy if the container cannot fit in ``value`` bytes even after
        reclaim. Only needed where the kernel would accept the write and OOM-kill (v2);
        the v1 kernel refuses such a write itself (apply_limits turns that into the same
        ResourceBusy), so the default checks nothing."""
        return None

    def stats(self, container: str) -> dict:
        """Figures for beancounters and ``kamra stats`` (see kamra.cgroups.stats)."""
        raise NotImplementedError(f"cgroup {self.name} cannot read statistics")

    def io_weight_effective(self, device: str) -> bool:
        """Whether ``limits.io.weight`` has any effect on this block device ("MAJ:MIN"):
        only an I/O scheduler that honours cgroup weights (BFQ) does."""
        return bfq_active(device)
