"""limits.disk: a container's writes land in a loop-mounted ext4 image of the quota's size.

Measured from inside (ENOSPC at the quota) and from the host (the image's allocated
size, mounts, loop devices). Each test fails if the quota were not applied.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from conftest import mounts_under, run_exec, unique

from kamra.errors import Conflict
from kamra.paths import Layout
from kamra.storage.quota import (
    CAP_SYS_RESOURCE,
    ceiling,
    has_cap,
    loops_backed_by,
    wait_detached,
)

M = 1 << 20
# The kernel's rule for resizing a mounted ext4 (needed only past the image's room).
CAN_RESIZE_MOUNTED = has_cap(CAP_SYS_RESOURCE)


def container_dir(root: str, name: str) -> str:
    return Layout.at(root).container_dir(name)


def image(root: str, name: str) -> str:
    return os.path.join(container_dir(root, name), "disk.img")


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def fill(cli, name: str, path: str, megabytes: int):
    """dd inside the container until done or the disk is full; (result, bytes written)."""
    result = cli.run("exec", name, "--", "sh", "-c",
                     f"dd if=/dev/zero of={path} bs=1M count={megabytes} conv=fsync; "
                     f"echo rc=$?; wc -c < {path}", timeout=120)
    return result, int(result.stdout.split()[-1])


def config_value(cli, name: str, key: str):
    rows = cli.json("config", "show", name)["config"]
    return next(row["value"] for row in rows if row["key"] == key)


def saved_limit(root: str, name: str) -> int:
    with open(os.path.join(container_dir(root, name), "disk.limit")) as f:
        return int(f.read())


def assert_released(root: str, name: str) -> None:
    """No mount under the container's dir and no loop device on its image."""
    assert mounts_under(container_dir(root, name)) == []
    assert wait_detached(image(root, name)), loops_backed_by(image(root, name))


def test_writing_past_the_quota_fails_with_enospc_and_grows_live(cli, root):
    name = unique()
    cli.run("create", name, "--template", "busybox", "-c", "limits.disk=64M", check=True)
    assert os.path.getsize(image(root, name)) == ceiling(64 * M)  # room to grow live
    assert allocated(image(root, name)) < 8 * M  # sparse: mkfs wrote only metadata
    assert saved_limit(root, name) == 64 * M
    cli.run("start", name, check=True)
    assert loops_backed_by(image(root, name))

    result, written = fill(cli, name, "/fill", 100)
    assert "No space left on device" in result.stdout + result.stderr
    assert "rc=0" not in result.stdout
    assert 60 * M <= written <= 64 * M  # stopped at the quota
    # The host's disk holds no more than the quota and the filesystem's own metadata.
    assert allocated(image(root, name)) <= 64 * M + 8 * M
    rows = {row["resource"]: row for row in cli.json("beancounters", name)}
    assert rows["diskspace"]["limit"] == 64 * M
    assert written <= rows["diskspace"]["held"] <= 64 * M
    assert rows["diskinodes"]["limit"] > rows["diskinodes"]["held"] > 0
    assert rows["diskspace"]["failcnt"] is None  # no kernel counter: n/a
    # Deleting inside gives the space back to the host (the image is mounted with discard).
    cli.run("exec", name, "--", "sh", "-c", "rm /fill && sync", check=True)
    deadline = time.monotonic() + 10
    while allocated(image(root, name)) > 8 * M and time.monotonic() < deadline:
        time.sleep(0.2)
    assert allocated(image(root, name)) <= 8 * M
    result, written = fill(cli, name, "/fill", 100)  # full again
    assert "No space left on device" in result.stdout + result.stderr

    # Shrinking a running container is refused, and nothing is saved.
    shrink = cli.run("set", name, "limits.disk=32M")
    assert shrink.returncode == Conflict.exit_code, shrink.stderr
    assert "cannot shrink" in shrink.stderr
    assert config_value(cli, name, "limits.disk") == 64 * M
    assert os.path.getsize(image(root, name)) == ceiling(64 * M)

    assert saved_limit(root, name) == 64 * M

    # Growing a running container's quota: live, whatever the host's capabilities.
    cli.run("set", name, "limits.disk=128M", check=True)
    assert saved_limit(root, name) == 128 * M
    result, more = fill(cli, name, "/more", 40)
    assert "rc=0" in result.stdout, result.stderr
    assert more == 40 * M
    result, _ = fill(cli, name, "/past", 100)  # and the new quota holds too
    assert "No space left on device" in result.stdout + result.stderr
    rows = {row["resource"]: row for row in cli.json("beancounters", name)}
    assert rows["diskspace"]["limit"] == 128 * M
    assert 120 * M <= rows["diskspace"]["held"] <= 128 * M

    cli.run("stop", name, check=True)
    assert_released(root, name)
    cli.run("start", name, check=True)  # the reservation is set again at every mount
    result, _ = fill(cli, name, "/again", 20)
    assert "No space left on device" in result.stdout + result.stderr
    cli.run("stop", name, check=True)
    assert_released(root, name)
    path = image(root, name)
    cli.run("destroy", name, check=True)
    assert not os.path.exists(container_dir(root, name))
    assert loops_backed_by(path) == []


