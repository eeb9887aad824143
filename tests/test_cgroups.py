"""Cgroup limits and statistics.

v1: for real, on this host's v1 hierarchies, with real processes in the payload
(limits written and read back from the kernel's files, and enforcement: a fork
bomb stops at pids.max with EAGAIN, a memory hog is OOM-killed inside the
container, a busy loop is throttled, pinning changes the affinity).

v2: the real cgroup2 mount here offers no controllers, so the driver's limit and
stats code runs against FakeCgroup2, a directory tree that behaves like cgroupfs
for the files kamra uses and enforces the kernel's rules (interface files only
for controllers enabled in the parent, no controllers for a cgroup with
processes, malformed values refused). What the real mount offers (placement,
cgroup.events, cgroup.freeze, cgroup.kill, cpu.stat) is exercised for real.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from kamra.cgroups import CgroupV1, CgroupV2, block_device_of, detect_mode
from kamra.cgroups import limits as L
from kamra.cgroups.base import read_mounts, wait_empty
from kamra.errors import InvalidInput, KamraError, KernelError, NotFound, ResourceBusy

MiB = 2**20


def rid() -> str:
    return "t" + uuid.uuid4().hex[:10]


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


# --- real processes in real cgroups ----------------------------------------------------


class Child:
    """A python child that waits for a line on stdin before running ``code``, so it can
    be placed in a cgroup before it does anything."""

    def __init__(self, code: str):
        script = "import sys\nsys.stdin.readline()\n" + textwrap.dedent(code)
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def place(self, procs_files: list[str]) -> None:
        for path in procs_files:
            with open(path, "w") as f:
                f.write(str(self.proc.pid))

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "child did not answer"
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()


class Harness:
    """Containers and children made by one test; ``close`` removes them all."""

    def __init__(self, driver):
        self.driver = driver
        self.containers: list[str] = []
        self.children: list[Child] = []

    def container(self, name: str = "c1") -> str:
        self.containers.append(name)
        self.driver.create(name)
        return name

    def child(self, container: str, code: str) -> Child:
        child = Child(code)
        self.children.append(child)
        child.place(self.driver.procs_files(container))
        return child

    def close(self) -> None:
        errors = []
        for name in self.containers:
            try:
                self.driver.kill(name)
                wait_empty(self.driver.procs_files(name), 10)
            except Exception as exc:  # keep cleaning up
                errors.append(exc)
        for child in self.children:
            child.stop()
        for name in self.containers:
            try:
                self.driver.remove(name)
            except Exception as exc:
                errors.append(exc)
        self.driver.cleanup()
        if errors:
            raise errors[0]


def _v1_available() -> bool:
    try:
        return detect_mode() in ("v1", "hybrid")
    except RuntimeError:
        return False


needs_v1 = pytest.mark.skipif(not _v1_available(), reason="no cgroup v1 hierarchies here")


@pytest.fixture
def v1():
    driver = CgroupV1.from_host(rid())
    harness = Harness(driver)
    try:
        yield harness
    finally:
        harness.close()
        left = [b for b in driver.bases.values() if os.path.isdir(b)]
        assert not left, f"cgroups left behind: {left}"


def v1_file(h: Harness, controller: str, container: str, name: str) -> str:
    return read(os.path.join(h.driver.bases[controller], container, name))


V1_UNLIMITED = "9223372036854771712"


@needs_v1
def test_v1_limits_written_and_removed(v1):
    c = v1.container()
    child = v1.child(c, "print(sorted(__import__('os').sched_getaffinity(0)), flush=True)\n"
                        "sys.stdin.readline()\n"
                        "print(sorted(__import__('os').sched_getaffinity(0)), flush=True)\n"
                        "sys.stdin.readline()\n")
    host_cpus = read(os.path.join(os.path.dirname(v1.driver.bases["cpuset"]), "cpuset.cpus"))
    v1.driver.apply_limits(c, {
        "limits.cpu": 0.5, "limits.cpu.weight": 100, "limits.cpu.set": "0",
        "limits.memory": 256 * MiB, "limits.memory.reservation": 128 * MiB, "limits.pids": 50,
    })
    assert v1_file(v1, "cpu", c, "cpu.cfs_quota_us") == "50000"
    assert v1_file(v1, "cpu", c, "cpu.cfs_period_us") == "100000"
    assert v1_file(v1, "cpu", c, "cpu.shares") == "1024"
    assert v1_file(v1, "cpuset", c, "cpuset.cpus") == "0"
    assert v1_file(v1, "cpuset", c, "payload/cpuset.cpus") == "0"
    assert v1_file(v1, "memory", c, "memory.limit_in_bytes") == str(256 * MiB)
    assert v1_file(v1, "memory", c, "memory.soft_limit_in_bytes") == str(128 * MiB)
    assert v1_file(v1, "pids", c, "pids.max") == "50"
    child.go()
    assert child.line() == "[0]"  # the kernel pinned the process that was already there

    v1.driver.apply_limits(c, {"limits.cpu.weight": 200, "limits.pids": 60})
    assert v1_file(v1, "cpu", c, "cpu.cfs_quota_us") == "-1"
    assert v1_file(v1, "cpu", c, "cpu.shares") == "2048"
    assert v1_file(v1, "cpuset", c, "cpuset.cpus") == host_cpus
    assert v1_file(v1, "cpuset", c, "payload/cpuset.cpus") == host_cpus
    assert v1_file(v1, "memory", c, "memory.limit_in_bytes") == V1_UNLIMITED
    assert v1_file(v1, "memory", c, "memory.soft_limit_in_bytes") == V1_UNLIMITED
    assert v1_file(v1, "pids", c, "pids.max") == "60"
    child.go()
    assert child.line() == str(sorted(L.parse_cpu_list(host_cpus)))

    v1.driver.apply_limits(c, {})
    assert v1_file(v1, "cpu", c, "cpu.shares") == "1024"
    assert v1_file(v1, "pids", c, "pids.max") == "max"


@needs_v1
def test_v1_cpuset_moves_between_disjoint_sets(v1):
    c = v1.container()
    cpus = sorted(L.parse_cpu_list(v1_file(v1, "cpuset", c, "cpuset.cpus")))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    for cpu in (cpus[0], cpus[1], cpus[0]):  # {0} -> {1}: neither order of plain writes works
        v1.driver.apply_limits(c, {"limits.cpu.set": str(cpu)})
        assert v1_file(v1, "cpuset", c, "cpuset.cpus") == str(cpu)
        assert v1_file(v1, "cpuset", c, "payload/cpuset.cpus") == str(cpu)
    with pytest.raises(InvalidInput, match=r"limits.cpu.set: '63' names CPUs .* available are"):
        v1.driver.apply_limits(c, {"limits.cpu.set": "63"})
    with pytest.raises(InvalidInput, match="not a CPU list"):
        v1.driver.apply_limits(c, {"limits.cpu.set": "zero", "limits.pids": 3})
    assert v1_file(v1, "cpuset", c, "cpuset.cpus") == str(cpus[0])
    assert v1_file(v1, "pids", c, "pids.max") == "max"  # checked before any write


@needs_v1
def test_v1_memory_and_swap_order(v1):
    c = v1.container()
    memsw = os.path.join(v1.driver.bases["memory"], c, "memory.memsw.limit_in_bytes")
    if not os.path.exists(memsw):
        with pytest.raises(KamraError, match="swapaccount"):
            v1.driver.apply_limits(c, {"limits.memory": 64 * MiB, "limits.memory.swap": 0})
        pytest.skip("swap accounting is off: memsw files are missing")
    with pytest.raises(InvalidInput, match="set limits.memory too"):
        v1.driver.apply_limits(c, {"limits.memory.swap": 32 * MiB})
    # Each step needs its own order: raising writes memsw first, lowering memory first.
    steps = [(64, 32), (128, 0), (32, 16), (48, None), (None, None)]
    for memory, swap in steps:
        limits: dict[str, object] = {}
        if memory is not None:
            limits["limits.memory"] = memory * MiB
        if swap is not None:
            limits["limits.memory.swap"] = swap * MiB
        v1.driver.apply_limits(c, limits)
        want_mem = V1_UNLIMITED if memory is None else str(memory * MiB)
        want_memsw = V1_UNLIMITED if swap is None else str((memory + swap) * MiB)
        assert v1_file(v1, "memory", c, "memory.limit_in_bytes") == want_mem
        assert v1_file(v1, "memory", c, "memory.memsw.limit_in_bytes") == want_memsw
    stats = v1.driver.stats(c)
    assert stats["swap"]["limit"] == "max" and stats["memsw"]["limit"] == "max"
    v1.driver.apply_limits(c, {"limits.memory": 64 * MiB, "limits.memory.swap": 16 * MiB})
    assert v1.driver.stats(c)["swap"]["limit"] == 16 * MiB


HOG = """
b = bytearray({size})
for i in range(0, len(b), 4096):
    b[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


@needs_v1
def test_v1_memory_below_usage_is_busy_and_keeps_old_limit(v1):
    c = v1.container("busy")
    v1.driver.apply_limits(c, {"limits.memory": 256 * MiB})
    child = v1.child(c, HOG.format(size=60 * MiB))
    child.go()
    assert child.line() == "ready"
    stats = v1.driver.stats(c)
    assert stats["memory"]["current"] >= 60 * MiB
    assert stats["memory"]["anon"] >= 60 * MiB
    assert stats["memory"]["peak"] >= stats["memory"]["current"]
    with pytest.raises(ResourceBusy) as info:
        v1.driver.apply_limits(c, {"limits.memory": 32 * MiB, "limits.pids": 7})
    message = str(info.value)
    assert message.startswith("limits.memory: container 'busy' uses ")
    assert "MiB even after reclaim; a limit of 32 MiB cannot hold" in message
    used = float(message.split(" uses ")[1].split(" MiB")[0])
    assert used >= 60
    assert v1_file(v1, "memory", c, "memory.limit_in_bytes") == str(256 * MiB)
    assert v1_file(v1, "pids", c, "pids.max") == "max"  # nothing else was changed
    if os.path.exists(os.path.join(v1.driver.bases["memory"], c, "memory.memsw.limit_in_bytes")):
        assert v1_file(v1, "memory", c, "memory.memsw.limit_in_bytes") == V1_UNLIMITED
    assert child.proc.poll() is None  # refused, not OOM-killed


@needs_v1
def test_v1_memory_hog_is_oom_killed_inside(v1):
    c = v1.container()
    v1.driver.apply_limits(c, {"limits.memory": 32 * MiB})
    child = v1.child(c, HOG.format(size=96 * MiB))
    child.go()
    assert child.proc.wait(30) == -signal.SIGKILL
    stats = v1.driver.stats(c)
    assert stats["memory"]["oom_kill"] >= 1
    assert stats["memory"]["failcnt"] > 0
    assert stats["memory"]["peak"] <= 32 * MiB


FORKER = """
import os, time
kids, err = [], None
for _ in range(10):
    try:
        pid = os.fork()
    except OSError as exc:
        err = exc.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    kids.append(pid)
print(len(kids), err, flush=True)
sys.stdin.readline()
"""


@needs_v1
def test_v1_pids_limit_stops_a_fork_loop(v1):
    c = v1.container()
    v1.driver.apply_limits(c, {"limits.pids": 5})
    child = v1.child(c, FORKER)
    child.go()
    made, err = child.line().split()
    assert (int(made), int(err)) == (4, errno.EAGAIN)  # 1 + 4 = 5 processes; the 6th fails
    stats = v1.driver.stats(c)
    assert stats["pids"]["current"] == 5
    assert stats["pids"]["limit"] == 5
    assert stats["pids"]["failcnt"] >= 1
    if stats["pids"]["peak"] is not None:
        assert stats["pids"]["peak"] == 5


BUSY = """
import time
sys.stdin.readline()
start = time.monotonic()
while time.monotonic() - start < {seconds}:
    pass
print(time.monotonic() - start, flush=True)
sys.stdin.readline()
"""


@needs_v1
def test_v1_stats_and_cpu_quota(v1):
    c = v1.container()
    empty = v1.driver.stats(c)
    assert set(empty) == {"cpu", "memory", "swap", "memsw", "kmem", "kmem_tcp", "pids", "io"}
    child = v1.child(c, "print('up', flush=True)\n" + BUSY.format(seconds=1.0))
    child.go()
    assert child.line() == "up"
    before = v1.driver.stats(c)
    assert before["memory"]["current"] > 0
    assert before["pids"]["current"] >= 1
    assert before["pids"]["limit"] == "max"
    assert before["memory"]["limit"] == "max"
    assert before["memory"]["oom"] is None and before["swap"]["peak"] is None
    v1.driver.apply_limits(c, {"limits.cpu": 0.5})
    child.go()
    wall = float(child.line())
    after = v1.driver.stats(c)
    used = (after["cpu"]["usage_ns"] - before["cpu"]["usage_ns"]) / 1e9
    assert used > 0.05, used
    assert used < 0.75 * wall, (used, wall)  # 0.5 CPU: about half the wall time
    if used > 0.3 * wall:  # it did reach its quota (not starved by a busy host)
        assert after["cpu"]["nr_throttled"] > 0
        assert after["cpu"]["throttled_ns"] > 0
    assert after["cpu"]["user_ns"] > before["cpu"]["user_ns"]


@needs_v1
def test_v1_io_limits(v1):
    c = v1.container()
    disk = block_device_of(os.path.dirname(os.path.abspath(__file__)))
    throttle = {"limits.io.read_bps": 10 * MiB, "limits.io.write_bps": 5 * MiB,
                "limits.io.read_iops": 300, "limits.io.write_iops": 200}
    with pytest.raises(InvalidInput, match="io_device|block device"):
        v1.driver.apply_limits(c, throttle)
    v1.driver.apply_limits(c, {**throttle, "limits.io.weight": 500}, io_device=disk)
    assert v1_file(v1, "blkio", c, "blkio.throttle.read_bps_device") == f"{disk} {10 * MiB}"
    assert v1_file(v1, "blkio", c, "blkio.throttle.write_bps_device") == f"{disk} {5 * MiB}"
    assert v1_file(v1, "blkio", c, "blkio.throttle.read_iops_device") == f"{disk} 300"
    assert v1_file(v1, "blkio", c, "blkio.throttle.write_iops_device") == f"{disk} 200"
    weight = os.path.join(v1.driver.bases["blkio"], c, "blkio.bfq.weight")
    if os.path.exists(weight):
        assert read(weight) == str(L.weight_to_bfq(500))
    v1.driver.apply_limits(c, {"limits.io.write_bps": 1 * MiB}, io_device=disk)
    assert v1_file(v1, "blkio", c, "blkio.throttle.read_bps_device") == ""
    assert v1_file(v1, "blkio", c, "blkio.throttle.write_bps_device") == f"{disk} {MiB}"
    v1.driver.apply_limits(c, {})  # no device given: every rule is still cleared
    for name in ("read_bps", "write_bps", "read_iops", "write_iops"):
        assert v1_file(v1, "blkio", c, f"blkio.throttle.{name}_device") == ""
    if os.path.exists(weight):
        assert read(weight) == "100"
    with pytest.raises(KernelError) as info:
        v1.driver.apply_limits(c, {"limits.io.write_bps": MiB}, io_device="254:4095")
    assert info.value.errno == errno.ENODEV
    assert "blkio.throttle.write_bps_device" in str(info.value) and "254:4095" in str(info.value)
    assert isinstance(v1.driver.io_weight_effective(disk), bool)


@needs_v1
def test_v1_bad_input(v1):
    with pytest.raises(NotFound):
        v1.driver.apply_limits("nonesuch", {})
    c = v1.container()
    with pytest.raises(InvalidInput, match="unknown limit key"):
        v1.driver.apply_limits(c, {"limits.bogus": 1})
    partial = CgroupV1({k: v for k, v in v1.driver.bases.items() if k != "pids"})
    with pytest.raises(KamraError, match="limits.pids: needs the pids controller, which is "
                                         "not mounted"):
        partial.apply_limits(c, {"limits.memory": 64 * MiB, "limits.pids": 5})
    assert v1_file(v1, "memory", c, "memory.limit_in_bytes") == V1_UNLIMITED
    partial.apply_limits(c, {})  # not asked: not needed
    with pytest.raises(KernelError) as info:
        v1.driver.apply_limits(c, {"limits.cpu": 0.001})  # 100 us: below the kernel's minimum
    assert "cpu.cfs_quota_us" in str(info.value) and "'100'" in str(info.value)
    assert info.value.errno == errno.EINVAL


# --- pure helpers ----------------------------------------------------------------------


def test_weight_mappings():
    assert L.weight_to_shares(100) == 1024
    assert L.weight_to_shares(1) == 10
    assert L.weight_to_shares(10000) == 102400
    assert L.weight_to_bfq(1) == 1 and L.weight_to_bfq(100) == 100
    assert L.weight_to_bfq(10000) == 1000
    assert 100 < L.weight_to_bfq(500) < 1000
    assert L.cpu_quota(0.5) == 50000 and L.cpu_quota(2) == 200000
    assert L.parse_cpu_list("0-2,5") == {0, 1, 2, 5}


def test_block_device_maps_partition_to_disk(tmp_path):
    disk = tmp_path / "devices" / "sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (disk / "sda1" / "dev").write_text("8:1\n")
    (disk / "sda1" / "partition").write_text("1\n")
    (disk / "queue").mkdir()
    (disk / "queue" / "scheduler").write_text("mq-deadline kyber [bfq] none\n")
    sysfs = tmp_path / "block"
    sysfs.mkdir()
    (sysfs / "8:1").symlink_to(disk / "sda1")
    (sysfs / "8:0").symlink_to(disk)
    assert L.whole_disk("8:1", sysfs=str(sysfs)) == "8:0"
    assert L.whole_disk("8:0", sysfs=str(sysfs)) == "8:0"
    assert L.io_scheduler("8:1", sysfs=str(sysfs)) == "bfq"
    assert L.bfq_active("8:1", sysfs=str(sysfs))
    with pytest.raises(KamraError, match="not on a block device"):
        L.whole_disk("0:42", sysfs=str(sysfs))
    real = block_device_of("/")
    assert os.path.exists(f"/sys/dev/block/{real}")
    assert not os.path.exists(f"/sys/dev/block/{real}/partition")


# --- cgroup v2 against a fake tree that enforces the kernel's rules ---------------------


PAGE = 4096
ROOT_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")
MEMORY_EVENTS = "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"

# Interface files each controller adds to a (non-root) cgroup, with their initial text.
CONTROLLER_FILES = {
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100", "cpu.weight.nice": "0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.cpus.effective": ""},
    "io": {"io.max": "", "io.weight": "default 100", "io.bfq.weight": "default 100",
           "io.stat": ""},
    "memory": {"memory.current": "0", "memory.peak": "0", "memory.max": "max",
               "memory.high": "max", "memory.low": "0", "memory.min": "0",
               "memory.swap.max": "max", "memory.swap.current": "0",
               "memory.swap.peak": "0", "memory.swap.events": "high 0\nmax 0\nfail 0",
               "memory.events": MEMORY_EVENTS,
               "memory.stat": "anon 0\nfile 0\nkernel 0\nsock 0\nshmem 0",
               "memory.reclaim": ""},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.peak": "0",
             "pids.events": "max 0"},
    "hugetlb": {"hugetlb.2MB.max": "max"},
}
CORE_FILES = {"cgroup.procs": "", "cgroup.controllers": "", "cgroup.subtree_control": "",
              "cgroup.events": "populated 0\nfrozen 0", "cgroup.type": "domain",
              "cgroup.freeze": "0", "cgroup.kill": "", "cpu.stat":
              "usage_usec 0\nuser_usec 0\nsystem_usec 0"}
