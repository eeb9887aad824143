"""cgroup v2 (unified hosts): one tree; kamra's own processes move into a leaf first."""

from __future__ import annotations

import os

from kamra.cgroups.base import (
    PAYLOAD,
    CgroupDriver,
    own_cgroups,
    read_mounts,
    read_pids,
    rmdir_retry,
    rmdir_tree,
)


class CgroupV2(CgroupDriver):
    name = "v2"

    def __init__(self, base: str):
        self.base = base  # <mount>/<own>/kamra-<rootid>

    @classmethod
    def from_host(cls, root_id: str, mountinfo: str = "/proc/self/mountinfo",
                  proc_cgroup: str = "/proc/self/cgroup") -> CgroupV2:
        mounts = [m for m, fstype, _ in read_mounts(mountinfo) if fstype == "cgroup2"]
        if not mounts:
            raise RuntimeError("cgroup2 is not mounted")
        own = own_cgroups(proc_cgroup).get("", "/")
        return cls(os.path.join(mounts[0], own.lstrip("/"), f"kamra-{root_id}"))

    def create(self, container: str) -> None:
        os.makedirs(os.path.join(self.base, container, PAYLOAD), exist_ok=True)

    def procs_files(self, container: str) -> list[str]:
        return [os.path.join(self.base, container, PAYLOAD, "cgroup.procs")]

    def pids(self, container: str) -> list[int]:
        found: set[int] = set()
        for dirpath, _, files in os.walk(os.path.join(self.base, container)):
            if "cgroup.procs" in files:
                found.update(read_pids(os.path.join(dirpath, "cgroup.procs")))
        return sorted(found)

    def kill(self, container: str) -> None:
        path = os.path.join(self.base, container, "cgroup.kill")
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("1")

    def remove(self, container: str) -> None:
        rmdir_tree(os.path.join(self.base, container))

    def cleanup(self) -> None:
        if os.path.isdir(self.base) and not [
                d for d in os.listdir(self.base) if os.path.isdir(os.path.join(self.base, d))]:
            rmdir_retry(self.base)
