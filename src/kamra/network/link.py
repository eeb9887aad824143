"""Veth pairs, addresses, routes, bridges and proxy neighbours, over rtnetlink.

Two ways to attach a container (``ns_fd``, a descriptor of its network namespace):

* routed (as Incus's routed NIC): the container's ``eth0`` holds its addresses as /32
  (/128) and reaches everything through the link-local gateway 169.254.0.1 (fe80::1),
  which every host-side veth holds; the host has one /32 route per address to the veth
  and forwards. With an uplink, the host answers ARP/NDP for those addresses there
  (proxy neighbour entries), so they can come out of the uplink's own subnet.
* bridged: the host-side veth is a port of a kamra bridge that holds the gateway.

The "host" is whatever network namespace the calling thread is in (kamrad's, or a
test's). No process is spawned; the container's side is configured by a thread inside
its namespace while the calling thread does the host's side.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Sequence
from socket import AF_INET, AF_INET6

from kamra.errors import AlreadyExists, KamraError, NotFound
from kamra.network import netns
from kamra.network.names import CONTAINER_IFNAME, ifb_name
from kamra.network.names import host_ifname as host_ifname  # callers name veths here
from kamra.network.rtnl import IFA_F_NODAD, NetlinkFailure, Rtnl
from kamra.network.rtnl import netlink_step as _step

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

GATEWAY4 = ipaddress.IPv4Address("169.254.0.1")
GATEWAY6 = ipaddress.IPv6Address("fe80::1")

# Errors that mean "already gone" when removing something.
_GONE = {errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def _ignore_gone(func: Callable[..., object], *args: object) -> None:
    try:
        func(*args)
    except NetlinkFailure as exc:
        if exc.errno not in _GONE:
            raise


def _family(addr: IPInterface | IPAddress) -> int:
    return AF_INET if addr.version == 4 else AF_INET6


def _rtnl() -> Rtnl:
    with _step("open a netlink socket"):
        return Rtnl()


def _require(nl: Rtnl, ifname: str, what: str) -> int:
    with _step(f"look up {what} {ifname}"):
        index = nl.link_index(ifname)
    if index is None:
        raise NotFound(f"{what} {ifname} does not exist")
    return index


def exists(host_if: str) -> bool:
    """Whether an interface of that name exists in the calling thread's namespace."""
    with _rtnl() as nl, _step(f"look up interface {host_if}"):
        return nl.link_index(host_if) is not None


def _create_veth(nl: Rtnl, ns_fd: int, host_if: str, mtu: int | None,
                 mac: str | None) -> int:
    """The pair, with the container's end created directly in its namespace as eth0.

    Created there (the peer's IFLA_NET_NS_FD) rather than moved afterwards: one request,
    and no clash with an "eth0" of the host.
    """
    try:
        nl.add_veth(host_if, CONTAINER_IFNAME, ns_fd, mtu, mac)
    except NetlinkFailure as exc:
        if exc.errno == errno.EEXIST:
            if nl.link_index(host_if) is None:  # then the name taken is the peer's
                raise AlreadyExists(f"the container already has an interface named "
                                    f"{CONTAINER_IFNAME}") from exc
            raise AlreadyExists(f"network interface {host_if} already exists") from exc
        with _step(f"create veth {host_if}"):
            raise
    return _require(nl, host_if, "veth")


def _container_up(nl: Rtnl) -> int:
    """lo and eth0 up in the container; returns eth0's index."""
    with _step("set the container's lo up"):
        nl.set_link(ifname="lo", up=True)  # by name: saves a lookup
    eth0 = _require(nl, CONTAINER_IFNAME, "the container's interface")
    with _step("set the container's eth0 up"):
        nl.set_link(eth0, up=True)
    return eth0


