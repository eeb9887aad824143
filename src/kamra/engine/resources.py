"""Resource management for the engine: effective configuration, plans, live limits.

A container's effective configuration is built-in defaults <- its plan <- its own
overrides (DESIGN.md, "Configuration model"). The kernel limits are derived from it
and written by the cgroup driver when the container starts and whenever the
configuration changes while it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kamra.cgroups.limits import io_scheduler, whole_disk
from kamra.config.keys import KEYS, check_consistency, format_value, parse_value
from kamra.config.plans import Plan, PlanStore
from kamra.config.resolve import effective, limits_only
from kamra.errors import Conflict, InvalidInput, KamraError
from kamra.state import ContainerRecord
from kamra.storage.base import DiskUsage

if TYPE_CHECKING:
    from kamra.engine.host import Host

RUNNING = ("starting", "running", "stopping")
IO_KEYS = ("limits.io.read_bps", "limits.io.write_bps", "limits.io.read_iops",
           "limits.io.write_iops", "limits.io.weight")


def check(values: dict[str, object]) -> None:
    """Values that each parse but cannot be applied together."""
    check_consistency(values)


def check_live_change(name: str, before: dict[str, object], after: dict[str, object]) -> None:
    """Refuse a change of a running container's limits that cannot be made live."""
    for key in after.keys() | before.keys():
        if before.get(key) != after.get(key) and not KEYS[key].live:
            raise Conflict(f"{key} cannot change while {name!r} runs: stop it first")
    disk_before, disk_after = before.get("limits.disk"), after.get("limits.disk")
    if disk_before is not None and disk_after is not None and disk_after < disk_before:  # type: ignore[operator]
        raise Conflict(f"limits.disk cannot shrink while {name!r} runs: "
                       "stop it first, or grow it instead")
    if (disk_before is None) != (disk_after is None):
        what = "added" if disk_after is not None else "removed"
        raise Conflict(f"limits.disk cannot be {what} while {name!r} runs (its files "
                       "would move under a mounted overlay): stop it first")


