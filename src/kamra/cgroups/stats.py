"""Per-container resource figures for ``kamra stats`` and ``kamra beancounters``.

``CgroupDriver.stats(container)`` returns a dict of sections, each a dict of figures,
read from the container's cgroup (``<own>/kamra-<rootid>/<container>``, the level
where limits are set; it includes the payload below it). Values are ints; a
limit without a bound is the string ``"max"``; a figure the kernel does not
provide on this host (file missing, controller not mounted/enabled, older
kernel) is ``None``. Nothing here ever raises for a missing file.

Sources (v1 file names are relative to the controller's hierarchy; "tree sum" means
summed over the container's cgroup and every cgroup below it, because v1 counts
that event in the cgroup of the process concerned, not where the limit is):

==================  ==================================================  ==========================================
figure              cgroup v1                                           cgroup v2
==================  ==================================================  ==========================================
cpu.usage_ns        cpuacct.usage                                       cpu.stat usage_usec * 1000
cpu.user_ns         cpuacct.usage_user                                  cpu.stat user_usec * 1000
cpu.system_ns       cpuacct.usage_sys                                   cpu.stat system_usec * 1000
cpu.nr_periods      cpu.stat nr_periods                                 cpu.stat nr_periods (cpu controller)
cpu.nr_throttled    cpu.stat nr_throttled                               cpu.stat nr_throttled (cpu controller)
cpu.throttled_ns    cpu.stat throttled_time                             cpu.stat throttled_usec * 1000
memory.current      memory.usage_in_bytes                               memory.current
memory.peak         memory.max_usage_in_bytes                           memory.peak (kernel >= 5.19)
memory.limit        memory.limit_in_bytes                               memory.max
memory.reservation  memory.soft_limit_in_bytes                          memory.low
memory.failcnt      memory.failcnt                                      memory.events max
memory.oom          None (v1 keeps no count, only the under_oom state)  memory.events oom
memory.oom_kill     memory.oom_control oom_kill, tree sum               memory.events oom_kill
memory.anon         memory.stat total_rss                               memory.stat anon
memory.file         memory.stat total_cache (page cache)                memory.stat file
memory.kernel       memory.kmem.usage_in_bytes                          memory.stat kernel (kernel >= 5.18)
memory.sock         memory.kmem.tcp.usage_in_bytes (TCP only; v1        memory.stat sock
                    counts it only once a tcp limit was written)
memory.shmem        memory.stat total_shmem                             memory.stat shmem
swap.current        memory.memsw.usage_in_bytes - memory.usage_in_bytes memory.swap.current
swap.peak           None (v1 keeps a peak of memory+swap only)          memory.swap.peak (kernel >= 6.5)
swap.limit          memory.memsw.limit_in_bytes - memory.limit_in_bytes memory.swap.max
swap.failcnt        memory.memsw.failcnt (memory+swap hit its limit)    memory.swap.events max
memsw.current       memory.memsw.usage_in_bytes                         None (v2 has no memory+swap counter)
memsw.peak          memory.memsw.max_usage_in_bytes                     None
memsw.limit         memory.memsw.limit_in_bytes                         None
memsw.failcnt       memory.memsw.failcnt                                None
kmem.current        memory.kmem.usage_in_bytes                          memory.stat kernel
kmem.peak           memory.kmem.max_usage_in_bytes                      None (no kernel counter)
kmem.limit          memory.kmem.limit_in_bytes                          None (v2 has no separate kmem limit)
kmem.failcnt        memory.kmem.failcnt                                 None
kmem_tcp.current    memory.kmem.tcp.usage_in_bytes                      memory.stat sock
kmem_tcp.peak       memory.kmem.tcp.max_usage_in_bytes                  None
kmem_tcp.limit      memory.kmem.tcp.limit_in_bytes                      None
kmem_tcp.failcnt    memory.kmem.tcp.failcnt                             None
pids.current        pids.current                                        pids.current
pids.peak           pids.peak (newer kernels)                           pids.peak (newer kernels)
pids.limit          pids.max                                            pids.max
pids.failcnt        pids.events max, tree sum (counted where the        pids.events max (counted where the limit
                    fork failed)                                        was hit and in its ancestors)
io.read_bytes       blkio.throttle.io_service_bytes_recursive Read,     io.stat rbytes, all devices
                    all devices
io.write_bytes      ... Write                                           io.stat wbytes
io.read_ops         blkio.throttle.io_serviced_recursive Read           io.stat rios
io.write_ops        ... Write                                           io.stat wios
==================  ==================================================  ==========================================

Notes: the v1 memory figures are hierarchical (use_hierarchy is always on in current
kernels), hence the ``total_*`` names of memory.stat; the container's cgroup itself
holds no process, its ``rss``/``cache`` are 0. ``failcnt`` is the kernel's count of
allocations refused at (v1) or reclaim forced by (v2, ``max`` event) the limit: on v2
it counts limit hits, not failed allocations.
"""

