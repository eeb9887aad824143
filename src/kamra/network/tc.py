"""Bandwidth limits on a container's host-side veth: htb, plus an ifb for what it sends.

Directions are the container's: ``egress`` is what the container sends, which arrives
on the host veth's *ingress*, where nothing can be queued; an ingress qdisc redirects
it (u32 match-all + mirred) to an ifb device, and htb shapes it on the ifb's egress.
``ingress`` is what the container receives: htb on the host veth's own egress.

Requests go over kamra's rtnetlink socket (``rtnl.Rtnl``) with pyroute2's tc codecs
(tcmsg, the htb and u32 plugins, which compute htb's rate tables); bfifo has no
pyroute2 codec and is encoded by hand. No ``tc`` process is run.
"""

from __future__ import annotations

import errno
import struct
from socket import htons

from pyroute2.netlink import NLM_F_DUMP
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_GETQDISC,
    RTM_GETTCLASS,
    RTM_GETTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
    RTM_NEWTFILTER,
    TC_H_INGRESS,
    TC_H_ROOT,
)
from pyroute2.netlink.rtnl.tcmsg import plugins, tcmsg

from kamra.errors import InvalidInput, NotFound
from kamra.network.names import ifb_name
from kamra.network.rtnl import CREATE, REPLACE, NetlinkFailure, Rtnl
from kamra.network.rtnl import netlink_step as _step

ETH_P_ALL = 0x0003
HTB_ROOT = 0x00010000      # 1:
HTB_CLASS = 0x00010010     # 1:10, the one class everything goes to (htb "default 10")
LEAF = 0x00100000          # 10:, the leaf queue under 1:10
INGRESS = 0xFFFF0000       # ffff:
IFB_TXQLEN = 1000
MIN_RATE = 8_000           # bits/s; below this htb's arithmetic gets silly
# Queue under the shaper: ~100 ms of traffic, but at least a few 64 KiB GSO packets, so
# TCP fills the link without a bufferbloat of seconds.
QUEUE_SECONDS = 0.1
QUEUE_MIN_BYTES = 4 * 65536
QUEUE_MAX_BYTES = 16 << 20


