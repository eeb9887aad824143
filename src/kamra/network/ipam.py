"""Address pools: which addresses a network offers and whether a given one may be used.

Pure logic; which addresses are taken is the caller's (the state store's) business.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

from kamra.errors import InvalidInput, ResourceBusy

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Pool:
    """A subnet and its gateway (by default the first host address)."""

    def __init__(self, cidr: str, gateway: str | None = None):
        try:
            self.network: IPNetwork = ipaddress.ip_network(cidr.strip(), strict=True)
        except ValueError as exc:
            raise InvalidInput(f"bad network {cidr!r}: {exc}") from None
        if self.network.num_addresses < 4 and self.network.version == 4:
            raise InvalidInput(f"network {self.network} is too small (at least a /30)")
        if self.network.num_addresses < 4:
            raise InvalidInput(f"network {self.network} is too small (at least a /126)")
        if gateway is None:
            self.gateway: IPAddress = next(self.network.hosts())
        else:
            self.gateway = _parse_ip(gateway)
            problem = _unusable(self.gateway, self.network)
            if problem:
                raise InvalidInput(f"gateway {self.gateway} {problem}")

    def __repr__(self) -> str:
        return f"Pool({str(self.network)!r}, gateway={str(self.gateway)!r})"

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen

    def candidates(self) -> Iterator[IPAddress]:
        """Usable host addresses in order: not the network, broadcast or gateway address."""
        for addr in self.network.hosts():
            if addr != self.gateway:
                yield addr

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address) and \
            addr in self.network


def _parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise InvalidInput(f"not an IP address: {text!r}") from None


def _unusable(addr: IPAddress, network: IPNetwork) -> str:
    """Why ``addr`` cannot be a host in ``network`` ("" if it can)."""
    if addr.version != network.version or addr not in network:
        return f"is not in {network}"
    if addr == network.network_address:
        return f"is the network address of {network}"
    if network.version == 4 and addr == network.broadcast_address:
        return f"is the broadcast address of {network}"
    return ""


def _normalize(taken: Iterable[object]) -> set[IPAddress]:
    found = set()
    for item in taken:
        if isinstance(item, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
            found.add(item.ip)
        else:
            found.add(ipaddress.ip_address(str(item)))
    return found


def first_free(pool: Pool, taken: Iterable[object]) -> IPAddress:
    """The lowest candidate of ``pool`` not in ``taken`` (addresses or their strings)."""
    used = _normalize(taken)
    for addr in pool.candidates():
        if addr not in used:
            return addr
    raise ResourceBusy(f"no free address left in {pool.network}")


def parse_address(text: str, pool: Pool) -> IPAddress:
    """Validate a user-given address for ``pool``; one-line InvalidInput when unusable.

    "10.0.3.5" and "10.0.3.5/24" (when /24 is the pool's prefix) are accepted.
    """
    raw = str(text).strip()
    if "/" in raw:
        try:
            iface = ipaddress.ip_interface(raw)
        except ValueError:
            raise InvalidInput(f"not an IP address: {text!r}") from None
        if iface.network.prefixlen != pool.prefixlen:
            raise InvalidInput(f"{raw}: the prefix length must be /{pool.prefixlen} "
                               f"(the network is {pool.network}), or leave it out")
        addr: IPAddress = iface.ip
    else:
        addr = _parse_ip(raw)
    problem = _unusable(addr, pool.network)
    if problem:
        raise InvalidInput(f"{addr} {problem}")
    if addr == pool.gateway:
        raise InvalidInput(f"{addr} is the gateway of {pool.network}")
    return addr
