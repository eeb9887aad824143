"""Resource limits enforced by the kernel, measured from inside and outside a container."""

from __future__ import annotations

import os
import time

import pytest
from conftest import start_container as running
from conftest import unique

from kamra.cgroups import driver_for_host
from kamra.paths import Layout


def cgroup_file(root: str, name: str, controller: str, knob: str) -> str:
    driver = driver_for_host(Layout.at(root).root_id)
    if driver.name != "v1":
        pytest.skip("these checks read cgroup v1 files")
    return os.path.join(driver.bases[controller], name, knob)


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_memory_hog_is_killed_inside_the_container_only(cli, root):
    name = running(cli, "limits.memory=64M")
    assert read(cgroup_file(root, name, "memory", "memory.limit_in_bytes")) == str(64 << 20)
    # busybox tail keeps everything it reads when no newline comes: it grows until killed.
    hog = cli.run("exec", name, "--", "tail", "/dev/zero", timeout=120)
    assert hog.returncode == 137  # SIGKILL from the OOM killer
    status = cli.json("status", name)
    assert status["state"] == "running"  # the init survived
    assert cli.run("exec", name, "--", "true").returncode == 0
    # The kernel's own counters, through kamra's beancounters.
    counters = {row["resource"]: row for row in cli.json("beancounters", name)}
    assert counters["oomkills"]["held"] >= 1
    assert counters["physpages"]["failcnt"] > 0
    assert counters["physpages"]["limit"] == 64 << 20
    assert 0 < counters["physpages"]["held"] <= counters["physpages"]["maxheld"] <= 64 << 20
    assert counters["numproc"]["held"] >= 1


def test_fork_loop_stops_at_the_pids_limit(cli, root):
    name = running(cli, "limits.pids=20")
    result = cli.run("exec", name, "--", "sh", "-c",
                     "n=0; while [ $n -lt 60 ]; do sleep 30 >/dev/null 2>&1 & n=$((n+1)); done;"
                     " echo done",
                     timeout=60)
    assert "fork" in result.stderr  # EAGAIN: "can't fork: Resource temporarily unavailable"
    current = int(read(cgroup_file(root, name, "pids", "pids.current")))
    assert 10 < current <= 20
    numproc = {row["resource"]: row for row in cli.json("beancounters", name)}["numproc"]
    assert numproc["failcnt"] > 0 and numproc["limit"] == 20
    assert 10 < numproc["held"] <= 20


def test_cpu_limit_caps_usage(cli, root):
    name = running(cli, "limits.cpu=0.5")
    assert read(cgroup_file(root, name, "cpu", "cpu.cfs_quota_us")) == "50000"
    usage = cgroup_file(root, name, "cpuacct", "cpuacct.usage")
    before, began = int(read(usage)), time.monotonic()
    cli.run("exec", name, "--", "timeout", "3", "sh", "-c", "while :; do :; done", timeout=30)
    used = (int(read(usage)) - before) / 1e9 / (time.monotonic() - began)
    assert 0.1 < used <= 0.56, f"used {used:.2f} of a core"


def test_cpu_set_pins(cli, root):
    name = running(cli, "limits.cpu.set=0")
    out = cli.run("exec", name, "--", "sh", "-c",
                  "grep Cpus_allowed_list /proc/self/status; nproc").stdout.split()
    assert out == ["Cpus_allowed_list:", "0", "1"]


def test_set_changes_a_running_container_live(cli, root):
    name = running(cli)
    pids_max = cgroup_file(root, name, "pids", "pids.max")
    assert read(pids_max) == "max"
    assert cli.run("set", name, "limits.pids=33").returncode == 0
    assert read(pids_max) == "33"
    show = {row["key"]: row for row in cli.json("config", "show", name)["config"]}
    assert show["limits.pids"]["display"] == "33" and show["limits.pids"]["source"] == "container"
    # --no-save: the kernel changes, the saved config does not.
    assert cli.run("set", "--no-save", name, "limits.pids=44").returncode == 0
    assert read(pids_max) == "44"
    show = {row["key"]: row for row in cli.json("config", "show", name)["config"]}
    assert show["limits.pids"]["display"] == "33"
    # Removing the override removes the limit.
    assert cli.run("set", name, "limits.pids=").returncode == 0
    assert read(pids_max) == "max"


