"""Checkpoint and restore with real CRIU: processes, memory, files and TCP survive."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import unique

STREAM = ("i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done | nc -l -p 5000")


class SequenceReader(threading.Thread):
    """Reads the container's increasing sequence; remembers every number and how it ended."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.numbers: list[int] = []
        self.arrivals: list[float] = []  # monotonic time each chunk of numbers came
        self.end: str | None = None
        self.stop_reading = False

    def run(self) -> None:
        buffer = b""
        try:
            while not self.stop_reading:
                data = self.sock.recv(4096)
                if not data:
                    self.end = "EOF"
                    return
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                if lines:
                    self.arrivals.append(time.monotonic())
                self.numbers.extend(int(line) for line in lines)
        except OSError as exc:
            self.end = repr(exc)

    def wait_for_more(self, than: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.numbers) <= than and time.monotonic() < deadline and self.end is None:
            time.sleep(0.02)
        assert len(self.numbers) > than, f"the stream stalled ({self.end})"

    def more(self, count: int = 50) -> None:
        self.wait_for_more(len(self.numbers) + count - 1)

    def check(self) -> None:
        """No gap, no duplicate, no reset."""
        numbers = list(self.numbers)
        assert numbers == list(range(len(numbers))), "gap or duplicate in the stream"
        assert self.end is None, self.end

    def longest_gap_ms(self) -> float:
        """The longest silence the client saw: its downtime."""
        times = list(self.arrivals)
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0) * 1000

    def close(self) -> None:
        self.stop_reading = True
        self.sock.close()


def connect_when_listening(address: str, netns_fd: int | None = None) -> SequenceReader:
    """Connect to port 5000 (from the network namespace ``netns_fd``, if given)."""
    from kamra.network import netns

    deadline = time.monotonic() + 10
    while True:
        try:
            if netns_fd is None:
                sock = socket.create_connection((address, 5000), timeout=60)
            else:
                sock = netns.run_in_netns(netns_fd, socket.create_connection,
                                          (address, 5000), 60)
            return SequenceReader(sock)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_checkpoint_and_restore_keep_an_established_tcp_stream(host, mode):
    name = unique()
    host.create(name, "busybox", init=["/bin/sh", "-c", STREAM], config={"net.mode": mode})
    status = host.start(name)
    address = status["addresses"][0]
    reader = connect_when_listening(address)
    reader.start()
    try:
        reader.wait_for_more(20)
        done = host.checkpoints.checkpoint(name)
        assert done["state"] == "checkpointed", done
        assert not os.path.exists(f"/proc/{status['init_pid']}")
        seen = len(reader.numbers)
        time.sleep(0.5)
        assert len(reader.numbers) <= seen + 5  # nothing flows while it is checkpointed
        restored = host.checkpoints.restore(name)
        assert restored["state"] == "running", restored
        reader.wait_for_more(len(reader.numbers) + 50)
        numbers = list(reader.numbers)
        assert numbers == list(range(len(numbers))), "gap or duplicate in the stream"
        assert reader.end is None
    finally:
        reader.close()


def _console_says(cli, name: str, command: str, marker: str) -> str:
    """Type ``command`` on the container's console; what it printed up to ``marker``."""
    from test_cli import PtySession, answer_cursor_query

    session = PtySession(cli.env, "console", name)
    session.read_until(b"Ctrl-a q")
    session.send(b"\r")
    answer_cursor_query(session)
    session.send(command.encode() + b"\r")
    out = session.read_until(marker.encode())
    session.send(b"\x01q")
    assert session.wait() == 0
    return out.decode(errors="replace")


def _started_busybox(cli) -> str:
    name = unique()
    cli.run("create", name, "--template", "busybox", check=True)
    cli.run("start", name, check=True)
    return name


def test_cli_checkpoint_restore_with_the_templates_own_init(cli):
    """busybox init with a shell on the console (its controlling terminal), a counter
    in memory, a file in /tmp (tmpfs) and a deleted file still open."""
    name = _started_busybox(cli)
    cli.run("exec", name, "--", "sh", "-c",
            "echo kept > /tmp/note; "
            "setsid sh -c 'exec 3</tmp/note; rm /tmp/note; "
            "i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.05; done' "
            "</dev/null >/dev/null 2>&1 &", check=True)
    before = cli.json("ps", name)
    time.sleep(0.3)
    result = cli.run("checkpoint", name, check=True)
    assert "checkpointed" in result.stdout
    assert cli.json("status", name)["state"] == "checkpointed"
    refused = cli.run("start", name)
    assert refused.returncode != 0 and "kamra restore" in refused.stderr
    assert "Traceback" not in refused.stderr
    restored = cli.run("restore", name, check=True)
    assert "restored" in restored.stdout
    after = cli.json("ps", name)
    # The same processes with the same pids inside the container.
    def lasting(rows: list) -> list:
        """The processes that stay: the loop's sleeps come and go, and so does the copy
        of the loop's shell that forks each of them (same command, a higher pid)."""
        first: dict[tuple, int] = {}
        for p in rows:
            if p["command"][0] != "sleep":
                key = tuple(p["command"])
                first[key] = min(first.get(key, p["container_pid"]), p["container_pid"])
        return sorted((pid, list(command)) for command, pid in first.items())

    assert len(lasting(before)) == 3, before  # init, the console shell, the loop
    assert lasting(before) == lasting(after)
    first = int(cli.run("exec", name, "--", "cat", "/run/count", check=True).stdout)
    time.sleep(0.3)
    second = int(cli.run("exec", name, "--", "cat", "/run/count", check=True).stdout)
    assert second > first
    loop = [p for p in after if "while" in " ".join(p["command"])]
    assert loop, after
    held = cli.run("exec", name, "--", "sh", "-c",
                   f"cat /proc/{loop[0]['container_pid']}/fd/3", check=True).stdout
    assert held == "kept\n"  # the deleted-but-open file came back with its contents
    # The console works again: its shell answers.
    out = _console_says(cli, name, "echo con$((40+2))sole", "con42sole")
    assert "con42sole" in out