def _container_routed(addrs: Sequence[IPInterface]) -> None:
    """Inside the container's namespace: /32 (/128) addresses, link-local gateway."""
    with _rtnl() as nl:
        eth0 = _container_up(nl)
        for addr in addrs:
            with _step(f"add {addr.ip} to the container's eth0"):
                nl.add_addr(eth0, str(addr.ip), addr.max_prefixlen, _family(addr),
                            IFA_F_NODAD)
        if any(a.version == 4 for a in addrs):
            with _step("add the container's default route via 169.254.0.1"):
                nl.add_route(AF_INET, str(GATEWAY4), 32, eth0)
                nl.add_route(AF_INET, "0.0.0.0", 0, eth0, str(GATEWAY4))
        if any(a.version == 6 for a in addrs):
            with _step("add the container's default route via fe80::1"):
                # A link-local gateway needs no prefix route: the device names the link.
                nl.add_route(AF_INET6, "::", 0, eth0, str(GATEWAY6))


def _container_bridged(addrs: Sequence[IPInterface], gateway: IPAddress | None,
                       gateway6: IPAddress | None) -> None:
    with _rtnl() as nl:
        eth0 = _container_up(nl)
        for addr in addrs:
            with _step(f"add {addr} to the container's eth0"):
                nl.add_addr(eth0, str(addr.ip), addr.network.prefixlen, _family(addr),
                            IFA_F_NODAD)
        for gw, family, any_addr in ((gateway, AF_INET, "0.0.0.0"),
                                     (gateway6, AF_INET6, "::")):
            if gw is None:
                continue
            with _step(f"add the container's default route via {gw}"):
                if not any(gw in a.network for a in addrs if a.version == gw.version):
                    # Not on the link by the addresses' prefix: say it is.
                    nl.add_route(family, str(gw), gw.max_prefixlen, eth0)
                nl.add_route(family, any_addr, 0, eth0, str(gw))


def _enable_forwarding(v4: bool, v6: bool) -> None:
    # In the caller's namespace (kamrad's): the host routes for its containers.
    # Note: IPv6 forwarding makes the kernel ignore router advertisements on every
    # interface unless accept_ra=2, as for any IPv6 router.
    # Read and compared at every start, never remembered: a namespace's inode number
    # is reused once it is gone, so "already on here" cannot be cached by it.
    if v4:
        netns.write_sysctl("net/ipv4/ip_forward", 1)
    if v6:
        netns.write_sysctl("net/ipv6/conf/all/forwarding", 1)


def setup_routed(ns_fd: int, host_if: str, addrs: Sequence[IPInterface],
                 mtu: int | None = None, uplink: str | None = None,
                 mac: str | None = None) -> None:
    """Attach the namespace ``ns_fd`` by a routed veth (see the module's docstring).

    On failure everything made here is removed again before the error is raised.
    """
    has4 = any(a.version == 4 for a in addrs)
    has6 = any(a.version == 6 for a in addrs)
    with _rtnl() as nl:
        uplink_idx = _require(nl, uplink, "uplink") if uplink else None
        index = _create_veth(nl, ns_fd, host_if, mtu, mac)
        try:
            # The container's side runs in parallel, in a thread inside its namespace.
            container = netns.NetnsThread(ns_fd, _container_routed, list(addrs))
            try:
                with _step(f"set {host_if} up"):
                    nl.set_link(index, up=True)
                if has4:
                    with _step(f"add {GATEWAY4} to {host_if}"):
                        nl.add_addr(index, str(GATEWAY4), 32, AF_INET)
                if has6:
                    with _step(f"add {GATEWAY6} to {host_if}"):
                        nl.add_addr(index, str(GATEWAY6), 64, AF_INET6, IFA_F_NODAD)
                for addr in addrs:
                    with _step(f"add the host route to {addr.ip} via {host_if}"):
                        nl.add_route(_family(addr), str(addr.ip), addr.max_prefixlen, index)
                _enable_forwarding(has4, has6)
                if uplink_idx is not None:
                    if has6:
                        netns.write_sysctl(f"net/ipv6/conf/{uplink}/proxy_ndp", 1)
                    for addr in addrs:
                        # `ip neigh replace proxy ADDR dev UPLINK`: answer ARP/NDP there.
                        with _step(f"add a proxy neighbour entry for {addr.ip} on {uplink}"):
                            nl.add_proxy_neigh(_family(addr), str(addr.ip), uplink_idx)
            finally:
                container.join()
        except BaseException:
            _undo(nl, host_if, uplink_idx, addrs)
            raise