def test_growing_past_the_images_room_while_running(host, root):
    """Past the image's room, a running container's filesystem itself must grow, which the
    kernel allows only with CAP_SYS_RESOURCE: done where held, else refused with why."""
    name = unique()
    host.create(name, "busybox", config={"limits.disk": "32M"})
    host.start(name)
    big = ceiling(32 * M) + 64 * M
    if CAN_RESIZE_MOUNTED:
        host.resources.set(name, {"limits.disk": str(big)}, [])
        assert os.path.getsize(image(root, name)) == ceiling(big)
        code, _ = run_exec(host, name, ["dd", "if=/dev/zero", "of=/f", "bs=1M", "count=36"])
        assert code == 0
    else:
        with pytest.raises(Conflict) as refused:
            host.resources.set(name, {"limits.disk": str(big)}, [])
        assert "CAP_SYS_RESOURCE" in refused.value.message
        assert "stop it first" in refused.value.message
        assert os.path.getsize(image(root, name)) == ceiling(32 * M)
        assert host.store.get(name).config["limits.disk"] == 32 * M
        assert saved_limit(root, name) == 32 * M
        host.stop(name)
        host.resources.set(name, {"limits.disk": str(big)}, [])  # stopped: offline
        assert os.path.getsize(image(root, name)) == ceiling(big)
        assert saved_limit(root, name) == big
    host.destroy(name, force=True)


def test_a_container_without_a_quota_has_no_image(host, root):
    name = unique()
    host.create(name, "busybox")
    where = container_dir(root, name)
    assert sorted(os.listdir(where)) == ["rootfs", "upper", "work"]  # O(1): three dirs
    rows = {row["resource"]: row for row in host.resources.beancounters(name)}
    assert rows["diskspace"]["limit"] is None and rows["diskinodes"]["limit"] is None


def test_shrink_while_stopped_only_to_what_fits(host, root):
    name = unique()
    host.create(name, "busybox", config={"limits.disk": "64M"})
    host.start(name)
    code, _ = run_exec(host, name, ["sh", "-c", "dd if=/dev/zero of=/data bs=1M count=30 "
                                    "&& md5sum /data > /data.md5"])
    assert code == 0
    host.stop(name)
    assert_released(root, name)
    # Stopped, the counters come from the image's superblock.
    stopped = {row["resource"]: row for row in host.resources.beancounters(name)}
    assert 30 * M <= stopped["diskspace"]["held"] < 40 * M

    with pytest.raises(Conflict) as refused:
        host.resources.set(name, {"limits.disk": "24M"}, [])
    assert re.search(r"uses 3\d", refused.value.message)  # the used size, in the reason
    assert host.store.get(name).config["limits.disk"] == 64 * M
    assert saved_limit(root, name) == 64 * M

    host.resources.set(name, {"limits.disk": "48M"}, [])
    assert saved_limit(root, name) == 48 * M
    host.start(name)
    assert run_exec(host, name, ["md5sum", "-c", "/data.md5"])[0] == 0
    code, out = run_exec(host, name, ["dd", "if=/dev/zero", "of=/more", "bs=1M", "count=30"])
    assert code != 0 and "No space left on device" in out
    host.destroy(name, force=True)
    assert loops_backed_by(image(root, name)) == []


