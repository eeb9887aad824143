"""cgroup v2 (unified hosts): one tree; kamra's own processes move into a leaf first."""

from __future__ import annotations

import errno
import os
import time

from kamra.cgroups import limits as L
from kamra.cgroups.base import (
    PAYLOAD,
    CgroupDriver,
    own_cgroups,
    read_mounts,
    read_pids,
    rmdir_retry,
    rmdir_tree,
)
from kamra.cgroups.stats import stats_v2
from kamra.errors import KamraError, KernelError, NotFound

# Controllers kamra enables for its cgroups when the host delegates them.
CONTROLLERS = ("cpu", "cpuset", "memory", "io", "pids")
# The file whose presence shows a limit can be set (its controller is enabled).
REQUIRED = {
    L.CPU: "cpu.max", L.CPU_WEIGHT: "cpu.weight", L.CPU_SET: "cpuset.cpus",
    L.MEMORY: "memory.max", L.SWAP: "memory.swap.max", L.RESERVATION: "memory.low",
    L.PIDS: "pids.max", L.IO_WEIGHT: "io.stat", **dict.fromkeys(L.IO_THROTTLE, "io.max"),
}
# Where kamra's own processes go so <own> can give controllers to its children.
LEAF = "kamrad"


class HostFiles:
    """File access to a mounted cgroup2 tree. The limit and stats code goes through this
    object, so tests can substitute a fake tree that enforces the kernel's rules."""

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def write(self, path: str, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)


