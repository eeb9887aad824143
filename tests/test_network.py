"""Container networking end to end, with real traffic between namespaces the test made.

Each test runs its kamrad in a fresh network namespace ("the host"), joined by a veth
to another one ("outside", a host on the LAN): 198.51.100.1 is the host's LAN address,
198.51.100.2 the outside host's. No packet leaves these namespaces.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Cli, cli_teardown, install_template, unique
from conftest import start_container as started

from kamra.linux import libc
from kamra.network import netns

HOST_LAN = "198.51.100.1"
OUTSIDE = "198.51.100.2"


def ns_run(fd: int, argv: list[str], check: bool = True, timeout: float = 30
           ) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            preexec_fn=lambda: libc.setns(fd, libc.CLONE_NEWNET),
                            pass_fds=(fd,))
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} in netns failed: {result.stderr}")
    return result


class Lan:
    """The host namespace (kamrad's), the outside host's, and the veth between them."""

    def __init__(self) -> None:
        self.host = netns.new_netns()
        self.outside = netns.new_netns()
        for fd in (self.host, self.outside):
            ns_run(fd, ["ip", "link", "set", "lo", "up"])
        netns.run_in_netns(self.host, _add_veth, "lan0", "out0", self.outside)
        ns_run(self.host, ["ip", "addr", "add", f"{HOST_LAN}/24", "dev", "lan0"])
        ns_run(self.host, ["ip", "link", "set", "lan0", "up"])
        ns_run(self.outside, ["ip", "addr", "add", f"{OUTSIDE}/24", "dev", "out0"])
        ns_run(self.outside, ["ip", "link", "set", "out0", "up"])

    def close(self) -> None:
        os.close(self.host)
        os.close(self.outside)  # the namespaces, and the veth with them, go

    def links(self) -> list[str]:
        out = ns_run(self.host, ["ip", "-o", "link", "show"]).stdout
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())

    def ruleset(self) -> str:
        return ns_run(self.host, ["nft", "list", "ruleset"]).stdout

    def routes(self) -> str:
        return ns_run(self.host, ["ip", "route", "show"]).stdout

    def qdiscs(self) -> str:
        return ns_run(self.host, ["tc", "qdisc", "show"]).stdout


def _add_veth(name: str, peer: str, peer_netns: int) -> None:
    from kamra.network.rtnl import Rtnl

    with Rtnl() as nl:
        nl.add_veth(name, peer, peer_netns)


class Server:
    """A TCP server in a namespace: records each peer's address and what it sent;
    answers with ``reply``. Stops when closed."""

    def __init__(self, fd: int, address: str, port: int, reply: bytes = b"pong\n"):
        self.peers: list[str] = []
        self.received: list[bytes] = []
        self.reply = reply
        self.ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, args=(fd, address, port),
                                        daemon=True)
        self._thread.start()
        assert self.ready.wait(10)

    def _serve(self, fd: int, address: str, port: int) -> None:
        libc.setns(fd, libc.CLONE_NEWNET)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((address, port))
            listener.listen()
            listener.settimeout(0.2)
            self.ready.set()
            while not self._stop:
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(10)
                    self.peers.append(peer[0])
                    data = b""
                    try:
                        while chunk := conn.recv(65536):
                            data += chunk
                            if data.endswith(b"\n"):
                                break
                        conn.sendall(self.reply)
                    except OSError:
                        pass
                    self.received.append(data)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)


def connect(fd: int, address: str, port: int, payload: bytes = b"ping\n",
            timeout: float = 5, refused_for: float = 5) -> bytes:
    """From a namespace: connect, send, read the answer (raises on failure). Refusals
    are retried for ``refused_for`` seconds: a server in a container (a shell loop
    around nc) is not listening again at once after each answer."""
    def body() -> bytes:
        deadline = time.monotonic() + refused_for
        while True:
            try:
                conn = socket.create_connection((address, port), timeout=timeout)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with conn:
            conn.sendall(payload)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            return data
    return netns.run_in_netns(fd, body)


@pytest.fixture
def lan():
    network = Lan()
    yield network
    network.close()


@pytest.fixture
def ncli(root, busybox_cache, lan):
    """The kamra CLI whose kamrad lives in the test's host namespace."""
    install_template(root, busybox_cache)
    c = Cli(root, netns=lan.host)
    yield c
    cli_teardown(c, root)


def write_config(root: str, text: str) -> None:
    with open(os.path.join(root, "network.toml"), "w") as f:
        f.write("[network]\n" + text)


def address_of(cli: Cli, name: str) -> str:
    return next(a for a in cli.json("status", name)["addresses"] if "." in a)


def reachable(cli: Cli, name: str, target: str) -> bool:
    return cli.run("exec", name, "--", "ping", "-c", "1", "-W", "2", target,
                   timeout=30).returncode == 0


def assert_nothing_left(lan: Lan) -> None:
    """Nothing of any stopped container: no link, route, qdisc, set or map element.
    (kamra's table itself, empty, stays while kamrad runs; ``daemon stop`` removes it.)"""
    assert lan.links() == ["lan0", "lo"]
    assert "elements" not in lan.ruleset()
    assert "169.254.0.1" not in lan.routes() and "10.73." not in lan.routes()
    assert "htb" not in lan.qdiscs()


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_host_containers_and_outside_talk(ncli, lan, mode):
    a = started(ncli, f"net.mode={mode}")
    b = started(ncli, f"net.mode={mode}", "net.nameservers=192.0.2.53", ip="10.73.0.77")
    addr_a, addr_b = address_of(ncli, a), address_of(ncli, b)
    assert addr_b == "10.73.0.77" and ipaddress.ip_address(addr_a) in \
        ipaddress.ip_network("10.73.0.0/16")
    assert addr_a != addr_b

    # host -> container, and container -> container
    server = Server(lan.host, HOST_LAN, 7001)
    try:
        assert reachable(ncli, a, addr_b) and reachable(ncli, b, addr_a)
        out = ncli.run("exec", a, "--", "sh", "-c", f"echo hi | nc {HOST_LAN} 7001")
        assert out.stdout == "pong\n", out.stderr
        assert server.peers == [addr_a]  # host <- container: no NAT toward the host
    finally:
        server.close()
    ping = ns_run(lan.host, ["ping", "-c", "1", "-W", "2", addr_a], check=False) \
        if _have("ping") else None
    assert ping is None or ping.returncode == 0

    assert "type nat hook postrouting" in lan.ruleset()  # net.nat (the default) needs it
    # container -> outside host: NAT'd to the host's LAN address
    outside = Server(lan.outside, OUTSIDE, 7002)
    try:
        out = ncli.run("exec", b, "--", "sh", "-c", f"echo hi | nc {OUTSIDE} 7002")
        assert out.stdout == "pong\n", out.stderr
        assert outside.peers == [HOST_LAN]
    finally:
        outside.close()

    # the container's name resolution config
    hosts = ncli.run("exec", a, "--", "cat", "/etc/hosts").stdout
    assert f"{addr_a}\t{a}" in hosts
    resolv = ncli.run("exec", a, "--", "cat", "/etc/resolv.conf").stdout
    assert "nameserver" in resolv
    resolv = ncli.run("exec", b, "--", "cat", "/etc/resolv.conf").stdout
    assert resolv.splitlines()[1:] == ["nameserver 192.0.2.53"]

    ncli.run("stop", a, b, check=True)
    assert_nothing_left(lan)
    ncli.run("destroy", a, b, check=True)
    assert ncli.json("network", "show")["allocations"] == []


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_isolated_container_reaches_host_and_outside_but_no_container(ncli, lan, mode):
    free = started(ncli, f"net.mode={mode}")
    other = started(ncli, f"net.mode={mode}")
    alone = started(ncli, f"net.mode={mode}", "net.isolated=true")
    addr_free, addr_other = address_of(ncli, free), address_of(ncli, other)
    addr_alone = address_of(ncli, alone)
    assert reachable(ncli, free, addr_other)  # not isolated: fine
    assert not reachable(ncli, alone, addr_free)
    assert not reachable(ncli, free, addr_alone)
    outside = Server(lan.outside, OUTSIDE, 7003)
    host = Server(lan.host, HOST_LAN, 7004)
    try:
        out = ncli.run("exec", alone, "--", "sh", "-c",
                       f"echo a | nc {OUTSIDE} 7003; echo b | nc {HOST_LAN} 7004")
        assert out.stdout == "pong\npong\n", out.stderr
    finally:
        outside.close()
        host.close()
    # Live: lifting the isolation opens the way without a restart.
    ncli.run("set", alone, "net.isolated=false", check=True)
    assert reachable(ncli, alone, addr_free)


@pytest.mark.parametrize("mode", ["routed", "bridge"])
def test_port_forwards_from_outside_and_from_the_host(ncli, lan, mode):
    name = started(ncli, f"net.mode={mode}")
    addr = address_of(ncli, name)
    ncli.run("port", "add", name, "8080:80/tcp", check=True)
    # A tiny TCP server inside the container, answering once per connection.
    ncli.run("exec", name, "--", "sh", "-c",
             "setsid sh -c 'while true; do echo served | nc -l -p 80; done' </dev/null "
             ">/dev/null 2>&1 &", check=True)
    time.sleep(0.3)
    assert connect(lan.outside, HOST_LAN, 8080).startswith(b"served")
    assert connect(lan.host, HOST_LAN, 8080).startswith(b"served")
    assert connect(lan.host, "127.0.0.1", 8080).startswith(b"served")
    other = started(ncli, f"net.mode={mode}")
    taken = ncli.run("port", "add", other, "8080:81")
    assert taken.returncode != 0 and name in taken.stderr and "8080" in taken.stderr
    assert "Traceback" not in taken.stderr
    rows = ncli.json("port", "list")
    assert [(r["container"], r["host_port"], r["ct_port"], r["proto"]) for r in rows] == \
        [(name, 8080, 80, "tcp")]
    ncli.run("port", "remove", name, "8080/tcp", check=True)
    with pytest.raises(OSError):
        connect(lan.outside, HOST_LAN, 8080, timeout=2, refused_for=0)
    assert addr not in lan.ruleset().split("fwd4")[-1]


def _have(tool: str) -> bool:
    return any(os.access(os.path.join(d, tool), os.X_OK)
               for d in os.environ.get("PATH", "").split(":"))


def test_kamrad_restart_neither_duplicates_nor_loses_the_network(ncli, lan, root):
    name = started(ncli, "limits.net.egress=20mbit")
    ncli.run("port", "add", name, "9090:90", check=True)
    before = (lan.links(), lan.ruleset(), lan.routes(), lan.qdiscs())
    with open(os.path.join(root, "run", "kamrad.pid")) as f:
        os.kill(int(f.read()), 9)
    time.sleep(0.3)
    ncli.run("list", check=True)  # a new kamrad
    after = (lan.links(), lan.ruleset(), lan.routes(), lan.qdiscs())
    assert after == before
    assert reachable(ncli, name, HOST_LAN)
    ncli.run("stop", name, check=True)
    assert_nothing_left(lan)
    ncli.run("start", name, check=True)  # comes back whole
    assert "9090" in lan.ruleset()
    ncli.run("destroy", "--force", name, check=True)
    assert_nothing_left(lan)
    assert ncli.json("port", "list") == []
    ncli.run("daemon", "stop", check=True)
    assert "kamra" not in lan.ruleset()  # no container runs: kamra's tables go too


def test_concurrent_creates_never_share_an_address(ncli, lan, root):
    write_config(root, 'ipv4_pool = "10.99.0.0/28"\n')  # 13 usable addresses
    names = [unique() for _ in range(16)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: ncli.run("create", n, "--template", "busybox"),
                                names))
    codes = [r.returncode for r in results]
    refusals = {r.stderr.strip() for r in results if r.returncode != 0}
    assert all("pool is exhausted" in text for text in refusals), refusals
    allocations = ncli.json("network", "show")["allocations"]
    addresses = [row["address"] for row in allocations]
    assert len(addresses) == len(set(addresses)) == 13
    assert codes.count(0) == 13  # the pool ran out: the rest were refused, whole
    made = {c["name"] for c in ncli.json("list")}
    assert made == {row["container"] for row in allocations}
    assert "10.99.0.1" not in addresses  # the gateway
    fixed = ncli.run("create", unique(), "--template", "busybox", "--ip", addresses[0])
    assert fixed.returncode != 0 and "already used" in fixed.stderr