def test_adding_and_removing_a_quota_moves_the_files(host, root):
    name = unique()
    host.create(name, "busybox")
    assert len(os.listdir(os.path.join(host.templates.get("busybox").rootfs, "usr", "sbin"))) > 1
    host.start(name)
    # A new file, a whiteout (a deleted template file) and an opaque dir (a template
    # dir replaced): what overlayfs keeps in its upper dir as device nodes and xattrs.
    code, _ = run_exec(host, name, ["sh", "-c", "echo kept > /root/state && chown 7:8 "
                                    "/root/state && rm /bin/true && rm -rf /usr/sbin && "
                                    "mkdir /usr/sbin && echo new > /usr/sbin/only"])
    assert code == 0
    with pytest.raises(Conflict):  # the upper dir cannot move under a mounted overlay
        host.resources.set(name, {"limits.disk": "64M"}, [])
    assert not os.path.exists(image(root, name))
    host.stop(name)

    def check() -> None:
        host.start(name)
        code, out = run_exec(host, name, ["sh", "-c", "cat /root/state; stat -c '%u:%g' "
                                          "/root/state; ls /bin/true; echo sbin=$(ls /usr/sbin)"])
        assert out.split("\n")[:2] == ["kept", "7:8"], out
        assert "No such file" in out  # /bin/true stays deleted
        assert "sbin=only\n" in out  # /usr/sbin is opaque: it holds only the new file
        assert code == 0
        host.stop(name)
        assert_released(root, name)

    host.resources.set(name, {"limits.disk": "64M"}, [])
    assert os.path.isfile(image(root, name))
    assert not {"upper", "work"} & set(os.listdir(container_dir(root, name)))
    check()
    host.resources.set(name, {}, ["limits.disk"])
    assert not os.path.exists(image(root, name))
    assert {"upper", "work"} <= set(os.listdir(container_dir(root, name)))
    check()


def test_files_that_do_not_fit_refuse_the_quota(host, root):
    name = unique()
    host.create(name, "busybox")
    host.start(name)
    assert run_exec(host, name, ["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=24"])[0] == 0
    host.stop(name)
    with pytest.raises(Conflict) as refused:
        host.resources.set(name, {"limits.disk": "16M"}, [])
    assert "too small" in refused.value.message
    assert not os.path.exists(image(root, name))
    assert {"upper", "work"} <= set(os.listdir(container_dir(root, name)))
    assert "limits.disk" not in host.store.get(name).config


def test_a_plan_change_a_running_container_cannot_take_is_refused_whole(cli, root):
    plan = unique("p")
    cli.run("plan", "create", plan, "limits.disk=64M", "limits.pids=50", check=True)
    name = unique()
    cli.run("create", name, "--template", "busybox", "--plan", plan, check=True)
    cli.run("start", name, check=True)
    shrink = cli.run("plan", "edit", plan, "limits.disk=32M", "limits.pids=40")
    assert shrink.returncode == Conflict.exit_code, shrink.stderr
    assert f"plan {plan!r} not changed" in shrink.stderr and name in shrink.stderr
    assert "cannot shrink" in shrink.stderr
    shown = cli.json("plan", "show", plan)
    assert shown["values"]["limits.disk"] == 64 * M and shown["values"]["limits.pids"] == 50
    assert saved_limit(root, name) == 64 * M
    # Growing through the plan reaches the running container live.
    cli.run("plan", "edit", plan, "limits.disk=96M", check=True)
    assert saved_limit(root, name) == 96 * M
    result, written = fill(cli, name, "/fill", 120)
    assert "No space left on device" in result.stdout + result.stderr
    assert 90 * M <= written <= 96 * M
    cli.run("destroy", "--force", name, check=True)
    cli.run("plan", "remove", plan, check=True)