TMPFS_FILES = ("/tmp", "/tmp/d", "/tmp/d/f", "/tmp/d/hard", "/tmp/d/link", "/tmp/d/fifo",
               "/dev/shm/seg", "/run/app", "/dev/extra", "/dev/null", "/dev/fd", "/dev/pts",
               "/dev/console")


def _tmpfs_view(cli, name: str) -> tuple[str, list[str]]:
    """(stat of TMPFS_FILES, the container's tmpfs mounts with their options)."""
    files = cli.run("exec", name, "--", "stat", "-c", "%n %a %u %g %F %s %h %N",
                    *TMPFS_FILES, check=True).stdout
    content = cli.run("exec", name, "--", "cat", "/tmp/d/f", "/dev/shm/seg", check=True)
    mounts = []
    for line in cli.run("exec", name, "--", "cat", "/proc/self/mountinfo",
                        check=True).stdout.splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[4] in ("/dev", "/dev/shm", "/run", "/tmp", "/dev/pts", "/dev/console"):
            mounts.append(" ".join([fields[4], fields[5], *fields[sep + 1:]]))
    return files + content.stdout, sorted(mounts)


def test_the_containers_own_tmpfs_mounts_come_back_as_they_were(cli):
    """kamra, not CRIU's tar, carries /dev, /dev/shm, /run and /tmp: every kind of file
    in them comes back with its mode, owner, links and contents, and the mounts with
    their options; the mounts inside /dev are CRIU's and work again."""
    name = _started_busybox(cli)
    cli.run("exec", name, "--", "sh", "-c",
            "mkdir -m 711 /tmp/d && echo data > /tmp/d/f && chmod 640 /tmp/d/f && "
            "chown 1000:1001 /tmp/d /tmp/d/f && ln /tmp/d/f /tmp/d/hard && "
            "ln -s ../d/f /tmp/d/link && mkfifo -m 600 /tmp/d/fifo && "
            "echo shared > /dev/shm/seg && mkdir -p /run/app && mknod -m 604 /dev/extra c 1 3",
            check=True)
    before = _tmpfs_view(cli, name)
    cli.run("checkpoint", name, check=True)
    images = os.listdir(os.path.join(cli.root, "containers", name, "checkpoint"))
    assert {"kamra-dev.tar", "kamra-dev-shm.tar", "kamra-run.tar",
            "kamra-tmp.tar"} <= set(images), images
    assert not [i for i in images if i.startswith("tmpfs-")], images  # none by CRIU
    cli.run("restore", name, check=True)
    after = _tmpfs_view(cli, name)
    assert after[0].splitlines() == before[0].splitlines()
    assert after[1] == before[1]
    # devpts, mounted by CRIU over the carried /dev, hands out terminals again.
    out = cli.run("exec", name, "--", "sh", "-c", "script -qc tty /dev/null || "
                  "ls /dev/pts", check=True).stdout
    assert "ptmx" in out or "/dev/pts/" in out
    assert not [d for d in os.listdir(os.path.join(cli.root, "run"))
                if d.startswith("tmpfs-")]  # the staging mounts are gone


