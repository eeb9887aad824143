"""A small synchronous rtnetlink client for kamra's start path.

pyroute2 0.9's IPRoute runs every request through an asyncio event loop, about a
millisecond each here, and the start path makes a dozen. This client does one blocking
send and receive per request (about 0.1 ms): the few messages of the start path (link,
address, route, neighbour) are packed by hand with ``struct``, which also spares
pyroute2's generic encoder (~60 us a message); dumps are decoded, and tc messages
encoded, with pyroute2's message classes (``request``). The socket belongs to the
namespace of the thread that created it and may then be used from any thread, one at
a time.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsg_base,
)
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_SETLINK,
)
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from kamra.errors import KamraError, KernelError

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000

IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
IFA_F_NODAD = 0x02
NTF_PROXY = 0x08
NUD_PERMANENT = 0x80

# Attribute numbers (linux/if_link.h, if_addr.h, rtnetlink.h, neighbour.h, veth.h).
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_TXQLEN = 13
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_BR_MCAST_SNOOPING = 23
VETH_INFO_PEER = 1
IFLA_BRPORT_ISOLATED = 33
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
NDA_DST = 1

CREATE = NLM_F_CREATE | NLM_F_EXCL
REPLACE = NLM_F_CREATE | NLM_F_REPLACE

_HEADER = struct.Struct("=IHHII")      # nlmsghdr: length, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")     # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")      # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")   # rtmsg: family, dst_len, src_len, tos, table,
                                       #        protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")    # ndmsg: family, ifindex, state, flags, type


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _str(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


def _u8(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=B", value))


def _ip(kind: int, family: int, address: str) -> bytes:
    return _attr(kind, socket.inet_pton(family, address))


def _mac(kind: int, mac: str) -> bytes:
    return _attr(kind, bytes.fromhex(mac.replace(":", "").replace("-", "")))


class NetlinkFailure(OSError):
    """A request the kernel refused: errno plus the kernel's extended-ack text if any."""


def _parse_ext_ack(data: bytes, offset: int, length: int, flags: int) -> str:
    # With NETLINK_CAP_ACK the echoed request is only its header, so the TLVs follow
    # nlmsghdr + error code + echoed nlmsghdr.
    if not flags & NLM_F_ACK_TLVS:
        return ""
    pos = offset + 16 + 4 + 16
    end = offset + length
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype == NLMSGERR_ATTR_MSG:
            return data[pos + 4:pos + alen].split(b"\0", 1)[0].decode(errors="replace")
        pos += (alen + 3) & ~3
    return ""