def _undo(nl: Rtnl, host_if: str, uplink_idx: int | None,
          addrs: Sequence[IPInterface]) -> None:
    """Best-effort removal after a failed setup (the original error is what matters)."""
    try:
        if uplink_idx is not None:
            for addr in addrs:
                _ignore_gone(nl.del_proxy_neigh, _family(addr), str(addr.ip), uplink_idx)
        index = nl.link_index(host_if)
        if index is not None:
            _ignore_gone(nl.del_link, index)
    except OSError:
        pass


def setup_bridged(ns_fd: int, host_if: str, bridge: str, addrs: Sequence[IPInterface],
                  gateway: IPAddress | None, prefixlen: int, mtu: int | None = None,
                  mac: str | None = None, gateway6: IPAddress | None = None,
                  prefixlen6: int | None = None) -> None:
    """Attach ``ns_fd`` by a veth whose host end is a port of ``bridge``.

    IPv4 addresses get ``prefixlen`` (the bridge's subnet) and the default route via
    ``gateway``; IPv6 ones get ``prefixlen6`` (else keep their own) and ``gateway6``.
    """
    gateway = None if gateway is None else ipaddress.ip_address(str(gateway))
    gateway6 = None if gateway6 is None else ipaddress.ip_address(str(gateway6))
    placed = [ipaddress.ip_interface(f"{a.ip}/{prefixlen}") if a.version == 4 else
              ipaddress.ip_interface(f"{a.ip}/{prefixlen6}") if prefixlen6 else a
              for a in addrs]
    with _rtnl() as nl:
        bridge_idx = _require(nl, bridge, "bridge")
        index = _create_veth(nl, ns_fd, host_if, mtu, mac)
        try:
            container = netns.NetnsThread(ns_fd, _container_bridged, placed, gateway,
                                          gateway6)
            try:
                with _step(f"attach {host_if} to bridge {bridge}"):
                    nl.set_link(index, up=True, master=bridge_idx)
            finally:
                container.join()
        except BaseException:
            _undo(nl, host_if, None, addrs)
            raise


BRIDGE_ALIAS = "made by kamra"  # marks a bridge kamra may remove again


def _kind_and_alias(nl: Rtnl, ifname: str) -> tuple[str | None, str | None]:
    msg = nl.link(ifname)
    if msg is None:
        return None, None
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return kind, msg.get_attr("IFLA_IFALIAS")


def ensure_bridge(bridge: str, gateway_iface: ipaddress.IPv4Interface | None,
                  gateway6_iface: ipaddress.IPv6Interface | None = None) -> bool:
    """Create ``bridge`` if missing, give it the gateway address(es), set it up; True when
    the bridge is kamra's. A bridge made by someone else is used as it is (its
    addresses are its owner's business); another kind of device is refused."""
    with _rtnl() as nl:
        index = nl.link_index(bridge)
        if index is None:
            try:
                nl.add_link(bridge, "bridge", alias=BRIDGE_ALIAS)
            except NetlinkFailure as exc:
                if exc.errno != errno.EEXIST:  # made by another thread meanwhile: fine
                    with _step(f"create bridge {bridge}"):
                        raise
            index = _require(nl, bridge, "bridge")
        kind, alias = _kind_and_alias(nl, bridge)
        if kind != "bridge":
            raise KamraError(f"{bridge} exists and is not a bridge (it is a {kind or 'device'}"
                             " of another program): name another bridge in network.toml")
        if alias != BRIDGE_ALIAS:
            return False
        for iface in (gateway_iface, gateway6_iface):
            if iface is not None:
                with _step(f"add {iface} to bridge {bridge}"):
                    nl.add_addr(index, str(iface.ip), iface.network.prefixlen,
                                _family(iface), IFA_F_NODAD if iface.version == 6 else 0)
        with _step(f"set bridge {bridge} up"):
            nl.set_link(index, up=True)
    _enable_forwarding(gateway_iface is not None, gateway6_iface is not None)
    return True


def remove_bridge(bridge: str) -> None:
    """Delete ``bridge`` if kamra made it (its ports are released, not deleted).
    Idempotent; a bridge or device of someone else's is left alone."""
    with _rtnl() as nl, _step(f"remove bridge {bridge}"):
        index = nl.link_index(bridge)
        if index is not None and _kind_and_alias(nl, bridge) == ("bridge", BRIDGE_ALIAS):
            _ignore_gone(nl.del_link, index)


