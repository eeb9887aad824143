"""Linux capabilities: names, numbers and dropping them from a process."""

from __future__ import annotations

import ctypes

from kamra.linux import libc

CAPS: dict[str, int] = {
    "chown": 0, "dac_override": 1, "dac_read_search": 2, "fowner": 3, "fsetid": 4, "kill": 5,
    "setgid": 6, "setuid": 7, "setpcap": 8, "linux_immutable": 9, "net_bind_service": 10,
    "net_broadcast": 11, "net_admin": 12, "net_raw": 13, "ipc_lock": 14, "ipc_owner": 15,
    "sys_module": 16, "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20,
    "sys_admin": 21, "sys_boot": 22, "sys_nice": 23, "sys_resource": 24, "sys_time": 25,
    "sys_tty_config": 26, "mknod": 27, "lease": 28, "audit_write": 29, "audit_control": 30,
    "setfcap": 31, "mac_override": 32, "mac_admin": 33, "syslog": 34, "wake_alarm": 35,
    "block_suspend": 36, "audit_read": 37, "perfmon": 38, "bpf": 39, "checkpoint_restore": 40,
}

# LXC's default drop list: loading kernel modules, raw I/O ports, the host clock and the
# LSM policy belong to the host, never to a container.
DEFAULT_DROP = ("sys_module", "sys_rawio", "sys_time", "mac_admin", "mac_override")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop(names: tuple[str, ...] | list[str]) -> None:
    """Drop capabilities from the bounding, inheritable and ambient sets.

    After the next execve the process (and everything it starts) can never regain them.
    """
    numbers = [CAPS[n] for n in names]
    for number in numbers:
        libc.prctl(libc.PR_CAPBSET_DROP, number)
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    lib = libc._libc
    if lib.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for number in numbers:
        data[number // 32].inheritable &= ~(1 << (number % 32))
    if lib.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def bounding_set(pid: int | str = "self") -> set[str]:
    """Names of the capabilities in a process's bounding set (from /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return {name for name, num in CAPS.items() if mask & (1 << num)}
    return set()


def has_cap(cap: int) -> bool:
    """Whether this process holds capability number ``cap`` in its effective set (some
    sandboxes withhold a few, e.g. CAP_SYS_RESOURCE, even from root)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False
