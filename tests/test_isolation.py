"""Isolation: what a process inside a container can see of, and do to, the host.

Every test runs real containers through the real ``kamra`` command line and checks one
boundary from the inside (and, where it helps, from the host side too). Each would
fail if that boundary were missing: a chroot instead of pivot_root, the host's /proc,
/sys or /dev, a shared namespace, a capability left in the bounding set, a host
descriptor leaking into an exec'd process.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
from conftest import unique

from kamra.linux.caps import CAPS, DEFAULT_DROP
from kamra.paths import Layout

DROPPED = {"sys_module": 16, "sys_rawio": 17, "sys_time": 25, "mac_override": 32,
           "mac_admin": 33}

# Exactly what a container's /dev holds (kamra.runtime.rootfs builds it on every start).
DEV_ENTRIES = {"null", "zero", "full", "random", "urandom", "tty", "console", "ptmx", "pts",
               "shm", "mqueue", "fd", "stdin", "stdout", "stderr"}
CHAR_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                "urandom": (1, 9), "tty": (5, 0)}

NAMESPACES = ("mnt", "uts", "ipc", "net", "pid", "cgroup")


# -- helpers ------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _keep_host_hostname():
    """Should a container ever share the host's UTS namespace, its init (and the test)
    would rename the host: put the name back after the test, whatever happened."""
    before = socket.gethostname()
    yield
    if socket.gethostname() != before:
        socket.sethostname(before)


def start(cli, name: str | None = None, *extra: str) -> str:
    """Create and start a busybox container; return once its boot settled.

    busybox init runs /etc/init.d/rcS (which sets the hostname from /etc/hostname) to
    completion before it spawns the console shell: once that shell is there, no boot
    process remains to race with what a test does or counts.
    """
    name = name or unique("iso")
    cli.run("create", name, "--template", "busybox", *extra, check=True)
    cli.run("start", name, check=True)
    pid = init_pid(cli, name)
    deadline = time.monotonic() + 15
    while "-/bin/sh" not in children_commands(pid):
        assert time.monotonic() < deadline, f"{name}: no console shell after 15s"
        time.sleep(0.02)
    return name


def children_commands(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return []
    commands = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                commands.append(f.read().split(b"\0")[0].decode(errors="replace"))
        except OSError:
            pass
    return commands


def sh(cli, name: str, script: str, *, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``sh -c script`` in the container (stdin empty), returning the finished process."""
    result = cli.run("exec", name, "--", "sh", "-c", script, input="")
    if check and result.returncode != 0:
        raise AssertionError(f"in {name}: sh -c {script!r} exited {result.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def sections(text: str) -> list[list[str]]:
    """Split output at lines of '---' into lists of non-empty lines."""
    parts: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip() == "---":
            parts.append([])
        elif line.strip():
            parts[-1].append(line)
    return parts


def status_field(text: str, key: str) -> list[str]:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"no {key} line in {text!r}")


def cap_names(mask_hex: str) -> set[str]:
    mask = int(mask_hex, 16)
    return {name for name, num in CAPS.items() if mask & (1 << num)}


def init_pid(cli, name: str) -> int:
    status = cli.json("status", name)
    assert status["state"] == "running", status
    return int(status["init_pid"])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sysv_keys(text: str) -> set[int]:
    """Keys listed in a /proc/sysvipc/{shm,msg} table (first column, after the header)."""
    keys = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].lstrip("-").isdigit():
            keys.add(int(fields[0]))
    return keys


def read_host(path: str) -> str:
    with open(path) as f:
        return f.read()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.msgget.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.msgctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_libc.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mq_close.argtypes = [ctypes.c_int]
_libc.mq_unlink.argtypes = [ctypes.c_char_p]
IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0


def sysv_key() -> int:
    return 0x4B000000 | int.from_bytes(os.urandom(3), "big")


def checked(value: int, what: str) -> int:
    if value < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return value