class Resources:
    def __init__(self, host: Host):
        self.host = host
        self.plans = PlanStore(host.layout)

    # -- configuration --------------------------------------------------------------------
    def parse(self, raw: dict[str, object]) -> dict[str, object]:
        return {key: parse_value(key, value) for key, value in raw.items()}

    def plan_values(self, plan: str | None) -> dict[str, object]:
        return dict(self.plans.get(plan).values) if plan else {}

    def effective(self, record: ContainerRecord) -> dict[str, tuple[object, str]]:
        return effective(record.plan, self.plan_values(record.plan), record.config)

    def limits(self, record: ContainerRecord) -> dict[str, object]:
        return limits_only(self.effective(record))

    def validate(self, plan: str | None, overrides: dict[str, object]) -> None:
        values = {key: value for key, (value, _) in
                  effective(plan, self.plan_values(plan), overrides).items()}
        check(values)

    def io_device(self, record: ContainerRecord, limits: dict[str, object]) -> str | None:
        if not any(key in limits for key in IO_KEYS):
            return None
        from kamra.cgroups.limits import block_device_of

        container_dir = self.host.layout.container_dir(record.name)
        return block_device_of(self.host.storage(record).upper_dir(container_dir))

    def apply_disk(self, record: ContainerRecord, limits: dict[str, object] | None = None) -> None:
        """Make the container's storage enforce its limits.disk (the storage's job, not the
        cgroups'): at create and start, on a stopped container's change (which may move
        its files or resize its image), and live (grow only). A no-op when it already does.
        A live grow tried with --no-save lasts until the next start, which sets the saved
        quota again (refusing to start if the data no longer fits)."""
        if limits is None:
            limits = self.limits(record)
        quota = limits.get("limits.disk")
        self.host.storage(record).set_quota(self.host.layout.container_dir(record.name),
                                            quota)  # type: ignore[arg-type]

    def apply(self, record: ContainerRecord) -> None:
        """Write the container's kernel limits (start, and live changes)."""
        limits = self.limits(record)
        self.apply_disk(record, limits)  # first: the one most likely to be refused
        # limits.disk is the storage's, limits.net.* the network's (tc on the veth).
        kernel = {k: v for k, v in limits.items()
                  if k != "limits.disk" and not k.startswith("limits.net.")}
        self.host.cgroups.apply_limits(record.name, kernel,
                                       io_device=self.io_device(record, kernel))

    def show(self, name: str) -> dict:
        record = self.host._record(name)
        rows = []
        for key, (value, source) in sorted(self.effective(record).items()):
            rows.append({"key": key, "value": value,
                         "display": format_value(key, value),
                         "source": source, "doc": KEYS[key].doc})
        return {"name": name, "plan": record.plan, "config": rows,
                "notes": self.notes(record)}

    def notes(self, record: ContainerRecord) -> list[str]:
        """Settings that are saved and written but that the host will not honour."""
        limits = self.limits(record)
        if "limits.io.weight" not in limits:
            return []
        try:
            device = self.io_device(record, limits)
        except KamraError:
            return []
        if device is None or self.host.cgroups.io_weight_effective(device):
            return []
        scheduler = io_scheduler(device) or "unknown"
        try:
            disk = whole_disk(device)
        except KamraError:
            disk = device
        return [f"limits.io.weight has no effect on {disk} (the container's disk): its I/O "
                f"scheduler is {scheduler!r} and only BFQ honours weights "
                f"(echo bfq > /sys/block/{disk}/queue/scheduler)"]

    def set(self, name: str, values: dict[str, object], unset: list[str], *,
            plan: str | None = None, clear_plan: bool = False, save: bool = True) -> dict:
        """Change a container's configuration; live on a running one. All or nothing."""
        parsed = self.parse(values)
        for key in unset:
            if key not in KEYS:
                parse_value(key, "")  # raises the unknown-key error with a suggestion
        with self.host._lock(name):
            record = self.host._record(name)
            new_plan = None if clear_plan else (plan or record.plan)
            if new_plan:
                self.plans.get(new_plan)
            overrides = {k: v for k, v in record.config.items() if k not in unset}
            overrides.update(parsed)
            self.validate(new_plan, overrides)
            candidate = ContainerRecord.from_json(record.to_json())
            candidate.plan, candidate.config = new_plan, overrides
            self._check_live(record, candidate)
            if record.state in RUNNING:
                self.apply(candidate)
                self.host.network.apply_policy(candidate)
            elif save:
                self.host.network.readdress(record, candidate)
                # A stopped container's quota changes now, so that a shrink that cannot
                # hold is refused before anything is saved.
                self.apply_disk(candidate)
            if save:
                self.host.store.update(candidate)
        return self.show(name)

    def _check_live(self, old: ContainerRecord, new: ContainerRecord) -> None:
        if old.state in RUNNING:
            check_live_change(old.name, self.limits(old), self.limits(new))

    # -- plans --------------------------------------------------------------------------
    def plan_users(self, plan: str) -> list[str]:
        return [r.name for r in self.host.store.list() if r.plan == plan]

    def plan_create(self, name: str, values: dict[str, object], description: str = "") -> Plan:
        parsed = self.parse(values)
        check(parsed)
        self.plans.create(name, parsed, description)
        return self.plans.get(name)

    def plan_update(self, name: str, values: dict[str, object], unset: list[str],
                    description: str | None = None) -> Plan:
        """Change a plan; running containers that use it get the change live (unless they
        override the key). A container whose limit cannot hold is reported, not skipped."""
        parsed = self.parse(values)
        old = self.plans.get(name)
        merged = {k: v for k, v in old.values.items() if k not in unset}
        merged.update(parsed)
        check(merged)
        users = [self.host.store.get(n) for n in self.plan_users(name)]
        for record in users:
            if record is None:
                continue
            after = effective(name, merged, record.config)
            check({k: v for k, (v, _) in after.items()})
            if record.state in RUNNING:
                try:
                    check_live_change(record.name, self.limits(record), limits_only(after))
                except Conflict as exc:
                    raise Conflict(f"plan {name!r} not changed: {exc.message}") from None
        plan = self.plans.update(name, parsed, unset, description)
        failed = []
        for record in users:
            if record is None or record.state not in RUNNING:
                continue
            with self.host._lock(record.name):
                current = self.host.store.get(record.name)
                if current is None or current.state not in RUNNING:
                    continue
                try:
                    self.apply(current)
                    self.host.network.apply_policy(current)
                except Exception as exc:  # noqa: BLE001 - report every container
                    failed.append(f"{record.name}: {getattr(exc, 'message', exc)}")
        if failed:
            raise InvalidInput(f"plan {name!r} saved, but not applied to: {'; '.join(failed)}")
        return plan

    def plan_remove(self, name: str) -> None:
        self.plans.remove(name, self.plan_users(name))

    # -- accounting -----------------------------------------------------------------------
    def disk_usage(self, record: ContainerRecord) -> DiskUsage:
        """Bytes and inodes the container has written, and the hard limits on them.

        With limits.disk: the quota image's filesystem counters (statvfs while mounted,
        its superblock while stopped), limited by the image's size and inode count.
        Without: a walk of the overlay upper dir (the kernel keeps no per-directory
        counter), unlimited. maxheld and failcnt: n/a (no kernel counter keeps them)."""
        return self.host.storage(record).usage(self.host.layout.container_dir(record.name))

    def stats(self, name: str) -> dict:
        record = self.host._record(name)
        data: dict = {"name": name, "state": record.state}
        if record.state in RUNNING:
            data.update(self.host.cgroups.stats(name))
        disk = self.disk_usage(record)
        data["disk"] = {"used": disk.used, "inodes": disk.inodes, "limit": disk.limit,
                        "inodes_limit": disk.inodes_limit}
        return data

    def beancounters(self, name: str) -> list[dict]:
        """OpenVZ-style rows: held, maxheld, barrier, limit, failcnt per resource."""
        s = self.stats(name)
        mem, swap = s.get("memory") or {}, s.get("swap") or {}
        kmem, tcp, pids = s.get("kmem") or {}, s.get("kmem_tcp") or {}, s.get("pids") or {}
        disk = s["disk"]
        rows = [
            ("physpages", "bytes", mem.get("current"), mem.get("peak"), mem.get("reservation"),
             mem.get("limit"), mem.get("failcnt")),
            ("swappages", "bytes", swap.get("current"), swap.get("peak"), None,
             swap.get("limit"), swap.get("failcnt")),
            ("kmemsize", "bytes", kmem.get("current"), kmem.get("peak"), None,
             kmem.get("limit"), kmem.get("failcnt")),
            ("tcpbuf", "bytes", tcp.get("current"), tcp.get("peak"), None, tcp.get("limit"),
             tcp.get("failcnt")),
            ("oomkills", "count", mem.get("oom_kill"), None, None, None, None),
            ("numproc", "count", pids.get("current"), pids.get("peak"), None,
             pids.get("limit"), pids.get("failcnt")),
            ("diskspace", "bytes", disk["used"], None, None, disk["limit"], None),
            ("diskinodes", "count", disk["inodes"], None, None, disk["inodes_limit"], None),
        ]
        return [{"container": name, "resource": r, "unit": unit, "held": held,
                 "maxheld": maxheld, "barrier": barrier, "limit": limit, "failcnt": failcnt}
                for r, unit, held, maxheld, barrier, limit, failcnt in rows]