def test_bandwidth_limits_hold_within_15_percent(ncli, lan):
    rate = 10_000_000  # 10mbit
    name = started(ncli, "limits.net.egress=10mbit", "limits.net.ingress=10mbit")
    seconds = 3
    size = rate // 8 * seconds

    # egress: the container sends, the host measures from first to last byte
    received: dict = {}

    def sink() -> None:
        libc.setns(lan.host, libc.CLONE_NEWNET)
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((HOST_LAN, 7100))
            listener.listen()
            listener.settimeout(30)
            conn, _ = listener.accept()
            with conn:
                total, first = 0, None
                while chunk := conn.recv(65536):
                    first = first or time.monotonic()
                    total += len(chunk)
                received.update(total=total, seconds=time.monotonic() - first)

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    time.sleep(0.2)
    ncli.run("exec", name, "--", "sh", "-c",
             f"head -c {size} /dev/zero | nc {HOST_LAN} 7100", timeout=60, check=True)
    thread.join(30)
    measured = received["total"] * 8 / received["seconds"]
    assert received["total"] == size
    assert abs(measured - rate) / rate < 0.15, f"egress {measured / 1e6:.2f} mbit/s"

    # ingress: the host sends to a listener in the container, and measures until the
    # container has read everything (its nc closes only after the last byte).
    addr = address_of(ncli, name)
    ncli.run("exec", name, "--", "sh", "-c",
             "setsid sh -c 'sleep 60 | nc -l -p 7101 >/dev/null' </dev/null >/dev/null 2>&1 &",
             check=True)

    def send() -> float:
        for _ in range(50):
            try:
                conn = socket.create_connection((addr, 7101), timeout=30)
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        with conn:
            began = time.monotonic()
            conn.sendall(b"\0" * size)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            return time.monotonic() - began

    measured = size * 8 / netns.run_in_netns(lan.host, send)
    assert abs(measured - rate) / rate < 0.15, f"ingress {measured / 1e6:.2f} mbit/s"

    # live change: double it, measure again (egress)
    ncli.run("set", name, "limits.net.egress=20mbit", check=True)
    assert "20Mbit" in lan.qdiscs() + ns_run(lan.host, ["tc", "class", "show", "dev",
                                                         _ifb_of(lan)]).stdout


