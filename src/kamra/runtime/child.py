"""Helpers for forked children of the keeper: a clean slate before container code runs."""

from __future__ import annotations

import os
import signal

from kamra.linux import libc


def clean_slate(keep: set[int]) -> None:
    """Undo what the keeper set up for itself and close every descriptor not in ``keep``."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    close_except(keep)


def close_except(keep: set[int]) -> None:
    """Close every descriptor above stderr not in ``keep``, in a few close_range calls.

    The keeper holds three descriptors per running container; closing them one by one
    would make every start and exec slower as containers accumulate.
    """
    first = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > first:
            libc.close_range(first, fd - 1)
        first = fd + 1
    libc.close_range(first)


def install_stdio(fds: tuple[int, int, int]) -> None:
    """Make ``fds`` the process's 0, 1 and 2 (safe even when they overlap 0-2)."""
    high = [os.dup(fd) if fd >= 0 else -1 for fd in fds]
    for target, fd in enumerate(high):
        if fd >= 0:
            os.dup2(fd, target, inheritable=True)
    for fd in set(high):
        if fd > 2:
            os.close(fd)


def close_all_but(keep_fd: int) -> None:
    """Close everything above stderr except ``keep_fd`` (the close-on-exec report pipe)."""
    close_except({keep_fd})


def write_cgroup_procs(paths: list[str], pid: int = 0) -> None:
    for path in paths:
        with open(path, "w") as f:
            f.write(str(pid))


def lookup_user(spec: str, passwd: str = "/etc/passwd",
                group: str = "/etc/group") -> tuple[int, int, list[int], str]:
    """Resolve USER, UID or USER:GROUP inside the container: (uid, gid, groups, home)."""
    user, _, grp = spec.partition(":")
    uid = gid = -1
    home = "/"
    name = user
    entries: list[list[str]] = []
    try:
        with open(passwd) as f:
            entries = [line.rstrip("\n").split(":") for line in f if line.count(":") >= 6]
    except OSError:
        pass
    for entry in entries:
        if entry[0] == user or (user.isdigit() and entry[2] == user):
            name, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
            break
    else:
        if not user.isdigit():
            raise LookupError(f"no user {user!r} in the container's /etc/passwd")
        uid, gid = int(user), int(user)
    groups: list[int] = []
    groups_db: list[list[str]] = []
    try:
        with open(group) as f:
            groups_db = [line.rstrip("\n").split(":") for line in f if line.count(":") >= 3]
    except OSError:
        pass
    if grp:
        for entry in groups_db:
            if entry[0] == grp or entry[2] == grp:
                gid = int(entry[2])
                break
        else:
            if not grp.isdigit():
                raise LookupError(f"no group {grp!r} in the container's /etc/group")
            gid = int(grp)
    for entry in groups_db:
        if name in entry[3].split(","):
            groups.append(int(entry[2]))
    return uid, gid, groups, home


def become(uid: int, gid: int, groups: list[int]) -> None:
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


def report_and_exit(fd: int, message: str, code: int) -> None:
    try:
        os.write(fd, ("error " + message.replace("\n", " ") + "\n").encode())
    finally:
        os._exit(code)


def exec_command(argv: list[str], env: dict[str, str]) -> None:
    """execvpe with the container's PATH; raises OSError when it cannot run."""
    os.execvpe(argv[0], argv, env)


def set_name(name: str) -> None:
    libc.set_process_name(name)
