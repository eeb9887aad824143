"""cgroup v1 (legacy and hybrid hosts): one directory per controller hierarchy."""

from __future__ import annotations

import os
import signal
import time

from kamra.cgroups.base import (
    PAYLOAD,
    CgroupDriver,
    own_cgroups,
    read_mounts,
    read_pids,
    rmdir_retry,
    rmdir_tree,
)

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
