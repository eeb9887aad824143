"""Two kamra hosts on one machine: remotes over TLS with tokens, and migrations between them.

Each host is a kamrad with its own data root in its own network namespace and its own
mount namespace, where the other host's root is hidden under an empty tmpfs; they share
nothing but a bridge ("the LAN") with a third namespace, the client. Every byte that
moves between the hosts crosses TCP. Containers are routed with the uplink on the LAN
(proxy ARP), without NAT, so the client reaches a container's own address on whichever
host runs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import pytest
from conftest import (
    Cli,
    cli_teardown,
    force_cleanup,
    install_template,
    leftovers,
    needs_debian,
    unique,
)
from test_checkpoint import connect_when_listening, start_nested_pid_namespace
from test_network import _add_veth, ns_run

from kamra.network import netns
from kamra.paths import Layout

A_ADDR, B_ADDR, CLIENT = "198.51.100.1", "198.51.100.2", "198.51.100.9"
STREAM = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done | nc -l -p 5000"


class Hosts:
    def __init__(self, busybox_cache: str, target_run_size: str | None = None):
        """``target_run_size``: B's run directory (where migrations arrive) is a tmpfs
        of that size, to fill up."""
        self.fds: list[int] = []
        self.small_run: str | None = None
        self.lan = self._ns()
        self.a, self.b, self.client = self._ns(), self._ns(), self._ns()
        ns_run(self.lan, ["ip", "link", "add", "br0", "type", "bridge"])
        ns_run(self.lan, ["ip", "link", "set", "br0", "up"])
        for fd, inside, outside, address in ((self.a, "up0", "pa", A_ADDR),
                                             (self.b, "up0", "pb", B_ADDR),
                                             (self.client, "c0", "pc", CLIENT)):
            netns.run_in_netns(self.lan, _add_veth, outside, inside, fd)
            ns_run(self.lan, ["ip", "link", "set", outside, "master", "br0", "up"])
            ns_run(fd, ["ip", "addr", "add", f"{address}/24", "dev", inside])
            ns_run(fd, ["ip", "link", "set", inside, "up"])
        ns_run(self.client, ["ip", "route", "add", "10.73.0.0/16", "dev", "c0"])
        self.roots = [tempfile.mkdtemp(prefix="kamra-test-") for _ in range(2)]
        for root in self.roots:
            install_template(root, busybox_cache)
            with open(os.path.join(root, "network.toml"), "w") as f:
                f.write('[network]\nuplink = "up0"\n')
        if target_run_size:  # before the mount namespaces, which copy it
            self.small_run = Layout.at(self.roots[1]).run
            os.makedirs(self.small_run, 0o700, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={target_run_size},mode=0700",
                            "kamra-test-run", self.small_run], check=True)
        self.mnt_a = self._mount_ns(hide=self.roots[1])
        self.mnt_b = self._mount_ns(hide=self.roots[0])
        self.cli_a = Cli(self.roots[0], netns=self.a, mntns=self.mnt_a)
        self.cli_b = Cli(self.roots[1], netns=self.b, mntns=self.mnt_b)

    def _mount_ns(self, hide: str) -> int:
        """A mount namespace (private propagation) where ``hide`` is an empty tmpfs."""
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size=1m kamra-hidden {hide} && echo ready && exec sleep 600"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
            fd = os.open(f"/proc/{holder.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            holder.kill()
            holder.wait()
        self.fds.append(fd)
        return fd

    def _ns(self) -> int:
        fd = netns.new_netns()
        self.fds.append(fd)
        ns_run(fd, ["ip", "link", "set", "lo", "up"])
        return fd

    def pair(self) -> None:
        """Each host listens for the other and knows it as a remote."""
        for cli, other, address, remote in ((self.cli_b, self.cli_a, B_ADDR, "b"),
                                            (self.cli_a, self.cli_b, A_ADDR, "a")):
            cli.run("remote", "listen", address, check=True)
            token = cli.run("remote", "token", check=True).stdout.strip()
            other.run("remote", "add", remote, address, "--token", token, check=True)

    def close(self) -> None:
        problems = []
        for cli, root in ((self.cli_a, self.roots[0]), (self.cli_b, self.roots[1])):
            cli_teardown(cli, root)
            layout = Layout.at(root)

            def found_here(layout: Layout = layout) -> list[str]:
                return [f for f in leftovers(layout) if f != f"mount {self.small_run}"]

            deadline = time.monotonic() + 3
            while (found := found_here()) and time.monotonic() < deadline:
                time.sleep(0.1)
            if found:
                force_cleanup(layout)
            problems += found
            shutil.rmtree(root, ignore_errors=True)
        if self.small_run:
            subprocess.run(["umount", "-l", self.small_run], check=False)
            shutil.rmtree(self.roots[1], ignore_errors=True)
        for fd in self.fds:
            os.close(fd)
        assert not problems, f"test left behind: {problems}"


@pytest.fixture
def hosts(busybox_cache):
    h = Hosts(busybox_cache)
    yield h
    h.close()


def streaming_container(cli: Cli, client_ns: int):
    """A routed container without NAT sending the sequence; (name, address, reader),
    the reader connected from the client namespace and reading."""
    name = unique()
    cli.run("create", name, "--template", "busybox", "-c", "net.nat=false", check=True)
    cli.run("start", name, check=True)
    cli.run("exec", name, "--", "sh", "-c",
            f"setsid sh -c '{STREAM}' </dev/null >/dev/null 2>&1 &", check=True)
    address = cli.json("status", name)["addresses"][0]
    stream = connect_when_listening(address, client_ns)
    stream.start()
    return name, address, stream


def test_remotes_pin_certificates_and_need_tokens(hosts):
    a, b = hosts.cli_a, hosts.cli_b
    b.run("remote", "listen", B_ADDR, check=True)
    wrong = a.run("remote", "add", "b", B_ADDR, "--token", "not-a-token")
    assert wrong.returncode != 0 and "token" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    token = b.run("remote", "token", check=True).stdout.strip()
    added = a.run("remote", "add", "b", f"{B_ADDR}:8443", "--token", token, check=True)
    listing = a.json("remote", "list")
    assert [r["name"] for r in listing["remotes"]] == ["b"]
    assert listing["remotes"][0]["fingerprint"] in added.stdout
    assert token not in str(listing)  # the token is a secret: never listed
    again = a.run("remote", "add", "b", B_ADDR, "--token", token)
    assert again.returncode != 0 and "exists" in again.stderr
    # B gets a new certificate (a reinstalled host): A refuses to talk to it.
    shutil.rmtree(os.path.join(hosts.roots[1], "remote", "tls"))
    b.run("remote", "listen", B_ADDR, check=True)
    name = unique()
    a.run("create", name, "--template", "busybox", check=True)
    refused = a.run("migrate", name, "b")
    assert refused.returncode != 0 and "pinned" in refused.stderr, refused.stderr
    lazy = a.run("migrate", name, "b", "--lazy", "--mode", "restart")
    assert lazy.returncode != 0 and "needs live migration" in lazy.stderr, lazy.stderr
    assert len(lazy.stderr.strip().splitlines()) == 1
    assert a.json("status", name)["state"] == "stopped"
    a.run("remote", "remove", "b", check=True)
    assert a.json("remote", "list")["remotes"] == []
    # Each kamrad sees its own root and an empty directory where the other's lies.
    for root, other in (hosts.roots, hosts.roots[::-1]):
        with open(Layout.at(root).daemon_pid) as f:
            pid = int(f.read().split()[0])
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert os.listdir(f"/proc/{pid}/root{other}") == []
        assert "templates" in os.listdir(f"/proc/{pid}/root{root}")


def test_live_migration_there_and_back_keeps_the_tcp_stream(hosts):
    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b
    name, address, stream = streaming_container(a, hosts.client)
    try:
        a.run("exec", name, "--", "sh", "-c", "echo moved > /root/note", check=True)
        stream.more()
        gap_before = stream.longest_gap_ms()
        there = a.json("migrate", name, "b")
        assert there["mode"] == "live" and there["reason"] is None, there
        assert there["rounds"] and there["pages_bytes"] > 0, there
        assert b.run("exec", name, "--", "cat", "/root/note", check=True).stdout == "moved\n"
        # A confirmed the end, so B stops showing where it came from.
        deadline = time.monotonic() + 10
        while b.json("status", name)["migrating_from"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.json("status", name)["migrating_from"] is None
        assert a.run("status", name).returncode != 0  # gone from A
        assert b.json("status", name)["state"] == "running"
        assert b.json("status", name)["addresses"] == [address]
        stream.more()
        back = b.json("migrate", name, "a")
        assert back["mode"] == "live", back
        assert a.json("status", name)["state"] == "running"
        stream.more()
        stream.check()
        for root in hosts.roots:  # what the targets logged of the imports
            with open(os.path.join(root, "run", "kamrad.log")) as f:
                print("".join(line for line in f if "received" in line or "restored " in line),
                      end="")
        print(f"phases there {there['phases_ms']}, back {back['phases_ms']}")
        print(f"kamra's downtime there {there['downtime_ms']} ms, back "
              f"{back['downtime_ms']} ms; the client's longest gap "
              f"{stream.longest_gap_ms():.0f} ms (before migrating: {gap_before:.0f} ms)")
        # The proxy ARP entry moved with the container: only A answers for it now.
        assert address in ns_run(hosts.a, ["ip", "neigh", "show", "proxy"]).stdout
        assert address not in ns_run(hosts.b, ["ip", "neigh", "show", "proxy"]).stdout
    finally:
        stream.close()


def test_auto_mode_falls_back_to_restart_with_the_reason(hosts):
    """CRIU cannot dump a nested pid namespace: auto moves the container stopped and
    started, and says why; --mode live refuses and leaves it running."""
    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b
    name = unique()
    a.run("create", name, "--template", "busybox", check=True)
    a.run("start", name, check=True)
    a.run("exec", name, "--", "sh", "-c", "echo kept > /root/file", check=True)
    start_nested_pid_namespace(a, name)
    live = a.run("migrate", name, "b", "--mode", "live")
    assert live.returncode != 0 and "nested pid namespace" in live.stderr, live.stderr
    assert a.json("status", name)["state"] == "running"
    assert b.json("list") == []  # nothing left behind on the target
    moved = a.run("migrate", name, "b")
    assert moved.returncode == 0, moved.stderr
    assert "restart mode" in moved.stdout and "nested pid namespace" in moved.stdout
    assert b.json("status", name)["state"] == "running"
    assert b.run("exec", name, "--", "cat", "/root/file", check=True).stdout == "kept\n"
    assert a.json("list") == []


def test_a_refusing_target_leaves_it_running_and_a_missing_template_is_sent(hosts):
    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b
    name = unique()
    a.run("create", name, "--template", "busybox", check=True)
    a.run("start", name, check=True)
    pid = a.json("status", name)["init_pid"]
    b.run("create", name, "--template", "busybox", check=True)  # the name is taken there
    refused = a.run("migrate", name, "b")
    assert refused.returncode != 0 and "exists" in refused.stderr
    assert a.json("status", name)["init_pid"] == pid
    b.run("destroy", name, check=True)
    # Limits B cannot give (more RAM than it has) are refused before anything moves.
    greedy = unique()
    a.run("create", greedy, "--template", "busybox", "-c", "limits.memory=64T", check=True)
    too_big = a.run("migrate", greedy, "b")
    assert too_big.returncode != 0 and "cannot give limits.memory" in too_big.stderr, \
        too_big.stderr
    assert a.json("status", greedy)["state"] == "stopped" and b.json("list") == []
    # B lacks the template: it is sent along, and B verifies its digest.
    digest = a.json("template", "show", "busybox")["digest"]
    b.run("template", "remove", "busybox", check=True)
    moved = a.run("migrate", name, "b")
    assert moved.returncode == 0, moved.stderr
    assert b.json("template", "show", "busybox")["digest"] == digest
    assert b.json("status", name)["state"] == "running"


class FakeTarget(threading.Thread):
    """A "target" on host B's address that speaks the protocol, with a real CRIU page
    server behind the page stream, and hangs up at a chosen point (``cut``):

      hello    on the first message (the token)
      check    on the first request
      files    at the first round of files (the container still runs)
      pages    right after accepting the page stream (CRIU's dump loses its server)
      chunk    after the first chunk of the container's archive
      restore  when asked to restore (the source's tasks are still frozen)
      resume   after saying "restored" and reading the source's commit
      partition  when asked to restore, B's link to the LAN goes down and the fake
               says nothing more, its connections left open (a network partition)
      lazy     (with --lazy) when asked to restore, after the source committed: the
               page connection and this one close
      giveback (with --lazy) when asked to restore, it answers that the restore failed
               and nothing of the container is left here, and closes the page connection
    """

    def __init__(self, hosts: Hosts, cut: str):
        from kamra.remote import tls

        super().__init__(daemon=True)
        self.dir = tempfile.mkdtemp(prefix="kamra-fake-")
        cert, key = tls.ensure_certificate(self.dir)
        self.context = tls.server_context(cert, key)
        self.cut = cut
        self.hosts = hosts
        self.healed = threading.Event()
        self.lazy_pages = None
        self.seen: list[str] = []
        self.threads: list[threading.Thread] = []

        def listen() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((B_ADDR, 8443))
            sock.listen(4)
            return sock

        self.listener = netns.run_in_netns(hosts.b, listen)
        self.start()

    def run(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._connection, args=(raw,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _connection(self, raw: socket.socket) -> None:
        from kamra.remote import wire

        with self.context.wrap_socket(raw, server_side=True) as sock:
            try:
                while True:
                    message, _ = wire.recv(sock)
                    op = message.get("op", "?")
                    self.seen.append(op)
                    if op == "pages" and message.get("lazy"):
                        wire.send(sock, {"ok": True})
                        self.lazy_pages = sock  # held open until the cut
                        self.healed.wait(120)
                        return
                    if op == "pages":
                        wire.send(sock, {"ok": True})
                        if self.cut != "pages":
                            self._page_server(sock)
                        return
                    if op == "restore" and message.get("lazy") and self.cut == "lazy":
                        self.lazy_pages.close()  # the page stream breaks after the commit
                        return
                    if op == "restore" and message.get("lazy") and self.cut == "giveback":
                        wire.send(sock, {"error": "CRIU could not restore it (fake)",
                                         "dropped": True})
                        self.lazy_pages.close()  # as the failed restore's daemon ends
                        continue
                    if op == self.cut:
                        return  # the cut: the connection drops here
                    if op == "restore" and self.cut == "partition":
                        ns_run(self.hosts.lan, ["ip", "link", "set", "pb", "down"])
                        self.healed.wait(120)
                        return
                    if op in ("hello", "check", "end"):
                        wire.send(sock, {"ok": True})
                    elif op == "restore":
                        wire.send(sock, {"restored": True})
                    elif op == "has":
                        wire.send(sock, {"state": None})  # it never got the container
                    elif op == "pages-failed":  # it knows nothing of its page server
                        wire.send(sock, {"error": "unknown request 'pages-failed'"})
                    elif op == "pages-resume":  # nor of the stream it cut
                        wire.send(sock, {"error": "no page stream of that migration"})
            except (OSError, wire.WireError):
                pass

    def _page_server(self, sock) -> None:
        from kamra.checkpoint.criu import Criu
        from kamra.engine.checkpoint import criu_binary
        from kamra.remote.relay import relay

        local, theirs = socket.socketpair()
        with local:
            proc = Criu(criu_binary()).page_server(self.dir, theirs.fileno())
            theirs.close()
            relay(sock, local)
        proc.wait()

    def close(self) -> None:
        if self.cut == "partition":
            ns_run(self.hosts.lan, ["ip", "link", "set", "pb", "up"])
        self.healed.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("cut", ["hello", "check", "files", "pages", "chunk", "restore",
                                 "partition"])
def test_a_cut_before_the_commit_resumes_the_container_here(hosts, cut):
    """The target goes away before the source committed (its tasks frozen): CRIU
    resumes them on the source, which says what happened in one line, and the client's
    connection goes on."""
    from kamra.remote import tls

    fake = FakeTarget(hosts, cut)
    try:
        a = hosts.cli_a
        fake.cut = "never"  # adding the remote says hello
        a.run("remote", "add", "b", B_ADDR, "--token", "any", check=True)  # fake accepts
        fake.cut = cut
        pinned = a.json("remote", "list")["remotes"][0]["fingerprint"]
        assert pinned == tls.fingerprint_of_file(os.path.join(fake.dir, "server.crt"))
        name, _, stream = streaming_container(a, hosts.client)
        try:
            stream.more()
            pid = a.json("status", name)["init_pid"]
            moved = a.run("migrate", name, "b")
            assert moved.returncode != 0, moved.stdout
            assert "Traceback" not in moved.stderr, moved.stderr
            assert "internal error" not in moved.stderr, moved.stderr
            assert len(moved.stderr.strip().splitlines()) == 1, moved.stderr
            assert cut in fake.seen or cut == "partition", fake.seen  # where it was meant to
            if cut == "partition":  # TCP keepalive ended the silent connection
                assert "restore" in fake.seen, fake.seen
                assert "went away during 'restore'" in moved.stderr, moved.stderr
            if cut == "pages":  # the memory had nowhere to go: no fallback to restart
                assert "could not reach" in moved.stderr, moved.stderr
            status = a.json("status", name)
            assert status["state"] == "running" and status["init_pid"] == pid
            stream.more()  # the network was unlocked, the same connection goes on
            stream.check()
        finally:
            stream.close()
    finally:
        fake.close()


def kept_file_container_for_the_fake(a: Cli) -> str:
    """The fake target added as remote b, and a running container with /root/file."""
    a.run("remote", "add", "b", B_ADDR, "--token", "any", check=True)
    name = unique()
    a.run("create", name, "--template", "busybox", check=True)
    a.run("start", name, check=True)
    a.run("exec", name, "--", "sh", "-c", "echo kept > /root/file", check=True)
    return name


@pytest.mark.parametrize("settle", ["ask", "restart"])
def test_a_lost_answer_after_the_commit_leaves_it_migrating_until_settled(hosts, settle):
    """The target hangs up after reading the commit: the source's tasks are gone (the
    target owns the container), the source shows it ``migrating`` and says so. Asking
    again, or kamrad on its own when it starts, settles it with whatever the target says
    (this fake has nothing: the container comes back stopped here, its files intact)."""
    fake = FakeTarget(hosts, "resume")
    try:
        a = hosts.cli_a
        name = kept_file_container_for_the_fake(a)
        pid = a.json("status", name)["init_pid"]
        lost = a.run("migrate", name, "b")
        assert lost.returncode != 0 and "migrating" in lost.stderr, lost.stderr
        assert len(lost.stderr.strip().splitlines()) == 1, lost.stderr
        assert a.json("status", name)["state"] == "migrating"
        assert a.json("status", name)["migrating_to"] == "b"
        assert "settles it" in a.run("status", name, check=True).stdout
        assert not os.path.exists(f"/proc/{pid}")
        refused = a.run("start", name)
        assert refused.returncode != 0 and "migrating" in refused.stderr
        if settle == "ask":
            settled = a.run("migrate", name, "b")
            assert settled.returncode == 0, settled.stderr
            assert "stopped here" in settled.stdout, settled.stdout
        else:
            a.run("daemon", "stop", check=True)
            deadline = time.monotonic() + 20
            while a.json("status", name)["state"] == "migrating" and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
        assert a.json("status", name)["state"] == "stopped"
        a.run("start", name, check=True)
        assert a.run("exec", name, "--", "cat", "/root/file", check=True).stdout == "kept\n"
    finally:
        fake.close()


class FakeSource:
    """The test speaking the protocol to a real target B, as a source would."""

    def __init__(self, hosts: Hosts):
        self.hosts = hosts
        b = hosts.cli_b
        b.run("remote", "listen", B_ADDR, check=True)
        self.token = b.run("remote", "token", check=True).stdout.strip()
        self.trip = os.urandom(8).hex()
        self.opened: list = []
        self.run = os.path.join(hosts.roots[1], "run")

    def connect(self):
        from kamra.remote import tls, wire

        def connect():
            sock, _ = tls.connect((B_ADDR, 8443), None)
            wire.send(sock, {"op": "hello", "token": self.token})
            assert "ok" in wire.recv(sock)[0]
            return sock

        sock = netns.run_in_netns(self.hosts.client, connect)
        self.opened.append(sock)
        return sock

    @staticmethod
    def ask(sock, request: dict) -> dict:
        from kamra.remote import wire

        wire.send(sock, request)
        return wire.recv(sock)[0]

    @staticmethod
    def upload(sock, request: dict, write) -> None:
        from kamra.remote import wire

        wire.send(sock, request)
        sender = wire.FileSender(sock)
        write(sender)
        sender.close()
        reply, _ = wire.recv(sock)
        assert reply.get("ok"), reply

    def page_servers(self) -> list[str]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f"incoming-pages-{self.trip}".encode() in f.read():
                        found.append(pid)
            except OSError:
                pass
        return found

    def staged(self) -> list[str]:
        return [e for e in os.listdir(self.run) if e.startswith("incoming-")]

    def hang_up(self) -> None:
        for sock in self.opened:
            sock.close()
        self.opened.clear()

    def target_is_clean(self) -> None:
        """Wait for B to drop what arrived, then check nothing is left."""
        b = self.hosts.cli_b
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (
                self.page_servers() or b.json("list") or self.staged()):
            time.sleep(0.1)
        left = (self.page_servers(), b.json("list"), self.staged())
        assert left == ([], [], []), f"left on B (page servers, containers, staged): {left}"


def test_a_lazy_page_stream_cut_while_it_runs_there_pauses_and_goes_on(hosts):
    """B runs the container while 512 MB of its memory still comes; then B's kamra port
    resets every connection for 2 s. The page stream breaks, A connects again until it
    can, both sides resend what the other lacked, and the memory arrives: the holder
    and the client's stream go on."""
    import json

    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b
    name, _, stream = streaming_container(a, hosts.client)
    cut = "kamra-test-cut"
    try:
        hold_memory(a, name, 512)
        stream.more()
        result: dict = {}
        mover = threading.Thread(target=lambda: result.update(
            moved=a.run("migrate", name, "b", "--lazy", "--format", "json", timeout=240)))
        mover.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and mover.is_alive():
            status = b.run("status", name, "--format", "json")
            if status.returncode == 0 and json.loads(status.stdout)["running"]:
                break
            time.sleep(0.02)
        ns_run(hosts.b, ["nft", "add", "table", "inet", cut])
        try:
            ns_run(hosts.b, ["nft", "add", "chain", "inet", cut, "input",
                             "{ type filter hook input priority 0 ; }"])
            ns_run(hosts.b, ["nft", "add", "rule", "inet", cut, "input", "tcp", "dport",
                             "8443", "reject", "with", "tcp", "reset"])
            time.sleep(2)
        finally:
            ns_run(hosts.b, ["nft", "delete", "table", "inet", cut])
        mover.join(240)
        moved = result["moved"]
        assert moved.returncode == 0, moved.stderr
        data = json.loads(moved.stdout)
        assert data["lazy"] and data["page_stream_cuts"] >= 1, data
        assert data["pages_bytes"] >= 512 << 20, data
        print(f"lazy with a cut: downtime {data['downtime_ms']} ms, memory all there after "
              f"{data['pages_ms']} ms, {data['page_stream_cuts']} cut(s)")
        assert b.run("exec", name, "--", "pidof", "dd").returncode == 0
        stream.more()
        stream.check()
    finally:
        ns_run(hosts.b, ["nft", "delete", "table", "inet", cut], check=False)
        stream.close()


def test_a_lazy_page_stream_cut_after_the_commit_leaves_it_migrating(hosts):
    """--lazy commits before the target restores: when the page stream then breaks,
    CRIU resumes the source's tasks, and kamra ends them (the target may run them). The
    container stays 'migrating' until settled; this fake never had it, so it comes back
    stopped here with its files."""
    fake = FakeTarget(hosts, "lazy")
    try:
        a = hosts.cli_a
        name = kept_file_container_for_the_fake(a)
        hold_memory(a, name, 16)
        pid = a.json("status", name)["init_pid"]
        lost = a.run("migrate", name, "b", "--lazy")
        assert lost.returncode != 0, lost.stdout
        assert "after the commit" in lost.stderr and "migrating" in lost.stderr, lost.stderr
        assert len(lost.stderr.strip().splitlines()) == 1, lost.stderr
        assert "restore" in fake.seen, fake.seen
        assert a.json("status", name)["state"] == "migrating"
        assert not os.path.exists(f"/proc/{pid}")
        settled = a.run("migrate", name, "b")
        assert settled.returncode == 0 and "stopped here" in settled.stdout, settled.stderr
        a.run("start", name, check=True)
        assert a.run("exec", name, "--", "cat", "/root/file", check=True).stdout == "kept\n"
    finally:
        fake.close()


def test_a_lazy_restore_that_fails_there_gives_the_container_back(hosts):
    """--lazy commits before the target restores; a target whose restore fails and that
    holds nothing of the container says so, and the source takes it back: CRIU resumed
    its tasks (their pages no longer asked for), kamra unlocks their network, and the
    client's connection goes on with no number lost or repeated."""
    fake = FakeTarget(hosts, "giveback")
    try:
        a = hosts.cli_a
        a.run("remote", "add", "b", B_ADDR, "--token", "any", check=True)
        name, _, stream = streaming_container(a, hosts.client)
        try:
            hold_memory(a, name, 16)
            stream.more()
            pid = a.json("status", name)["init_pid"]
            back = a.run("migrate", name, "b", "--lazy")
            assert back.returncode != 0, back.stdout
            assert "could not restore" in back.stderr and "runs here again" in back.stderr, \
                back.stderr
            assert len(back.stderr.strip().splitlines()) == 1, back.stderr
            assert "restore" in fake.seen, fake.seen
            status = a.json("status", name)
            assert status["state"] == "running" and status["init_pid"] == pid, status
            stream.more()  # the same connection goes on
            stream.check()
            a.run("exec", name, "--", "true", check=True)
        finally:
            stream.close()
    finally:
        fake.close()


@pytest.mark.parametrize("cut", ["files", "pages", "send", "lazy-send"])
def test_the_target_cleans_up_when_the_source_goes_away(hosts, cut):
    """A source (here: the test, speaking the protocol) hangs up after a round of files,
    after opening the page stream, after the whole archive, or (lazy) after the images
    and the archive: the target removes what it received (a lazy arrival's images in
    memory too), its page server or lazy-pages daemon ends, and no container is left."""
    from kamra import scratch
    from kamra.checkpoint import archive
    from kamra.remote import wire

    b = hosts.cli_b
    source = FakeSource(hosts)
    name, trip = unique(), source.trip
    manifest = {"container": {"name": name, "template": "busybox", "hostname": name,
                              "template_digest": b.json("template", "show",
                                                        "busybox")["digest"],
                              "storage": "overlay", "created_at": time.time(), "init": [],
                              "stop_signal": "SIGTERM", "console": True, "plan": None,
                              "config": {}},
                "addresses": [], "forwards": [], "checkpoint": None}
    upper = tempfile.mkdtemp(prefix="kamra-upper-")
    with open(os.path.join(upper, "file"), "w") as f:
        f.write("sent\n")
    try:
        sock = source.connect()
        assert source.ask(sock, {"op": "check", "name": name, "trip": trip,
                                 "manifest": manifest}).get("ok")
        if cut == "files":
            source.upload(sock, {"op": "files", "trip": trip, "round": 1},
                          lambda out: archive.stream_files(out, upper, None))
            assert os.path.isfile(os.path.join(source.run, f"incoming-files-{trip}",
                                               "upper", "file"))
        elif cut == "pages":
            pages = source.connect()
            assert source.ask(pages, {"op": "pages", "name": name, "trip": trip}).get("ok")
            assert source.page_servers()
            assert os.path.isdir(os.path.join(source.run, f"incoming-pages-{trip}"))
        elif cut == "lazy-send":
            pages = source.connect()
            assert source.ask(pages, {"op": "pages", "name": name, "trip": trip,
                                      "lazy": True}).get("ok")
            with open(os.path.join(upper, "core-1.img"), "wb") as f:  # CRIU's, as it were
                f.write(os.urandom(5000))
            wire.send(sock, {"op": "send", "name": name, "pages": None, "files": None,
                             "images": True})
            wire.send_files(sock, upper, ["core-1.img"])
            sender = wire.FileSender(sock)
            archive.stream(sender, manifest, None, upper)
            sender.close()
            assert wire.recv(sock)[0].get("ok")
            checkpoint = os.path.join(Layout.at(hosts.roots[1]).container_dir(name),
                                      "checkpoint")
            images = os.readlink(checkpoint)  # in memory, until spent
            assert os.path.dirname(images) == scratch.MEMORY
            # The daemon started on them (it logs there; on these make-believe images it
            # may give up at once, which is no matter here).
            deadline = time.monotonic() + 5
            while "lazy-pages.log" not in os.listdir(images) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "lazy-pages.log" in os.listdir(images), os.listdir(images)
        else:
            source.upload(sock, {"op": "send", "name": name, "pages": None, "files": None},
                          lambda out: archive.stream(out, manifest, None, upper))
            status = b.json("status", name)  # received, not resumed: not B's yet
            assert status["state"] == "migrating" and status["running"] is False, status
            assert status["migrating_from"] == CLIENT
    finally:
        source.hang_up()
        shutil.rmtree(upper)
    source.target_is_clean()
    if cut == "lazy-send":
        deadline = time.monotonic() + 10
        while daemons(images) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not daemons(images) and not os.path.exists(images)


def daemons(marker: str) -> list[str]:
    """Processes whose command line names ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_a_target_kamrad_killed_before_the_commit_drops_what_arrived(hosts):
    """B restores a real checkpoint (sent by the test, as a source would), stopped at
    CRIU's post-restore, says "restored", and its kamrad is killed before any commit.
    CRIU on B kills what it restored; B's kamrad, started again, drops the container
    (the source still has it) and everything its restore had set up."""
    from kamra.checkpoint import archive

    a = hosts.cli_a
    name = unique()
    a.run("create", name, "--template", "busybox", check=True)
    a.run("start", name, check=True)
    a.run("exec", name, "--", "sh", "-c", "echo kept > /root/file", check=True)
    work = tempfile.mkdtemp(prefix="kamra-export-")
    export = os.path.join(work, "c.tar.zst")
    try:
        a.run("checkpoint", name, "--export", export, check=True)
        manifest = archive.read(export)
        source = FakeSource(hosts)
        sock = source.connect()
        assert source.ask(sock, {"op": "check", "name": name, "trip": source.trip,
                                 "manifest": manifest}).get("ok")

        def write(out) -> None:
            with open(export, "rb") as f:
                shutil.copyfileobj(f, out)

        source.upload(sock, {"op": "send", "name": name, "pages": None, "files": None},
                      write)
        assert source.ask(sock, {"op": "restore", "name": name}) == {"restored": True}
        # Restored and stopped on B, waiting for the commit: kill B's kamrad.
        layout = Layout.at(hosts.roots[1])
        with open(layout.daemon_pid) as f:
            kamrad = int(f.read().split()[0])
        os.kill(kamrad, 9)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{kamrad}") and time.monotonic() < deadline:
            time.sleep(0.05)
        source.hang_up()
        source.target_is_clean()  # B's kamrad starts again (the CLI starts it)
        with open(layout.daemon_log) as f:
            assert "was not committed" in f.read()
        assert not os.path.exists(layout.container_dir(name))
        # The source's copy is intact: it restores and runs.
        a.run("restore", name, check=True)
        assert a.run("exec", name, "--", "cat", "/root/file", check=True).stdout == "kept\n"
    finally:
        shutil.rmtree(work)


def hold_memory(cli: Cli, name: str, mb: int) -> None:
    """A process in the container holding ``mb`` MB of random bytes (dd's buffer,
    blocked on a pipe nobody reads); returns once it holds them."""
    cli.run("exec", name, "--", "sh", "-c",
            f"setsid sh -c 'dd if=/dev/urandom bs={mb}M count=1 | sleep 100000' "
            "</dev/null >/dev/null 2>&1 &", check=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rss = cli.run("exec", name, "--", "sh", "-c",
                      "grep VmRSS /proc/$(pidof dd)/status").stdout.split()
        if len(rss) > 1 and int(rss[1]) >= mb << 10:
            return
        time.sleep(0.2)
    pytest.fail(f"dd never held its {mb} MB")


def test_lazy_migration_pulls_the_memory_after_the_target_resumed(hosts):
    """--lazy: the container runs on B before its 64 MB arrived; B's lazy-pages daemon
    pulls the rest from A's CRIU while it runs. The client's stream goes on, and the
    memory holder survives on B."""
    from kamra.engine.migrate import lazy_pages_unavailable

    assert lazy_pages_unavailable() is None  # 'make setup' raised fs.pipe-max-size
    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b
    name, _, stream = streaming_container(a, hosts.client)
    try:
        hold_memory(a, name, 64)
        stream.more()
        moved = a.json("migrate", name, "b", "--lazy")
        assert moved["mode"] == "live" and moved["lazy"], moved
        assert moved["pages_bytes"] >= 64 << 20, moved
        # Pages crossed after B answered that the container runs: post-copy.
        assert moved["pages_after_resume_bytes"] > 0, moved
        print(f"lazy: downtime {moved['downtime_ms']} ms, phases {moved['phases_ms']}, "
              f"memory all there after {moved['pages_ms']} ms, "
              f"{moved['pages_after_resume_bytes'] / 1e6:.1f} of "
              f"{moved['pages_bytes'] / 1e6:.1f} MB after the resume")
        assert a.run("status", name).returncode != 0  # gone from A
        assert b.json("status", name)["running"] is True
        assert b.run("exec", name, "--", "pidof", "dd").returncode == 0
        stream.more()
        stream.check()
    finally:
        stream.close()


@pytest.fixture
def hosts_small_target(busybox_cache):
    h = Hosts(busybox_cache, target_run_size="24m")
    yield h
    h.close()


@pytest.mark.parametrize("fills", ["files", "pages"])
def test_a_full_disk_on_the_target_leaves_the_container_running_here(hosts_small_target,
                                                                     fills):
    """B's run directory, where migrations arrive, holds 24 MB: 40 MB of files (the
    first round) or of memory (the page stream) do not fit. The source says why in one
    line, the container runs on with the client's stream, and B keeps nothing."""
    hosts = hosts_small_target
    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b
    name, _, stream = streaming_container(a, hosts.client)
    try:
        if fills == "files":
            a.run("exec", name, "--", "dd", "if=/dev/urandom", "of=/root/big", "bs=1M",
                  "count=40", check=True)
        else:
            hold_memory(a, name, 40)
        pid = a.json("status", name)["init_pid"]
        stream.more()
        moved = a.run("migrate", name, "b")
        assert moved.returncode != 0, moved.stdout
        assert "Traceback" not in moved.stderr, moved.stderr
        assert len(moved.stderr.strip().splitlines()) == 1, moved.stderr
        assert "No space left on device" in moved.stderr, moved.stderr
        print(moved.stderr.strip())
        status = a.json("status", name)
        assert status["state"] == "running" and status["init_pid"] == pid
        stream.more()
        stream.check()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (
                b.json("list") or [e for e in os.listdir(hosts.small_run)
                                   if e.startswith("incoming-")]):
            time.sleep(0.1)
        assert b.json("list") == []
        assert [e for e in os.listdir(hosts.small_run) if e.startswith("incoming-")] == []
    finally:
        stream.close()