def _burst(rate_bits: int) -> int:
    """htb's burst in bytes: 10 ms at the rate, never less than a few full packets.

    Large enough that timer slack on a busy host does not lose tokens (which makes
    the achieved rate fall short), small enough to stay well within 15% over a second.
    """
    return max(rate_bits // 8 // 100, 4 * 1514)


def _quantum(rate_bits: int) -> int:
    # One class only, so the quantum only has to be legal: r2q's default would give
    # rate/10, which the kernel warns about above 200000 bytes.
    return max(1514, min(rate_bits // 8 // 10, 200_000))


def _tc_msg(index: int, handle: int, parent: int, kind: str | None,
            options: dict | None = None, info: int = 0) -> tcmsg:
    msg = tcmsg()
    msg["index"] = index
    msg["handle"] = handle
    msg["parent"] = parent
    msg["info"] = info
    attrs: list[list[object]] = []
    if kind is not None:
        attrs.append(["TCA_KIND", kind])
    if options is not None:
        attrs.append(["TCA_OPTIONS", options])
    msg["attrs"] = attrs
    return msg


def _htb(nl: Rtnl, index: int, rate_bits: int) -> None:
    """htb 1: default 10, class 1:10 at the rate, bfifo under it; replaced in place."""
    qdiscs = _qdiscs(nl, index)
    if qdiscs.get(TC_H_ROOT) != "htb":
        options = plugins["htb"].get_parameters({"default": 0x10})
        nl.request(_tc_msg(index, HTB_ROOT, TC_H_ROOT, "htb", options), RTM_NEWQDISC,
                   REPLACE)
    burst = _burst(rate_bits)
    options = plugins["htb"].get_class_parameters({
        "rate": f"{rate_bits}bit", "ceil": f"{rate_bits}bit", "burst": burst,
        "cburst": burst, "quantum": _quantum(rate_bits), "mtu": 1514})
    nl.request(_tc_msg(index, HTB_CLASS, HTB_ROOT, "htb", options), RTM_NEWTCLASS, REPLACE)
    limit = min(max(int(rate_bits / 8 * QUEUE_SECONDS), QUEUE_MIN_BYTES), QUEUE_MAX_BYTES)
    _bfifo(nl, index, limit)


def _bfifo(nl: Rtnl, index: int, limit: int) -> None:
    """A byte-limited fifo as the class's leaf (by hand: pyroute2 has no bfifo codec)."""
    kind = b"bfifo\0"
    kind_attr = struct.pack("=HH", 4 + len(kind), 1) + kind + b"\0" * (-len(kind) % 4)
    options = struct.pack("=HHI", 8, 2, limit)  # TCA_OPTIONS: struct tc_fifo_qopt
    header = struct.pack("=BxxxiIII", 0, index, LEAF, HTB_CLASS, 0)
    nl.request_raw(RTM_NEWQDISC, header + kind_attr + options, REPLACE)


def _qdiscs(nl: Rtnl, index: int) -> dict[int, str]:
    """Parent handle -> kind of the qdiscs on one interface (TC_H_ROOT, TC_H_INGRESS)."""
    found: dict[int, str] = {}
    msg = tcmsg()
    msg["index"] = index
    for reply in nl.request(msg, RTM_GETQDISC, NLM_F_DUMP):
        if reply["index"] == index:
            found[reply["parent"]] = reply.get_attr("TCA_KIND")
    return found


def _delete_qdisc(nl: Rtnl, index: int, parent: int) -> None:
    try:
        nl.request(_tc_msg(index, 0, parent, None), RTM_DELQDISC)
    except NetlinkFailure as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


def _ensure_ifb(nl: Rtnl, name: str) -> int:
    index = nl.link_index(name)
    if index is None:
        try:
            nl.add_link(name, "ifb", txqlen=IFB_TXQLEN)
        except NetlinkFailure as exc:
            if exc.errno != errno.EEXIST:
                raise
        index = nl.link_index(name)
        if index is None:
            raise NotFound(f"ifb {name} vanished while being set up")
    nl.set_link(index, up=True)
    return index


def _redirect(nl: Rtnl, index: int, ifb_index: int) -> None:
    """ingress qdisc + one u32 match-all filter redirecting everything to the ifb."""
    if _qdiscs(nl, index).get(TC_H_INGRESS) != "ingress":
        nl.request(_tc_msg(index, INGRESS, TC_H_INGRESS, "ingress", {"attrs": []}),
                   RTM_NEWQDISC, CREATE)
    probe = tcmsg()
    probe["index"] = index
    probe["parent"] = INGRESS
    for reply in nl.request(probe, RTM_GETTFILTER, NLM_F_DUMP):
        if reply.get_attr("TCA_KIND") == "u32" and reply.get_attr("TCA_OPTIONS"):
            options = reply.get_attr("TCA_OPTIONS")
            if options.get_attr("TCA_U32_ACT") is not None:
                return  # already redirecting (the ifb's index cannot have changed: same name)
    options = plugins["u32"].get_parameters({
        "target": 0, "keys": ["0x0/0x0+0"],
        "action": {"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": ifb_index}})
    info = htons(ETH_P_ALL) | (1 << 16)  # protocol all, prio 1
    nl.request(_tc_msg(index, 0, INGRESS, "u32", options, info), RTM_NEWTFILTER, CREATE)


def _check_rate(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, int) or value < MIN_RATE):
        raise InvalidInput(f"{what} limit must be at least {MIN_RATE} bit/s, not {value!r}")


def set_bandwidth(host_if: str, egress: int | None, ingress: int | None) -> None:
    """Limit what the container behind ``host_if`` sends (egress) and receives
    (ingress), in bits/s. Applies live; None removes that direction's limit."""
    _check_rate(egress, "egress")
    _check_rate(ingress, "ingress")
    with _step("open a netlink socket"):
        nl = Rtnl()
    with nl:
        with _step(f"look up {host_if}"):
            index = nl.link_index(host_if)
        if index is None:
            raise NotFound(f"interface {host_if} does not exist")
        ifb = ifb_name(host_if)
        if ingress is None:
            with _step(f"remove the ingress limit on {host_if}"):
                if _qdiscs(nl, index).get(TC_H_ROOT) == "htb":
                    _delete_qdisc(nl, index, TC_H_ROOT)
        else:
            with _step(f"set the ingress limit on {host_if}"):
                _htb(nl, index, ingress)
        if egress is None:
            with _step(f"remove the egress limit on {host_if}"):
                _delete_qdisc(nl, index, TC_H_INGRESS)
                ifb_index = nl.link_index(ifb)
                if ifb_index is not None:
                    nl.del_link(ifb_index)
        else:
            with _step(f"set up ifb {ifb}"):
                ifb_index = _ensure_ifb(nl, ifb)
            with _step(f"set the egress limit on {ifb}"):
                _htb(nl, ifb_index, egress)
            with _step(f"redirect {host_if}'s ingress to {ifb}"):
                _redirect(nl, index, ifb_index)


def clear(host_if: str) -> None:
    """Remove both limits and the ifb. Idempotent (the veth may be gone)."""
    with _step("open a netlink socket"):
        nl = Rtnl()
    with nl, _step(f"clear the limits on {host_if}"):
        index = nl.link_index(host_if)
        if index is not None:
            qdiscs = _qdiscs(nl, index)
            if qdiscs.get(TC_H_ROOT) == "htb":
                _delete_qdisc(nl, index, TC_H_ROOT)
            if TC_H_INGRESS in qdiscs:
                _delete_qdisc(nl, index, TC_H_INGRESS)
        ifb_index = nl.link_index(ifb_name(host_if))
        if ifb_index is not None:
            try:
                nl.del_link(ifb_index)
            except NetlinkFailure as exc:
                if exc.errno != errno.ENODEV:
                    raise


def _class_rate(nl: Rtnl, index: int) -> int | None:
    msg = tcmsg()
    msg["index"] = index
    for reply in nl.request(msg, RTM_GETTCLASS, NLM_F_DUMP):
        if reply["index"] == index and reply["handle"] == HTB_CLASS:
            parms = reply.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")
            rate64 = reply.get_nested("TCA_OPTIONS", "TCA_HTB_RATE64")
            if parms is not None:
                return int((rate64 or parms["rate"]) * 8)
    return None


def get_bandwidth(host_if: str) -> tuple[int | None, int | None]:
    """(egress, ingress) limits in bits/s as the kernel holds them; None where unlimited."""
    with _step("open a netlink socket"):
        nl = Rtnl()
    with nl, _step(f"read the limits on {host_if}"):
        index = nl.link_index(host_if)
        if index is None:
            raise NotFound(f"interface {host_if} does not exist")
        ingress = _class_rate(nl, index) if _qdiscs(nl, index).get(TC_H_ROOT) == "htb" \
            else None
        ifb_index = nl.link_index(ifb_name(host_if))
        egress = None
        if ifb_index is not None and TC_H_INGRESS in _qdiscs(nl, index):
            egress = _class_rate(nl, ifb_index)
        return egress, ingress
