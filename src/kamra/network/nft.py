"""kamra's own nftables table: NAT, port forwards and isolation as set elements.

The ruleset is fixed and small; everything per container is an element of a set or a
map, so starting a container adds elements (one short netlink transaction) and never
rewrites rules. kamra only ever touches its own table (``inet kamra`` by default).

Commands go through libnftables (ctypes) in this process; only when the library is
missing does kamra run ``nft -f -``. A libnftables context opens its netlink socket
when it is made, so a ``Firewall`` acts on the network namespace of the thread that
constructed it, whichever thread calls it later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import ipaddress
import json
import shutil
import subprocess
import threading
from dataclasses import dataclass

from kamra.errors import AlreadyExists, InvalidInput, KamraError
from kamra.network.names import VETH_PREFIX

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NFT_CTX_OUTPUT_JSON = 1 << 4
PROTOCOLS = ("tcp", "udp")


class FirewallError(KamraError):
    """nftables refused a command; ``errno`` is guessed from its message (0 if unknown)."""

    def __init__(self, message: str, err: int = 0):
        super().__init__(message)
        self.errno = err


_ERRNO_TEXT = {
    "No such file or directory": errno.ENOENT,
    "File exists": errno.EEXIST,
    "Operation not permitted": errno.EPERM,
    "Device or resource busy": errno.EBUSY,
    "Operation not supported": errno.EOPNOTSUPP,
}


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("Error:"):
            return line[len("Error:"):].strip()
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


class _LibNftables:
    """A libnftables context: commands in, (ok, output, error text) out."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib
        self.ctx = lib.nft_ctx_new(0)
        if not self.ctx:
            raise FirewallError("nftables: cannot create a libnftables context")
        lib.nft_ctx_buffer_output(self.ctx)
        lib.nft_ctx_buffer_error(self.ctx)
        self.plain_flags = lib.nft_ctx_output_get_flags(self.ctx)

    def run(self, commands: str, as_json: bool = False) -> tuple[bool, str, str]:
        flags = self.plain_flags | (NFT_CTX_OUTPUT_JSON if as_json else 0)
        self.lib.nft_ctx_output_set_flags(self.ctx, flags)
        rc = self.lib.nft_run_cmd_from_buffer(self.ctx, commands.encode())
        out = (self.lib.nft_ctx_get_output_buffer(self.ctx) or b"").decode(errors="replace")
        err = (self.lib.nft_ctx_get_error_buffer(self.ctx) or b"").decode(errors="replace")
        return rc == 0, out, err

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


class _NftCommand:
    """Fallback without libnftables: ``nft -f -`` (a process per call; not the fast path).

    Unlike the library this acts on the namespace of the calling thread at each call.
    """

    def __init__(self, path: str):
        self.path = path

    def run(self, commands: str, as_json: bool = False) -> tuple[bool, str, str]:
        argv = [self.path] + (["-j"] if as_json else []) + ["-f", "-"]
        result = subprocess.run(argv, input=commands, capture_output=True, text=True,
                                check=False)
        return result.returncode == 0, result.stdout, result.stderr

    def close(self) -> None:
        pass


def open_backend() -> _LibNftables | _NftCommand:
    path = ctypes.util.find_library("nftables") or "libnftables.so.1"
    try:
        return _LibNftables(path)
    except OSError:
        command = shutil.which("nft")
        if command is None:
            raise FirewallError("nftables: neither libnftables nor the nft command "
                                "is installed") from None
        return _NftCommand(command)


@dataclass(frozen=True)
class Forward:
    """A port forward: ``host_ip`` None means every address of the host."""

    proto: str
    host_port: int
    ct_addr: IPAddress
    ct_port: int
    host_ip: IPAddress | None = None

    def to_json(self) -> dict:
        return {"proto": self.proto, "host_port": self.host_port,
                "ct_addr": str(self.ct_addr), "ct_port": self.ct_port,
                "host_ip": None if self.host_ip is None else str(self.host_ip)}


def _ip(value: str | IPAddress) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise InvalidInput(f"not an IP address: {value!r}") from None


def _v(addr: IPAddress) -> str:
    return "4" if addr.version == 4 else "6"


def _check_port(port: int, what: str) -> int:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInput(f"{what} must be a port number 1-65535, not {port!r}")
    return port


