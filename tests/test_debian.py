"""A Debian container with systemd as init: starts, runs exec, stops cleanly."""

from __future__ import annotations

import time

from conftest import install_template, needs_debian, unique

pytestmark = [needs_debian]


def test_debian_container_lifecycle(cli, debian_build):
    info = debian_build[0]
    install_template(cli.root, info.path, "debian")
    name = unique("d")
    created = cli.run("create", name, "--template", "debian", "-c", "limits.memory=256M")
    assert created.returncode == 0, created.stderr
    cli.run("start", name, check=True)
    release = cli.run("exec", name, "--", "cat", "/etc/os-release").stdout
    assert "Debian GNU/Linux 12" in release
    init = cli.run("exec", name, "--", "cat", "/proc/1/comm").stdout.strip()
    assert init == "systemd"
    assert cli.run("exec", name, "--", "hostname").stdout.strip() == name
    # procps' free reads /proc/meminfo, which LXCFS answers with the container's limit.
    total = cli.run("exec", name, "--", "free", "-b").stdout.splitlines()[1].split()[1]
    assert int(total) == 256 << 20
    # ... and "used" follows a 100 MB allocation inside (dd holds its buffer while
    # blocked on a pipe nobody reads).
    def used() -> int:
        return int(cli.run("exec", name, "--", "free", "-b").stdout.splitlines()[1].split()[2])

    before = used()
    cli.run("exec", name, "--", "sh", "-c",
            "(dd if=/dev/zero bs=100M count=1 | sleep 60) >/dev/null 2>&1 &", check=True)
    deadline = time.monotonic() + 10
    while used() - before < 90 << 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert used() - before >= 90 << 20
    # Its network: the address kamra gave it, on eth0, which systemd leaves alone.
    address = cli.json("status", name)["addresses"][0]
    assert f"inet {address}/32" in cli.run("exec", name, "--", "ip", "-4", "addr", "show",
                                           "eth0").stdout
    # Checkpoint and restore with systemd, its services and the 100 MB in dd's memory.
    def services() -> set[str]:
        out = cli.run("exec", name, "--", "systemctl", "list-units", "--type=service",
                      "--state=running", "--no-legend", "--plain").stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    running = services()
    print("services running before the checkpoint:", sorted(running))
    assert running, "systemd runs no service"
    checkpointed = cli.run("checkpoint", name)
    assert checkpointed.returncode == 0, checkpointed.stderr
    restored = cli.run("restore", name)
    assert restored.returncode == 0, restored.stderr
    assert cli.run("exec", name, "--", "cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert used() - before >= 90 << 20  # dd's buffer came back
    survived = services()
    print("services running after the restore:", sorted(survived))
    assert survived == running
    assert cli.run("exec", name, "--", "systemctl", "is-system-running").stdout.strip() in (
        "running", "degraded")
    stopped = cli.run("stop", name, "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    status = cli.json("status", name)
    assert status["state"] == "stopped"
    # systemd halts on SIGRTMIN+3; inside a pid namespace that ends the init with SIGINT.
    assert status["last_exit"]["reason"] == "poweroff"
    assert cli.run("destroy", name).returncode == 0
