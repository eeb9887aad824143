"""Networking for the engine: addresses at create, the wired namespace at start, policy.

The order of a start (DESIGN.md, "Process model"): kamrad makes the container's network
namespace itself (kamra.network.netns), wires it (a veth with eth0 inside, addresses,
routes; kamra.network.link), adds the container to kamra's nftables table (NAT,
isolation, port forwards; kamra.network.nft) and shapes its bandwidth
(kamra.network.tc), then hands the namespace to the keeper, whose init joins it before
it mounts /sys. Nothing of the container runs before its network is whole; a failure
undoes every step. At stop, and when an init exits, the host side goes again.

What is kept: the addresses (state store, held from create to destroy, never handed out
twice) and the port forwards (state store; active while the container runs). The rest
is derived, so kamrad restarting re-derives it: running containers get their rules
again (idempotent), stopped ones lose any left over.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from kamra.config import netconfig
from kamra.config.netconfig import NetworkConfig
from kamra.engine.etcfiles import hosts_text, resolv_text, write_etc
from kamra.errors import Conflict, InvalidInput, KamraError
from kamra.network.ipam import Pool, parse_address
from kamra.state import ContainerRecord
from kamra.state.base import Forward

if TYPE_CHECKING:
    from kamra.engine.host import Host

log = logging.getLogger("kamra.network")

RUNNING = ("starting", "running", "stopping")
CHECK_EVERY = 30.0  # seconds between looks for another firewall at start
SPARE_NETNS = 2
PROTOS = ("tcp", "udp")


class Networking:
    def __init__(self, host: Host):
        self.host = host
        self.salt = host.layout.root_id
        self._config: NetworkConfig | None = None
        self._firewall = None
        self._ports = None  # kamra.network.portisolation.PortIsolation, bridge mode only
        self._bridge_ready = False
        # Containers whose host side is set up (or being set up): the table and the
        # bridge go when the last of them stops. Re-entrant: prepare calls teardown.
        self._active: dict[str, str] = {}  # name -> mode
        # Running containers that need the NAT chains (connection tracking costs every
        # packet; without NAT and port forwards kamra keeps no nat chain).
        self._nat_users: set[str] = set()
        self._nat_on = False
        self._checked: tuple[float, list[str]] = (-CHECK_EVERY - 1, [])
        # Network namespaces made ahead of time: making one costs the kernel about a
        # millisecond, a fifth of the network's start budget.
        self._lock = threading.RLock()
        self._spare_netns: list[int] = []
        self._netns_wanted = threading.Condition(self._lock)
        self._refiller: threading.Thread | None = None
        self._closed = False

    # -- settings ---------------------------------------------------------------------------
    @property
    def config(self) -> NetworkConfig:
        if self._config is None:
            self._config = netconfig.load(self.host.layout)
        return self._config

    def settings(self, record: ContainerRecord) -> dict[str, object]:
        return {key: value for key, (value, _) in self.host.resources.effective(record).items()
                if key.startswith("net.") or key.startswith("limits.net.")}

    def mode(self, record: ContainerRecord) -> str:
        return str(self.settings(record)["net.mode"])

    def host_ifname(self, name: str) -> str:
        from kamra.network.names import host_ifname
        return host_ifname(name, self.salt)

    def _table(self, attr: str, kind: type, **ensure: object) -> Any:
        """kamra's nftables table of one family, made (or repaired) on first use."""
        with self._lock:
            table = getattr(self, attr)
            if table is None:
                table = kind(table=f"kamra-{self.salt}")
                table.ensure(**ensure)
                setattr(self, attr, table)
            return table

    @property
    def firewall(self) -> Any:  # kamra.network.nft.Firewall, imported lazily
        from kamra.network.nft import Firewall

        with self._lock:
            if self._firewall is None:
                self._nat_on = bool(self._nat_users)
            return self._table("_firewall", Firewall, nat=self._nat_on)

    def _note_nat(self, record: ContainerRecord, settings: dict[str, object] | None,
                  running: bool) -> None:
        """Count the container among those that need the NAT chains (its own NAT, or a
        port forward) and add or drop the chains when that changes."""
        if running and settings is None:
            settings = self.settings(record)
        needs = running and (bool(settings["net.nat"])  # type: ignore[index]
                             or bool(self.host.store.forwards(record.name)))
        with self._lock:
            if needs:
                self._nat_users.add(record.name)
            else:
                self._nat_users.discard(record.name)
            want = bool(self._nat_users)
            if self._firewall is not None and self._nat_on != want:
                self._firewall.ensure(nat=want)
                self._nat_on = want

    @property
    def port_isolation(self) -> Any:  # kamra.network.portisolation.PortIsolation
        from kamra.network.portisolation import PortIsolation
        return self._table("_ports", PortIsolation)

    # -- addresses (create .. destroy) ------------------------------------------------------
    def _allocate(self, name: str, pool: Pool, wanted: object, key: str) -> str:
        """Hold ``wanted`` (validated for the pool) or the pool's next free address."""
        address = None
        if wanted is not None:
            try:
                address = str(parse_address(str(wanted), pool))
            except InvalidInput as exc:
                raise InvalidInput(f"{key}: {exc.message}: choose an address of the pool "
                                   f"{pool.network} (see 'kamra network show')") from None
        return self.host.store.allocate_address(
            name, (str(a) for a in pool.candidates()), address)

    def assign(self, record: ContainerRecord) -> list[str]:
        """Hold the container's addresses (its own net.ipv4/net.ipv6, or the pools' next
        free ones). Atomic per address across processes; released by ``release``."""
        settings = self.settings(record)
        if settings["net.mode"] == "none":
            return []
        config = self.config
        held = []
        try:
            held.append(self._allocate(record.name, Pool(str(config.ipv4_pool),
                                                         str(config.ipv4_gateway)),
                                       settings.get("net.ipv4"), "net.ipv4"))
            if config.ipv6_pool is not None:
                held.append(self._allocate(record.name, Pool(str(config.ipv6_pool),
                                                             str(config.ipv6_gateway)),
                                           settings.get("net.ipv6"), "net.ipv6"))
            elif settings.get("net.ipv6") is not None:
                raise InvalidInput(f"net.ipv6 is set but no ipv6_pool is configured in "
                                   f"{config.path}: add one, or unset net.ipv6")
        except BaseException:
            self.host.store.release_addresses(record.name)
            raise
        return held

    def readdress(self, old: ContainerRecord, new: ContainerRecord) -> None:
        """A stopped container's addressing changed (net.mode, net.ipv4, net.ipv6): hold
        the new addresses, or keep the old ones if the new cannot be had."""
        keys = ("net.mode", "net.ipv4", "net.ipv6")
        before, after = self.settings(old), self.settings(new)
        if all(before.get(k) == after.get(k) for k in keys):
            return
        self.host.store.release_addresses(old.name)
        try:
            self.assign(new)
        except BaseException:
            self.assign(old)
            raise

    def release(self, name: str) -> None:
        for forward in self.host.store.forwards(name):
            self.host.store.remove_forward(name, forward.proto, forward.host_port,
                                           forward.host_ip)
        self.host.store.release_addresses(name)

    def addresses(self, name: str) -> list[str]:
        return [a for a, holder in self.host.store.addresses().items() if holder == name]

    def _interfaces(self, name: str) -> list:
        found = []
        for text in self.addresses(name):
            address = ipaddress.ip_address(text)
            found.append(ipaddress.ip_interface(f"{address}/{address.max_prefixlen}"))
        return found

    # -- start and stop -----------------------------------------------------------------------
    def write_files(self, record: ContainerRecord, rootfs: str) -> None:
        """/etc/hosts (its own name) and /etc/resolv.conf, written at every start."""
        settings = self.settings(record)
        addresses = self.addresses(record.name)
        write_etc(rootfs, "hosts", hosts_text(record.hostname, addresses))
        if settings["net.mode"] == "none":
            return
        servers = settings.get("net.nameservers") or self.config.nameservers or \
            netconfig.host_nameservers()
        write_etc(rootfs, "resolv.conf", resolv_text(list(servers)))  # type: ignore[arg-type]

    def prepare(self, record: ContainerRecord, ns_fd: int | None = None) -> int | None:
        """The container's network namespace, wired; None for net.mode=none (the init
        then makes an empty one of its own). On failure nothing is left behind.

        ``ns_fd`` wires a namespace that exists already (CRIU's restored container's),
        which stays the caller's; otherwise a new one is made."""
        settings = self.settings(record)
        mode = settings["net.mode"]
        if mode == "none":
            return None
        from kamra.network import link

        name = record.name
        addrs = self._interfaces(name)
        if not addrs:  # created with net.mode=none, or its addresses were lost
            self.assign(record)
            addrs = self._interfaces(name)
        host_if = self.host_ifname(name)
        config = self.config
        owned = ns_fd is None
        if ns_fd is None:
            ns_fd = self._take_netns()
        try:
            if link.exists(host_if):  # left by a crash before its container's stop
                self.teardown(record)
            with self._lock:
                self._active[name] = str(mode)
            if mode == "routed":
                link.setup_routed(ns_fd, host_if, addrs, mtu=config.mtu, uplink=config.uplink)
            else:
                self._ensure_bridge()
                link.setup_bridged(ns_fd, host_if, config.bridge, addrs, config.ipv4_gateway,
                                   config.ipv4_pool.prefixlen, mtu=config.mtu,
                                   gateway6=config.ipv6_gateway,
                                   prefixlen6=config.ipv6_pool.prefixlen
                                   if config.ipv6_pool is not None else None)
            self.apply_policy(record, fresh=True)
            # The host's own 127.0.0.1 reaching a port forward (the firewall's guard
            # chain, set up by apply_policy, keeps the container off the host's 127/8).
            link.allow_localhost_forwards(host_if if mode == "routed" else config.bridge)
        except BaseException:
            try:
                self.teardown(record)
            except KamraError as exc:
                log.warning("undoing the network of %s: %s", name, exc.message)
            if owned:
                os.close(ns_fd)
            raise
        return ns_fd

    def warm(self) -> None:
        """A container is about to arrive by live migration: what wiring the first one
        costs (importing the netlink library, some 130 ms here, and making kamra's
        firewall table) is paid now rather than while its tasks are frozen."""
        from kamra.network import link, netns, tc  # noqa: F401 - imported to be ready

        if not self._closed:
            self.firewall  # noqa: B018 - made on first use

    def _take_netns(self) -> int:
        from kamra.network import netns

        with self._lock:
            fd = self._spare_netns.pop() if self._spare_netns else None
            if self._refiller is None:  # one long-lived thread: starting one costs 0.5 ms
                self._refiller = threading.Thread(target=self._refill_netns,
                                                  name="kamra-spare-netns", daemon=True)
                self._refiller.start()
            self._netns_wanted.notify()
        return netns.new_netns() if fd is None else fd

    def _refill_netns(self) -> None:
        from kamra.network import netns

        while True:
            with self._lock:
                while len(self._spare_netns) >= SPARE_NETNS and not self._closed:
                    self._netns_wanted.wait()
                if self._closed:
                    return
            try:
                fd = netns.new_netns()
            except KamraError as exc:
                log.warning("making a spare network namespace: %s", exc.message)
                time.sleep(1)
                continue
            with self._lock:
                if self._closed:
                    os.close(fd)
                    return
                self._spare_netns.append(fd)

    def _ensure_bridge(self) -> None:
        if self._bridge_ready:
            return
        from kamra.network import link

        config = self.config
        gateway4 = ipaddress.IPv4Interface(f"{config.ipv4_gateway}/{config.ipv4_pool.prefixlen}")
        gateway6 = None
        if config.ipv6_pool is not None:
            gateway6 = ipaddress.IPv6Interface(
                f"{config.ipv6_gateway}/{config.ipv6_pool.prefixlen}")
        with self._lock:
            link.ensure_bridge(config.bridge, gateway4, gateway6)  # (or uses the user's)
            self.firewall.add_bridge(config.bridge, config.ipv4_pool)
            self._bridge_ready = True

    def apply_policy(self, record: ContainerRecord, *, fresh: bool = False) -> None:
        """NAT, isolation, port forwards and bandwidth: at start (``fresh``: nothing of the
        container's is there yet, so nothing needs removing) and on a live change."""
        from kamra.network import tc

        settings = self.settings(record)
        mode = settings["net.mode"]
        if mode == "none":
            return
        self._note_nat(record, settings, True)
        firewall = self.firewall
        host_if = self.host_ifname(record.name)
        addresses = self.addresses(record.name)
        for address in addresses:
            if settings["net.nat"]:
                firewall.add_nat(address)
            elif not fresh:
                firewall.remove_nat(address)
            if mode == "routed":
                if settings["net.isolated"]:
                    firewall.add_isolated(address)
                elif not fresh:
                    firewall.remove_isolated(address)
        if mode == "bridge":
            if settings["net.isolated"]:
                self.port_isolation.set_isolated(host_if, True)
            elif not fresh and self._ports is not None:
                self._ports.set_isolated(host_if, False)
        for forward in self.host.store.forwards(record.name):
            self._activate(forward, addresses)
        egress, ingress = settings.get("limits.net.egress"), settings.get("limits.net.ingress")
        if not fresh or egress is not None or ingress is not None:
            tc.set_bandwidth(host_if, egress, ingress)  # type: ignore[arg-type]

    def _activate(self, forward: Forward, addresses: list[str]) -> None:
        v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
        if not v4:
            return
        self.firewall.add_forward(forward.proto, forward.host_port, v4[0], forward.ct_port,
                                  forward.host_ip or None)

    def announce(self, record: ContainerRecord) -> None:
        """After a migration: tell the segment where the container's addresses are now
        (routed: the uplink answers for them; bridged: the container's own eth0)."""
        from kamra.network import link, netns

        mode = self.mode(record)
        addresses = self.addresses(record.name)
        try:
            if mode == "routed" and self.config.uplink:
                link.announce(self.config.uplink, addresses)
            elif mode == "bridge" and record.init_pid:
                fd = os.open(f"/proc/{record.init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    netns.run_in_netns(fd, link.announce, "eth0", addresses)
                finally:
                    os.close(fd)
        except (KamraError, OSError) as exc:
            log.warning("announcing %s: %s", record.name, exc)

    def teardown(self, record: ContainerRecord) -> None:
        """Remove everything kamra added on the host for this container. Idempotent."""
        from kamra.network import link, tc

        name = record.name
        host_if = self.host_ifname(name)
        addresses = self.addresses(name)
        firewall = self.firewall
        for forward in self.host.store.forwards(name):
            firewall.remove_forward(forward.proto, forward.host_port, forward.host_ip or None,
                                    version="4")  # forwards reach a container over IPv4
        for address in addresses:
            firewall.remove_nat(address)
            firewall.remove_isolated(address)
        if self._ports is not None:
            self._ports.set_isolated(host_if, False)
        tc.clear(host_if)
        link.teardown(host_if, self._interfaces(name), uplink=self.config.uplink)
        self._note_nat(record, None, False)
        self._release_shared(name)

    def _release_shared(self, name: str) -> None:
        """The bridge goes with the last bridged container. kamra's inet table, which then
        holds no element, stays while kamrad runs (making it again costs the next start
        about 6 ms) and goes in ``close`` when no container runs."""
        from kamra.network import link

        with self._lock:
            self._active.pop(name, None)
            if self._bridge_ready and "bridge" not in self._active.values():
                if self._firewall is not None:
                    self._firewall.remove_bridge(self.config.bridge, self.config.ipv4_pool)
                link.remove_bridge(self.config.bridge)
                self._bridge_ready = False
                if self._ports is not None:
                    self._ports.destroy()
                    self._ports.close()
                    self._ports = None

    def reconcile(self) -> None:
        """After kamrad (re)starts: running containers get their host side again
        (idempotent: nothing doubles), stopped ones lose what a crash left."""
        records = self.host.store.list()
        with self._lock:
            for record in records:
                if record.state in RUNNING and self.mode(record) != "none":
                    self._active[record.name] = self.mode(record)
                    settings = self.settings(record)
                    if settings["net.nat"] or self.host.store.forwards(record.name):
                        self._nat_users.add(record.name)
            if "bridge" in self._active.values():
                self._ensure_bridge()
        for record in records:
            try:
                if self.mode(record) == "none":
                    continue
                if record.state in RUNNING:
                    self.apply_policy(record)
                else:
                    self.teardown(record)
            except KamraError as exc:
                log.warning("network of %s not reconciled: %s", record.name, exc.message)

    def close(self) -> None:
        """kamrad stops: with no container running, nothing of kamra's stays behind (an
        earlier kamrad's leftovers included: the tables are found by name)."""
        with self._lock:
            self._closed = True
            self._netns_wanted.notify_all()
            while self._spare_netns:
                os.close(self._spare_netns.pop())
            if self._active:
                return
            from kamra.network.nft import Firewall
            from kamra.network.portisolation import PortIsolation

            for attr, kind in (("_firewall", Firewall), ("_ports", PortIsolation)):
                table = getattr(self, attr) or kind(table=f"kamra-{self.salt}")
                try:
                    table.destroy()
                except KamraError as exc:
                    log.warning("removing kamra's %s table: %s", attr.strip("_"), exc.message)
                table.close()
                setattr(self, attr, None)

    # -- port forwards ------------------------------------------------------------------------
    def port_add(self, name: str, spec: str, host_ip: str | None = None) -> Forward:
        record = self.host._record(name)
        if self.mode(record) == "none":
            raise Conflict(f"{name!r} has no network (net.mode=none): a port forward needs "
                           "one; set net.mode=routed or bridge")
        forward = parse_forward(name, spec, host_ip)
        with self.host._lock(name):
            self.host.store.add_forward(forward)
            record = self.host._record(name)
            if record.state in RUNNING:
                try:
                    self._note_nat(record, None, True)
                    self._activate(forward, self.addresses(name))
                except BaseException:
                    self.host.store.remove_forward(name, forward.proto, forward.host_port,
                                                   forward.host_ip)
                    raise
        return forward

    def port_remove(self, name: str, spec: str, host_ip: str | None = None) -> None:
        proto, host_port = parse_host_port(spec)
        self.host._record(name)
        with self.host._lock(name):
            if not self.host.store.remove_forward(name, proto, host_port, host_ip or ""):
                raise InvalidInput(f"{name!r} has no forward of host port "
                                   f"{host_ip or '*'}:{host_port}/{proto}: see "
                                   f"'kamra port list {name}'")
            self.firewall.remove_forward(proto, host_port, host_ip or None, version="4")
            record = self.host._record(name)
            self._note_nat(record, None, record.state in RUNNING)

    def port_list(self, name: str | None = None) -> list[dict]:
        if name is not None:
            self.host._record(name)
        return [f.to_json() for f in self.host.store.forwards(name)]

    # -- reports ------------------------------------------------------------------------------
    def show(self) -> dict:
        allocations = [{"address": address, "container": holder}
                       for address, holder in self.host.store.addresses().items()]
        return {"config": self.config.to_json(), "allocations": allocations,
                "forwards": [f.to_json() for f in self.host.store.forwards()]}

    def check(self) -> list[str]:
        from kamra.network.check import foreign_forward_blockers

        found = foreign_forward_blockers(own_table=f"kamra-{self.salt}")
        with self._lock:
            self._checked = (time.monotonic(), found)
        return found

    def start_notes(self, record: ContainerRecord) -> list[str]:
        """At start, what ``kamra network check`` says. Reading the whole ruleset costs
        milliseconds, so only the first start of a kamrad waits for it; later ones get
        the last answer while a stale one (older than CHECK_EVERY) is renewed aside."""
        if self.mode(record) == "none":
            return []
        with self._lock:
            when, found = self._checked
            stale = time.monotonic() - when > CHECK_EVERY
            first = when < 0
            if stale and not first:
                self._checked = (time.monotonic(), found)  # one renewal at a time
        if first:
            return list(self._check_quietly())
        if stale:
            threading.Thread(target=self._check_quietly, name="kamra-network-check",
                             daemon=True).start()
        return list(found)

    def _check_quietly(self) -> list[str]:
        try:
            return self.check()
        except KamraError as exc:
            log.warning("network check: %s", exc.message)
            return []


def parse_host_port(spec: str) -> tuple[str, int]:
    text, _, proto = spec.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in PROTOS:
        raise InvalidInput(f"unknown protocol {proto!r} in {spec!r}: use /tcp or /udp")
    return proto, _port(text, spec)


def _port(text: str, spec: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise InvalidInput(f"invalid port {text!r} in {spec!r}: use a number from 1 to 65535, "
                           "like 8080:80/tcp")
    return port


def parse_forward(name: str, spec: str, host_ip: str | None) -> Forward:
    """``HOSTPORT:CTPORT[/tcp|/udp]`` (CTPORT defaults to HOSTPORT)."""
    ports, _, proto = spec.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in PROTOS:
        raise InvalidInput(f"unknown protocol {proto!r} in {spec!r}: use /tcp or /udp")
    host_text, _, ct_text = ports.partition(":")
    host_port = _port(host_text, spec)
    ct_port = _port(ct_text, spec) if ct_text else host_port
    if host_ip:
        try:
            host_ip = str(ipaddress.IPv4Address(host_ip))
        except ValueError:
            raise InvalidInput(f"--host-ip {host_ip!r} is not an IPv4 address") from None
    return Forward(container=name, proto=proto, host_port=host_port, ct_port=ct_port,
                   host_ip=host_ip or "")
