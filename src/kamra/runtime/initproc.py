"""The two forked children that turn a keeper request into a container init.

The keeper forks the first child (the "launcher"), which unshares the pid namespace
and forks the init. While the init unshares its other namespaces and builds its root
filesystem, the launcher moves it into the container's cgroup: on cgroup v1 the
first migration after a pause waits out an RCU grace period (6-15 ms here), so doing
both at once hides most of it. The init waits for the launcher's go before it
enters its cgroup namespace and execs, so no container code ever runs outside the
container's cgroup. The launcher then exits, the init is re-parented to the keeper
(a child subreaper), which records its exit status.

Both report over a close-on-exec stream socket: ``pid N`` from the launcher,
``error ...`` from either, and ``console`` from the init with the console pty's
master and slave attached (and the read end of its output pipe, see _hand_console) (it is made from the container's own devpts, see
``rootfs``); EOF with no error means the init exec'd.

A container with networking gets its network namespace from kamrad, already wired
(veth, addresses, routes: kamra.network), as a descriptor the init joins with setns
before it mounts /sys; without one, the init makes an empty namespace of its own.
"""

from __future__ import annotations

import os
import socket

from kamra.linux import caps, fdpass, libc, seccomp
from kamra.runtime import child
from kamra.runtime.rootfs import StepFailed, enter_rootfs

# Unshared by the init itself; the pid namespace is unshared by the launcher (it applies
# to children only) and the cgroup namespace only once the init sits in its cgroup.
INIT_NAMESPACES = libc.CLONE_NEWNS | libc.CLONE_NEWUTS | libc.CLONE_NEWIPC | libc.CLONE_NEWNET

# The init's stdio from the client, or None: the init makes a console pty of its own.
Stdio = tuple[int, int, int] | None

DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM": "linux",
    "HOME": "/root",
    "container": "kamra",  # systemd and others detect the container type from this
}


def launcher(req: dict, stdio: Stdio, report_w: int, netns_fd: int | None = None) -> None:
    """First child: never returns."""
    code = 1
    try:
        keep = {report_w, *(stdio or ())}
        if netns_fd is not None:
            keep.add(netns_fd)
        child.clean_slate(keep)
        child.set_name("kamra-launch")
        try:
            libc.unshare(libc.CLONE_NEWPID)
        except OSError as exc:
            child.report_and_exit(report_w, f"create pid namespace: {exc.strerror}", 1)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            init(req, stdio, report_w, go_r, netns_fd)
        os.close(go_r)
        if netns_fd is not None:
            os.close(netns_fd)
        try:
            child.write_cgroup_procs(req.get("cgroup_procs", []), pid)
        except OSError as exc:
            os.kill(pid, 9)
            child.report_and_exit(report_w, f"join cgroup: {exc.strerror}", 1)
        os.write(go_w, b"1")
        os.write(report_w, f"pid {pid}\n".encode())
        code = 0
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return
        try:
            os.write(report_w, f"error launcher: {exc}\n".encode())
        except OSError:
            pass
    os._exit(code)


def standby(ctrl_fd: int, cgroup_procs: list[str], ready_w: int) -> None:
    """A launcher forked ahead of time into a spare cgroup and a new pid namespace. Never
    returns.

    It pays the cgroup migration (an RCU grace period on v1) before anyone waits for it.
    When a container starts, the engine renames the spare cgroup to the container's name
    and the keeper hands the launcher the spawn request; only then does it fork the init,
    which is born in the cgroup (no migration on the start path) and is as old as the
    container (LXCFS tells the container its uptime from the init's age). A restore
    request makes it the restore helper instead (kamra.runtime.restorer): CRIU runs in
    the cgroup already, and so will what it restores.
    """
    try:
        child.clean_slate({ctrl_fd, ready_w})
        child.set_name("kamra-standby")
        try:
            child.write_cgroup_procs(cgroup_procs)
        except OSError as exc:
            os.write(ready_w, f"error prepare launcher: {exc.strerror}".encode())
            os._exit(1)
        os.write(ready_w, f"ok {os.getpid()}".encode())
        os.close(ready_w)
        sock = socket.socket(fileno=ctrl_fd)
        req, fds = fdpass.recv(sock)
        sock.close()
        if req is None or not fds:
            os._exit(0)  # released
        if req.get("op") == "restore":
            from kamra.runtime.restorer import restore_helper

            # [kamrad's connection, the keeper's adopt socket, the images directory]
            restore_helper(socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1]), req,
                           fds[2:])
        libc.unshare(libc.CLONE_NEWPID)  # the init to come is its pid 1
        # [report, stdio x3 unless the init makes its console, netns if wired]
        report_w = fds[0]
        stdio = None if req.get("console", True) else (fds[1], fds[2], fds[3])
        netns_fd = fds[-1] if req.get("netns") else None
        pid = os.fork()
        if pid == 0:
            init(req, stdio, report_w, None, netns_fd)
        os.write(report_w, f"pid {pid}\n".encode())
        os._exit(0)
    except BaseException:  # noqa: BLE001 - a forked child must never return
        pass
    os._exit(1)


