"""What the host offers that some keys are checked against (its CPUs).

Kept apart from parsing: a plan written on one machine stays readable on another, and
the host checks run where a value is assigned, with a host tests can inject.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kamra.config.units import cpu_list_to_str, parse_cpu_list

ONLINE_CPUS = "/sys/devices/system/cpu/online"


@dataclass(frozen=True)
class HostInfo:
    online: tuple[int, ...]  # CPU numbers a cpuset may name
    cpu_count: int  # cores a CPU quota may ask for

    @classmethod
    def current(cls) -> HostInfo:
        count = os.cpu_count() or 1
        try:
            with open(ONLINE_CPUS) as f:
                online = parse_cpu_list(f.read().strip())
        except (OSError, ValueError):
            # No sysfs (an unusual chroot): assume CPUs 0..n-1, what the kernel numbers them.
            online = tuple(range(count))
        return cls(online=online, cpu_count=count)

    @classmethod
    def with_online(cls, cpus: str, cpu_count: int | None = None) -> HostInfo:
        """A host with this online list (as /sys prints it), for tests."""
        online = parse_cpu_list(cpus)
        return cls(online=online, cpu_count=cpu_count if cpu_count is not None else len(online))

    @property
    def online_text(self) -> str:
        return cpu_list_to_str(self.online)
