"""The host's network settings for one data root: ``<root>/network.toml``.

Address pools, the bridge, the uplink for proxy ARP and the default nameservers are
the host's, not any container's: they live in one small file beside the state, read
when kamrad starts (and by ``kamra network show``). Every setting has a default, so the
file is optional::

    [network]
    ipv4_pool = "10.73.0.0/16"     # routed: /32 per container; bridge: the bridge's subnet
    ipv4_gateway = "10.73.0.1"     # the bridge's address (bridge mode); default: first
    ipv6_pool = "fd42:73::/64"     # optional; no IPv6 without it
    bridge = "kamrabr0"
    uplink = "eth0"                # routed: answer ARP/NDP for containers there
    nameservers = ["192.0.2.53"]   # default: the host's /etc/resolv.conf
    mtu = 1500
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field

from kamra.errors import InvalidInput
from kamra.paths import Layout

FILE = "network.toml"
DEFAULT_IPV4_POOL = "10.73.0.0/16"
DEFAULT_BRIDGE = "kamrabr0"
_KNOWN = {"ipv4_pool", "ipv4_gateway", "ipv6_pool", "bridge", "uplink", "nameservers", "mtu"}


@dataclass
class NetworkConfig:
    ipv4_pool: ipaddress.IPv4Network
    ipv4_gateway: ipaddress.IPv4Address
    ipv6_pool: ipaddress.IPv6Network | None = None
    bridge: str = DEFAULT_BRIDGE
    uplink: str | None = None
    nameservers: list[str] = field(default_factory=list)
    mtu: int | None = None
    path: str = ""

    @property
    def ipv6_gateway(self) -> ipaddress.IPv6Address | None:
        return None if self.ipv6_pool is None else self.ipv6_pool.network_address + 1

    def to_json(self) -> dict:
        return {"file": self.path, "ipv4_pool": str(self.ipv4_pool),
                "ipv4_gateway": str(self.ipv4_gateway),
                "ipv6_pool": str(self.ipv6_pool) if self.ipv6_pool else None,
                "bridge": self.bridge, "uplink": self.uplink,
                "nameservers": self.nameservers, "mtu": self.mtu}


def _bad(path: str, key: str, problem: str, form: str) -> InvalidInput:
    return InvalidInput(f"{path}: {key}: {problem}: use {form}")


def load(layout: Layout) -> NetworkConfig:
    path = os.path.join(layout.root, FILE)
    data: dict = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f).get("network", {})
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise InvalidInput(f"{path} cannot be read: {exc}: fix or remove it") from None
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise InvalidInput(f"{path}: unknown setting {unknown[0]!r} in [network]: "
                           f"known are {', '.join(sorted(_KNOWN))}")
    try:
        pool4 = ipaddress.IPv4Network(str(data.get("ipv4_pool", DEFAULT_IPV4_POOL)),
                                      strict=False)
    except ValueError as exc:
        raise _bad(path, "ipv4_pool", str(exc), "a network like 10.73.0.0/16") from None
    if pool4.prefixlen > 30:
        raise _bad(path, "ipv4_pool", f"{pool4} is too small", "a /30 or larger network")
    try:
        gateway = ipaddress.IPv4Address(str(data.get("ipv4_gateway",
                                                     pool4.network_address + 1)))
    except ValueError as exc:
        raise _bad(path, "ipv4_gateway", str(exc), "an address in ipv4_pool") from None
    if gateway not in pool4:
        raise _bad(path, "ipv4_gateway", f"{gateway} is not in {pool4}",
                   "an address in ipv4_pool")
    pool6 = None
    if data.get("ipv6_pool"):
        try:
            pool6 = ipaddress.IPv6Network(str(data["ipv6_pool"]), strict=False)
        except ValueError as exc:
            raise _bad(path, "ipv6_pool", str(exc), "a network like fd42:73::/64") from None
    nameservers = data.get("nameservers", [])
    if not isinstance(nameservers, list):
        raise _bad(path, "nameservers", "not a list", 'a list like ["192.0.2.53"]')
    for server in nameservers:
        try:
            ipaddress.ip_address(str(server))
        except ValueError:
            raise _bad(path, "nameservers", f"{server!r} is not an IP address",
                       'a list like ["192.0.2.53"]') from None
    mtu = data.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise _bad(path, "mtu", f"{mtu!r} is out of range", "a number from 576 to 65535")
    bridge = str(data.get("bridge", DEFAULT_BRIDGE))
    if not 0 < len(bridge) <= 15 or "/" in bridge or " " in bridge:
        raise _bad(path, "bridge", f"{bridge!r} is not an interface name",
                   "1 to 15 characters without '/' or spaces")
    return NetworkConfig(ipv4_pool=pool4, ipv4_gateway=gateway, ipv6_pool=pool6,
                         bridge=bridge, uplink=data.get("uplink") or None,
                         nameservers=[str(s) for s in nameservers], mtu=mtu, path=path)


def host_nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The host's nameservers, less loopback ones (a container cannot reach the host's
    127.0.0.53 stub resolver through its own loopback)."""
    servers = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        if not ipaddress.ip_address(fields[1].split("%")[0]).is_loopback:
                            servers.append(fields[1])
                    except ValueError:
                        continue
    except OSError:
        pass
    return servers