def _join_netns(netns_fd: int | None, report_w: int) -> None:
    """Join the network namespace kamrad wired for the container (replacing the empty
    one a standby made ahead of time)."""
    if netns_fd is None:
        return
    try:
        libc.setns(netns_fd, libc.CLONE_NEWNET)
    except OSError as exc:
        child.report_and_exit(report_w, f"join network namespace: {exc.strerror}", 1)
    os.close(netns_fd)


def init(req: dict, stdio: Stdio, report_w: int, go_r: int | None,
         netns_fd: int | None = None) -> None:
    """Second child, pid 1 of the new pid namespace: set up and exec the init."""
    try:
        os.setsid()
        try:
            libc.unshare(INIT_NAMESPACES if netns_fd is None
                         else INIT_NAMESPACES & ~libc.CLONE_NEWNET)
        except OSError as exc:
            raise StepFailed("create namespaces", exc) from exc
    except StepFailed as exc:
        child.report_and_exit(report_w, str(exc), 1)
    _join_netns(netns_fd, report_w)
    _finish_init(req, stdio, report_w, go_r)


def _hand_console(report_w: int, pty: tuple[int, int], output_pipe: bool) -> tuple[int, int, int]:
    """Send the console pty to the keeper (which copies it to console.log and clients)
    and return the init's stdio: the pty's slave, or with ``output_pipe`` /dev/null and
    a pipe the keeper reads into the same log.

    An OS init (busybox init, systemd) gets the pipe: it only writes messages, and the
    console stays free to be the controlling terminal of the getty or shell the init
    starts on it. CRIU takes a pty's session from the first process holding it, so an
    init holding the console too would make such a container impossible to dump."""
    master, slave = pty
    handed = [master, slave]
    if output_pipe:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        handed.append(read_end)
    with socket.socket(fileno=os.dup(report_w)) as sock:
        socket.send_fds(sock, [b"console\n"], handed)
    os.close(master)
    if not output_pipe:
        return (slave, slave, slave)
    os.close(read_end)
    os.close(slave)
    return (os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC), write_end, write_end)


def _finish_init(req: dict, stdio: Stdio, report_w: int, go_r: int | None) -> None:
    """Build the root filesystem, wait for the launcher's go (if any), exec. Never returns."""
    try:
        pty = enter_rootfs(req["rootfs"], req["hostname"], stdio is None, req.get("lxcfs"))
        if pty is not None:
            stdio = _hand_console(report_w, pty, bool(req.get("output_pipe")))
        if stdio is None:
            child.report_and_exit(report_w, "no stdio and no console", 1)
        try:
            caps.drop(req.get("drop_caps", list(caps.DEFAULT_DROP)))
        except OSError as exc:
            raise StepFailed("drop capabilities", exc) from exc
        try:
            if seccomp.DENY_BPF is not None:
                seccomp.install(seccomp.DENY_BPF)
        except OSError as exc:
            raise StepFailed("install the seccomp filter", exc) from exc
        # The console is the init's stdio but not its controlling terminal, as when the
        # kernel starts init: an OS init hands it to the getty or shell it spawns, which
        # needs it as its own controlling terminal for job control.
        child.install_stdio(stdio)
        if go_r is not None:
            if os.read(go_r, 1) != b"1":
                # The launcher failed (and reported why) or died without a word.
                child.report_and_exit(report_w, "launcher gave no go", 1)
            os.close(go_r)
        try:
            # Now that it sits in its cgroup, that cgroup becomes the container's root.
            libc.unshare(libc.CLONE_NEWCGROUP)
        except OSError as exc:
            raise StepFailed("create cgroup namespace", exc) from exc
        child.close_all_but(report_w)
        env = dict(DEFAULT_ENV)
        env.update(req.get("env", {}))
        argv = req["argv"]
        try:
            child.exec_command(argv, env)
        except OSError as exc:
            child.report_and_exit(report_w, f"exec {argv[0]}: {exc.strerror}",
                                  127 if exc.errno == 2 else 126)
    except StepFailed as exc:
        child.report_and_exit(report_w, str(exc), 1)
    except BaseException as exc:  # noqa: BLE001
        child.report_and_exit(report_w, f"init setup: {exc}", 1)
    os._exit(1)
