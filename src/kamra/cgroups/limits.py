"""Normalized limit keys, their kernel encodings, and the helpers both drivers share.

``apply_limits`` takes already-normalized values (parsing sizes, checking ranges
against the host is the config layer's job):

==============================  ==========  ====================================  ===================================
key                             type        cgroup v1                             cgroup v2
==============================  ==========  ====================================  ===================================
limits.cpu                      float cores cpu.cfs_quota_us / cpu.cfs_period_us  cpu.max "Q 100000" ("max 100000")
                                            (period 100000, quota -1 = none)
limits.cpu.weight               int 1-10000 cpu.shares = w*1024/100 (2..262144)   cpu.weight (default 100)
limits.cpu.set                  str "0-1"   cpuset.cpus on <container> and        cpuset.cpus on <container>
                                            payload (parent's set when absent)    ("" = inherit when absent)
limits.memory                   int bytes   memory.limit_in_bytes (-1 = none)     memory.max ("max")
limits.memory.swap              int bytes   memory.memsw.limit_in_bytes =         memory.swap.max ("max")
                                            memory + swap (-1 = none)
limits.memory.reservation       int bytes   memory.soft_limit_in_bytes (-1)       memory.low ("0")
limits.pids                     int         pids.max ("max")                      pids.max ("max")
limits.io.weight                int 1-10000 blkio.bfq.weight (1-1000, mapped)     io.weight "default N", and
                                                                                  io.bfq.weight (mapped) if present
limits.io.read_bps ...          int         blkio.throttle.read_bps_device ...    io.max "MAJ:MIN rbps= wbps= riops=
 write_bps, read_iops,                      "MAJ:MIN N" ("MAJ:MIN 0" clears)      wiops=" ("max" clears)
 write_iops
==============================  ==========  ====================================  ===================================

The io weight mapping to BFQ's 1..1000 is piecewise linear around the defaults
(1 -> 1, 100 -> 100, 10000 -> 1000), as systemd maps IOWeight=, so a container at
the default weight competes evenly with a cgroup at BFQ's default.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable

from kamra.errors import InvalidInput, KamraError, KernelError, ResourceBusy

CPU = "limits.cpu"
CPU_WEIGHT = "limits.cpu.weight"
CPU_SET = "limits.cpu.set"
MEMORY = "limits.memory"
SWAP = "limits.memory.swap"
RESERVATION = "limits.memory.reservation"
PIDS = "limits.pids"
IO_WEIGHT = "limits.io.weight"
IO_READ_BPS = "limits.io.read_bps"
IO_WRITE_BPS = "limits.io.write_bps"
IO_READ_IOPS = "limits.io.read_iops"
IO_WRITE_IOPS = "limits.io.write_iops"

IO_THROTTLE = (IO_READ_BPS, IO_WRITE_BPS, IO_READ_IOPS, IO_WRITE_IOPS)
KEYS = (CPU, CPU_WEIGHT, CPU_SET, MEMORY, SWAP, RESERVATION, PIDS, IO_WEIGHT) + IO_THROTTLE
# Limits enforced elsewhere (the storage driver): accepted and ignored here.
NOT_CGROUP = ("limits.disk",)

# key -> (v1 throttle file, v2 io.max field)
IO_FILES = {
    IO_READ_BPS: ("blkio.throttle.read_bps_device", "rbps"),
    IO_WRITE_BPS: ("blkio.throttle.write_bps_device", "wbps"),
    IO_READ_IOPS: ("blkio.throttle.read_iops_device", "riops"),
    IO_WRITE_IOPS: ("blkio.throttle.write_iops_device", "wiops"),
}

CFS_PERIOD = 100000
WEIGHT_DEFAULT, WEIGHT_MIN, WEIGHT_MAX = 100, 1, 10000
BFQ_DEFAULT, BFQ_MIN, BFQ_MAX = 100, 1, 1000


def check_keys(limits: dict[str, object], io_device: str | None) -> None:
    unknown = sorted(set(limits) - set(KEYS) - set(NOT_CGROUP))
    if unknown:
        raise InvalidInput(f"unknown limit key {unknown[0]!r}: known keys are {', '.join(KEYS)}")
    throttled = [k for k in IO_THROTTLE if k in limits]
    if throttled and not io_device:
        raise InvalidInput(f"{throttled[0]}: I/O limits apply to a block device and none was "
                           "given (the disk holding the container's files, as MAJ:MIN)")
    if io_device is not None and not _is_devnum(io_device):
        raise InvalidInput(f"io device {io_device!r}: expected MAJ:MIN, e.g. 254:0")


def _is_devnum(text: str) -> bool:
    major, sep, minor = text.partition(":")
    return bool(sep) and major.isdigit() and minor.isdigit()


def cpu_quota(cores: object) -> int:
    """CFS quota in microseconds per 100 ms period for a number of cores."""
    return int(round(float(cores) * CFS_PERIOD))  # type: ignore[arg-type]


def weight_to_shares(weight: object) -> int:
    """cgroup v2 weight (1..10000, default 100) -> v1 cpu.shares (default 1024)."""
    return max(2, min(262144, int(weight) * 1024 // 100))  # type: ignore[call-overload]


def weight_to_bfq(weight: object) -> int:
    """io weight (1..10000, default 100) -> BFQ weight (1..1000, default 100)."""
    w = max(WEIGHT_MIN, min(WEIGHT_MAX, int(weight)))  # type: ignore[call-overload]
    if w <= WEIGHT_DEFAULT:
        return BFQ_DEFAULT - (WEIGHT_DEFAULT - w) * (BFQ_DEFAULT - BFQ_MIN) \
            // (WEIGHT_DEFAULT - WEIGHT_MIN)
    return BFQ_DEFAULT + (w - WEIGHT_DEFAULT) * (BFQ_MAX - BFQ_DEFAULT) \
        // (WEIGHT_MAX - WEIGHT_DEFAULT)


def parse_cpu_list(text: str) -> set[int]:
    """"0-2,5" -> {0, 1, 2, 5} (the kernel's list format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def check_cpu_list(text: str, available: str) -> set[int]:
    """The CPUs of ``limits.cpu.set``, which must be a subset of ``available``."""
    try:
        wanted = parse_cpu_list(text)
    except ValueError:
        wanted = set()
    if not wanted:
        raise InvalidInput(f"limits.cpu.set: {text!r} is not a CPU list such as 0-1 or 0,2")
    if not wanted <= parse_cpu_list(available):
        raise InvalidInput(f"limits.cpu.set: {text!r} names CPUs kamra cannot use here; "
                           f"the CPUs available are {available}")
    return wanted


def mib(value: int, up: bool = False) -> str:
    """Bytes as MiB for messages: whole when exact, else one decimal (rounded up for usage)."""
    n = value / 2**20
    if n == int(n):
        return str(int(n))
    return f"{math.ceil(n * 10) / 10:.1f}" if up else f"{n:.1f}"


def memory_busy(container: str, usage: int, limit: int) -> ResourceBusy:
    return ResourceBusy(
        f"limits.memory: container {container!r} uses {mib(usage, up=True)} MiB even after "
        f"reclaim; a limit of {mib(limit)} MiB cannot hold: raise the value or free memory first")


def write_knob(path: str, value: str, key: str,
               opener: Callable[[str, str], None] | None = None) -> None:
    """Write one cgroup file; a refusal becomes a KernelError naming the key, file and value."""
    try:
        if opener is not None:
            opener(path, value)
        else:
            with open(path, "w") as f:
                f.write(value)
    except OSError as exc:
        raise KernelError(f"{key}: writing {value!r} to {path}", exc.errno or errno.EIO,
                          _hint(exc.errno)) from exc


def _hint(err: int | None) -> str:
    return {
        errno.EINVAL: "the kernel rejects this value",
        errno.EBUSY: "the cgroup's current state does not allow it",
        errno.ENODEV: "no such block device",
    }.get(err or 0, "")


def missing_controller(key: str, controller: str, how: str) -> KamraError:
    return KamraError(f"{key}: needs the {controller} controller, which {how}; "
                      "the limit cannot be applied on this host")


# --- block devices -------------------------------------------------------------------

SYS_DEV_BLOCK = "/sys/dev/block"


def block_device_of(path: str, sysfs: str = SYS_DEV_BLOCK) -> str:
    """"MAJ:MIN" of the whole disk holding ``path`` (a partition maps to its disk), the
    device I/O limits are set on. Loop and device-mapper devices are their own disks."""
    st_dev = os.stat(path).st_dev
    dev = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    return whole_disk(dev, path, sysfs)


def whole_disk(dev: str, what: str = "", sysfs: str = SYS_DEV_BLOCK) -> str:
    node = os.path.join(sysfs, dev)
    if not os.path.exists(node):
        raise KamraError(f"{what or dev}: not on a block device (device {dev}: overlay, tmpfs "
                         "or a btrfs subvolume has none); I/O limits need the disk's MAJ:MIN")
    if os.path.exists(os.path.join(node, "partition")):
        with open(os.path.join(os.path.realpath(node), "..", "dev")) as f:
            return f.read().strip()
    return dev


def io_scheduler(device: str, sysfs: str = SYS_DEV_BLOCK) -> str | None:
    """The active I/O scheduler of a disk (the bracketed one), or None if unknown."""
    try:
        disk = whole_disk(device, sysfs=sysfs)
        with open(os.path.join(sysfs, disk, "queue", "scheduler")) as f:
            text = f.read()
    except (OSError, KamraError):
        return None
    start, end = text.find("["), text.find("]")
    if start < 0 or end < start:
        return text.strip() or None  # a single scheduler is printed without brackets
    return text[start + 1:end]


def bfq_active(device: str, sysfs: str = SYS_DEV_BLOCK) -> bool:
    return io_scheduler(device, sysfs) == "bfq"
