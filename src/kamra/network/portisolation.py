"""Isolation for bridged containers, with routed mode's rule: an nftables bridge table.

The kernel's own bridge port isolation (``link.set_isolated``, IFLA_BRPORT_ISOLATED)
only cuts off two ports that are *both* isolated. kamra's rule is that an isolated
container talks to no other container at all, so here a frame forwarded between two
kamra ports is dropped when either port is in the ``isolated`` set. Frames to and from
the bridge itself (the host, the gateway) are not forwarded frames, so the host still
reaches every container. One set element per container; the rules never change.
"""

from __future__ import annotations

from kamra.network.names import VETH_PREFIX
from kamra.network.nft import NftTable


def ruleset(table: str) -> str:
    t = f"bridge {table}"
    veth = f'"{VETH_PREFIX}*"'
    return "\n".join([
        f"add table {t}",
        f"add set {t} isolated {{ type ifname; }}",
        f"add chain {t} forward {{ type filter hook forward priority filter; "
        "policy accept; }",
        f"flush chain {t} forward",
        f"add rule {t} forward iifname @isolated oifname {veth} drop",
        f"add rule {t} forward oifname @isolated iifname {veth} drop",
    ]) + "\n"


class PortIsolation(NftTable):
    """kamra's ``bridge`` table (same name as its inet table; the families keep them apart)."""

    family = "bridge"

    def ensure(self) -> None:
        """Create or repair the table; set elements are kept. Idempotent."""
        self._run(f"set up table {self.qualified}", ruleset(self.table))

    def set_isolated(self, host_if: str, on: bool) -> None:
        """Isolate the container behind bridge port ``host_if``, or stop. Idempotent."""
        if on:
            self._element("add", "isolated", f'"{host_if}"', f"isolate port {host_if}")
        else:
            self._discard("isolated", f'"{host_if}"', f"stop isolating port {host_if}")

    def isolated(self) -> list[str]:
        return sorted(str(e) for e in self.elements("isolated"))