class CgroupV2(CgroupDriver):
    name = "v2"

    def __init__(self, base: str, fs: HostFiles | None = None):
        self.base = base  # <mount>/<own>/kamra-<rootid>
        self.fs = fs or HostFiles()

    @classmethod
    def from_host(cls, root_id: str, mountinfo: str = "/proc/self/mountinfo",
                  proc_cgroup: str = "/proc/self/cgroup") -> CgroupV2:
        mounts = [m for m, fstype, _ in read_mounts(mountinfo) if fstype == "cgroup2"]
        if not mounts:
            raise RuntimeError("cgroup2 is not mounted")
        own = own_cgroups(proc_cgroup).get("", "/")
        if own.endswith("/" + LEAF):  # already moved into the leaf by an earlier kamrad
            own = os.path.dirname(own)
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

    # --- controllers, limits and statistics --------------------------------------------

    def _read(self, path: str) -> str | None:
        try:
            return self.fs.read(path)
        except OSError:
            return None

    def _is_root(self, path: str) -> bool:
        # The root cgroup is the only one without cgroup.type.
        return not self.fs.exists(os.path.join(path, "cgroup.type"))

    def _own(self) -> str:
        return os.path.dirname(self.base)

    def delegate(self, container: str) -> list[str]:
        """Enable the controllers kamra uses (those the host delegates to us) from our own
        cgroup down to the container's, and in the container's subtree_control so a
        container that manages its cgroup (systemd) gets them in its payload. A cgroup
        with processes cannot enable controllers (the "no internal processes" rule), so
        kamra's own processes first move into ``<own>/kamrad``. Idempotent; returns the
        controllers enabled on the container's cgroup."""
        own = self._own()
        offered = (self._read(os.path.join(own, "cgroup.controllers")) or "").split()
        wanted = [c for c in CONTROLLERS if c in offered]
        levels = [own, self.base, os.path.join(self.base, container)]
        for level in levels:
            enabled = (self._read(os.path.join(level, "cgroup.subtree_control")) or "").split()
            missing = [c for c in wanted if c not in enabled]
            if not missing:
                continue
            if level == own and not self._is_root(own):
                self._evacuate(own)
            L.write_knob(os.path.join(level, "cgroup.subtree_control"),
                         " ".join("+" + c for c in missing), "cgroup.subtree_control",
                         opener=self.fs.write)
        return wanted

    def _evacuate(self, own: str) -> None:
        leaf = os.path.join(own, LEAF)
        self.fs.mkdir(leaf)
        for _ in range(100):
            pids = (self._read(os.path.join(own, "cgroup.procs")) or "").split()
            if not pids:
                return
            for pid in pids:
                try:
                    self.fs.write(os.path.join(leaf, "cgroup.procs"), pid)
                except OSError as exc:
                    if exc.errno != errno.ESRCH:  # exited meanwhile
                        raise KernelError(f"moving pid {pid} into {leaf}",
                                            exc.errno or errno.EIO) from exc
            time.sleep(0.005)

    def _knob(self, container: str, name: str, key: str | None) -> str | None:
        """Path of an interface file; None if it is missing and not asked for (``key``
        None), an error if a limit needs it."""
        path = os.path.join(self.base, container, name)
        if self.fs.exists(path):
            return path
        if key is None:
            return None
        if name == "memory.swap.max" and self.fs.exists(os.path.join(self.base, container,
                                                                      "memory.max")):
            raise KamraError(f"{key}: swap limits need swap accounting, which this kernel has "
                             "off (no memory.swap.max; booted with cgroup.memory=noswap?); "
                             "remove the key")
        controller = name.split(".")[0]
        offered = (self._read(os.path.join(self._own(), "cgroup.controllers")) or "").split()
        raise L.missing_controller(
            key, controller, f"cgroup2 does not delegate here (no {name}; kamra's cgroup is "
            f"offered: {' '.join(offered) or 'no controllers'})")

    def _put(self, path: str | None, value: str, key: str) -> None:
        if path is not None:
            L.write_knob(path, value, key, opener=self.fs.write)

    def apply_limits(self, container: str, limits: dict[str, object],
                     io_device: str | None = None) -> None:
        L.check_keys(limits, io_device)
        if not self.fs.exists(os.path.join(self.base, container, "cgroup.procs")):
            raise NotFound(f"container {container!r} has no cgroup (is it running?)")
        self.delegate(container)

        def knob(name: str, *keys: str) -> str | None:
            return self._knob(container, name, next((k for k in keys if k in limits), None))

        # Everything that can be checked is checked before the first write.
        for key, name in REQUIRED.items():
            if key in limits:
                self._knob(container, name, key)
        cpus = limits.get(L.CPU_SET)
        if cpus is not None:
            parent = os.path.join(self.base, "cpuset.cpus.effective")
            L.check_cpu_list(str(cpus), (self._read(parent) or "").strip())
        memory = limits.get(L.MEMORY)
        if memory is not None:
            self.check_memory_limit(container, int(memory))  # type: ignore[call-overload]
        self._put(knob("memory.max", L.MEMORY),
                  "max" if memory is None else str(int(memory)), L.MEMORY)  # type: ignore[call-overload]
        swap = limits.get(L.SWAP)
        self._put(knob("memory.swap.max", L.SWAP),
                  "max" if swap is None else str(int(swap)), L.SWAP)  # type: ignore[call-overload]
        low = limits.get(L.RESERVATION)
        self._put(knob("memory.low", L.RESERVATION),
                  "0" if low is None else str(int(low)), L.RESERVATION)  # type: ignore[call-overload]

        cores = limits.get(L.CPU)
        quota = "max" if cores is None else str(L.cpu_quota(cores))
        self._put(knob("cpu.max", L.CPU), f"{quota} {L.CFS_PERIOD}", L.CPU)
        self._put(knob("cpu.weight", L.CPU_WEIGHT),
                  str(int(limits.get(L.CPU_WEIGHT, L.WEIGHT_DEFAULT))),  # type: ignore[call-overload]
                  L.CPU_WEIGHT)
        # An empty cpuset.cpus inherits the parent's; "" alone would write nothing.
        self._put(knob("cpuset.cpus", L.CPU_SET), "\n" if cpus is None else str(cpus),
                  L.CPU_SET)

        pids = limits.get(L.PIDS)
        self._put(knob("pids.max", L.PIDS),
                  "max" if pids is None else str(int(pids)), L.PIDS)  # type: ignore[call-overload]

        weight = limits.get(L.IO_WEIGHT, L.WEIGHT_DEFAULT)
        # io.weight is iocost's (kernels without it lack the file), BFQ reads io.bfq.weight.
        self._put(self._knob(container, "io.weight", None), f"default {int(weight)}",  # type: ignore[call-overload]
                  L.IO_WEIGHT)
        self._put(self._knob(container, "io.bfq.weight", None),
                  str(L.weight_to_bfq(weight)), L.IO_WEIGHT)
        self._apply_io_max(container, limits, io_device)

    def _apply_io_max(self, container: str, limits: dict[str, object],
                      device: str | None) -> None:
        throttled = next((k for k in L.IO_THROTTLE if k in limits), None)
        path = self._knob(container, "io.max", throttled)
        if path is None:
            return
        present = [line.split()[0] for line in (self._read(path) or "").splitlines()
                   if line.strip()]
        clear = " ".join(f"{field}=max" for _, field in L.IO_FILES.values())
        for dev in present:
            if dev != device or throttled is None:
                self._put(path, f"{dev} {clear}", throttled or L.IO_READ_BPS)
        if throttled is not None and device:
            fields = " ".join(
                f"{field}={'max' if limits.get(key) is None else int(limits[key])}"  # type: ignore[call-overload]
                for key, (_, field) in L.IO_FILES.items())
            self._put(path, f"{device} {fields}", throttled)

    def check_memory_limit(self, container: str, value: int) -> None:
        """The v2 kernel accepts a memory.max below usage and then OOM-kills inside the
        container: refuse such a value instead, after asking the kernel to reclaim the
        excess (memory.reclaim, kernel >= 5.19), as v1 does on its own."""
        path = os.path.join(self.base, container)
        current = _int(self._read(os.path.join(path, "memory.current")))
        if current is None or current <= value:
            return
        reclaim = os.path.join(path, "memory.reclaim")
        if self.fs.exists(reclaim):
            try:
                self.fs.write(reclaim, str(current - value))
            except OSError:
                pass  # EAGAIN: could not reclaim it all; memory.current says how much
            current = _int(self._read(os.path.join(path, "memory.current"))) or 0
        if current > value:
            raise L.memory_busy(container, current, value)

    def stats(self, container: str) -> dict:
        return stats_v2(os.path.join(self.base, container), read=self._read)

    def io_weight_effective(self, device: str) -> bool:
        """BFQ honours weights (io.bfq.weight); so does iocost (io.weight) where it is
        enabled for the device in the root cgroup's io.cost.qos."""
        if super().io_weight_effective(device):
            return True
        root = self._own()
        while not self._is_root(root) and root != "/":
            root = os.path.dirname(root)
        try:
            disk = L.whole_disk(device)
        except KamraError:
            disk = device
        for line in (self._read(os.path.join(root, "io.cost.qos")) or "").splitlines():
            fields = line.split()
            if fields and fields[0] == disk and "enable=1" in fields[1:]:
                return True
        return False


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None