# Creates a SysV shared memory segment and message queue with a given key in whatever
# IPC namespace it runs in (run under nsenter --ipc to put them in a container's).
_MAKE_SYSV = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
key = int(sys.argv[1])
assert libc.shmget(key, 4096, 0o1000 | 0o2000 | 0o600) >= 0, ctypes.get_errno()
assert libc.msgget(key, 0o1000 | 0o2000 | 0o600) >= 0, ctypes.get_errno()
"""


# -- filesystem view ----------------------------------------------------------------------

def test_pivot_root_leaves_no_way_back_to_the_host(cli):
    """The classic chroot escape, run as root inside: it only works against a chroot.

    A process chrooted into a subdirectory reaches the container's root through
    /proc/1/root; from there '..' climbs to the host's root if the container's root is
    merely a chroot (the mount above it is still in the namespace). After pivot_root
    and detaching the old root, the container's root is the namespace's topmost mount:
    '..' stays put.
    """
    name = start(cli)
    root = os.path.realpath(cli.root)
    marker = os.path.join(root, f"escape-marker-{uuid.uuid4().hex}")
    with open(marker, "w") as f:
        f.write("host secret\n")
    try:
        up = "/proc/1/root/" + "../" * 40
        result = sh(cli, name, f"""
            set -e
            mkdir -p /tmp/x/bin /tmp/x/proc
            cp /bin/busybox /tmp/x/bin/busybox
            mount -t proc proc /tmp/x/proc
            stat -c %d:%i /
            echo ---
            chroot /tmp/x /bin/busybox stat -c %d:%i /
            echo ---
            chroot /tmp/x /bin/busybox stat -c %d:%i {up}
            echo ---
            chroot /tmp/x /bin/busybox cat {up}{marker.lstrip("/")} 2>&1 || echo no-escape
            echo ---
            chroot /tmp/x /bin/busybox sh -c 'cd -P {up} && /bin/busybox chroot . /bin/busybox cat {marker} 2>&1 || echo no-escape'
        """)
        own_root, sub_root, climbed, direct, via_chroot = sections(result.stdout)
        assert sub_root != own_root  # the nested chroot really changed the root
        assert climbed == own_root  # '..' from the container's root stops there
        assert "host secret" not in result.stdout
        assert direct[-1] == "no-escape" and via_chroot[-1] == "no-escape"
        st = os.stat("/")
        assert own_root != [f"{st.st_dev}:{st.st_ino}"]
    finally:
        os.unlink(marker)


def test_proc_is_the_containers_own(cli):
    name = start(cli)
    pid1 = init_pid(cli, name)
    result = sh(cli, name, """
        echo $$
        echo ---
        cat /proc/$$/status
        echo ---
        cat /proc/1/status
        echo ---
        tr '\\0' '\\n' < /proc/1/cmdline
        echo ---
        readlink /proc/1/exe
        echo ---
        ls /proc
        echo ---
        stat -c %d /proc
        true
    """)
    parts = sections(result.stdout)
    assert len(parts) == 7 and all(parts), f"not the container's /proc:\n{result.stdout}"
    (me,), my_status, init_status, init_cmdline, (init_exe,), listing, (proc_dev,) = parts
    me = int(me)
    # The proc mount belongs to the container's pid namespace: a process shows one pid.
    assert status_field("\n".join(my_status), "NSpid") == [str(me)]
    assert status_field("\n".join(init_status), "NSpid") == ["1"]
    # /proc/1 is the container's init, the very process the host knows as its init pid.
    with open(f"/proc/{pid1}/cmdline", "rb") as f:
        host_cmdline = [a.decode() for a in f.read().split(b"\0") if a]
    assert init_cmdline == host_cmdline
    assert init_exe == "/bin/busybox"
    exe = os.stat(f"/proc/{pid1}/exe")
    own = os.stat(os.path.join(Layout.at(cli.root).container_dir(name), "rootfs/bin/busybox"))
    assert (exe.st_dev, exe.st_ino) == (own.st_dev, own.st_ino)
    assert status_field(read_host(f"/proc/{pid1}/status"), "NSpid")[-1] == "1"
    # Only the container's processes: init, its console shell, us and our ls.
    inside = {int(e) for e in listing if e.isdigit()}
    known = {row["container_pid"] for row in cli.json("ps", name)}
    assert 1 in inside and me in inside
    assert len(inside - known - {me}) <= 1, (inside, known)  # the ls itself
    assert int(proc_dev) != os.stat("/proc").st_dev
    # busybox ps reads the same /proc: no host process in it.
    me, *ps = sh(cli, name, "echo $$; ps -o pid; true").stdout.split()
    ps_pids = {int(p) for p in ps if p.isdigit()}
    assert 1 in ps_pids and int(me) in ps_pids
    assert len(ps_pids - known - {int(me)}) <= 1, (ps_pids, known)  # ps itself


def test_sys_is_read_only(cli):
    name = start(cli)
    # An attribute root may open for writing on the host. Opening it without writing
    # changes nothing, so the probe below is harmless even if /sys were writable.
    target = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(target):
        target = "/sys/kernel/mm/ksm/run"
    os.close(os.open(target, os.O_WRONLY | os.O_APPEND))
    result = sh(cli, name, f"""
        grep ' /sys ' /proc/mounts
        echo ---
        (: >> {target}) && echo opened
        echo ---
        touch /sys/kernel/kamra-probe && echo created
        true
    """)
    mounts, _, _ = sections(result.stdout)
    assert "ro" in mounts[0].split()[3].split(",")
    assert "opened" not in result.stdout and "created" not in result.stdout
    assert result.stderr.count("Read-only file system") == 2, result.stderr


def test_every_process_runs_under_the_bpf_filter(cli):
    """The init and exec'd commands run under kamra's seccomp filter (bpf refused:
    kamra.linux.seccomp; tests/test_seccomp.py shows the kernel enforcing it)."""
    name = start(cli)
    result = sh(cli, name, "grep -E '^Seccomp(_filters)?:' /proc/1/status /proc/self/status")
    lines = result.stdout.split()
    assert lines.count("2") == 2, result.stdout  # mode 2: filter, for both
    assert "/proc/1/status:Seccomp_filters:" in result.stdout


def test_dev_holds_only_the_allowed_devices(cli):
    name = start(cli)
    # Ptys of the host's devpts, open while we look: none of them may show inside.
    host_ptys = [os.openpty() for _ in range(3)]
    try:
        result = sh(cli, name, """
            ls -A /dev
            echo ---
            find /dev -type b
            echo ---
            stat -c '%n|%F|%t|%T' /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty
            echo ---
            ls -A /dev/pts
            echo ---
            stat -c %d /dev/pts
            echo ---
            grep ' /dev/pts ' /proc/mounts
            echo ---
            stat -c '%d %t:%T' /dev/console /dev/pts/0
        """)
    finally:
        for master, slave in host_ptys:
            os.close(master)
            os.close(slave)
    listing, blocks, devices, pts, (pts_dev,), pts_mount, console = sections(result.stdout)
    assert set(listing) == DEV_ENTRIES
    assert blocks == []
    assert len(devices) == len(CHAR_DEVICES)
    for line in devices:
        path, kind, major, minor = line.split("|")
        assert kind == "character special file", line
        assert (int(major, 16), int(minor, 16)) == CHAR_DEVICES[os.path.basename(path)], line
    # A devpts instance of its own, holding only the console (its pty 0): not the host's.
    assert pts == ["0", "ptmx"], pts
    assert int(pts_dev) != os.stat("/dev/pts").st_dev
    assert pts_mount[0].split()[2] == "devpts"
    assert console[0] == console[1] == f"{pts_dev} 88:0", console


def test_run_and_tmp_are_tmpfs(cli):
    name = start(cli)
    result = sh(cli, name, """
        cat /proc/mounts
        echo ---
        echo hi > /tmp/inside-tmp && echo hi > /run/inside-run && echo written
    """)
    mounts, written = sections(result.stdout)
    assert written == ["written"]
    fstype = {}
    for line in mounts:
        _, mountpoint, kind = line.split()[:3]
        fstype[mountpoint] = kind  # the last mount on a path is the visible one
    assert fstype["/run"] == "tmpfs" and fstype["/tmp"] == "tmpfs"
    assert fstype["/dev/shm"] == "tmpfs"
    # The files landed in the container's tmpfs, not in its root filesystem.
    container_dir = Layout.at(cli.root).container_dir(name)
    for base in ("rootfs", "upper"):
        assert not os.path.exists(os.path.join(container_dir, base, "tmp", "inside-tmp"))
        assert not os.path.exists(os.path.join(container_dir, base, "run", "inside-run"))


def test_mountinfo_does_not_reveal_the_data_root(cli):
    name = start(cli)
    result = sh(cli, name, "cat /proc/self/mountinfo; echo ---; cat /proc/1/mountinfo;"
                           " echo ---; cat /proc/mounts")
    own, init, mounts = sections(result.stdout)
    assert any(line.split()[4] == "/" for line in own)
    for path in {cli.root, os.path.realpath(cli.root)}:
        assert path not in result.stdout
    assert len(own) == len(init) and len(mounts) == len(own)
    # The host does see the container's root under the data root (it is the same mount).
    assert any(os.path.realpath(cli.root) in line for line in read_host("/proc/self/mountinfo")
               .splitlines())


# -- namespaces ---------------------------------------------------------------------------

def test_every_namespace_differs_from_the_hosts(cli):
    name = start(cli)
    pid1 = init_pid(cli, name)
    script = "; ".join(f"readlink /proc/$$/ns/{ns}; readlink /proc/1/ns/{ns}"
                       for ns in NAMESPACES)
    lines = sh(cli, name, script + "; true").stdout.split()
    assert len(lines) == 2 * len(NAMESPACES)
    for i, ns in enumerate(NAMESPACES):
        mine, init = lines[2 * i], lines[2 * i + 1]
        assert mine == init, ns  # exec joins the init's namespaces
        assert mine == os.readlink(f"/proc/{pid1}/ns/{ns}"), ns
        assert mine != os.readlink(f"/proc/self/ns/{ns}"), f"{ns} namespace shared with host"


def test_ps_maps_host_and_container_pids(cli):
    name = start(cli)
    pid1 = init_pid(cli, name)
    rows = cli.json("ps", name)
    init = [r for r in rows if r["container_pid"] == 1]
    assert len(init) == 1 and init[0]["pid"] == pid1
    # A process started by exec shows up with both its pids.
    out = sh(cli, name, "sleep 300 </dev/null >/dev/null 2>&1 & echo $!").stdout
    sleeper = int(out.strip())
    assert sleeper > 1
    rows = cli.json("ps", name)
    found = [r for r in rows if r["container_pid"] == sleeper]
    assert len(found) == 1, rows
    host_pid = found[0]["pid"]
    assert found[0]["command"] == ["sleep", "300"] and found[0]["user"] == "root"
    assert host_pid != sleeper and alive(host_pid)
    nspid = status_field(read_host(f"/proc/{host_pid}/status"), "NSpid")
    assert nspid == [str(host_pid), str(sleeper)]
    for row in rows:  # every row is a live process inside the container's pid namespace
        assert alive(row["pid"])
        assert os.readlink(f"/proc/{row['pid']}/ns/pid") == os.readlink(f"/proc/{pid1}/ns/pid")
    # From the inside, the same process has the container pid (and only that one).
    inside = sh(cli, name, f"cat /proc/{sleeper}/cmdline | tr '\\0' ' '").stdout
    assert inside.split() == ["sleep", "300"]


def test_uts_namespace(cli):
    host_name = socket.gethostname()  # _keep_host_hostname restores it if this fails
    default = start(cli)
    custom = unique("h")
    named = start(cli, None, "--hostname", custom)
    assert socket.gethostname() == host_name
    assert sh(cli, default, "hostname").stdout.strip() == default
    assert sh(cli, named, "hostname").stdout.strip() == custom
    assert sh(cli, named, "cat /proc/sys/kernel/hostname").stdout.strip() == custom
    assert cli.json("status", named)["hostname"] == custom
    renamed = unique("renamed")
    assert sh(cli, default, f"hostname {renamed}; hostname").stdout.strip() == renamed
    assert socket.gethostname() == host_name
    assert sh(cli, named, "hostname").stdout.strip() == custom
    assert sh(cli, default, "uname -n").stdout.strip() == renamed  # it did stick inside


def test_ipc_namespace(cli):
    first, second = start(cli), start(cli)
    host_key, inner_key = sysv_key(), sysv_key()
    queue = f"kamra-q-{uuid.uuid4().hex[:8]}"
    try:
        checked(_libc.shmget(host_key, 4096, IPC_CREAT | IPC_EXCL | 0o600), "shmget")
        checked(_libc.msgget(host_key, IPC_CREAT | IPC_EXCL | 0o600), "msgget")
        # SysV objects made in the first container's IPC namespace (by a host program
        # that joins only that namespace), and a POSIX message queue made inside it.
        subprocess.run(["nsenter", "--target", str(init_pid(cli, first)), "--ipc", "--",
                        sys.executable, "-c", _MAKE_SYSV, str(inner_key)], check=True)
        sh(cli, first, f"touch /dev/mqueue/{queue}")
        script = "cat /proc/sysvipc/shm; echo ---; cat /proc/sysvipc/msg; echo ---; " \
                 "ls -A /dev/mqueue"
        views = {}
        for name in (first, second):
            shm, msg, mq = (sections(sh(cli, name, script).stdout) + [[]])[:3]
            views[name] = (sysv_keys("\n".join(shm)), sysv_keys("\n".join(msg)), mq)
        host_view = (sysv_keys(read_host("/proc/sysvipc/shm")),
                     sysv_keys(read_host("/proc/sysvipc/msg")))
        fd = _libc.mq_open(f"/{queue}".encode(), os.O_RDONLY)
        mq_errno = ctypes.get_errno()
        if fd >= 0:
            _libc.mq_close(fd)
    finally:
        # The host's objects; the container's too, should they have leaked to the host.
        for key in (host_key, inner_key):
            shmid = _libc.shmget(key, 0, 0)
            if shmid >= 0:
                _libc.shmctl(shmid, IPC_RMID, None)
            msqid = _libc.msgget(key, 0)
            if msqid >= 0:
                _libc.msgctl(msqid, IPC_RMID, None)
        _libc.mq_unlink(f"/{queue}".encode())
    assert views[first] == ({inner_key}, {inner_key}, [queue])
    assert views[second] == (set(), set(), [])
    assert host_key in host_view[0] and host_key in host_view[1]
    assert inner_key not in host_view[0] and inner_key not in host_view[1]
    assert fd < 0 and mq_errno == errno.ENOENT, "the container's POSIX queue is on the host"


@pytest.mark.parametrize("mode, interfaces", [("none", ["lo"]), ("routed", ["eth0", "lo"])])
def test_network_namespace_has_only_its_own_interfaces(cli, mode, interfaces):
    """Its own namespace: loopback (up), and eth0 unless net.mode=none; none of the host's."""
    name = start(cli, None, "-c", f"net.mode={mode}")
    result = sh(cli, name, """
        cat /proc/net/dev
        echo ---
        ls -A /sys/class/net
        echo ---
        cat /sys/class/net/lo/flags
        echo ---
        ip -o link
        echo ---
        ip -o addr show lo
    """)
    netdev, sysnet, (flags,), links, addrs = sections(result.stdout)
    assert sorted(line.split(":")[0].strip() for line in netdev[2:]) == interfaces
    assert sorted(sysnet) == interfaces  # /sys is the container's network namespace's
    assert int(flags, 16) & 0x1  # IFF_UP
    assert sorted(link.split(":")[1].strip().split("@")[0] for link in links) == interfaces
    for link in links:
        assert "UP" in link.split("<")[1].split(">")[0].split(",")
    assert any("127.0.0.1/8" in line for line in addrs)