class Rtnl:
    """One NETLINK_ROUTE socket in the creating thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except OSError:  # old kernels: plain errno only
            pass
        self.sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the wire -------------------------------------------------------------------

    def request(self, msg: nlmsg_base, msg_type: int, flags: int = 0) -> list[nlmsg_base]:
        """Send one request and return the replies (a dump's messages, or none for an ack).

        Raises NetlinkFailure on an error reply.
        """
        seq = self._next_seq()
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        msg["header"]["sequence_number"] = seq
        msg.encode()
        self.sock.send(msg.data)
        return self._replies(seq, type(msg))

    def request_raw(self, msg_type: int, payload: bytes, flags: int = 0
                    ) -> list[tuple[bytes, int]]:
        """Send a request encoded by hand; replies come back undecoded, as (datagram,
        offset of the message in it)."""
        seq = self._next_seq()
        header = _HEADER.pack(_HEADER.size + len(payload), msg_type,
                              NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0)
        self.sock.send(header + payload)
        return self._replies(seq, None)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _replies(self, seq: int, cls: type[nlmsg_base] | None) -> list[Any]:
        replies: list[Any] = []
        while True:
            data = self.sock.recv(1 << 17)
            for offset, length, rtype, rflags, rseq in _messages(data):
                if rseq != seq:
                    continue  # a stale reply of an earlier, interrupted request
                if rtype == NLMSG_DONE:
                    return replies
                if rtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + 16)[0]
                    if code == 0:
                        return replies
                    detail = _parse_ext_ack(data, offset, length, rflags)
                    text = os.strerror(code) + (f": {detail}" if detail else "")
                    raise NetlinkFailure(code, text)
                if cls is None:
                    replies.append((data, offset))
                else:
                    reply = cls(data[offset:offset + length])
                    reply.decode()
                    replies.append(reply)

    # -- links ----------------------------------------------------------------------

    def link_index(self, ifname: str) -> int | None:
        """The index of ``ifname``, or None: a targeted RTM_GETLINK, the reply not decoded."""
        payload = _IFINFO.pack(0, 0, 0, 0, 0) + _str(IFLA_IFNAME, ifname)
        try:
            raw = self.request_raw(RTM_GETLINK, payload)
        except NetlinkFailure as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        for data, offset in raw:
            return _IFINFO.unpack_from(data, offset + _HEADER.size)[2]
        return None

    def links(self) -> list[ifinfmsg]:
        return self.request(ifinfmsg(), RTM_GETLINK, NLM_F_DUMP)

    def link(self, ifname: str) -> ifinfmsg | None:
        """``ifname``'s link message, decoded (kind, alias, ...), or None."""
        msg = ifinfmsg()
        msg["attrs"] = [["IFLA_IFNAME", ifname]]
        try:
            replies = self.request(msg, RTM_GETLINK)
        except NetlinkFailure as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return replies[0] if replies else None

    def add_veth(self, ifname: str, peer: str, peer_netns_fd: int | None = None,
                 mtu: int | None = None, peer_mac: str | None = None) -> None:
        """A veth pair; the peer may be created directly in another namespace."""
        peer_attrs = _str(IFLA_IFNAME, peer)
        if peer_netns_fd is not None:
            peer_attrs += _u32(IFLA_NET_NS_FD, peer_netns_fd)
        if mtu:
            peer_attrs += _u32(IFLA_MTU, mtu)
        if peer_mac:
            peer_attrs += _mac(IFLA_ADDRESS, peer_mac)
        # VETH_INFO_PEER carries a whole ifinfomsg followed by the peer's attributes.
        info = _str(IFLA_INFO_KIND, "veth") + _attr(
            IFLA_INFO_DATA, _attr(VETH_INFO_PEER, _IFINFO.pack(0, 0, 0, 0, 0) + peer_attrs))
        attrs = _str(IFLA_IFNAME, ifname) + (_u32(IFLA_MTU, mtu) if mtu else b"")
        attrs += _attr(IFLA_LINKINFO, info)
        self.request_raw(RTM_NEWLINK, _IFINFO.pack(0, 0, 0, 0, 0) + attrs, CREATE)

    def add_link(self, ifname: str, kind: str, txqlen: int | None = None,
                 alias: str | None = None) -> None:
        """A link of a kind that needs no options (bridge, ifb); ``alias`` marks its maker
        (set by a second message: the kernel ignores it on creation)."""
        info = _str(IFLA_INFO_KIND, kind)
        if kind == "bridge":
            # No multicast snooping: a bridge that snoops but has no MLD querier can stop
            # flooding the neighbour solicitations IPv6 needs (seen as a rare IPv6 timeout
            # between two containers); a container bridge gains nothing from snooping.
            info += _attr(IFLA_INFO_DATA, _u8(IFLA_BR_MCAST_SNOOPING, 0))
        attrs = _str(IFLA_IFNAME, ifname) + _attr(IFLA_LINKINFO, info)
        if txqlen is not None:
            attrs += _u32(IFLA_TXQLEN, txqlen)
        self.request_raw(RTM_NEWLINK, _IFINFO.pack(0, 0, 0, 0, 0) + attrs, CREATE)
        if alias is not None:
            self.set_link(ifname=ifname, alias=alias)

    def set_link(self, index: int = 0, up: bool | None = None, master: int | None = None,
                 mtu: int | None = None, ifname: str | None = None,
                 alias: str | None = None) -> None:
        """Change a link, named by ``index`` or (index 0) by ``ifname``: no lookup needed."""
        flags, change = (0, 0) if up is None else (IFF_UP if up else 0, IFF_UP)
        attrs = b""
        if not index and ifname:
            attrs += _str(IFLA_IFNAME, ifname)
        if master is not None:
            attrs += _u32(IFLA_MASTER, master)
        if mtu is not None:
            attrs += _u32(IFLA_MTU, mtu)
        if alias is not None:
            attrs += _str(IFLA_IFALIAS, alias)
        self.request_raw(RTM_NEWLINK, _IFINFO.pack(0, 0, index, flags, change) + attrs)

    def set_brport_isolated(self, index: int, on: bool) -> None:
        """IFLA_BRPORT_ISOLATED on a bridge port.

        The bridge reads IFLA_PROTINFO as port options only when it carries
        NLA_F_NESTED (otherwise as a bare STP state).
        """
        isolated = _attr(IFLA_BRPORT_ISOLATED, bytes([1 if on else 0]))
        payload = _IFINFO.pack(socket.AF_BRIDGE, 0, index, 0, 0) + _attr(
            IFLA_PROTINFO | NLA_F_NESTED, isolated)
        self.request_raw(RTM_SETLINK, payload)

    def del_link(self, index: int) -> None:
        self.request_raw(RTM_DELLINK, _IFINFO.pack(0, 0, index, 0, 0))

    # -- addresses, routes, neighbours ------------------------------------------------

    def _addr(self, index: int, address: str, prefixlen: int, family: int,
              flags: int = 0) -> bytes:
        payload = _IFADDR.pack(family, prefixlen, flags & 0xFF, 0, index)
        payload += _ip(IFA_ADDRESS, family, address)
        if family == socket.AF_INET:
            payload += _ip(IFA_LOCAL, family, address)
        if flags:
            payload += _u32(IFA_FLAGS, flags)
        return payload

    def add_addr(self, index: int, address: str, prefixlen: int, family: int,
                 flags: int = 0) -> None:
        """Add or replace an address (IFA_F_NODAD in ``flags`` skips IPv6 DAD)."""
        self.request_raw(RTM_NEWADDR, self._addr(index, address, prefixlen, family, flags),
                         REPLACE)

    def del_addr(self, index: int, address: str, prefixlen: int, family: int) -> None:
        self.request_raw(RTM_DELADDR, self._addr(index, address, prefixlen, family))

    def add_route(self, family: int, dst: str, dst_len: int, oif: int,
                  gateway: str | None = None) -> None:
        """Add or replace a main-table route: link scope without a gateway, like `ip route`."""
        scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        payload = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, scope,
                              RTN_UNICAST, 0) + _u32(RTA_OIF, oif)
        if dst_len:
            payload += _ip(RTA_DST, family, dst)
        if gateway:
            payload += _ip(RTA_GATEWAY, family, gateway)
        self.request_raw(RTM_NEWROUTE, payload, REPLACE)

    def del_route(self, family: int, dst: str, dst_len: int, oif: int) -> None:
        # Protocol and scope 0 match any (RT_SCOPE_NOWHERE would refuse).
        payload = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, 0, 0, RTN_UNICAST, 0)
        payload += _u32(RTA_OIF, oif) + (_ip(RTA_DST, family, dst) if dst_len else b"")
        self.request_raw(RTM_DELROUTE, payload)

    def _proxy(self, family: int, address: str, index: int) -> bytes:
        return _NDMSG.pack(family, index, NUD_PERMANENT, NTF_PROXY, 0) + _ip(
            NDA_DST, family, address)

    def add_proxy_neigh(self, family: int, address: str, index: int) -> None:
        """Like `ip neigh replace proxy ADDRESS dev DEV`."""
        self.request_raw(RTM_NEWNEIGH, self._proxy(family, address, index), REPLACE)

    def del_proxy_neigh(self, family: int, address: str, index: int) -> None:
        self.request_raw(RTM_DELNEIGH, self._proxy(family, address, index))

    def proxy_neighs(self, family: int) -> list[ndmsg]:
        msg = ndmsg()
        msg["family"] = family
        msg["flags"] = NTF_PROXY
        return self.request(msg, RTM_GETNEIGH, NLM_F_DUMP)


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, mtype, flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return
        yield offset, length, mtype, flags, seq
        offset += (length + 3) & ~3


@contextmanager
def netlink_step(what: str) -> Iterator[None]:
    """Translate a netlink or OS failure into a one-line KernelError naming the step."""
    try:
        yield
    except KamraError:
        raise
    except OSError as exc:
        detail = str(exc.strerror or "")
        extra = detail.split(": ", 1)[1] if ": " in detail else ""
        raise KernelError(what, exc.errno or errno.EIO, extra) from exc