def _ifb_of(lan: Lan) -> str:
    return next(link for link in lan.links() if link.startswith("kb"))


def test_failed_network_setup_undoes_itself(ncli, lan, root):
    ns_run(lan.host, ["ip", "link", "add", "notabridge", "type", "veth", "peer", "name",
                      "notabridge1"])
    write_config(root, 'bridge = "notabridge"\n')
    name = unique()
    ncli.run("create", name, "--template", "busybox", "-c", "net.mode=bridge", check=True)
    result = ncli.run("start", name)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "network" in result.stderr and "undone" in result.stderr
    status = ncli.json("status", name)
    assert status["state"] == "stopped"
    assert [link for link in lan.links() if link.startswith("kv")] == []
    assert "elements" not in lan.ruleset()
    assert "notabridge" in lan.links()  # another program's device: never touched
    assert "inet " not in ns_run(lan.host, ["ip", "addr", "show", "notabridge"]).stdout
    ncli.run("destroy", name, check=True)
    ns_run(lan.host, ["ip", "link", "del", "notabridge"])


def test_network_show_and_check(ncli, lan):
    data = ncli.json("network", "show")
    assert data["config"]["ipv4_pool"] == "10.73.0.0/16"
    check = ncli.run("network", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    # Another program's firewall dropping forwarded traffic (as Docker's does).
    ns_run(lan.host, ["nft", "add table ip other; add chain ip other fwdchain "
                      "{ type filter hook forward priority 0; policy drop; }"])
    check = ncli.run("network", "check")
    assert check.returncode == 1
    assert "other" in check.stdout and "kv" in check.stdout
    assert json.loads(ncli.run("network", "check", "--format", "json").stdout)
    name = unique()
    ncli.run("create", name, "--template", "busybox", check=True)
    started_ = ncli.run("start", name)
    assert started_.returncode == 0  # said at start, not refused
    assert "note: nftables chain ip other fwdchain" in started_.stderr
    ncli.run("destroy", "--force", name, check=True)
    ns_run(lan.host, ["nft", "delete table ip other"])


@pytest.mark.parametrize("ip, words", [
    ("10.73.0.1", ["gateway"]),
    ("192.0.2.9", ["not in", "10.73.0.0/16"]),
    ("10.73.0.0", ["network address"]),
    ("abc", ["not an IPv4 address"]),
])
def test_bad_addresses_are_refused_and_nothing_is_made(ncli, ip, words):
    name = unique()
    result = ncli.run("create", name, "--template", "busybox", "--ip", ip)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr
    assert ncli.json("list") == [] and ncli.json("network", "show")["allocations"] == []


def test_routed_with_proxy_arp_and_no_nat_is_reached_directly_from_the_lan(ncli, lan, root):
    """OpenVZ's venet: the LAN reaches the container's own address, which the host answers
    ARP for on its uplink; with net.nat=false the outside sees that address too."""
    write_config(root, 'uplink = "lan0"\n')
    name = started(ncli, "net.nat=false")
    addr = address_of(ncli, name)
    # Nothing to translate, so no nat chain: connection tracking stays off.
    assert "type nat" not in lan.ruleset()
    assert addr in ns_run(lan.host, ["ip", "neigh", "show", "proxy"]).stdout
    # The outside host believes the container is on its own segment: it ARPs for it.
    ns_run(lan.outside, ["ip", "route", "add", "10.73.0.0/16", "dev", "out0"])
    outside = Server(lan.outside, OUTSIDE, 7005)
    try:
        out = ncli.run("exec", name, "--", "sh", "-c", f"echo hi | nc {OUTSIDE} 7005")
        assert out.stdout == "pong\n", out.stderr
        assert outside.peers == [addr]  # not NAT'd
    finally:
        outside.close()
    ncli.run("exec", name, "--", "sh", "-c",
             "setsid sh -c 'while true; do echo direct | nc -l -p 80; done' </dev/null "
             ">/dev/null 2>&1 &", check=True)
    assert connect(lan.outside, addr, 80).startswith(b"direct")
    ncli.run("port", "add", name, "8081:80", check=True)  # a forward needs them again
    assert "type nat hook prerouting" in lan.ruleset()
    ncli.run("port", "remove", name, "8081", check=True)
    assert "type nat" not in lan.ruleset()
    ncli.run("stop", name, check=True)
    assert addr not in ns_run(lan.host, ["ip", "neigh", "show", "proxy"]).stdout
    assert_nothing_left(lan)


def test_ipv6_from_a_configured_pool(ncli, lan, root):
    write_config(root, 'ipv6_pool = "fd42:73::/64"\n')
    name = started(ncli)
    addresses = ncli.json("status", name)["addresses"]
    v6 = next(a for a in addresses if ":" in a)
    assert v6 == "fd42:73::2"
    inside = ncli.run("exec", name, "--", "ip", "-6", "addr", "show", "dev", "eth0").stdout
    assert f"{v6}/128" in inside
    ncli.run("exec", name, "--", "sh", "-c",
             "setsid sh -c 'while true; do echo six | nc -l -p 80; done' </dev/null "
             ">/dev/null 2>&1 &", check=True)
    deadline = time.monotonic() + 10  # IPv6 duplicate address detection is off, but the
    while True:                      # route may take a moment
        try:
            assert connect(lan.host, v6, 80).startswith(b"six")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    ncli.run("stop", name, check=True)
    assert_nothing_left(lan)


@pytest.mark.parametrize("args, words", [
    (["add", "{name}", "abc"], ["invalid port 'abc'"]),
    (["add", "{name}", "70000:80"], ["invalid port '70000'", "1 to 65535"]),
    (["add", "{name}", "8080:80/sctp"], ["unknown protocol 'sctp'", "/tcp or /udp"]),
    (["add", "{name}", "8080:80", "--host-ip", "nowhere"], ["--host-ip 'nowhere'"]),
    (["add", "nosuch", "8080:80"], ["'nosuch' not found"]),
    (["remove", "{name}", "9999/udp"], ["no forward of host port", "9999/udp"]),
])
def test_bad_port_forwards_are_refused_in_one_line(ncli, args, words):
    name = unique()
    ncli.run("create", name, "--template", "busybox", check=True)
    result = ncli.run("port", *[a.format(name=name) for a in args])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr
    assert ncli.json("port", "list") == []