def test_cgroup_namespace_hides_host_cgroup_paths(cli):
    name = start(cli)
    pid1 = init_pid(cli, name)
    result = sh(cli, name, "cat /proc/$$/cgroup; echo ---; cat /proc/1/cgroup")
    mine, init = sections(result.stdout)
    for line in mine + init:
        assert line.split(":", 2)[2] == "/", line
    assert "kamra-" not in result.stdout
    # The host sees the same process deep in kamra's cgroups.
    host_view = read_host(f"/proc/{pid1}/cgroup")
    root_id = Layout.at(cli.root).root_id
    assert f"kamra-{root_id}" in host_view
    assert len(mine) == len(host_view.splitlines())


def test_capability_bounding_set(cli):
    assert set(DEFAULT_DROP) == set(DROPPED)
    name = start(cli)
    pid1 = init_pid(cli, name)
    result = sh(cli, name, "cat /proc/1/status; echo ---; cat /proc/$$/status")
    for text in ("\n".join(s) for s in sections(result.stdout)):
        for field in ("CapBnd", "CapEff", "CapPrm"):
            held = cap_names(status_field(text, field)[0])
            assert "sys_admin" in held and "chown" in held  # decoded the mask right
            assert not held & set(DROPPED), (field, held & set(DROPPED))
        assert int(status_field(text, "CapInh")[0], 16) == 0
    host_view = cap_names(status_field(read_host(f"/proc/{pid1}/status"), "CapBnd")[0])
    assert not host_view & set(DROPPED)
    # Without CAP_SYS_TIME, setting the clock fails. Set it to the current second, so
    # that even if it did not fail, the host's clock would move by under a second.
    result = sh(cli, name, "date -s \"$(date '+%Y-%m-%d %H:%M:%S')\"", check=False)
    assert "Operation not permitted" in result.stderr, (result.stdout, result.stderr)