WRITABLE = {"cgroup.procs", "cgroup.subtree_control", "cgroup.freeze", "cgroup.kill",
            "cpu.max", "cpu.weight", "cpuset.cpus", "cpuset.mems", "io.max", "io.weight",
            "io.bfq.weight", "memory.max", "memory.high", "memory.low", "memory.min",
            "memory.swap.max", "memory.reclaim", "pids.max"}


def _err(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class FakeCgroup2:
    """A temporary directory tree that answers like cgroupfs v2 for the files kamra uses.

    Directories made by anyone (the driver's os.makedirs included) become cgroups with
    the core files and the files of the controllers their parent enabled; a
    controller disabled in the parent takes its files away. Writes go through
    ``write`` (the driver's ``fs``), which enforces: ``+c`` only for controllers in
    cgroup.controllers (ENOENT), not in a non-root cgroup with processes and no
    processes into a non-root cgroup with controllers enabled (EBUSY: the no-internal-
    process rule), ``-c`` not while a child uses it (EBUSY), read-only files
    (EACCES), and each value's syntax and range as the kernel parses it (EINVAL/ERANGE).
    Kernel-side counters (memory.current ...) are set by the test with ``set``."""

    def __init__(self, root: str, controllers=ROOT_CONTROLLERS, cpus: str = "0-1",
                 devices=("254:0", "8:0")):
        self.root = root
        self.cpus = L.parse_cpu_list(cpus)
        self.devices = set(devices)
        self.reclaimable: dict[str, int] = {}
        self.absent: set[str] = set()  # files an older kernel does not have
        os.makedirs(root, exist_ok=True)
        self._put(os.path.join(root, "cgroup.controllers"), " ".join(controllers))
        for name in ("cgroup.procs", "cgroup.subtree_control"):
            self._put(os.path.join(root, name), "")
        self._put(os.path.join(root, "cpu.stat"), CORE_FILES["cpu.stat"])
        self._put(os.path.join(root, "cpuset.cpus.effective"), cpus)

    # plain file storage
    @staticmethod
    def _put(path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text + "\n" if text else "")

    @staticmethod
    def _get(path: str) -> str:
        with open(path) as f:
            return f.read().strip()

    def _words(self, cgroup: str, name: str) -> list[str]:
        return self._get(os.path.join(cgroup, name)).split()

    def _is_root(self, cgroup: str) -> bool:
        return os.path.realpath(cgroup) == os.path.realpath(self.root)

    def sync(self) -> None:
        """Give every directory the files the kernel would show for it."""
        for dirpath, dirnames, _ in os.walk(self.root):
            for d in dirnames:
                self._sync_one(os.path.join(dirpath, d))

    def _sync_one(self, cgroup: str) -> None:
        parent = os.path.dirname(cgroup)
        available = self._words(parent, "cgroup.subtree_control")
        for name, text in CORE_FILES.items():
            path = os.path.join(cgroup, name)
            if not os.path.exists(path):
                self._put(path, text)
        self._put(os.path.join(cgroup, "cgroup.controllers"), " ".join(available))
        for controller, files in CONTROLLER_FILES.items():
            for name, text in files.items():
                path = os.path.join(cgroup, name)
                if controller in available and name not in self.absent:
                    if not os.path.exists(path):
                        self._put(path, text)
                elif os.path.exists(path):
                    os.unlink(path)
        if "cpuset" in available:
            own = self._get(os.path.join(cgroup, "cpuset.cpus"))
            inherited = self._get(os.path.join(parent, "cpuset.cpus.effective"))
            self._put(os.path.join(cgroup, "cpuset.cpus.effective"), own or inherited)
        populated = self._populated(cgroup)
        self._put(os.path.join(cgroup, "cgroup.events"),
                  f"populated {int(populated)}\nfrozen 0")

    def _populated(self, cgroup: str) -> bool:
        return any(self._get(os.path.join(d, "cgroup.procs"))
                   for d, _, files in os.walk(cgroup) if "cgroup.procs" in files)

    # the interface the driver uses (kamra.cgroups.v2.HostFiles)
    def read(self, path: str) -> str:
        self.sync()
        if os.path.basename(path) == "memory.reclaim":
            raise _err(errno.EINVAL, path)
        with open(path) as f:
            return f.read()

    def exists(self, path: str) -> bool:
        self.sync()
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.sync()

    def write(self, path: str, value: str) -> None:
        self.sync()
        if not os.path.exists(path):
            raise _err(errno.ENOENT, path)
        name, cgroup = os.path.basename(path), os.path.dirname(path)
        if name not in WRITABLE or (self._is_root(cgroup) and name != "cgroup.procs"
                                    and name != "cgroup.subtree_control"):
            raise _err(errno.EACCES, path)
        handler = getattr(self, "_w_" + name.replace(".", "_"), None)
        text = value.strip()
        stored = handler(cgroup, text, path) if handler else None
        if stored is not None:
            self._put(path, stored)
        self.sync()

    def set(self, cgroup: str, name: str, text: str) -> None:
        """What the kernel would report (counters, usage) for a cgroup."""
        self._put(os.path.join(cgroup, name), text)

    # kernel rules, file by file
    def _w_cgroup_subtree_control(self, cgroup: str, text: str, path: str) -> str:
        enabled = self._words(cgroup, "cgroup.subtree_control")
        available = self._words(cgroup, "cgroup.controllers")
        for token in text.split():
            op, controller = token[:1], token[1:]
            if op not in "+-" or not controller:
                raise _err(errno.EINVAL, path)
            if op == "+":
                if controller not in available:
                    raise _err(errno.ENOENT, path)
                if not self._is_root(cgroup) and self._get(os.path.join(cgroup, "cgroup.procs")):
                    raise _err(errno.EBUSY, path)
                if controller not in enabled:
                    enabled.append(controller)
            else:
                for child in os.scandir(cgroup):
                    if child.is_dir() and controller in self._words(child.path,
                                                                    "cgroup.subtree_control"):
                        raise _err(errno.EBUSY, path)
                if controller in enabled:
                    enabled.remove(controller)
        return " ".join(c for c in ROOT_CONTROLLERS if c in enabled)

    def _w_cgroup_procs(self, cgroup: str, text: str, path: str) -> str:
        if not text.isdigit():
            raise _err(errno.EINVAL, path)
        if not self._is_root(cgroup) and self._words(cgroup, "cgroup.subtree_control"):
            raise _err(errno.EBUSY, path)
        for dirpath, _, files in os.walk(self.root):
            if "cgroup.procs" in files and dirpath != cgroup:
                pids = self._words(dirpath, "cgroup.procs")
                if text in pids:
                    pids.remove(text)
                    self._put(os.path.join(dirpath, "cgroup.procs"), "\n".join(pids))
        pids = self._words(cgroup, "cgroup.procs")
        return "\n".join(sorted(set(pids) | {text}, key=int))

    def _w_cgroup_freeze(self, cgroup: str, text: str, path: str) -> str:
        if text not in ("0", "1"):
            raise _err(errno.ERANGE, path)
        return text

    def _w_cgroup_kill(self, cgroup: str, text: str, path: str) -> None:
        if text != "1":
            raise _err(errno.ERANGE, path)
        for dirpath, _, files in os.walk(cgroup):
            if "cgroup.procs" in files:
                self._put(os.path.join(dirpath, "cgroup.procs"), "")
        return None

    @staticmethod
    def _int(text: str, path: str, lo: int = 0, hi: int = 2**63 - 1, code=errno.EINVAL) -> int:
        if not text.isdigit():
            raise _err(errno.EINVAL, path)
        value = int(text)
        if not lo <= value <= hi:
            raise _err(code, path)
        return value

    def _w_cpu_max(self, cgroup: str, text: str, path: str) -> str:
        parts = text.split()
        if not 1 <= len(parts) <= 2:
            raise _err(errno.EINVAL, path)
        period = self._words(cgroup, "cpu.max")[1]
        if len(parts) == 2:
            period = str(self._int(parts[1], path, 1000, 1000000))
        if parts[0] != "max":
            self._int(parts[0], path, 1000)
        return f"{parts[0]} {period}"

    def _w_cpu_weight(self, cgroup: str, text: str, path: str) -> str:
        return str(self._int(text, path, 1, 10000, errno.ERANGE))

    def _w_cpuset_cpus(self, cgroup: str, text: str, path: str) -> str:
        if not text:
            return ""
        try:
            cpus = L.parse_cpu_list(text)
        except ValueError:
            raise _err(errno.EINVAL, path) from None
        if not cpus <= self.cpus:
            raise _err(errno.EINVAL, path)
        return _format_cpus(cpus)

    def _memory(self, text: str, path: str) -> str:
        if text == "max":
            return "max"
        return str(self._int(text, path) // PAGE * PAGE)

    def _w_memory_max(self, cgroup: str, text: str, path: str) -> str:
        value = self._memory(text, path)
        current = int(self._get(os.path.join(cgroup, "memory.current")))
        if value != "max" and current > int(value):
            # The kernel reclaims, then OOM-kills: the test must never get here.
            self.oom_killed_in = cgroup
        return value

    def _w_memory_low(self, cgroup: str, text: str, path: str) -> str:
        return self._memory(text, path)

    _w_memory_high = _w_memory_min = _w_memory_swap_max = _w_memory_low

    def _w_memory_reclaim(self, cgroup: str, text: str, path: str) -> None:
        want = self._int(text, path, 1)
        current = int(self._get(os.path.join(cgroup, "memory.current")))
        got = min(want, self.reclaimable.get(cgroup, 0), current)
        self.reclaimable[cgroup] = self.reclaimable.get(cgroup, 0) - got
        self.set(cgroup, "memory.current", str(current - got))
        if got < want:
            raise _err(errno.EAGAIN, path)
        return None

    def _w_pids_max(self, cgroup: str, text: str, path: str) -> str:
        return "max" if text == "max" else str(self._int(text, path))

    def _w_io_weight(self, cgroup: str, text: str, path: str, hi: int = 10000) -> str:
        lines = dict(line.split(None, 1) for line in
                     self._get(path).splitlines() if line.strip())
        parts = text.split()
        if len(parts) == 1:
            parts = ["default", parts[0]]
        if len(parts) != 2:
            raise _err(errno.EINVAL, path)
        where, value = parts
        if where != "default" and where not in self.devices:
            raise _err(errno.ENODEV, path)
        lines[where] = str(self._int(value, path, 1, hi, errno.ERANGE))
        return "\n".join(f"{k} {v}" for k, v in lines.items())

    def _w_io_bfq_weight(self, cgroup: str, text: str, path: str) -> str:
        return self._w_io_weight(cgroup, text, path, hi=1000)

    def _w_io_max(self, cgroup: str, text: str, path: str) -> str:
        fields = ("rbps", "wbps", "riops", "wiops")
        rules = {}
        for line in self._get(path).splitlines():
            if line.strip():
                dev, *kvs = line.split()
                rules[dev] = dict(kv.split("=") for kv in kvs)
        dev, *kvs = text.split()
        if dev.count(":") != 1:
            raise _err(errno.EINVAL, path)
        if dev not in self.devices:
            raise _err(errno.ENODEV, path)
        rule = rules.get(dev, dict.fromkeys(fields, "max"))
        for kv in kvs:
            key, sep, value = kv.partition("=")
            if not sep or key not in fields or not (value == "max" or value.isdigit()):
                raise _err(errno.EINVAL, path)
            rule[key] = value
        rules[dev] = rule
        return "\n".join(f"{d} " + " ".join(f"{f}={r[f]}" for f in fields)
                         for d, r in rules.items() if any(r[f] != "max" for f in fields))


def _format_cpus(cpus: set[int]) -> str:
    out, items = [], sorted(cpus)
    while items:
        lo = hi = items.pop(0)
        while items and items[0] == hi + 1:
            hi = items.pop(0)
        out.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return ",".join(out)


KAMRAD_PID = "4242"


@pytest.fixture
def fake(tmp_path):
    """A systemd-like host: kamra.service delegated with every controller, kamrad in it."""
    tree = FakeCgroup2(str(tmp_path / "cgroup"))
    own = os.path.join(tree.root, "system.slice", "kamra.service")
    tree.write(os.path.join(tree.root, "cgroup.subtree_control"), "+cpu +cpuset +io +memory +pids")
    tree.mkdir(os.path.join(tree.root, "system.slice"))
    tree.write(os.path.join(tree.root, "system.slice", "cgroup.subtree_control"),
               "+cpu +cpuset +io +memory +pids")
    tree.mkdir(own)
    tree.write(os.path.join(own, "cgroup.procs"), KAMRAD_PID)
    tree.own = own
    return tree


def fake_driver(tree: FakeCgroup2, container: str = "c1") -> tuple[CgroupV2, str]:
    driver = CgroupV2(os.path.join(tree.own, f"kamra-{rid()}"), fs=tree)
    driver.create(container)
    tree.write(driver.procs_files(container)[0], "5000")  # the container's init
    return driver, os.path.join(driver.base, container)


def test_fake_cgroup2_enforces_the_kernel_rules(fake):
    own = fake.own
    ctl = os.path.join(own, "cgroup.subtree_control")
    with pytest.raises(OSError) as info:
        fake.write(ctl, "+memory")  # kamrad is in it
    assert info.value.errno == errno.EBUSY
    leaf = os.path.join(own, "leaf")
    fake.mkdir(leaf)
    assert not os.path.exists(os.path.join(leaf, "memory.max"))  # not enabled in own
    assert os.path.exists(os.path.join(own, "memory.max"))  # enabled in system.slice
    fake.write(os.path.join(leaf, "cgroup.procs"), KAMRAD_PID)
    assert read(os.path.join(own, "cgroup.procs")) == ""
    fake.write(ctl, "+memory +pids")
    assert os.path.exists(os.path.join(leaf, "memory.max"))
    assert not os.path.exists(os.path.join(leaf, "cpu.max"))
    with pytest.raises(OSError) as info:
        fake.write(ctl, "+hugetlb")  # system.slice does not give it
    assert info.value.errno == errno.ENOENT
    with pytest.raises(OSError) as info:
        fake.write(os.path.join(own, "cgroup.procs"), "77")  # own has controllers now
    assert info.value.errno == errno.EBUSY
    for name, bad in (("cpu.max", "50000 100000 7"), ("cpu.max", "half"), ("cpu.max", "500"),
                      ("memory.max", "-1"), ("pids.max", "lots"), ("memory.current", "1")):
        with pytest.raises(OSError):
            fake.write(os.path.join(own, name), bad)
    fake.write(os.path.join(own, "cpu.max"), "max")
    assert read(os.path.join(own, "cpu.max")) == "max 100000"
    fake.write(ctl, "-memory")
    assert not os.path.exists(os.path.join(leaf, "memory.max"))


def test_v2_limits_on_fake_tree(fake):
    driver, cg = fake_driver(fake)
    everything = {
        "limits.cpu": 0.5, "limits.cpu.weight": 200, "limits.cpu.set": "0",
        "limits.memory": 256 * MiB, "limits.memory.swap": 64 * MiB,
        "limits.memory.reservation": 128 * MiB, "limits.pids": 100, "limits.io.weight": 500,
        "limits.io.read_bps": 10 * MiB, "limits.io.write_iops": 200,
    }
    driver.apply_limits("c1", everything, io_device="254:0")
    # kamrad moved into the leaf so kamra's cgroup could get controllers
    assert read(os.path.join(fake.own, "cgroup.procs")) == ""
    assert read(os.path.join(fake.own, "kamrad", "cgroup.procs")) == KAMRAD_PID
    for level in (fake.own, driver.base, cg):
        assert read(os.path.join(level, "cgroup.subtree_control")) == "cpuset cpu io memory pids"
    assert read(os.path.join(cg, "payload", "cgroup.procs")) == "5000"
    assert os.path.exists(os.path.join(cg, "payload", "memory.max"))  # for systemd inside

    def f(name: str) -> str:
        return read(os.path.join(cg, name))

    assert f("cpu.max") == "50000 100000"
    assert f("cpu.weight") == "200"
    assert f("cpuset.cpus") == "0"
    assert f("cpuset.cpus.effective") == "0"
    assert f("memory.max") == str(256 * MiB)
    assert f("memory.swap.max") == str(64 * MiB)
    assert f("memory.low") == str(128 * MiB)
    assert f("pids.max") == "100"
    assert f("io.weight") == "default 500"
    assert f("io.bfq.weight") == f"default {L.weight_to_bfq(500)}"
    assert f("io.max") == f"254:0 rbps={10 * MiB} wbps=max riops=max wiops=200"

    driver.apply_limits("c1", {"limits.io.write_bps": MiB}, io_device="8:0")
    assert f("io.max") == f"8:0 rbps=max wbps={MiB} riops=max wiops=max"
    assert f("cpu.max") == "max 100000"
    assert f("cpu.weight") == "100"
    assert f("cpuset.cpus") == ""
    assert f("cpuset.cpus.effective") == "0-1"
    assert f("memory.max") == "max"
    assert f("memory.swap.max") == "max"
    assert f("memory.low") == "0"
    assert f("pids.max") == "max"
    assert f("io.weight") == "default 100"
    driver.apply_limits("c1", {})
    assert f("io.max") == ""
    driver.apply_limits("c1", {"limits.disk": 10 * 2**30})  # not a cgroup limit: ignored


def test_v2_refusals_on_fake_tree(fake):
    driver, cg = fake_driver(fake)
    with pytest.raises(InvalidInput):
        driver.apply_limits("c1", {"limits.io.read_bps": MiB})  # no device
    with pytest.raises(NotFound):
        driver.apply_limits("other", {})
    with pytest.raises(KernelError) as info:
        driver.apply_limits("c1", {"limits.cpu": 0.005})  # quota 500 < 1000
    assert "cpu.max" in str(info.value) and "'500 100000'" in str(info.value)
    with pytest.raises(InvalidInput, match="'5' names CPUs kamra cannot use here; the CPUs "
                                           "available are 0-1"):
        driver.apply_limits("c1", {"limits.memory": 64 * MiB, "limits.cpu.set": "5"})
    assert read(os.path.join(cg, "memory.max")) == "max"  # checked before any write
    fake.absent.add("memory.swap.max")
    with pytest.raises(KamraError, match="limits.memory.swap: swap limits need swap accounting"):
        driver.apply_limits("c1", {"limits.memory": 64 * MiB, "limits.memory.swap": 0})
    fake.write(os.path.join(cg, "cpuset.cpus"), "1")
    with pytest.raises(OSError):  # the fake, as the kernel, refuses CPUs the host lacks
        fake.write(os.path.join(cg, "cpuset.cpus"), "5")
    with pytest.raises(KernelError) as info:
        driver.apply_limits("c1", {"limits.io.write_bps": MiB}, io_device="9:9")
    assert info.value.errno == errno.ENODEV and "io.max" in str(info.value)


def test_v2_memory_limit_below_usage(fake):
    driver, cg = fake_driver(fake)
    driver.apply_limits("c1", {"limits.memory": 512 * MiB})
    fake.set(cg, "memory.current", str(300 * MiB))
    fake.reclaimable[cg] = 20 * MiB
    with pytest.raises(ResourceBusy) as info:
        driver.apply_limits("c1", {"limits.memory": 200 * MiB, "limits.pids": 9})
    assert str(info.value) == (
        "limits.memory: container 'c1' uses 280 MiB even after reclaim; a limit of 200 MiB "
        "cannot hold: raise the value or free memory first")
    assert read(os.path.join(cg, "memory.max")) == str(512 * MiB)  # the old limit stays
    assert read(os.path.join(cg, "pids.max")) == "max"
    assert not hasattr(fake, "oom_killed_in")
    # Enough reclaimable memory (page cache): the limit holds and is written.
    fake.reclaimable[cg] = 100 * MiB
    driver.apply_limits("c1", {"limits.memory": 200 * MiB})
    assert read(os.path.join(cg, "memory.max")) == str(200 * MiB)
    assert read(os.path.join(cg, "memory.current")) == str(200 * MiB)
    assert not hasattr(fake, "oom_killed_in")
    driver.check_memory_limit("c1", 300 * MiB)  # fits: nothing to do


def test_v2_io_weight_effective_with_iocost(fake):
    driver, _ = fake_driver(fake)
    disk = block_device_of("/")
    if L.bfq_active(disk):
        pytest.skip("the root disk uses BFQ")
    assert not driver.io_weight_effective(disk)
    fake.set(fake.root, "io.cost.qos", f"{disk} enable=1 ctrl=auto rpct=0.00 rlat=250000")
    assert driver.io_weight_effective(disk)


def test_v2_without_delegated_controllers(tmp_path):
    tree = FakeCgroup2(str(tmp_path / "cg"), controllers=("hugetlb",))
    own = os.path.join(tree.root, "user.slice")
    tree.mkdir(own)
    tree.own = own
    driver, cg = fake_driver(tree)
    driver.apply_limits("c1", {})  # nothing asked: nothing needed
    with pytest.raises(KamraError, match="limits.pids: needs the pids controller"):
        driver.apply_limits("c1", {"limits.pids": 5})
    stats = driver.stats("c1")
    assert stats["memory"]["current"] is None and stats["pids"]["current"] is None
    assert stats["cpu"]["usage_ns"] == 0


def test_v2_stats_on_fake_tree(fake):
    driver, cg = fake_driver(fake)
    driver.apply_limits("c1", {"limits.memory": 512 * MiB, "limits.pids": 64})
    fake.set(cg, "cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
                             "nr_periods 10\nnr_throttled 3\nthrottled_usec 7")
    fake.set(cg, "memory.current", str(100 * MiB))
    fake.set(cg, "memory.peak", str(150 * MiB))
    fake.set(cg, "memory.events", "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n")
    fake.set(cg, "memory.stat", "anon 1000\nfile 2000\nkernel 300\nkernel_stack 16\n"
                                "sock 40\nshmem 50\n")
    fake.set(cg, "memory.swap.events", "high 0\nmax 4\nfail 5")
    fake.set(cg, "pids.current", "3")
    fake.set(cg, "pids.events", "max 6")
    fake.set(cg, "io.stat", "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
                            "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0")
    s = driver.stats("c1")
    assert s["cpu"] == {"usage_ns": 1500000, "user_ns": 1000000, "system_ns": 500000,
                        "nr_periods": 10, "nr_throttled": 3, "throttled_ns": 7000}
    assert s["memory"] == {"current": 100 * MiB, "peak": 150 * MiB, "limit": 512 * MiB,
                           "reservation": 0, "failcnt": 12, "oom": 2, "oom_kill": 1,
                           "anon": 1000, "file": 2000, "kernel": 300, "sock": 40, "shmem": 50}
    assert s["swap"] == {"current": 0, "peak": 0, "limit": "max", "failcnt": 4}
    assert s["memsw"] == dict.fromkeys(("current", "peak", "limit", "failcnt"))
    assert s["kmem"]["current"] == 300 and s["kmem_tcp"]["current"] == 40
    assert s["pids"] == {"current": 3, "peak": 0, "limit": 64, "failcnt": 6}
    assert s["io"] == {"read_bytes": 101, "write_bytes": 202, "read_ops": 4, "write_ops": 6}
    fake.absent.add("memory.peak")  # an older kernel
    assert driver.stats("c1")["memory"]["peak"] is None
    assert driver.stats("gone")["memory"]["current"] is None  # never raises


# --- what the real cgroup2 mount here offers ------------------------------------------


def _cgroup2_mount() -> str | None:
    mounts = [m for m, fstype, _ in read_mounts() if fstype == "cgroup2"]
    return mounts[0] if mounts else None


@pytest.mark.skipif(_cgroup2_mount() is None, reason="cgroup2 is not mounted")
def test_v2_real_mount_placement_freeze_kill_stats():
    driver = CgroupV2.from_host(rid())
    harness = Harness(driver)
    try:
        c = harness.container()
        cg = os.path.join(driver.base, c)
        child = harness.child(c, BUSY.format(seconds=0.3))
        assert read(os.path.join(cg, "payload", "cgroup.procs")) == str(child.proc.pid)
        assert "populated 1" in read(os.path.join(cg, "cgroup.events"))
        assert driver.pids(c) == [child.proc.pid]
        child.go()
        child.go()
        float(child.line())
        stats = driver.stats(c)
        assert stats["cpu"]["usage_ns"] >= 0.2e9  # cpu.stat is core, no controller needed
        offered = read(os.path.join(os.path.dirname(driver.base), "cgroup.controllers")).split()
        if "memory" not in offered:
            assert stats["memory"]["current"] is None
        if "pids" not in offered:
            driver.apply_limits(c, {})
            with pytest.raises(KamraError, match="pids controller"):
                driver.apply_limits(c, {"limits.pids": 5})
        with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
            f.write("1")
        deadline = time.monotonic() + 5
        while "frozen 1" not in read(os.path.join(cg, "cgroup.events")):
            assert time.monotonic() < deadline, "cgroup did not freeze"
            time.sleep(0.01)
        with open(f"/proc/{child.proc.pid}/stat") as f:
            assert f.read().split(")")[-1].split()[0] in ("S", "D", "T")
        with open(os.path.join(cg, "cgroup.freeze"), "w") as f:
            f.write("0")
        driver.kill(c)  # cgroup.kill
        assert child.proc.wait(10) == -signal.SIGKILL
        assert wait_empty(driver.procs_files(c), 10)
        assert "populated 0" in read(os.path.join(cg, "cgroup.events"))
    finally:
        harness.close()
    assert not os.path.isdir(driver.base)