def set_isolated(host_if: str, on: bool) -> None:
    """Bridge port isolation (IFLA_BRPORT_ISOLATED).

    Isolated ports cannot reach each other; they still reach non-isolated ports and
    the bridge itself (the host). So in bridge mode two containers are cut off from
    each other only when both are isolated (the routed firewall set is stricter).
    """
    with _rtnl() as nl:
        index = _require(nl, host_if, "bridge port")
        with _step(f"set port isolation on {host_if}"):
            nl.set_brport_isolated(index, on)


def allow_localhost_forwards(ifname: str) -> None:
    """Let the host's own connections to 127.0.0.1:PORT be forwarded to a container
    behind ``ifname`` (a kamra veth or bridge): sets its route_localnet.

    The kernel otherwise refuses to route a packet with a 127/8 source out of a
    non-loopback interface. route_localnet would also accept packets *to* 127/8 arriving
    from the container, so call this only with the firewall's guard chain in place
    (``Firewall.ensure()`` drops them before routing). IPv6 has no equivalent: ::1
    never leaves the host, so forwards are not reachable through it.
    """
    netns.write_sysctl(f"net/ipv4/conf/{ifname}/route_localnet", 1)


def teardown(host_if: str, addrs: Sequence[IPInterface], uplink: str | None = None) -> None:
    """Remove the host routes, proxy entries, the veth pair and its ifb. Idempotent.

    The veth may be gone already (the container's namespace died, which deletes the
    pair and its routes); a missing uplink is fine too.
    """
    with _rtnl() as nl:
        with _step(f"look up {host_if}"):
            index = nl.link_index(host_if)
        if index is not None:
            for addr in addrs:
                with _step(f"remove the host route to {addr.ip}"):
                    _ignore_gone(nl.del_route, _family(addr), str(addr.ip),
                                 addr.max_prefixlen, index)
            with _step(f"remove veth {host_if}"):
                _ignore_gone(nl.del_link, index)
        if uplink:
            with _step(f"look up {uplink}"):
                uplink_idx = nl.link_index(uplink)
            if uplink_idx is not None:
                for addr in addrs:
                    with _step(f"remove the proxy neighbour entry for {addr.ip}"):
                        _ignore_gone(nl.del_proxy_neigh, _family(addr), str(addr.ip),
                                     uplink_idx)
        ifb = ifb_name(host_if)
        with _step(f"remove ifb {ifb}"):
            ifb_idx = nl.link_index(ifb)
            if ifb_idx is not None:
                _ignore_gone(nl.del_link, ifb_idx)


def proxy_neighbours(uplink: str) -> list[str]:
    """Addresses the host answers ARP/NDP for on ``uplink``."""
    with _rtnl() as nl, _step(f"list proxy neighbours on {uplink}"):
        index = nl.link_index(uplink)
        if index is None:
            return []
        return [msg.get_attr("NDA_DST") for family in (AF_INET, AF_INET6)
                for msg in nl.proxy_neighs(family) if msg["ifindex"] == index]


def announce(ifname: str, addresses: Sequence[str]) -> None:
    """Gratuitous ARP for each IPv4 address from ``ifname`` (in the calling thread's
    namespace): neighbours that knew the address at another MAC (the host a container
    migrated from) update at once instead of after their cache times out."""
    import socket
    import struct
    import threading

    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    if not v4:
        return
    # Protocol 0: a socket that only sends hooks into nothing, so opening and binding it
    # costs no RCU grace period (an ARP-protocol one did: about 8 ms here).
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        with _step(f"announce {', '.join(v4)} on {ifname}"):
            raw.bind((ifname, 0))
            mac = raw.getsockname()[4]
            for address in v4:
                ip = socket.inet_aton(address)
                # Ethernet broadcast, ARP request: "who has ADDR? tell ADDR (at MAC)".
                frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + \
                    struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
                raw.send(frame)
    finally:
        # Closing a packet socket always waits for a grace period (synchronize_net,
        # 8-24 ms here): not while a migrated container waits to run.
        threading.Thread(target=raw.close, name="kamra-close-arp", daemon=True).start()
