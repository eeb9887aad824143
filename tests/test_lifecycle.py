"""Container lifecycle through the engine: create, start, stop, restart, destroy, run."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import mounts_under, run_exec, unique

from kamra.errors import AlreadyExists, Conflict, InvalidInput, KamraError, NotFound
from kamra.linux import proc


def test_create_is_copy_on_write(host):
    name = unique()
    record = host.create(name, "busybox")
    container_dir = host.layout.container_dir(name)
    assert record.template_digest.startswith("sha256:")
    # O(1): nothing of the template was copied.
    assert os.listdir(os.path.join(container_dir, "upper")) == []
    with pytest.raises(AlreadyExists):
        host.create(name, "busybox")


def test_start_exec_stop_destroy(host):
    name = unique()
    host.create(name, "busybox")
    started = host.start(name)
    pid = started["init_pid"]
    assert started["state"] == "running"
    assert proc.alive(pid, None)
    code, out = run_exec(host, name, ["sh", "-c", "echo $$; hostname; exit 4"])
    assert code == 4
    lines = out.split()
    assert lines[1] == name
    with pytest.raises(Conflict):
        host.start(name)
    with pytest.raises(Conflict):
        host.destroy(name)
    stopped = host.stop(name, timeout=10)
    assert stopped["state"] == "stopped"
    assert stopped["last_exit"]["reason"] in ("poweroff", "stopped")
    assert not proc.alive(pid, None)
    assert not mounts_under(host.layout.container_dir(name))
    assert host.cgroups.pids(name) == []
    with pytest.raises(Conflict):
        host.stop(name)
    with pytest.raises(Conflict):
        run_exec(host, name, ["true"])
    host.destroy(name)
    assert not os.path.exists(host.layout.container_dir(name))
    with pytest.raises(NotFound):
        host.status(name)


def test_files_survive_restart(host):
    name = unique()
    host.create(name, "busybox")
    host.start(name)
    assert run_exec(host, name, ["sh", "-c", "echo kept > /root/state"])[0] == 0
    restarted = host.restart(name, timeout=10)
    assert restarted["state"] == "running"
    assert run_exec(host, name, ["cat", "/root/state"]) == (0, "kept\n")
    # The write went to the container's upper layer, never to the shared template.
    template_root = host.templates.get("busybox").rootfs
    assert not os.path.exists(os.path.join(template_root, "root", "state"))
    host.stop(name)


def test_stop_kills_an_init_that_ignores_its_stop_signal(host):
    name = unique()
    host.create(name, "busybox", init=["/bin/sh", "-c",
                                       "trap '' USR2 TERM INT; sleep 1000 & while :; do wait; done"])
    host.start(name)
    code, _ = run_exec(host, name, ["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"])
    assert code == 0
    pids = host.cgroups.pids(name)
    assert len(pids) >= 2
    begin = time.monotonic()
    stopped = host.stop(name, timeout=1)
    took = time.monotonic() - begin
    assert stopped["state"] == "stopped"
    assert stopped["last_exit"]["signal"] == "SIGKILL"
    assert took >= 1  # it waited for the graceful stop first
    assert not any(proc.alive(pid, None) for pid in pids)


def test_failure_while_starting_undoes_every_step(host):
    name = unique()
    host.create(name, "busybox", init=["/no/such/init"])
    with pytest.raises(KamraError) as err:
        host.start(name)
    assert "exec /no/such/init" in err.value.message
    assert host.status(name)["state"] == "stopped"
    assert not mounts_under(host.layout.container_dir(name))
    assert not os.path.exists(host.cgroups.procs_files(name)[0])

    # A broken storage step: the overlay cannot mount without its work dir.
    other = unique()
    host.create(other, "busybox")
    os.rmdir(os.path.join(host.layout.container_dir(other), "work"))
    with pytest.raises(KamraError) as err:
        host.start(other)
    assert "mount storage" in err.value.message
    assert host.status(other)["state"] == "stopped"
    assert not os.path.exists(host.cgroups.procs_files(other)[0])


def test_init_exit_is_recorded_and_resources_released(host):
    name = unique()
    host.create(name, "busybox", init=["/bin/sh", "-c", "exit 3"])
    started = host.start(name)
    assert host.wait_exit(name, started["init_pid"], timeout=10) is not None
    deadline = time.monotonic() + 10
    while host.status(name)["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.02)
    status = host.status(name)
    assert status["state"] == "stopped"
    assert status["last_exit"]["code"] == 3
    assert not mounts_under(host.layout.container_dir(name))


def test_poweroff_and_reboot_from_inside(host):
    name = unique()
    host.create(name, "busybox")
    first = host.start(name)["init_pid"]
    # busybox `reboot` asks init to reboot; in a pid namespace the init then ends with
    # SIGHUP and kamra starts the container again.
    run_exec(host, name, ["reboot"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = host.status(name)
        if status["state"] == "running" and status["init_pid"] not in (None, first):
            break
        time.sleep(0.05)
    assert status["init_pid"] != first and status["state"] == "running"
    assert status["last_exit"]["reason"] == "reboot"
    second = status["init_pid"]
    run_exec(host, name, ["poweroff"])
    deadline = time.monotonic() + 20
    while host.status(name)["state"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.05)
    status = host.status(name)
    assert status["state"] == "stopped"
    assert status["last_exit"]["reason"] == "poweroff"
    assert not proc.alive(second, None)


def test_run_returns_exit_code_and_removes(host):
    read_end, write_end = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    result = host.run("busybox", ["sh", "-c", "echo out; exit 9"], remove=True,
                      stdio=[devnull, write_end, write_end])
    os.close(write_end)
    os.close(devnull)
    assert result["exit_code"] == 9
    assert os.read(read_end, 100) == b"out\n"
    os.close(read_end)
    assert host.store.get(result["name"]) is None
    assert not os.path.exists(host.layout.container_dir(result["name"]))


def test_concurrent_commands_are_serialised(host):
    name = unique()
    host.create(name, "busybox")
    results: list[str] = []

    def start() -> None:
        try:
            host.start(name)
            results.append("started")
        except Conflict:
            results.append("conflict")

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict", "conflict", "conflict", "started"]
    assert len([p for p in host.ps(name) if p["container_pid"] == 1]) == 1
    host.stop(name, timeout=5)


def test_invalid_input_is_refused_before_anything_is_made(host):
    for bad in ("../x", "A B", "x" * 64, "", "-x", "a/b"):
        with pytest.raises(InvalidInput):
            host.create(bad, "busybox")
    with pytest.raises(NotFound):
        host.create(unique(), "nosuchtemplate")
    with pytest.raises(InvalidInput):
        host.create(unique(), "busybox", hostname="bad_host!")
    assert os.listdir(host.layout.containers) == []
    assert host.list() == []


def test_starts_use_a_standby_launcher_on_cgroup_v1(host):
    """On v1 a start takes a launcher that already sits in a spare cgroup (no migration)."""
    if not host.cgroups.supports_rename:
        pytest.skip("the host's cgroup driver cannot rename cgroups")
    name = unique()
    host.create(name, "busybox")
    host._refill_standby()  # prepared in the background since the Host started
    host._refill.join(timeout=30)
    started = host.start(name)
    assert started["via_standby"] is True
    # It is a complete container: its own root (the template's files), hostname, pid 1.
    code, out = run_exec(host, name, ["sh", "-c", "hostname; cat /proc/1/comm; ls /bin/busybox"])
    assert code == 0 and out.split() == [name, "init", "/bin/busybox"]
    assert started["init_pid"] in host.cgroups.pids(name)
    host.stop(name, timeout=10)


def test_destroy_force_ends_processes_whatever_the_recorded_state(host):
    """A container whose record says it is not running (a checkpoint cut short leaves
    it 'checkpointing') but whose processes live: destroy --force ends them and leaves
    no cgroup (the root fixture checks); without --force it refuses."""
    name = unique()
    host.create(name, "busybox", init=["/bin/sh", "-c", "sleep 100000"])
    host.start(name)
    record = host.store.get(name)
    pid = record.init_pid
    record.state = "checkpointing"
    host.store.update(record)
    with pytest.raises(Conflict):
        host.destroy(name)
    host.destroy(name, force=True)
    assert not os.path.exists(f"/proc/{pid}")
    assert host.store.get(name) is None
