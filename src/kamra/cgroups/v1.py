"""cgroup v1 (legacy and hybrid hosts): one directory per controller hierarchy."""

from __future__ import annotations

import errno
import os
import signal
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
from kamra.cgroups.stats import stats_v1
from kamra.errors import InvalidInput, KamraError, KernelError, NotFound, ResourceBusy

# Controllers kamra places containers in; the others (net_cls, perf_event, ...) are left alone.
CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer")


class CgroupV1(CgroupDriver):
    name = "v1"
    supports_rename = True

    def __init__(self, bases: dict[str, str]):
        # controller -> <mount>/<own>/kamra-<rootid>
        self.bases = bases

    @classmethod
    def from_host(cls, root_id: str, mountinfo: str = "/proc/self/mountinfo",
                  proc_cgroup: str = "/proc/self/cgroup") -> CgroupV1:
        own = own_cgroups(proc_cgroup)
        bases: dict[str, str] = {}
        for mountpoint, fstype, opts in read_mounts(mountinfo):
            if fstype != "cgroup":
                continue
            for controller in CONTROLLERS:
                if controller in opts and controller not in bases:
                    path = own.get(controller, "/")
                    bases[controller] = os.path.join(mountpoint, path.lstrip("/"),
                                                     f"kamra-{root_id}")
        if "freezer" not in bases:
            raise RuntimeError("the v1 freezer controller is not mounted; kamra needs it to "
                               "stop containers reliably")
        return cls(bases)

    @staticmethod
    def _fill_cpuset(path: str) -> None:
        """A new v1 cpuset has no CPUs or memory nodes and refuses tasks (ENOSPC): give it
        its parent's. Checked every time, not only on creation: another thread may have
        created the directory a moment ago and not filled it yet."""
        parent = os.path.dirname(path)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            with open(os.path.join(path, knob)) as f:
                if f.read().strip():
                    continue
            with open(os.path.join(parent, knob)) as f:
                value = f.read().strip()
            with open(os.path.join(path, knob), "w") as f:
                f.write(value)

    def create(self, container: str) -> None:
        for controller, base in self.bases.items():
            payload = os.path.join(base, container, PAYLOAD)
            os.makedirs(payload, exist_ok=True)
            if controller == "cpuset":
                for path in (base, os.path.dirname(payload), payload):
                    self._fill_cpuset(path)

    def procs_files(self, container: str) -> list[str]:
        return [os.path.join(base, container, PAYLOAD, "cgroup.procs")
                for base in self.bases.values()]

    def _freezer(self, container: str) -> str:
        return os.path.join(self.bases["freezer"], container)

    def pids(self, container: str) -> list[int]:
        found: set[int] = set()
        top = self._freezer(container)
        for dirpath, _, files in os.walk(top):
            if "cgroup.procs" in files:
                found.update(read_pids(os.path.join(dirpath, "cgroup.procs")))
        return sorted(found)

    def kill(self, container: str) -> None:
        # Freeze first so no process can fork between our reading the list and the
        # kill, then SIGKILL everything and thaw so the kills are delivered.
        state = os.path.join(self._freezer(container), "freezer.state")
        if not os.path.exists(state):
            return
        for _ in range(50):
            with open(state, "w") as f:
                f.write("FROZEN")
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                with open(state) as f:
                    if f.read().strip() == "FROZEN":
                        break
                time.sleep(0.005)
            pids = self.pids(container)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            with open(state, "w") as f:
                f.write("THAWED")
            if not pids:
                return
            time.sleep(0.01)

    def rename(self, old: str, new: str) -> None:
        done = []
        try:
            for base in self.bases.values():
                os.rename(os.path.join(base, old), os.path.join(base, new))
                done.append(base)
        except OSError:
            for base in done:
                os.rename(os.path.join(base, new), os.path.join(base, old))
            raise

    def spares(self) -> list[str]:
        base = self.bases["freezer"]
        try:
            return [d for d in os.listdir(base) if d.startswith(".standby-")]
        except FileNotFoundError:
            return []

    def remove(self, container: str) -> None:
        for base in self.bases.values():
            rmdir_tree(os.path.join(base, container))

    def cleanup(self) -> None:
        for base in self.bases.values():
            # Only if empty: a base with a container (or a spare) in it stays.
            if not [d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))] \
                    if os.path.isdir(base) else False:
                rmdir_retry(base)

    # --- limits ------------------------------------------------------------------------

    def _dir(self, controller: str, container: str, key: str | None) -> str | None:
        """The container's cgroup in a controller's hierarchy; None when the controller is
        not mounted and nothing is asked of it (``key`` None), an error when it is."""
        base = self.bases.get(controller)
        if base is None:
            if key is None:
                return None
            raise L.missing_controller(key, controller, "is not mounted (cgroup v1)")
        return os.path.join(base, container)

    def apply_limits(self, container: str, limits: dict[str, object],
                     io_device: str | None = None) -> None:
        L.check_keys(limits, io_device)
        if not os.path.isdir(self._freezer(container)):
            raise NotFound(f"container {container!r} has no cgroup (is it running?)")

        def asked(*keys: str) -> str | None:
            return next((k for k in keys if k in limits), None)

        # Everything that can be checked is checked before the first write: a missing
        # controller or a bad CPU list changes nothing.
        mem_path = self._dir("memory", container, asked(L.MEMORY, L.SWAP, L.RESERVATION))
        cpu_path = self._dir("cpu", container, asked(L.CPU, L.CPU_WEIGHT))
        cpuset_path = self._dir("cpuset", container, asked(L.CPU_SET))
        pids_path = self._dir("pids", container, asked(L.PIDS))
        blkio_path = self._dir("blkio", container, asked(*L.IO_THROTTLE))
        cpuset_steps = self._cpuset_steps(cpuset_path, limits.get(L.CPU_SET)) \
            if cpuset_path else []

        # Memory first: a value that cannot hold is refused before anything else changes.
        if mem_path:
            self._apply_memory(container, mem_path, limits)
            reservation = limits.get(L.RESERVATION)
            self._write(mem_path, "memory.soft_limit_in_bytes",
                        "-1" if reservation is None else str(int(reservation)),  # type: ignore[call-overload]
                        L.RESERVATION)

        if cpu_path:
            cores = limits.get(L.CPU)
            self._write(cpu_path, "cpu.cfs_period_us", str(L.CFS_PERIOD), L.CPU)
            self._write(cpu_path, "cpu.cfs_quota_us",
                        "-1" if cores is None else str(L.cpu_quota(cores)), L.CPU)
            weight = limits.get(L.CPU_WEIGHT, L.WEIGHT_DEFAULT)
            self._write(cpu_path, "cpu.shares", str(L.weight_to_shares(weight)), L.CPU_WEIGHT)

        for where, value in cpuset_steps:
            L.write_knob(os.path.join(where, "cpuset.cpus"), value, L.CPU_SET)

        if pids_path:
            pids = limits.get(L.PIDS)
            self._write(pids_path, "pids.max", "max" if pids is None else str(int(pids)),  # type: ignore[call-overload]
                        L.PIDS)

        if blkio_path:
            weight_file = os.path.join(blkio_path, "blkio.bfq.weight")
            if os.path.exists(weight_file):
                weight = limits.get(L.IO_WEIGHT, L.WEIGHT_DEFAULT)
                L.write_knob(weight_file, str(L.weight_to_bfq(weight)), L.IO_WEIGHT)
            for key, (name, _) in L.IO_FILES.items():
                self._apply_throttle(os.path.join(blkio_path, name), key, limits.get(key),
                                     io_device)

    @staticmethod
    def _write(path: str, name: str, value: str, key: str) -> None:
        L.write_knob(os.path.join(path, name), value, key)

    @staticmethod
    def _read_int(path: str) -> int:
        with open(path) as f:
            return int(f.read().strip())

    def _apply_memory(self, container: str, path: str, limits: dict[str, object]) -> None:
        memory, swap = limits.get(L.MEMORY), limits.get(L.SWAP)
        mem_file = os.path.join(path, "memory.limit_in_bytes")
        memsw_file = os.path.join(path, "memory.memsw.limit_in_bytes")
        has_memsw = os.path.exists(memsw_file)
        if swap is not None:
            if not has_memsw:
                raise KamraError(
                    "limits.memory.swap: swap limits need swap accounting, which this kernel "
                    "has off (no memory.memsw.* files): boot with swapaccount=1, or remove "
                    "the key")
            if memory is None:
                raise InvalidInput(
                    "limits.memory.swap: on cgroup v1 swap is limited together with memory "
                    "(memory+swap = limits.memory + limits.memory.swap): set limits.memory too")
        new_mem = -1 if memory is None else int(memory)  # type: ignore[call-overload]
        if not has_memsw:
            self._write_memory(container, path, mem_file, new_mem)
            return
        new_memsw = -1 if swap is None else new_mem + int(swap)  # type: ignore[call-overload]

        def unbounded(v: int) -> float:
            return float("inf") if v < 0 or v >= 2**62 else v

        # The kernel keeps memory.limit <= memsw.limit after every write.
        old_mem, old_memsw = self._read_int(mem_file), self._read_int(memsw_file)
        if unbounded(new_memsw) >= unbounded(old_mem):
            self._write_memsw(container, path, memsw_file, new_memsw)
            try:
                self._write_memory(container, path, mem_file, new_mem)
            except (ResourceBusy, KernelError):
                self._restore(memsw_file, old_memsw)
                raise
        else:
            self._write_memory(container, path, mem_file, new_mem)
            try:
                self._write_memsw(container, path, memsw_file, new_memsw)
            except (ResourceBusy, KernelError):
                self._restore(mem_file, old_mem)
                raise

    @staticmethod
    def _restore(path: str, value: int) -> None:
        try:
            with open(path, "w") as f:
                f.write(str(-1 if value >= 2**62 else value))
        except OSError:
            pass

    def _write_memory(self, container: str, path: str, mem_file: str, value: int) -> None:
        try:
            L.write_knob(mem_file, str(value), L.MEMORY)
        except KernelError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # The kernel reclaimed what it could and still does not fit: the old limit stays.
            usage = self._read_int(os.path.join(path, "memory.usage_in_bytes"))
            raise L.memory_busy(container, usage, value) from exc

    def _write_memsw(self, container: str, path: str, memsw_file: str, value: int) -> None:
        try:
            L.write_knob(memsw_file, str(value), L.SWAP)
        except KernelError as exc:
            if exc.errno != errno.EBUSY:
                raise
            usage = self._read_int(os.path.join(path, "memory.memsw.usage_in_bytes"))
            raise ResourceBusy(
                f"limits.memory.swap: container {container!r} uses {L.mib(usage, up=True)} MiB "
                f"of memory and swap even after reclaim; memory + swap = {L.mib(value)} MiB "
                "cannot hold: raise the values or free memory first") from exc

    @staticmethod
    def _cpuset_steps(path: str, cpus: object) -> list[tuple[str, str]]:
        """(cgroup, cpuset.cpus value) writes that move the container and its payload to
        ``cpus`` (the parent's set when None), validated first."""
        payload = os.path.join(path, PAYLOAD)
        with open(os.path.join(os.path.dirname(path), "cpuset.cpus")) as f:
            available = f.read().strip()
        target = available if cpus is None else str(cpus).strip()
        with open(os.path.join(path, "cpuset.cpus")) as f:
            current = f.read().strip()
        wanted = L.check_cpu_list(target, available)
        # A v1 cpuset must stay a superset of its children's after every write: widen the
        # container to old | new, move the payload, then narrow the container.
        wide = L.parse_cpu_list(current) | wanted
        return [(path, ",".join(map(str, sorted(wide)))), (payload, target), (path, target)]

    @staticmethod
    def _apply_throttle(path: str, key: str, value: object, device: str | None) -> None:
        try:
            with open(path) as f:
                present = [line.split()[0] for line in f if line.strip()]
        except FileNotFoundError as exc:
            if value is None:
                return
            raise KernelError(f"{key}: reading {path}", errno.ENOENT,
                              "blkio throttling is not available") from exc
        for dev in present:  # stale rules (another device, or a removed key)
            if dev != device or value is None:
                L.write_knob(path, f"{dev} 0", key)
        if value is not None and device:
            L.write_knob(path, f"{device} {int(value)}", key)  # type: ignore[call-overload]

    def stats(self, container: str) -> dict:
        return stats_v1({c: os.path.join(b, container) for c, b in self.bases.items()})
