"""Pure logic: names, signals, framing, wire format, cgroup detection, revert."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from kamra.cgroups.base import detect_mode, own_cgroups
from kamra.cgroups.v1 import CgroupV1
from kamra.cgroups.v2 import CgroupV2
from kamra.engine.host import describe_exit
from kamra.engine.revert import Revert
from kamra.errors import InvalidInput, KernelError, NotFound, from_json
from kamra.linux import fdpass
from kamra.names import check_hostname, check_name
from kamra.runtime import console
from kamra.signals import parse_signal, signal_name


@pytest.mark.parametrize("good", ["a", "web1", "a-b", "0", "x" * 63])
def test_good_names(good):
    assert check_name(good) == good


@pytest.mark.parametrize("bad", ["", "A", "a b", "../x", "a/b", "-a", "x" * 64, "a.b", "é"])
def test_bad_names(bad):
    with pytest.raises(InvalidInput):
        check_name(bad)


def test_hostnames():
    assert check_hostname("web.example") == "web.example"
    with pytest.raises(InvalidInput):
        check_hostname("bad_name")


def test_signals():
    assert parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal("term") == signal.SIGTERM
    assert parse_signal("SIGRTMIN+3") == signal.SIGRTMIN + 3
    assert parse_signal("9") == 9
    assert signal_name(signal.SIGRTMIN + 3) == "SIGRTMIN+3"
    with pytest.raises(InvalidInput):
        parse_signal("SIGNOPE")


def test_describe_exit():
    assert describe_exit(3 << 8)["code"] == 3
    assert describe_exit(signal.SIGHUP)["reason"] == "reboot"
    assert describe_exit(signal.SIGINT)["reason"] == "poweroff"
    assert describe_exit(signal.SIGKILL, stopping=True)["reason"] == "stopped"
    assert describe_exit(signal.SIGKILL)["code"] == 137


def test_console_frames_roundtrip():
    data = console.frame_data(b"x" * 70000) + console.frame_winsize(40, 120)
    buffer = bytearray(data[:10])
    assert console.parse_frames(buffer) == []
    buffer += data[10:]
    frames = console.parse_frames(buffer)
    assert b"".join(p for k, p in frames if k == console.DATA) == b"x" * 70000
    assert console.parse_winsize(frames[-1][1]) == (40, 120)
    assert buffer == bytearray()


def test_fdpass_carries_descriptors():
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    with left, right:
        fdpass.send(left, {"hello": [1, 2]}, [write_end])
        message, fds = fdpass.recv(right)
        assert message == {"hello": [1, 2]}
        os.write(fds[0], b"through")
        assert os.read(read_end, 10) == b"through"
        for fd in (read_end, write_end, *fds):
            os.close(fd)
        left.shutdown(socket.SHUT_WR)
        assert fdpass.recv(right) == (None, [])


def test_errors_roundtrip():
    err = from_json(NotFound("x").to_json())
    assert isinstance(err, NotFound) and err.message == "x"
    kernel = from_json(KernelError("mount", 1).to_json())
    assert isinstance(kernel, KernelError) and kernel.errno == 1


def test_revert_undoes_in_reverse_on_failure():
    done: list[str] = []
    with pytest.raises(RuntimeError), Revert() as revert:
        revert.add("a", done.append, "a")
        revert.add("b", done.append, "b")
        raise RuntimeError("step failed")
    assert done == ["b", "a"]
    with Revert() as revert:
        revert.add("c", done.append, "c")
        revert.success()
    assert done == ["b", "a"]


HYBRID = """\
30 23 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
31 30 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
34 30 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""
UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_mode_detection_and_paths(tmp_path):
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(HYBRID)
    unified = tmp_path / "unified"
    unified.write_text(UNIFIED)
    assert detect_mode(str(hybrid)) == "hybrid"
    assert detect_mode(str(unified)) == "v2"
    own = tmp_path / "cgroup"
    own.write_text("4:memory:/supervisor/me\n3:freezer:/\n2:cpu:/\n0::/user.slice/x\n")
    assert own_cgroups(str(own))["memory"] == "/supervisor/me"
    v1 = CgroupV1.from_host("abcd", str(hybrid), str(own))
    # Beneath our own cgroup in every hierarchy, with the root's id in the path.
    assert v1.bases["memory"] == "/sys/fs/cgroup/memory/supervisor/me/kamra-abcd"
    assert v1.bases["freezer"] == "/sys/fs/cgroup/freezer/kamra-abcd"
    assert v1.procs_files("c1")[0].endswith("kamra-abcd/c1/payload/cgroup.procs")
    v2 = CgroupV2.from_host("abcd", str(unified), str(own))
    assert v2.base == "/sys/fs/cgroup/user.slice/x/kamra-abcd"


@pytest.mark.parametrize("script, doc", [("gen_cli_docs", "cli.md"),
                                         ("gen_config_docs", "config.md")])
def test_generated_reference_is_current(script, doc):
    """docs/cli.md and docs/config.md are generated from the parser and the key registry:
    regenerate them when the CLI, the keys or the plans change."""
    import importlib.util

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        script, os.path.join(here, "scripts", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(here, "docs", doc)) as f:
        assert f.read() == module.render(), f"run scripts/{script}.py > docs/{doc}"