def _check_proto(proto: str) -> str:
    if proto not in PROTOCOLS:
        raise InvalidInput(f"protocol must be tcp or udp, not {proto!r}")
    return proto


NAT_CHAINS = ("prerouting", "output", "postrouting")


def ruleset(table: str, nat: bool = True) -> str:
    """The commands that (re)create kamra's table without losing set elements.

    ``add`` of an existing table, set or chain is a no-op, and each chain is flushed
    before its rules are added, all in one transaction: running this twice, or from
    two processes at once, leaves one copy of every rule.

    The NAT chains (``NAT_CHAINS``) are there only with ``nat``: a nat chain makes the
    kernel track every connection in the namespace, which costs each packet between
    the host and its containers some 5-10% more time; without NAT or port forwards
    there is nothing to track, so kamra then keeps none (``nat=False`` removes them).
    """
    t = f"inet {table}"
    veth = f'"{VETH_PREFIX}*"'
    sets = [
        ("nat4", "type ipv4_addr;"), ("nat6", "type ipv6_addr;"),
        ("isolated4", "type ipv4_addr;"), ("isolated6", "type ipv6_addr;"),
        ("bridges", "type ifname;"),
        ("bridge_nets4", "type ipv4_addr; flags interval;"),
    ]
    maps = [
        ("fwd4", "type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service;"),
        ("fwd4_any", "type inet_proto . inet_service : ipv4_addr . inet_service;"),
        ("fwd6", "type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service;"),
        ("fwd6_any", "type inet_proto . inet_service : ipv6_addr . inet_service;"),
    ]
    dnat = [
        # A forward bound to one host address, then one bound to every local address.
        "dnat ip to ip daddr . meta l4proto . th dport map @fwd4",
        "fib daddr type local dnat ip to meta l4proto . th dport map @fwd4_any",
        "dnat ip6 to ip6 daddr . meta l4proto . th dport map @fwd6",
        "fib daddr type local dnat ip6 to meta l4proto . th dport map @fwd6_any",
    ]
    chains: dict[str, tuple[str, list[str]]] = {
        # Before conntrack: a container may not address the host's loopback, which
        # route_localnet (needed for forwards reached through 127.0.0.1) would allow.
        "guard": ("type filter hook prerouting priority raw;", [
            f"iifname {veth} ip daddr 127.0.0.0/8 drop",
            "iifname @bridges ip daddr 127.0.0.0/8 drop",
        ]),
        "prerouting": ("type nat hook prerouting priority dstnat;", dnat),
        # The host reaching a forward through one of its own addresses (and 127.0.0.1).
        "output": ("type nat hook output priority -100;", dnat),
        "postrouting": ("type nat hook postrouting priority srcnat;", [
            # The host's own 127.0.0.1 connection to a forward: give it a source the
            # container can answer (the veth's or bridge's address).
            "ip saddr 127.0.0.0/8 ct status dnat masquerade",
            # Hairpin on a bridge: the target would answer its peer directly.
            "ct status dnat ip saddr @bridge_nets4 ip daddr @bridge_nets4 masquerade",
            # NAT'd containers leaving through anything that is not kamra's.
            f"ip saddr @nat4 oifname != {veth} oifname != @bridges masquerade",
            f"ip6 saddr @nat6 oifname != {veth} oifname != @bridges masquerade",
        ]),
        "forward": ("type filter hook forward priority filter;", [
            # Routed containers talk to each other veth to veth through the host.
            f"iifname {veth} oifname {veth} ip saddr @isolated4 drop",
            f"iifname {veth} oifname {veth} ip daddr @isolated4 drop",
            f"iifname {veth} oifname {veth} ip6 saddr @isolated6 drop",
            f"iifname {veth} oifname {veth} ip6 daddr @isolated6 drop",
        ]),
    }
    lines = [f"add table {t}"]
    lines += [f"add set {t} {name} {{ {spec} }}" for name, spec in sets]
    lines += [f"add map {t} {name} {{ {spec} }}" for name, spec in maps]
    for name, (hook, rules) in chains.items():
        lines.append(f"add chain {t} {name} {{ {hook} policy accept; }}")
        lines.append(f"flush chain {t} {name}")
        if name in NAT_CHAINS and not nat:
            lines.append(f"delete chain {t} {name}")  # made above, so this cannot fail
            continue
        lines += [f"add rule {t} {name} {rule}" for rule in rules]
    return "\n".join(lines) + "\n"


