"""The exec helper: a forked child of the keeper that runs a command in a container.

It joins the container's cgroup and namespaces, optionally opens a pty from the
container's own devpts (so the command sees /dev/pts/N inside), forks the command
(which lands in the container's pid namespace and gets a session of its own), and
reports on the session socket: ``{"pty": true}`` with the master fd, then
``{"started": pid}`` or ``{"error": ...}``, then ``{"exit": code}``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from kamra.linux import caps, fdpass, libc, proc, seccomp
from kamra.runtime import child
from kamra.runtime.initproc import DEFAULT_ENV


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def exec_helper(conn: socket.socket, req: dict, fds: list[int]) -> None:
    """Never returns."""
    try:
        child.clean_slate({conn.fileno(), *fds})
        child.set_name("kamra-exec")
        _run(conn, req, fds)
    except BaseException as exc:  # noqa: BLE001 - report anything, never return
        try:
            fdpass.send(conn, {"error": f"exec: {exc}", "exit": 125})
        except OSError:
            pass
    os._exit(0)


def _join(req: dict) -> None:
    pid, started = req["init_pid"], req.get("init_start")
    nsfds = []
    try:
        for name, flag in libc.NAMESPACES:
            nsfds.append((os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag))
        # Checked after opening: the descriptors now pin the namespaces of the process
        # we verified, even if the pid were reused afterwards.
        if not proc.alive(pid, started):
            raise ProcessLookupError("the container's init is gone")
        child.write_cgroup_procs(req.get("cgroup_procs", []))
        for fd, flag in nsfds:
            libc.setns(fd, flag)
    finally:
        for fd, _ in nsfds:
            os.close(fd)
    os.chdir("/")


def _run(conn: socket.socket, req: dict, fds: list[int]) -> None:
    _join(req)
    tty = bool(req.get("tty"))
    master = slave = -1
    if tty:
        master, slave = libc.open_pty_peer("/dev/ptmx")
        rows, cols = req.get("winsize") or (24, 80)
        libc.set_winsize(master, rows, cols)
        stdio = (slave, slave, slave)
    else:
        if len(fds) < 3:
            raise ValueError("exec without a tty needs three stdio descriptors")
        stdio = (fds[0], fds[1], fds[2])
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _command(req, stdio, tty, report_w)
    os.close(report_w)
    for fd in fds:
        os.close(fd)
    if tty:
        os.close(slave)
        fdpass.send(conn, {"pty": True}, [master])
        os.close(master)
    report = b""
    while chunk := os.read(report_r, 4096):
        report += chunk
    os.close(report_r)
    _, status = os.waitpid(pid, 0)
    if report.startswith(b"error "):
        fdpass.send(conn, {"error": report[6:].decode(errors="replace").strip(),
                           "exit": exit_code(status)})
        return
    fdpass.send(conn, {"started": pid})
    fdpass.send(conn, {"exit": exit_code(status)})


def _command(req: dict, stdio: tuple[int, int, int], tty: bool, report_w: int) -> None:
    """The command itself, pid N in the container's pid namespace. Never returns."""
    try:
        os.setsid()  # a session of its own, inside the container
        if tty:
            fcntl.ioctl(stdio[0], libc.TIOCSCTTY, 0)
        child.install_stdio(stdio)
        try:
            uid, gid, groups, home = child.lookup_user(req.get("user") or "root")
        except LookupError as exc:
            child.report_and_exit(report_w, str(exc), 125)
        caps.drop(req.get("drop_caps", list(caps.DEFAULT_DROP)))
        if seccomp.DENY_BPF is not None:  # as for the init (kamra.linux.seccomp)
            seccomp.install(seccomp.DENY_BPF)
        env = dict(DEFAULT_ENV)
        env["HOME"] = home
        env["TERM"] = req.get("term") or ("xterm" if tty else "dumb")
        env.update(req.get("env") or {})
        cwd = req.get("cwd") or (home if req.get("login") else "/")
        try:
            os.chdir(cwd)
        except OSError as exc:
            child.report_and_exit(report_w, f"working directory {cwd}: {exc.strerror}", 125)
        child.become(uid, gid, groups)
        child.close_all_but(report_w)
        argv = req["argv"]
        try:
            child.exec_command(argv, env)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                child.report_and_exit(report_w, f"{argv[0]}: command not found in the container", 127)
            child.report_and_exit(report_w, f"{argv[0]}: {exc.strerror}", 126)
    except BaseException as exc:  # noqa: BLE001
        child.report_and_exit(report_w, f"exec setup: {exc}", 125)
    os._exit(125)