# -- exec'd processes ---------------------------------------------------------------------

def test_exec_inherits_only_stdio(cli):
    name = start(cli)
    # /proc/$$/fd of the shell itself (ls would also list its own directory descriptor).
    result = sh(cli, name, "ls /proc/$$/fd; echo ---; ls -l /proc/$$/fd; true")
    fds, details = sections(result.stdout)
    assert sorted(fds) == ["0", "1", "2"], details
    # Nor does the container's init hold anything but its console.
    init_fds = sh(cli, name, "ls /proc/1/fd").stdout.split()
    assert sorted(init_fds) == ["0", "1", "2"]


def test_exec_gets_a_session_of_its_own(cli):
    name = start(cli)
    result = sh(cli, name, "echo $$; cat /proc/$$/stat; echo; ls -d /proc/[0-9]*; true")
    me, stat, *rest = result.stdout.split("\n")
    fields = stat.rsplit(")", 1)[1].split()
    ppid, pgrp, session, tty_nr = (int(f) for f in fields[1:5])
    # Leader of its own session and process group, inside the container's pid namespace
    # (a session led from outside it would show as 0); no controlling terminal.
    assert session == pgrp == int(me) > 1
    assert tty_nr == 0
    assert ppid == 0  # its parent (kamra's exec helper) is outside the pid namespace
    assert f"/proc/{session}" in rest


# -- lifetime -----------------------------------------------------------------------------

def test_container_outlives_the_cli_and_kamrad(cli):
    name = start(cli)  # 'kamra start' has exited by now
    pid1 = init_pid(cli, name)  # a fresh 'kamra status'
    assert alive(pid1)
    layout = Layout.at(cli.root)
    keeper = int(read_host(layout.keeper_pid).strip())
    assert status_field(read_host(f"/proc/{pid1}/status"), "PPid") == [str(keeper)]
    # kamrad can go away too: the keeper holds the container; a new kamrad finds it.
    cli.run("daemon", "stop", check=True)
    assert alive(pid1)
    status = cli.json("status", name)
    assert status["state"] == "running" and status["init_pid"] == pid1
    assert sh(cli, name, "echo still here").stdout.strip() == "still here"
    assert json.loads(cli.run("list", "--format", "json", check=True).stdout)[0]["state"] \
        == "running"