class NftTable:
    """One table of kamra's (``family`` ``table``) in the namespace of the constructing
    thread: the plumbing shared by the firewall and bridge port isolation."""

    family = "inet"

    def __init__(self, table: str = "kamra"):
        if not table or not table[0].isalpha() or \
                not table.replace("_", "").replace("-", "").isalnum():
            raise InvalidInput(f"bad nftables table name {table!r}")
        self.table = table
        self._lock = threading.Lock()
        self._backend = open_backend()

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    def __enter__(self) -> NftTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def qualified(self) -> str:
        return f"{self.family} {self.table}"

    def _run(self, what: str, commands: str, as_json: bool = False,
             missing_ok: bool = False) -> str:
        with self._lock:
            ok, out, err = self._backend.run(commands, as_json)
        if ok:
            return out
        line = _first_error_line(err)
        code = next((n for text, n in _ERRNO_TEXT.items() if text in line), 0)
        if missing_ok and code == errno.ENOENT:
            return ""
        if code == errno.ENOENT and not self.exists():
            line += f" (table {self.qualified} is missing: ensure() sets it up)"
        raise FirewallError(f"nftables: {what}: {line}", code)

    def _element(self, verb: str, setname: str, element: str, what: str,
                 missing_ok: bool = False) -> None:
        self._run(what, f"{verb} element {self.qualified} {setname} {{ {element} }}\n",
                  missing_ok=missing_ok)

    def _discard(self, setname: str, element: str, what: str) -> None:
        """Remove ``element`` from a set whether or not it is there, in one transaction
        that cannot fail on its absence: a failed command costs libnftables about 10 ms
        (it re-reads the ruleset to explain the error), and this runs on every stop."""
        self._run(what, f"add element {self.qualified} {setname} {{ {element} }}\n"
                        f"delete element {self.qualified} {setname} {{ {element} }}\n")

    def exists(self) -> bool:
        out = self._run("list tables", f"list tables {self.family}\n")
        return any(line.strip() == f"table {self.qualified}" for line in out.splitlines())

    def destroy(self) -> None:
        """Delete the table and everything in it. Idempotent."""
        self._run(f"delete table {self.qualified}", f"delete table {self.qualified}\n",
                  missing_ok=True)

    def listing(self) -> str:
        """The table as nft prints it ("" when it does not exist): for reports and tests."""
        return self._run(f"list table {self.qualified}", f"list table {self.qualified}\n",
                         missing_ok=True)

    def _table_json(self) -> list[dict]:
        out = self._run(f"list table {self.qualified}", f"list table {self.qualified}\n",
                        as_json=True)
        return json.loads(out).get("nftables", []) if out.strip() else []

    def elements(self, setname: str) -> list:
        """The raw JSON elements of one set or map."""
        for item in self._table_json():
            body = item.get("set") or item.get("map")
            if body and body.get("name") == setname:
                return body.get("elem", [])
        return []


