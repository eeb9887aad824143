"""Cgroup drivers behind one interface, chosen by what the host mounts.

kamra's cgroups live beneath the cgroup kamra was started in (never at a
hierarchy's root), at ``<own>/kamra-<rootid>/<container>``, and a container's
processes sit one level lower in ``<container>/payload``, so a container that can
write its own cgroup can never raise the limits set on its parent.
"""

from __future__ import annotations

from kamra.cgroups.base import CgroupDriver, detect_mode
from kamra.cgroups.limits import KEYS as LIMIT_KEYS
from kamra.cgroups.limits import block_device_of, io_scheduler
from kamra.cgroups.v1 import CgroupV1
from kamra.cgroups.v2 import CgroupV2

DRIVERS: dict[str, type[CgroupDriver]] = {"v1": CgroupV1, "hybrid": CgroupV1, "v2": CgroupV2}


def driver_for_host(root_id: str, mountinfo: str = "/proc/self/mountinfo",
                    proc_cgroup: str = "/proc/self/cgroup") -> CgroupDriver:
    mode = detect_mode(mountinfo)
    return DRIVERS[mode].from_host(root_id, mountinfo, proc_cgroup)


__all__ = ["CgroupDriver", "CgroupV1", "CgroupV2", "DRIVERS", "LIMIT_KEYS", "block_device_of",
           "detect_mode", "driver_for_host", "io_scheduler"]