def test_a_memory_limit_that_cannot_hold_is_refused(cli, root):
    name = running(cli, "limits.memory=256M")
    cli.run("exec", name, "--", "sh", "-c",
            # dd keeps its 50 MB buffer while blocked on a pipe nobody reads (a
            # subshell's variable would be gone once ash execs the last command).
            "(dd if=/dev/zero bs=50M count=1 | sleep 1000) >/dev/null 2>&1 &",
            check=True)
    usage = cgroup_file(root, name, "memory", "memory.usage_in_bytes")
    deadline = time.monotonic() + 20
    while int(read(usage)) < 40 << 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert int(read(usage)) >= 40 << 20
    refused = cli.run("set", name, "limits.memory=16M")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "limits.memory" in refused.stderr
    limit = cgroup_file(root, name, "memory", "memory.limit_in_bytes")
    assert read(limit) == str(256 << 20)
    show = {row["key"]: row for row in cli.json("config", "show", name)["config"]}
    assert show["limits.memory"]["display"] in ("256M", "256MiB")


def test_plans_apply_and_propagate(cli, root):
    plan = unique("p")
    assert cli.run("plan", "create", plan, "limits.pids=50", "limits.cpu.weight=200",
                   "--description", "test plan").returncode == 0
    follower = running(cli, plan=plan)
    own = running(cli, "limits.pids=70", plan=plan)
    assert read(cgroup_file(root, follower, "pids", "pids.max")) == "50"
    assert read(cgroup_file(root, follower, "cpu", "cpu.shares")) == "2048"
    assert read(cgroup_file(root, own, "pids", "pids.max")) == "70"
    assert cli.run("plan", "edit", plan, "limits.pids=60").returncode == 0
    assert read(cgroup_file(root, follower, "pids", "pids.max")) == "60"
    assert read(cgroup_file(root, own, "pids", "pids.max")) == "70"  # its override wins
    sources = {row["key"]: row["source"] for row in cli.json("config", "show", follower)["config"]}
    assert sources["limits.pids"] == f"plan {plan}" and sources["limits.memory"] == "default"
    removal = cli.run("plan", "remove", plan)
    assert removal.returncode != 0 and follower in removal.stderr
    for name in (follower, own):
        cli.run("destroy", "--force", name, check=True)
    assert cli.run("plan", "remove", plan).returncode == 0
    assert plan not in {p["name"] for p in cli.json("plan", "list")}


@pytest.mark.parametrize("item, words", [
    ("limits.memory=abc", ["limits.memory", "512M"]),
    ("limits.memory=-5M", ["limits.memory"]),
    ("limits.cpu=0", ["limits.cpu"]),
    ("limits.cpu=-1", ["limits.cpu"]),
    ("limits.pids=0", ["limits.pids"]),
    ("limits.cpu.set=99", ["limits.cpu.set", "99"]),
    ("limits.mem=1G", ["unknown", "limits.mem"]),
    ("limits.memory", ["KEY=VALUE"]),
])
def test_bad_limits_are_refused_and_nothing_is_saved(cli, item, words):
    name = unique()
    result = cli.run("create", name, "--template", "busybox", "-c", item)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    for word in words:
        assert word in line
    assert cli.json("list") == []
    missing = cli.run("create", name, "--template", "busybox", "--plan", "nosuchplan")
    assert missing.returncode != 0 and "nosuchplan" in missing.stderr
    assert cli.json("list") == []


def read_proc(cli, name: str, file: str) -> str:
    """A /proc file as a program that read()s it sees it, from inside the container.

    Not with busybox cat: it copies with sendfile(), which the kernel serves from the page
    cache for lxcfs's FUSE files (direct I/O notwithstanding), cut at the size the kernel
    last learnt for the file (see kamra.runtime.lxcfs). dd does plain read()s, like free,
    top and most programs."""
    return cli.run("exec", name, "--", "dd", f"if=/proc/{file}", "bs=65536",
                   check=True).stdout