class Firewall(NftTable):
    """kamra's ``inet`` table: NAT, port forwards, routed isolation."""

    def ensure(self, nat: bool = True) -> None:
        """Create or repair the table, its sets, maps and chains (the NAT chains only
        with ``nat``: see ``ruleset``); elements are kept."""
        self._run(f"set up table {self.qualified}", ruleset(self.table, nat))

    # -- NAT ------------------------------------------------------------------------

    def add_nat(self, addr: str | IPAddress) -> None:
        """Masquerade what ``addr`` sends out of non-kamra interfaces. Idempotent."""
        ip = _ip(addr)
        self._element("add", f"nat{_v(ip)}", str(ip), f"add {ip} to the NAT set")

    def remove_nat(self, addr: str | IPAddress) -> None:
        ip = _ip(addr)
        self._discard(f"nat{_v(ip)}", str(ip), f"remove {ip} from the NAT set")

    # -- isolation (routed mode; bridges use port isolation) -----------------------

    def add_isolated(self, addr: str | IPAddress) -> None:
        """Drop forwarded traffic between ``addr`` and any other routed container."""
        ip = _ip(addr)
        self._element("add", f"isolated{_v(ip)}", str(ip), f"isolate {ip}")

    def remove_isolated(self, addr: str | IPAddress) -> None:
        ip = _ip(addr)
        self._discard(f"isolated{_v(ip)}", str(ip), f"stop isolating {ip}")

    # -- bridges --------------------------------------------------------------------

    def add_bridge(self, bridge: str, network: str | ipaddress.IPv4Network | None = None
                   ) -> None:
        """Count ``bridge`` as kamra's (no masquerade into it; hairpin NAT on ``network``)."""
        self._element("add", "bridges", f'"{bridge}"', f"add bridge {bridge}")
        if network is not None:
            net = ipaddress.ip_network(str(network))
            if net.version == 4:
                self._element("add", "bridge_nets4", str(net), f"add network {net}")

    def remove_bridge(self, bridge: str, network: str | ipaddress.IPv4Network | None = None
                      ) -> None:
        self._element("delete", "bridges", f'"{bridge}"', f"remove bridge {bridge}",
                      missing_ok=True)
        if network is not None:
            net = ipaddress.ip_network(str(network))
            if net.version == 4:
                self._element("delete", "bridge_nets4", str(net),
                              f"remove network {net}", missing_ok=True)

    # -- port forwards --------------------------------------------------------------

    @staticmethod
    def _key(proto: str, host_port: int, host_ip: IPAddress | None) -> str:
        key = f"{proto} . {host_port}"
        return key if host_ip is None else f"{host_ip} . {key}"

    @staticmethod
    def _map(version: str, host_ip: IPAddress | None) -> str:
        return f"fwd{version}" if host_ip is not None else f"fwd{version}_any"

    def add_forward(self, proto: str, host_port: int, ct_addr: str | IPAddress,
                    ct_port: int, host_ip: str | IPAddress | None = None) -> None:
        """Forward ``proto`` ``[host_ip]:host_port`` on the host to ``ct_addr:ct_port``.

        Without ``host_ip``: every local address of the host (``fib daddr type
        local``). Adding the same forward again is a no-op; a port already forwarded
        elsewhere raises AlreadyExists.
        """
        _check_proto(proto)
        _check_port(host_port, "host port")
        _check_port(ct_port, "container port")
        target = _ip(ct_addr)
        listen = None if host_ip is None else _ip(host_ip)
        if listen is not None and listen.version != target.version:
            raise InvalidInput(f"cannot forward {listen} to {target}: "
                               "address families differ")
        key = self._key(proto, host_port, listen)
        where = f"{proto} {listen or '*'}:{host_port}"
        for existing in self.forwards():
            if (existing.proto, existing.host_port, existing.host_ip) == (
                    proto, host_port, listen) and existing.ct_addr.version == target.version:
                if (existing.ct_addr, existing.ct_port) == (target, ct_port):
                    return
                raise AlreadyExists(f"port forward {where} already goes to "
                                    f"{existing.ct_addr}:{existing.ct_port}")
        self._element("add", self._map(_v(target), listen),
                      f"{key} : {target} . {ct_port}", f"add port forward {where}")

    def remove_forward(self, proto: str, host_port: int,
                       host_ip: str | IPAddress | None = None, version: str | None = None
                       ) -> None:
        """Remove the forward of ``[host_ip]:host_port`` (both families without host_ip,
        unless ``version``, "4" or "6", says which)."""
        _check_proto(proto)
        listen = None if host_ip is None else _ip(host_ip)
        versions = [_v(listen)] if listen is not None else [version] if version else ["4", "6"]
        for version in versions:
            self._element("delete", self._map(version, listen),
                          self._key(proto, host_port, listen),
                          f"remove port forward {proto} {listen or '*'}:{host_port}",
                          missing_ok=True)

    def forwards(self) -> list[Forward]:
        found: list[Forward] = []
        for item in self._table_json():
            body = item.get("map")
            if not body or not body.get("name", "").startswith("fwd"):
                continue
            for elem in body.get("elem", []):
                key, value = elem[0], elem[1]
                key_parts = key["concat"]
                ct_addr, ct_port = value["concat"]
                host_ip = _ip(key_parts[0]) if len(key_parts) == 3 else None
                proto, port = key_parts[-2], key_parts[-1]
                found.append(Forward(str(proto), int(port), _ip(ct_addr), int(ct_port),
                                     host_ip))
        return sorted(found, key=lambda f: (f.host_port, f.proto, str(f.host_ip)))
