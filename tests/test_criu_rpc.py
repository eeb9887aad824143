"""kamra's CRIU RPC: the protobuf codec on its own, then the driver against the real CRIU.

The dump tests checkpoint a small shell loop of our own (never a container), restore it
as our child (rst_sibling) and kill exactly the pids they started or restored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from kamra.checkpoint import rpc
from kamra.checkpoint.criu import Criu, CriuError, log_errors

LOOP = "i=0; while :; do i=$((i+1)); echo $i > {file}; sleep 0.05; done"


# -- codec ----------------------------------------------------------------------------


def test_round_trip_nested_and_repeated():
    opts = {
        "images_dir_fd": 7, "pid": 1234, "log_level": 4, "log_file": "dump.log",
        "leave_running": False, "shell_job": True, "cpu_cap": 0xFFFFFFFF,
        "ps": {"address": "10.0.0.1", "port": 27000, "fd": 9},
        "external": ["mnt[/x]:x", "net[4026531992]:host"],
        "inherit_fd": [{"key": "pipe:[1]", "fd": 3}, {"key": "tty[88:0]", "fd": 4}],
        "cg_root": [{"path": "/kamra/c1"}], "manage_cgroups_mode": rpc.CG_MODES["SOFT"],
        "network_lock": rpc.NETWORK_LOCK_METHODS["SKIP"], "unix_sk_ino": [{"inode": 1 << 31}],
    }
    request = {"type": rpc.REQ_TYPES["DUMP"], "opts": opts, "features": {"lazy_pages": True}}
    assert rpc.decode("criu_req", rpc.encode("criu_req", request)) == request


def test_negative_int32_is_ten_bytes_and_comes_back():
    data = rpc.encode("criu_opts", {"images_dir_fd": -1})
    assert data == b"\x08" + b"\xff" * 9 + b"\x01"
    assert rpc.decode("criu_opts", data) == {"images_dir_fd": -1}
    answer = rpc.encode("criu_resp", {"type": 2, "success": False, "cr_errno": -22})
    assert rpc.decode("criu_resp", answer)["cr_errno"] == -22


def test_images_dir_fd_is_always_sent():
    # It is `required` in rpc.proto: CRIU's unpacker rejects criu_opts without it.
    assert rpc.decode("criu_opts", rpc.encode("criu_opts", {})) == {"images_dir_fd": -1}


def test_byte_exact_encoding():
    request = {"type": rpc.REQ_TYPES["DUMP"],
               "opts": {"images_dir_fd": 5, "pid": 300, "log_file": "d.log",
                        "shell_job": True, "external": ["a", "bc"]}}
    opts = (b"\x08\x05"            # 1: images_dir_fd = 5
            b"\x10\xac\x02"        # 2: pid = 300 (varint 0xac 0x02)
            b"\x38\x01"            # 7: shell_job = true
            b"\x52\x05d.log"       # 10: log_file, length 5
            b"\xaa\x02\x01a"       # 37: external (key 37<<3|2 = 298 = 0xaa 0x02)
            b"\xaa\x02\x02bc")
    assert rpc.encode("criu_req", request) == b"\x08\x01\x12" + bytes([len(opts)]) + opts


def test_unknown_fields_are_skipped():
    known = rpc.encode("criu_resp", {"type": 10, "success": True,
                                     "version": {"major_number": 4, "minor_number": 2}})
    unknown = (b"\xf8\x06\x2a"          # 111: varint
               b"\xfa\x06\x03abc"       # 111: length-delimited
               b"\xfd\x06\x01\x02\x03\x04"  # 111: fixed32
               b"\xf9\x06" + bytes(8))  # 111: fixed64
    assert rpc.decode("criu_resp", unknown + known + unknown) == {
        "type": 10, "success": True, "version": {"major_number": 4, "minor_number": 2}}


def test_codec_rejects_mistakes():
    with pytest.raises(KeyError):
        rpc.encode("criu_opts", {"images_dir": "/x", "leave_runing": True})
    with pytest.raises(ValueError):
        rpc.encode("unix_sk", {"inode": -1})
    with pytest.raises(ValueError):
        rpc.decode("criu_resp", b"\x08")


def test_log_errors(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("(00.000100) Version: 4.2.1\n"
                   "(00.001000) Error (criu/a.c:1): first\n"
                   "(00.002000) Error (criu/b.c:2): second\n"
                   "(00.002500) Warn  (criu/b.c:3): not an error\n"
                   "(00.003000) Error (criu/c.c:3): third\n"
                   "(00.004000) Error (criu/d.c:4): fourth\n")
    assert log_errors(str(log)) == ["Error (criu/b.c:2): second", "Error (criu/c.c:3): third",
                                    "Error (criu/d.c:4): fourth"]
    assert log_errors(str(tmp_path / "missing.log")) == []


# -- the real CRIU ----------------------------------------------------------------------


def test_version():
    assert Criu().version() >= (4, 2, 0)


def test_features():
    features = Criu().features()
    assert "lazy_pages" in features
    assert set(features) <= {"mem_track", "lazy_pages", "pidfd_store"}


def _counter(path: str) -> int:
    for _ in range(100):  # the loop rewrites the file: it may be empty for a moment
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                return int(f.read())
        time.sleep(0.01)
    raise AssertionError(f"{path} holds no counter")


def _counting(path: str) -> None:
    """The loop writing ``path`` runs: its counter goes up."""
    first = _counter(path)
    deadline = time.monotonic() + 10
    while _counter(path) <= first + 2:
        assert time.monotonic() < deadline, f"the counter in {path} is stuck at {first}"
        time.sleep(0.05)


def _start_loop(path: str) -> subprocess.Popen[bytes]:
    # A session leader (CRIU dumps whole sessions only with shell_job) with stdio on
    # /dev/null, which CRIU reopens by path on restore.
    proc = subprocess.Popen(["sh", "-c", LOOP.format(file=path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=os.path.dirname(path))
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "the loop did not start"
            time.sleep(0.02)
        _counting(path)
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    return proc


def _kill_group(pid: int) -> None:
    """Kill the session we started (the shell and its sleep), by its own pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _wait_group_gone(pgid: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(pgid, 0)  # zombies count: a pid is free only once reaped
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {pgid} outlived the dump"
        time.sleep(0.01)


def _images(tmp_path) -> int:
    images = tmp_path / "images"
    images.mkdir()
    return os.open(images, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def test_dump_and_restore(tmp_path):
    counter = str(tmp_path / "counter")
    images_fd = _images(tmp_path)
    proc = _start_loop(counter)
    restored: int | None = None
    try:
        answer = Criu().run("DUMP", {
            "images_dir_fd": images_fd, "pid": proc.pid, "log_file": "dump.log",
            "log_level": 4, "shell_job": False, "leave_running": False,
        }, log_path=str(tmp_path / "images" / "dump.log"), timeout=60)
        assert answer["success"] and not answer.get("dump", {}).get("restored")
        # CRIU killed the tree after dumping it: our child is a zombie until we reap it.
        assert proc.wait(10) == -signal.SIGKILL
        # Restore needs every dumped pid free, the shell's too, which lives on as the
        # session and group id of its orphaned sleep until init has reaped that.
        _wait_group_gone(proc.pid)

        answer = Criu().run("RESTORE", {
            "images_dir_fd": images_fd, "log_file": "restore.log", "log_level": 4,
            "rst_sibling": True,
        }, log_path=str(tmp_path / "images" / "restore.log"), timeout=60)
        restored = answer["restore"]["pid"]
        assert restored == proc.pid  # CRIU restores the very pid it dumped
        _counting(counter)
        # rst_sibling made the restored shell our child, not the exited criu worker's.
        assert os.waitpid(restored, os.WNOHANG) == (0, 0)
    finally:
        _kill_group(proc.pid)
        if proc.returncode is None:
            proc.wait()
        elif restored is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(restored, 0)
        os.close(images_fd)


def test_notify_receives_script_names(tmp_path):
    counter = str(tmp_path / "counter")
    images_fd = _images(tmp_path)
    seen: list[tuple[str, int, list[int]]] = []
    proc = _start_loop(counter)
    try:
        Criu().run("DUMP", {"images_dir_fd": images_fd, "pid": proc.pid, "log_file": "dump.log",
                            "log_level": 4, "leave_running": True},
                   notify=lambda script, pid, fds: seen.append((script, pid, fds)),
                   log_path=str(tmp_path / "images" / "dump.log"), timeout=60)
        names = [script for script, _pid, _fds in seen]
        assert names.index("pre-dump") < names.index("post-dump")
        assert all(fds == [] for _script, _pid, fds in seen)
        _counting(counter)  # leave_running: the loop goes on after the dump
    finally:
        _kill_group(proc.pid)
        proc.wait()
        os.close(images_fd)


def test_failing_callback_fails_the_dump(tmp_path):
    images_fd = _images(tmp_path)
    counter = str(tmp_path / "counter")
    proc = _start_loop(counter)

    def refuse(script: str, pid: int, fds: list[int]) -> None:
        if script == "pre-dump":
            raise RuntimeError("not now")

    try:
        with pytest.raises(RuntimeError, match="not now") as caught:
            Criu().run("DUMP", {"images_dir_fd": images_fd, "pid": proc.pid,
                                "log_file": "dump.log", "leave_running": True},
                       notify=refuse, log_path=str(tmp_path / "images" / "dump.log"),
                       timeout=60)
        assert isinstance(caught.value.__cause__, CriuError)
        _counting(counter)  # the dump gave up: the loop was left alone
    finally:
        _kill_group(proc.pid)
        proc.wait()
        os.close(images_fd)


def test_failure_is_readable(tmp_path):
    images_fd = _images(tmp_path)
    log = str(tmp_path / "images" / "dump.log")
    try:
        with pytest.raises(CriuError) as caught:
            Criu().run("DUMP", {"images_dir_fd": images_fd, "pid": 2**22 + 1,
                                "log_file": "dump.log", "log_level": 4},
                       log_path=log, timeout=60)
    finally:
        os.close(images_fd)
    error = caught.value
    assert str(error).startswith("criu dump failed: ")
    assert "Error (" in str(error) and "(00." not in str(error)
    assert error.log_path == log
    with open(log) as f:
        assert f.read()  # the log the message came from is there for a closer look


def test_unknown_request_kind():
    with pytest.raises(ValueError):
        Criu().run("NOTIFY", {})
    with pytest.raises(ValueError):
        Criu().run("DUMPP", {})


def _group(pgid: int) -> list[int]:
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if os.getpgid(int(pid)) == pgid:
                members.append(int(pid))
    return members


def test_a_daemon_ends_with_what_it_forked(tmp_path):
    """CRIU killed while it probes the kernel leaves its ptrace'd probe child sleeping
    forever; end() takes the daemon's whole process group. Here the page server is
    ended 2-6 ms after it started, while it probes (a plain kill left the probe child
    behind in 3 of 35 such tries here), and nothing of its group is left."""
    import socket

    from kamra.checkpoint.criu import end
    from kamra.engine.checkpoint import criu_binary

    for delay in [0.002, 0.003, 0.004, 0.005, 0.006] * 3:
        ours, theirs = socket.socketpair()
        proc = Criu(criu_binary()).page_server(str(tmp_path), theirs.fileno())
        theirs.close()
        assert os.getpgid(proc.pid) == proc.pid  # a group of its own
        time.sleep(delay)
        end(proc)
        ours.close()
        assert proc.returncode is not None
        deadline = time.monotonic() + 5
        while _group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # (SIGKILL is delivered, the dead are reaped by init)
        assert _group(proc.pid) == []
