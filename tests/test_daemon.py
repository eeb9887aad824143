"""kamrad: containers outlive it; a new kamrad re-adopts them (pid + start time checked)."""

from __future__ import annotations

import os
import signal
import socket
import time

from conftest import unique

from kamra.engine import Host
from kamra.paths import Layout


def kamrad_pid(root: str) -> int:
    with open(Layout.at(root).daemon_pid) as f:
        return int(f.read())


def wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.02)


def close_host(host: Host) -> None:
    """What kamrad does when it stops: release the spare, stop an idle keeper, close."""
    host.shutting_down()
    host.keeper.request({"op": "shutdown"})
    host.keeper.wait_gone()
    host.close()


def test_container_survives_kamrad_sigkill(cli, root):
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("start", name, check=True)
    before = cli.json("status", name)
    daemon = kamrad_pid(root)
    os.kill(daemon, signal.SIGKILL)
    wait_dead(daemon)
    # The next command starts a new kamrad, which re-adopts the running container.
    after = cli.json("status", name)
    assert kamrad_pid(root) != daemon
    assert after["state"] == "running"
    assert after["init_pid"] == before["init_pid"]
    result = cli.run("exec", name, "--", "sh", "-c", "echo adopted; exit 6")
    assert result.returncode == 6 and result.stdout == "adopted\n"
    ps = cli.json("ps", name)
    assert any(p["container_pid"] == 1 and p["pid"] == before["init_pid"] for p in ps)
    cli.run("stop", name, "--timeout", "10", check=True)
    stopped = cli.json("status", name)
    assert stopped["state"] == "stopped"
    assert stopped["last_exit"]["reason"] in ("poweroff", "stopped")


def test_exit_while_kamrad_is_down_is_not_lost(root, busybox_cache):
    from conftest import install_template

    install_template(root, busybox_cache)
    name = unique()
    first = Host(root)
    first.create(name, "busybox", init=["/bin/sh", "-c", "sleep 0.5; exit 3"])
    started = first.start(name)
    first.close()  # as if kamrad died: nothing stops the container, the keeper stays
    time.sleep(1.0)
    second = Host(root)  # re-adoption: the keeper recorded the exit status meanwhile
    try:
        deadline = time.monotonic() + 10
        while second.status(name)["state"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.02)
        status = second.status(name)
        assert status["state"] == "stopped"
        assert status["last_exit"]["code"] == 3
        assert started["init_pid"] != status["init_pid"]
        second.destroy(name)
    finally:
        close_host(second)


def test_readoption_refuses_a_reused_pid(root, busybox_cache):
    """A recorded pid whose start time differs is another process: never adopted."""
    from conftest import install_template

    install_template(root, busybox_cache)
    name = unique()
    host = Host(root)
    host.create(name, "busybox")
    record = host.store.get(name)
    # Pretend the container ran as our own pid but with another start time.
    record.state = "running"
    record.init_pid = os.getpid()
    record.init_start = 1
    host.store.update(record)
    host.close()
    again = Host(root)
    try:
        status = again.status(name)
        assert status["state"] == "stopped"
        assert status["last_exit"]["reason"] == "lost"
        again.destroy(name)
    finally:
        close_host(again)


def test_daemon_commands(cli, root):
    assert cli.run("daemon", "start").returncode == 0
    status = cli.json("daemon", "status")
    assert status["running"] and status["pid"] == kamrad_pid(root)
    assert cli.run("daemon", "stop").returncode == 0
    assert cli.run("daemon", "status").returncode != 0
    # Any command starts it again on demand.
    assert cli.run("list").returncode == 0
    assert cli.json("daemon", "status")["running"]


def test_upgrade_keeps_a_session_message_sent_with_the_headers(tmp_path):
    """kamrad may send a session's first message (with a descriptor) right behind the
    101 headers; the client must not read past the headers and lose it."""
    from kamra.client import Client
    from kamra.linux import fdpass

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    try:
        # Both are waiting before the client reads a byte: the worst case.
        theirs.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: kamra-session\r\n"
                       b"Connection: Upgrade\r\n\r\n")
        fdpass.send(theirs, {"session": True}, [read_end])
        client = Client(str(tmp_path), autostart=False)
        client._open = lambda: ours  # type: ignore[method-assign]
        sock = client.upgrade("/v1/containers/x/console", {})
        sock.settimeout(5)  # a lost message would otherwise wait forever
        reply, fds = fdpass.recv(sock)
        assert reply == {"session": True}
        assert len(fds) == 1
        os.write(write_end, b"x")
        assert os.read(fds[0], 1) == b"x"  # the very pipe kamrad sent
        os.close(fds[0])
    finally:
        for end in (ours, theirs):
            end.close()
        os.close(read_end)
        os.close(write_end)