def meminfo(cli, name: str) -> dict[str, int]:
    out = read_proc(cli, name, "meminfo")
    fields = {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines()
              if len(line.split()) >= 2 and line.split()[1].isdigit()}
    assert {"MemTotal", "MemFree", "MemAvailable", "SwapFree"} <= fields.keys(), out
    return fields


def wait_meminfo(cli, name: str, done, timeout: float = 10) -> dict[str, int]:
    """Read /proc/meminfo until ``done(fields)`` holds (or ``timeout`` passes): the VMs
    running the tests are noisy, and each read is a whole ``kamra exec``."""
    deadline = time.monotonic() + timeout
    fields = meminfo(cli, name)
    while not done(fields) and time.monotonic() < deadline:
        time.sleep(0.1)
        fields = meminfo(cli, name)
    return fields


def test_proc_tells_the_container_its_own_limits(cli, root):
    name = running(cli, "limits.memory=256M", "limits.cpu.set=0")
    mib = 1024  # /proc/meminfo counts kB
    idle = meminfo(cli, name)
    assert idle["MemTotal"] == 256 * mib  # the limit, not the host's RAM
    assert idle["MemFree"] > 200 * mib  # an idle busybox uses next to nothing
    assert idle["SwapFree"] < 1 << 40  # not lxcfs 5.0.3's 0 - x on a host without swap
    # A process inside touches 100 MiB of anonymous memory (dd's buffer, filled from
    # /dev/zero) and keeps it: dd blocks writing to a sleep that never reads. (Not a
    # shell variable in a subshell: ash execs the subshell's last command, so the memory
    # is gone a moment later.)
    cli.run("exec", name, "--", "sh", "-c",
            "(dd if=/dev/zero bs=100M count=1 | sleep 1000) >/dev/null 2>&1 &", check=True)
    held = wait_meminfo(cli, name, lambda f: f["MemFree"] <= idle["MemFree"] - 90 * mib)
    assert idle["MemFree"] - 130 * mib <= held["MemFree"] <= idle["MemFree"] - 90 * mib
    assert held["MemAvailable"] <= idle["MemAvailable"] - 90 * mib  # anon: not reclaimable
    assert held["MemTotal"] == 256 * mib
    # free takes "available" from /proc/meminfo (busybox free gets total, used and free
    # from sysinfo(2), which lxcfs cannot answer: the host's figures).
    mem_line = cli.run("exec", name, "--", "free", check=True).stdout.splitlines()[1]
    assert int(mem_line.split()[-1]) <= idle["MemAvailable"] - 90 * mib
    # ... and it follows the memory back when the process ends.
    cli.run("exec", name, "--", "killall", "dd", "sleep", check=True)
    freed = wait_meminfo(cli, name, lambda f: f["MemFree"] >= idle["MemFree"] - 20 * mib)
    assert freed["MemFree"] >= idle["MemFree"] - 20 * mib
    cpus = read_proc(cli, name, "cpuinfo")
    assert sum(line.startswith("processor") for line in cpus.splitlines()) == 1
    fields = read_proc(cli, name, "uptime").split()
    with open("/proc/uptime") as f:
        assert float(fields[0]) < float(f.read().split()[0])  # the container's, not the host's
    # LXCFS is its own process: it keeps serving across a kamrad crash.
    with open(os.path.join(root, "run", "lxcfs.pid")) as f:
        lxcfs_pid = int(f.read())
    with open(os.path.join(root, "run", "kamrad.pid")) as f:
        os.kill(int(f.read()), 9)
    time.sleep(0.2)
    assert meminfo(cli, name)["MemTotal"] == 256 * mib
    with open(os.path.join(root, "run", "lxcfs.pid")) as f:
        assert int(f.read()) == lxcfs_pid


def test_uptime_counts_from_the_containers_start(cli):
    """A spare launcher waits in advance (cgroup v1), but the init, whose age LXCFS gives
    as the container's uptime, is forked at start."""
    cli.run("list", check=True)  # kamrad up, its spare launchers prepared
    time.sleep(3)
    name = running(cli)
    uptime = float(read_proc(cli, name, "uptime").split()[0])
    assert uptime < 2.5, uptime