from __future__ import annotations

import os
from collections.abc import Callable

Reader = Callable[[str], "str | None"]
Lister = Callable[[str], "list[str]"]

# v1 reports "no limit" as PAGE_COUNTER_MAX pages (2**63 - 1 rounded to pages).
V1_UNLIMITED = 2**62

SECTIONS = {
    "cpu": ("usage_ns", "user_ns", "system_ns", "nr_periods", "nr_throttled", "throttled_ns"),
    "memory": ("current", "peak", "limit", "reservation", "failcnt", "oom", "oom_kill",
               "anon", "file", "kernel", "sock", "shmem"),
    "swap": ("current", "peak", "limit", "failcnt"),
    "memsw": ("current", "peak", "limit", "failcnt"),
    "kmem": ("current", "peak", "limit", "failcnt"),
    "kmem_tcp": ("current", "peak", "limit", "failcnt"),
    "pids": ("current", "peak", "limit", "failcnt"),
    "io": ("read_bytes", "write_bytes", "read_ops", "write_ops"),
}


def empty() -> dict[str, dict[str, int | str | None]]:
    return {section: dict.fromkeys(keys) for section, keys in SECTIONS.items()}


def read_file(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def list_dirs(path: str) -> list[str]:
    """Every directory at or below ``path`` (the cgroup and its descendants)."""
    return [dirpath for dirpath, _, _ in os.walk(path)]


def as_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def as_limit(text: str | None) -> int | str | None:
    """A limit file's value: int, or "max" when unbounded (v2 "max", v1 -1 or ~2**63)."""
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return "max"
    value = as_int(text)
    if value is None:
        return None
    return "max" if value < 0 or value >= V1_UNLIMITED else value


def flat_keyed(text: str | None) -> dict[str, int]:
    """"key value" lines (memory.stat, cpu.stat, memory.events ...) -> dict."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def _sub(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(0, a - b)


def _times(value: int | None, factor: int) -> int | None:
    return None if value is None else value * factor


def _tree_sum(top: str, name: str, field: str, read: Reader, lister: Lister) -> int | None:
    total, seen = 0, False
    for path in lister(top):
        value = flat_keyed(read(os.path.join(path, name))).get(field)
        if value is not None:
            total, seen = total + value, True
    return total if seen else None


def stats_v1(paths: dict[str, str], read: Reader = read_file,
             lister: Lister = list_dirs) -> dict[str, dict[str, int | str | None]]:
    """``paths``: controller -> the container's cgroup directory in that hierarchy."""
    out = empty()

    def f(controller: str, name: str) -> str | None:
        path = paths.get(controller)
        return read(os.path.join(path, name)) if path else None

    cpu = out["cpu"]
    cpu["usage_ns"] = as_int(f("cpuacct", "cpuacct.usage"))
    cpu["user_ns"] = as_int(f("cpuacct", "cpuacct.usage_user"))
    cpu["system_ns"] = as_int(f("cpuacct", "cpuacct.usage_sys"))
    cpu_stat = f("cpu", "cpu.stat")
    if cpu_stat is not None:
        s = flat_keyed(cpu_stat)
        cpu["nr_periods"] = s.get("nr_periods")
        cpu["nr_throttled"] = s.get("nr_throttled")
        cpu["throttled_ns"] = s.get("throttled_time")

    mem = out["memory"]
    mem["current"] = as_int(f("memory", "memory.usage_in_bytes"))
    mem["peak"] = as_int(f("memory", "memory.max_usage_in_bytes"))
    mem["limit"] = as_limit(f("memory", "memory.limit_in_bytes"))
    mem["reservation"] = as_limit(f("memory", "memory.soft_limit_in_bytes"))
    mem["failcnt"] = as_int(f("memory", "memory.failcnt"))
    if "memory" in paths:
        mem["oom_kill"] = _tree_sum(paths["memory"], "memory.oom_control", "oom_kill",
                                    read, lister)
    memory_stat = f("memory", "memory.stat")
    if memory_stat is not None:
        s = flat_keyed(memory_stat)
        mem["anon"] = s.get("total_rss")
        mem["file"] = s.get("total_cache")
        mem["shmem"] = s.get("total_shmem")
    mem["kernel"] = as_int(f("memory", "memory.kmem.usage_in_bytes"))
    mem["sock"] = as_int(f("memory", "memory.kmem.tcp.usage_in_bytes"))

    memsw = out["memsw"]
    memsw["current"] = as_int(f("memory", "memory.memsw.usage_in_bytes"))
    memsw["peak"] = as_int(f("memory", "memory.memsw.max_usage_in_bytes"))
    memsw["limit"] = as_limit(f("memory", "memory.memsw.limit_in_bytes"))
    memsw["failcnt"] = as_int(f("memory", "memory.memsw.failcnt"))

    swap = out["swap"]
    swap["current"] = _sub(memsw["current"], mem["current"])  # type: ignore[arg-type]
    if memsw["limit"] == "max":
        swap["limit"] = "max"
    elif isinstance(memsw["limit"], int) and isinstance(mem["limit"], int):
        swap["limit"] = memsw["limit"] - mem["limit"]
    swap["failcnt"] = memsw["failcnt"]

    for section, prefix in (("kmem", "memory.kmem."), ("kmem_tcp", "memory.kmem.tcp.")):
        out[section]["current"] = as_int(f("memory", prefix + "usage_in_bytes"))
        out[section]["peak"] = as_int(f("memory", prefix + "max_usage_in_bytes"))
        out[section]["limit"] = as_limit(f("memory", prefix + "limit_in_bytes"))
        out[section]["failcnt"] = as_int(f("memory", prefix + "failcnt"))

    pids = out["pids"]
    pids["current"] = as_int(f("pids", "pids.current"))
    pids["peak"] = as_int(f("pids", "pids.peak"))
    pids["limit"] = as_limit(f("pids", "pids.max"))
    if "pids" in paths:
        pids["failcnt"] = _tree_sum(paths["pids"], "pids.events", "max", read, lister)

    io = out["io"]
    for name, (rkey, wkey) in (("blkio.throttle.io_service_bytes_recursive",
                                ("read_bytes", "write_bytes")),
                               ("blkio.throttle.io_serviced_recursive",
                                ("read_ops", "write_ops"))):
        text = f("blkio", name)
        if text is None:
            continue
        totals = {"Read": 0, "Write": 0}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in totals:
                totals[parts[1]] += int(parts[2])
        io[rkey], io[wkey] = totals["Read"], totals["Write"]
    return out


def stats_v2(path: str, read: Reader = read_file) -> dict[str, dict[str, int | str | None]]:
    """``path``: the container's cgroup directory."""
    out = empty()

    def f(name: str) -> str | None:
        return read(os.path.join(path, name))

    cpu = out["cpu"]
    cpu_stat = f("cpu.stat")
    if cpu_stat is not None:
        s = flat_keyed(cpu_stat)
        cpu["usage_ns"] = _times(s.get("usage_usec"), 1000)
        cpu["user_ns"] = _times(s.get("user_usec"), 1000)
        cpu["system_ns"] = _times(s.get("system_usec"), 1000)
        cpu["nr_periods"] = s.get("nr_periods")
        cpu["nr_throttled"] = s.get("nr_throttled")
        cpu["throttled_ns"] = _times(s.get("throttled_usec"), 1000)

    mem = out["memory"]
    mem["current"] = as_int(f("memory.current"))
    mem["peak"] = as_int(f("memory.peak"))
    mem["limit"] = as_limit(f("memory.max"))
    mem["reservation"] = as_limit(f("memory.low"))
    events = f("memory.events")
    if events is not None:
        s = flat_keyed(events)
        mem["failcnt"] = s.get("max")
        mem["oom"] = s.get("oom")
        mem["oom_kill"] = s.get("oom_kill")
    memory_stat = f("memory.stat")
    if memory_stat is not None:
        s = flat_keyed(memory_stat)
        for key in ("anon", "file", "kernel", "sock", "shmem"):
            mem[key] = s.get(key)
        out["kmem"]["current"] = s.get("kernel")
        out["kmem_tcp"]["current"] = s.get("sock")

    swap = out["swap"]
    swap["current"] = as_int(f("memory.swap.current"))
    swap["peak"] = as_int(f("memory.swap.peak"))
    swap["limit"] = as_limit(f("memory.swap.max"))
    swap_events = f("memory.swap.events")
    if swap_events is not None:
        swap["failcnt"] = flat_keyed(swap_events).get("max")

    pids = out["pids"]
    pids["current"] = as_int(f("pids.current"))
    pids["peak"] = as_int(f("pids.peak"))
    pids["limit"] = as_limit(f("pids.max"))
    pid_events = f("pids.events")
    if pid_events is not None:
        pids["failcnt"] = flat_keyed(pid_events).get("max")

    io_stat = f("io.stat")
    if io_stat is not None:
        totals = {"rbytes": 0, "wbytes": 0, "rios": 0, "wios": 0}
        for line in io_stat.splitlines():
            for field in line.split()[1:]:
                key, _, value = field.partition("=")
                if key in totals and value.isdigit():
                    totals[key] += int(value)
        out["io"].update(read_bytes=totals["rbytes"], write_bytes=totals["wbytes"],
                         read_ops=totals["rios"], write_ops=totals["wios"])
    return out