@needs_debian
def test_a_debian_container_migrates_live_with_its_services(hosts, debian_build):
    """systemd as init, its services, and the template itself (B lacks it: sent); a
    second one moves with --lazy. A container moved once cannot move live again (an
    inotify watch CRIU restored, see docs/migration.md): auto mode restarts it, saying
    why."""
    install_template(hosts.roots[0], debian_build[0].path, "debian")  # before kamrad starts
    hosts.pair()
    a, b = hosts.cli_a, hosts.cli_b

    def debian(name: str) -> set[str]:
        a.run("create", name, "--template", "debian", "-c", "limits.memory=256M",
              "-c", "net.nat=false", check=True)
        a.run("start", name, check=True)
        deadline = time.monotonic() + 30
        while not (running := services(a, name)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return running

    def services(cli: Cli, name: str) -> set[str]:
        out = cli.run("exec", name, "--", "systemctl", "list-units", "--type=service",
                      "--state=running", "--no-legend", "--plain").stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    name = unique("d")
    running = debian(name)
    moved = a.json("migrate", name, "b")
    assert moved["mode"] == "live", moved
    assert b.run("exec", name, "--", "cat", "/proc/1/comm").stdout.strip() == "systemd"
    survived = services(b, name)
    print(f"services before: {sorted(running)}; on B after a live migration: "
          f"{sorted(survived)}; downtime {moved['downtime_ms']} ms, phases "
          f"{moved['phases_ms']}, {moved['bytes'] / 1e6:.1f} MB")
    assert running and survived == running
    back = b.json("migrate", name, "a")
    assert back["mode"] == "restart" and "fsnotify" in back["reason"], back
    deadline = time.monotonic() + 30  # booted afresh
    while services(a, name) != running and time.monotonic() < deadline:
        time.sleep(0.5)
    assert services(a, name) == running
    lazy = unique("d")
    running = debian(lazy)
    moved = a.json("migrate", lazy, "b", "--lazy")
    assert moved.get("lazy") and moved["pages_after_resume_bytes"] > 0, moved.get("reason")
    assert services(b, lazy) == running
    print(f"with --lazy: services {sorted(running)} run on B; downtime "
          f"{moved['downtime_ms']} ms, {moved['pages_after_resume_bytes'] / 1e6:.1f} of "
          f"{moved['pages_bytes'] / 1e6:.1f} MB after the resume")


def test_lazy_is_refused_with_the_reason_when_pipes_are_capped():
    """Without CAP_SYS_RESOURCE, CRIU's lazy pages need fs.pipe-max-size >= 4 MiB: with
    the default 1 MiB, --lazy is refused saying so (the sysctl is put back after)."""
    from kamra.engine.migrate import LAZY_PIPE, lazy_pages_unavailable
    from kamra.linux.caps import CAPS, has_cap

    path = "/proc/sys/fs/pipe-max-size"
    with open(path) as f:
        saved = f.read().strip()
    try:
        with open(path, "w") as f:
            f.write(str(1 << 20))
        why = lazy_pages_unavailable()
        if has_cap(CAPS["sys_resource"]):
            assert why is None  # root gets big pipes whatever the sysctl says
        else:
            assert why and "fs.pipe-max-size (1024 KiB)" in why, why
            assert f"fs.pipe-max-size={LAZY_PIPE}" in why
        with open(path, "w") as f:
            f.write(str(LAZY_PIPE))
        assert lazy_pages_unavailable() is None
    finally:
        with open(path, "w") as f:
            f.write(saved)