def test_checkpoint_leave_running_and_refusals(cli):
    name = _started_busybox(cli)
    pid = cli.json("status", name)["init_pid"]
    result = cli.run("checkpoint", name, "--leave-running", check=True)
    assert "still running" in result.stdout
    assert cli.json("status", name)["state"] == "running"
    assert cli.json("status", name)["init_pid"] == pid
    # An exec session in progress cannot be dumped with the container: refused, kept.
    session = subprocess.Popen([sys.executable, "-m", "kamra.cli.main", "exec", name, "--",
                                "sleep", "30"], env=cli.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not any("sleep" in " ".join(p["command"]) for p in cli.json("ps", name)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        refused = cli.run("checkpoint", name)
        assert refused.returncode != 0
        assert "exec" in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert cli.json("status", name)["state"] == "running"
    finally:
        session.kill()
        session.wait()
    # Nothing to restore: one line, non-zero.
    nothing = cli.run("restore", name)
    assert nothing.returncode != 0 and "no checkpoint" in nothing.stderr


NESTED = "setsid unshare -p -f sleep 1000 </dev/null >/dev/null 2>&1 &"


def start_nested_pid_namespace(cli, name: str) -> None:
    """Start a process in a nested pid namespace (which CRIU cannot dump) and wait
    until it runs."""
    cli.run("exec", name, "--", "sh", "-c", NESTED, check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = cli.run("exec", name, "--", "sh", "-c",
                        "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        if "sleep 1000" in found:
            return
        time.sleep(0.1)
    raise AssertionError("the nested pid namespace never started")


def test_a_failed_checkpoint_leaves_the_container_running(cli):
    """CRIU cannot dump a nested pid namespace: the dump fails, CRIU's reason is shown,
    and the container goes on as before (thawed, network unlocked)."""
    name = _started_busybox(cli)
    start_nested_pid_namespace(cli, name)
    failed = cli.run("checkpoint", name)
    assert failed.returncode != 0, failed.stdout
    assert "keeps running" in failed.stderr and "Traceback" not in failed.stderr
    print(failed.stderr)
    assert "pid" in failed.stderr.split("keeps running")[0], failed.stderr
    assert cli.json("status", name)["state"] == "running"
    assert cli.run("exec", name, "--", "true").returncode == 0
    log = os.path.join(cli.root, "containers", name, "dump-failed.log")
    assert os.path.exists(log)


def test_restore_after_kamrad_restarted(cli):
    name = _started_busybox(cli)
    cli.run("exec", name, "--", "sh", "-c", "echo 7 > /run/mark", check=True)
    cli.run("checkpoint", name, check=True)
    cli.run("daemon", "stop", check=True)
    assert cli.json("status", name)["state"] == "checkpointed"  # kamrad started anew
    cli.run("restore", name, check=True)
    assert cli.run("exec", name, "--", "cat", "/run/mark", check=True).stdout == "7\n"
    # Once restored, the checkpoint is spent: a plain stop and start boot afresh.
    cli.run("stop", name, check=True)
    cli.run("start", name, check=True)
    assert cli.run("exec", name, "--", "cat", "/run/mark").returncode != 0
    # A checkpoint can also be dropped: the container boots afresh, the images go.
    cli.run("exec", name, "--", "sh", "-c", "echo 8 > /run/mark", check=True)
    cli.run("checkpoint", name, check=True)
    checkpoint = os.path.join(cli.root, "containers", name, "checkpoint")
    assert os.path.exists(os.path.join(checkpoint, "checkpoint.json"))
    cli.run("start", name, "--discard-checkpoint", check=True)
    assert cli.json("status", name)["state"] == "running"
    assert cli.run("exec", name, "--", "cat", "/run/mark").returncode != 0
    assert not os.path.exists(checkpoint)


def test_export_and_import_move_a_container_with_its_tcp_stream(host, tmp_path):
    """The exported file alone brings the container back (here under a new name, after
    the original was destroyed), with its address and its established connection."""
    name = unique()
    host.create(name, "busybox", init=["/bin/sh", "-c", "echo data > /home/file; " + STREAM])
    status = host.start(name)
    reader = connect_when_listening(status["addresses"][0])
    reader.start()
    try:
        reader.wait_for_more(20)
        export = str(tmp_path / "c.tar.zst")
        done = host.checkpoints.checkpoint(name, export=export)
        assert done["checkpoint"]["export"]["bytes"] == os.path.getsize(export)
        assert oct(os.stat(export).st_mode & 0o777) == "0o600"
        host.destroy(name)
        again = unique()
        restored = host.checkpoints.restore(again, import_file=export)
        assert restored["state"] == "running"
        assert restored["addresses"] == status["addresses"]
        reader.wait_for_more(len(reader.numbers) + 50)
        numbers = list(reader.numbers)
        assert numbers == list(range(len(numbers))), "gap or duplicate in the stream"
        rootfs = os.path.join(host.layout.container_dir(again), "rootfs")
        with open(os.path.join(rootfs, "home", "file")) as f:
            assert f.read() == "data\n"
    finally:
        reader.close()


def test_a_hostile_or_foreign_archive_is_refused_and_nothing_is_made(cli, tmp_path):
    import io
    import tarfile

    import zstandard

    def archive(members: dict[str, bytes]) -> str:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path = tmp_path / f"a{len(list(tmp_path.iterdir()))}.tar.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
        return str(path)

    manifest = b'{"format": 1, "container": {}}'
    cases = [
        (archive({"kamra-checkpoint.json": manifest, "../evil": b"x"}), "outside"),
        (archive({"kamra-checkpoint.json": manifest, "upper/../../evil": b"x"}), "outside"),
        (archive({"kamra-checkpoint.json": b'{"format": 99}'}), "not a kamra checkpoint"),
        (archive({"kamra-checkpoint.json": manifest}), "names no container"),
        (archive({"rootfs/bin/sh": b"x"}), "outside"),
        (str(tmp_path / "missing.tar.zst"), "not found"),
    ]
    for path, words in cases:
        result = cli.run("restore", "imported", "--import", path)
        assert result.returncode != 0, path
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert cli.json("list") == []
    assert not os.path.exists(os.path.join(cli.root, "containers", "imported"))
