"""Shared fixtures: a private data root per test, real containers, and leftover checks.

Every test gets its own temporary root (so its own keeper, kamrad, cgroups and
mounts); teardown stops and destroys whatever the test left running, then the
root is checked for leftovers (mounts, cgroups, processes) and the test fails if
anything is left. Nothing here mocks the kernel.

The whole session runs in a network namespace of its own (made in pytest_configure,
gone when pytest exits): containers are networked by default, and the routes,
forwarding and nftables rules that takes are never made in the machine's own
namespace, which has a real uplink. Only the Debian build goes back to the machine's
namespace, to reach the package mirror.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from kamra import scratch
from kamra.linux import fdpass, libc
from kamra.paths import Layout
from kamra.templates.fsutil import mounts_under

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


MACHINE_NETNS: int | None = None  # the machine's own network namespace, for the mirror
MACHINE_FORWARDING = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
_machine_forwarding: list[str] = []


def _read_all(paths: tuple[str, ...]) -> list[str]:
    values = []
    for path in paths:
        try:
            with open(path) as f:
                values.append(f.read().strip())
        except OSError:
            values.append("?")
    return values


def pytest_configure(config: pytest.Config) -> None:
    global MACHINE_NETNS
    config.addinivalue_line("markers", "slow: builds a Debian template (needs the mirror)")
    if os.geteuid() != 0:
        raise pytest.UsageError("kamra's tests create real containers: run them as root")
    if MACHINE_NETNS is None:
        _machine_forwarding[:] = _read_all(MACHINE_FORWARDING)
        MACHINE_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        libc.unshare(libc.CLONE_NEWNET)  # before any thread: every later one inherits it
        libc.interface_up("lo")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The machine's own namespace must come out as it went in: fail the run otherwise."""
    if MACHINE_NETNS is None:
        return
    after = in_machine_netns(_read_all, MACHINE_FORWARDING)
    if after != _machine_forwarding:
        print(f"\nthe machine's forwarding sysctls changed during the tests: "
              f"{_machine_forwarding} -> {after}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def in_machine_netns(func, *args):
    """Run ``func`` in a thread in the machine's network namespace (processes it starts
    are there too): only to download, never to route or filter."""
    import threading

    result: dict = {}

    def body() -> None:
        try:
            libc.setns(MACHINE_NETNS, libc.CLONE_NEWNET)
            result["value"] = func(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=body, name="machine-netns")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def unique(prefix: str = "c") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def run_exec(host, name: str, argv: list[str]) -> tuple[int, str]:
    """exec through the engine, stdout and stderr to a pipe: (exit code, output)."""
    read_end, write_end = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    session = host.exec_session(name, argv, fds=[devnull, write_end, write_end])
    os.close(write_end)
    os.close(devnull)
    code = None
    with session:
        while True:
            message, _ = fdpass.recv(session)
            if message is None:
                break
            if "exit" in message:
                code = message["exit"]
    output = b""
    while chunk := os.read(read_end, 65536):
        output += chunk
    os.close(read_end)
    return code, output.decode()


def cgroups_of(layout: Layout) -> list[str]:
    found = glob.glob(f"/sys/fs/cgroup/**/kamra-{layout.root_id}", recursive=True)
    return [path for path in found if os.path.isdir(path)]


def _pid_from(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def leftovers(layout: Layout) -> list[str]:
    problems = [f"mount {m}" for m in mounts_under(layout.root)]
    problems += [f"cgroup {c}" for c in cgroups_of(layout)]
    for what, path in (("keeper", layout.keeper_pid), ("kamrad", layout.daemon_pid),
                       ("lxcfs", os.path.join(layout.run, "lxcfs.pid"))):
        pid = _pid_from(path)
        if _alive(pid):
            problems.append(f"{what} pid {pid}")
    problems += [f"memory scratch {p}" for p in glob.glob(
        os.path.join(scratch.MEMORY, f"kamra-{layout.root_id}-*"))]
    return problems


def force_cleanup(layout: Layout) -> None:
    """Last resort after a failed test: end what this root started, by its recorded pids."""
    for path in (layout.daemon_pid, layout.keeper_pid, os.path.join(layout.run, "lxcfs.pid")):
        pid = _pid_from(path)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for cgroup in cgroups_of(layout):
        freezer = os.path.join(cgroup)
        for procs in glob.glob(os.path.join(freezer, "**", "cgroup.procs"), recursive=True):
            with open(procs) as f:
                for pid in f.read().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    time.sleep(0.2)
    for mount in sorted(mounts_under(layout.root), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    scratch.sweep(layout.root_id)
    for cgroup in cgroups_of(layout):
        for dirpath, _, _ in sorted(os.walk(cgroup), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


@pytest.fixture
def root():
    """A fresh data root; after the test it must hold no mounts, cgroups or processes."""
    path = tempfile.mkdtemp(prefix="kamra-test-")
    layout = Layout.at(path)
    yield path
    # Shown by pytest only when the test failed: what the daemons said.
    for log in ("kamrad.log", "keeper.log"):
        try:
            with open(os.path.join(layout.run, log), errors="replace") as f:
                print(f"--- {log} ---\n{f.read()[-4000:]}")
        except OSError:
            pass
    deadline = time.monotonic() + 3  # a removed cgroup can linger for a moment in listings
    while (problems := leftovers(layout)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if problems:
        force_cleanup(layout)
    shutil.rmtree(path, ignore_errors=True)
    assert not problems, f"test left behind: {problems}"


@pytest.fixture(scope="session")
def busybox_cache():
    """One busybox template built per session, copied (hard-linked) into each test root."""
    from kamra.templates.store import TemplateStore

    path = tempfile.mkdtemp(prefix="kamra-tcache-")
    store = TemplateStore(Layout.at(path))
    Layout.at(path).ensure()
    store.build("busybox")
    yield Layout.at(path).template_dir("busybox")
    shutil.rmtree(path, ignore_errors=True)


DEBIAN_ENABLED = os.environ.get("KAMRA_TEST_DEBIAN") == "1"
needs_debian = pytest.mark.skipif(not DEBIAN_ENABLED,
                                  reason="downloads Debian (a minute): set KAMRA_TEST_DEBIAN=1")


@pytest.fixture(scope="session")
def debian_build():
    """The Debian template, built once per session: (info, progress events, seconds, store)."""
    from kamra.templates.store import TemplateStore

    path = tempfile.mkdtemp(prefix="kamra-tdebian-")
    layout = Layout.at(path)
    layout.ensure()
    store = TemplateStore(layout)
    events: list[dict] = []
    began = time.monotonic()
    info = in_machine_netns(lambda: store.build("debian", progress=events.append))
    yield info, events, time.monotonic() - began, store
    shutil.rmtree(path, ignore_errors=True)


def start_container(cli, *config: str, plan: str | None = None, ip: str | None = None) -> str:
    """Create a busybox container with ``-c`` items (and a plan, an address) and start it."""
    name = unique()
    args = ["create", name, "--template", "busybox"]
    for item in config:
        args += ["-c", item]
    if plan:
        args += ["--plan", plan]
    if ip:
        args += ["--ip", ip]
    cli.run(*args, check=True)
    cli.run("start", name, check=True)
    return name


def install_template(root: str, cached: str, name: str = "busybox") -> None:
    """Copy a built template into a test root (hard links: templates are immutable)."""
    layout = Layout.at(root)
    layout.ensure()
    subprocess.run(["cp", "-al", cached, layout.template_dir(name)], check=True)


@pytest.fixture
def host(root, busybox_cache):
    """The engine on a private root with the busybox template installed."""
    from kamra.engine import Host

    install_template(root, busybox_cache)
    h = Host(root)
    yield h
    for record in h.store.list():
        try:
            h.destroy(record.name, force=True)
        except Exception as exc:  # noqa: BLE001
            print(f"teardown: destroy {record.name}: {exc}", file=sys.stderr)
    try:
        h.keeper.request({"op": "shutdown"})
    except Exception:  # noqa: BLE001
        pass
    h.keeper.wait_gone()
    h.cgroups.cleanup()
    h.close()


class Cli:
    """Runs the real kamra command line against a private root."""

    def __init__(self, root: str, netns: int | None = None, mntns: int | None = None):
        self.root = root
        self.env = dict(os.environ, KAMRA_ROOT=root, PYTHONPATH=SRC)
        # Run (and so autostart kamrad) in these network and mount namespaces.
        self.netns = netns
        self.mntns = mntns
        self.fds = tuple(fd for fd in (netns, mntns) if fd is not None)

    def _enter(self) -> None:
        if self.netns is not None:
            libc.setns(self.netns, libc.CLONE_NEWNET)
        if self.mntns is not None:
            libc.setns(self.mntns, libc.CLONE_NEWNS)

    def run(self, *args: str, input: str | bytes | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        # No input means an empty stdin: never pytest's own, which may be a terminal.
        result = subprocess.run([sys.executable, "-m", "kamra.cli.main", *args],
                                input="" if input is None else input, capture_output=True,
                                text=text, env=self.env, timeout=timeout,
                                preexec_fn=self._enter if self.fds else None,
                                pass_fds=self.fds)
        if check and result.returncode != 0:
            raise AssertionError(f"kamra {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr}")
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--format", "json", check=True).stdout)


@pytest.fixture
def cli(root, busybox_cache):
    install_template(root, busybox_cache)
    c = Cli(root)
    yield c
    cli_teardown(c, root)


def cli_teardown(c: Cli, root: str) -> None:
    """Destroy what a test left, stop its kamrad and wait for its keeper to go."""
    try:
        listing = json.loads(c.run("list", "--format", "json", timeout=30).stdout or "[]")
    except (ValueError, subprocess.TimeoutExpired):
        listing = []
    for container in listing:
        c.run("destroy", "--force", container["name"], timeout=60)
    c.run("daemon", "stop", timeout=60)
    layout = Layout.at(root)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(_pid_from(layout.keeper_pid)):
        time.sleep(0.05)
