"""Interface names kamra gives on the host, derived from container names.

One place, because the firewall matches on the prefixes ("kv*") and tc derives the
ifb's name from the veth's.
"""

from __future__ import annotations

import hashlib

VETH_PREFIX = "kv"
IFB_PREFIX = "kb"
CONTAINER_IFNAME = "eth0"
IFNAMSIZ = 15  # usable characters of an interface name


def host_ifname(name: str, salt: str = "") -> str:
    """The host-side veth name of container ``name``: "kv" + 12 hex digits (14 chars).

    A hash, because container names run to 63 characters and interface names stop at
    15; salted with the data root's id so two kamra roots on one host never collide.
    48 bits keep an accidental collision unlikely even with many thousand containers
    (and ``setup_*`` refuses an existing name rather than take it over).
    """
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).hexdigest()
    return VETH_PREFIX + digest[:12]


def ifb_name(host_if: str) -> str:
    """The ifb device that shapes what the container behind ``host_if`` sends."""
    suffix = host_if[len(VETH_PREFIX):] if host_if.startswith(VETH_PREFIX) else host_if
    return (IFB_PREFIX + suffix)[:IFNAMSIZ]
