"""The one registry of configuration keys: each key's parser, doc, default and live-ness.

`kamra config keys`, `kamra set`, plans and docs/config.md all read this table, so a key
is added, documented and validated in one place.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from kamra.config.hostinfo import HostInfo
from kamra.config.units import (
    BadValue,
    cpu_list_to_str,
    cpu_to_str,
    parse_cpu_amount,
    parse_cpu_list,
    parse_int,
    parse_size,
    size_to_str,
)
from kamra.errors import InvalidInput

__all__ = ["KEYS", "Key", "check_consistency", "format_value", "get_key", "parse_assignments",
           "parse_size", "parse_value", "size_to_str"]

MIN_MEMORY = 4 << 20
MIN_DISK = 16 << 20
MAX_WEIGHT = 10000


@dataclass(frozen=True)
class Key:
    name: str
    doc: str  # one line: what the key limits
    parse: Callable[[object], object]  # raw -> normalized value; raises BadValue
    default: object  # None: not set (unlimited, or the kernel's own default)
    live: bool  # can change while the container runs
    unit: str
    format: Callable[[object], str]  # normalized -> text that parse accepts again
    form: str  # the accepted form, for errors and docs
    unset: str = "unlimited"  # what an unset value means, for display
    grow_only_live: bool = False  # live changes may only raise it (a filesystem cannot shrink online)
    # Checks against this machine, kept out of `parse` so stored plans load anywhere.
    host_check: Callable[[object, HostInfo], None] | None = None

    def to_json(self) -> dict:
        return {"key": self.name, "doc": self.doc, "form": self.form, "unit": self.unit,
                "default": None if self.default is None else self.format(self.default),
                "unset": self.unset, "live": self.live, "grow_only_live": self.grow_only_live}


# -- parsers ------------------------------------------------------------------------------

def _size(minimum: int) -> Callable[[object], object]:
    def parse(raw: object) -> int:
        value = parse_size(raw)
        if value < minimum:
            raise BadValue(f"{size_to_str(value)} is too small")
        return value
    return parse


def _memory(raw: object) -> int:
    value = parse_size(raw)
    if value < MIN_MEMORY:
        raise BadValue(f"{size_to_str(value)} is below the minimum of {size_to_str(MIN_MEMORY)} "
                       "(a container cannot run in less)", "use a size like 512M or 2G")
    return value


def _int_range(low: int, high: int | None = None) -> Callable[[object], object]:
    def parse(raw: object) -> int:
        value = parse_int(raw)
        if value < low or (high is not None and value > high):
            raise BadValue(f"{value} is out of range")
        return value
    return parse


def _cpu(raw: object) -> float:
    cores = parse_cpu_amount(raw)
    if cores < 0.01:
        raise BadValue(f"{cpu_to_str(cores)} cores is below the minimum of 0.01 (1% of a core)")
    return cores


def _cpu_fits(value: object, host: HostInfo) -> None:
    if value > host.cpu_count:  # type: ignore[operator]
        raise BadValue(f"{cpu_to_str(value)} cores is more than this host's {host.cpu_count} CPUs",  # type: ignore[arg-type]
                       f"use at most {host.cpu_count}")


def _cpu_set(raw: object) -> str:
    return cpu_list_to_str(parse_cpu_list(raw))


def _cpus_exist(value: object, host: HostInfo) -> None:
    missing = sorted(set(parse_cpu_list(value)) - set(host.online))
    if missing:
        many = len(missing) > 1
        raise BadValue(f"CPU{'s' if many else ''} {cpu_list_to_str(missing)} {'do' if many else 'does'} "
                       f"not exist on this host (online: {host.online_text})",
                       f"use CPUs from {host.online_text}")


NET_MODES = ("routed", "bridge", "none")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def _net_mode(raw: object) -> str:
    text = str(raw).strip().lower()
    if text not in NET_MODES:
        raise BadValue(f"unknown network mode {str(raw)!r}")
    return text


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise BadValue(f"{str(raw)!r} is not true or false")


def _bool_str(value: object) -> str:
    return "true" if value else "false"


def _address(version: int) -> Callable[[object], object]:
    def parse(raw: object) -> str:
        import ipaddress

        text = str(raw).strip()
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise BadValue(f"{text!r} is not an IPv{version} address") from None
        if address.version != version:
            raise BadValue(f"{text!r} is not an IPv{version} address")
        if address.is_multicast or address.is_unspecified or address.is_loopback:
            raise BadValue(f"{text} cannot be a container's address")
        return str(address)
    return parse


def _nameservers(raw: object) -> list[str]:
    import ipaddress

    items = raw if isinstance(raw, list) else str(raw).replace(",", " ").split()
    if not items:
        raise BadValue("no address given")
    result = []
    for item in items:
        try:
            result.append(str(ipaddress.ip_address(str(item).strip())))
        except ValueError:
            raise BadValue(f"{str(item)!r} is not an IP address") from None
    return result


def _nameservers_str(value: object) -> str:
    return ",".join(value)  # type: ignore[arg-type]


def _rate(raw: object) -> int:
    """Bits per second, as tc writes them: 10mbit, 1gbit, 500kbit (base 1000)."""
    import re

    text = str(raw).strip().lower()
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?bit)?", text)
    if not found:
        raise BadValue(f"invalid rate {str(raw)!r}")
    value = int(float(found.group(1)) * _RATE_UNITS[found.group(2) or "bit"])
    if value < 8000:
        raise BadValue(f"{text} is below the minimum of 8kbit")
    return value


def rate_to_str(value: object) -> str:
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if value % _RATE_UNITS[unit] == 0:  # type: ignore[operator]
            return f"{value // _RATE_UNITS[unit]}{unit}"  # type: ignore[operator]
    return f"{value}bit"


def _size_str(value: object) -> str:
    return size_to_str(value)  # type: ignore[arg-type]


def _cpu_str(value: object) -> str:
    return cpu_to_str(value)  # type: ignore[arg-type]


# -- the registry ---------------------------------------------------------------------------

_WEIGHT_FORM = f"a whole number from 1 to {MAX_WEIGHT} (the kernel's default is 100)"
_SIZE_FORM = "a number of bytes or a size like 512M or 2G"
_RATE_FORM = "bytes per second, or a size per second like 10M; more than 0"


def _key(name: str, doc: str, parse: Callable[[object], object], *, unit: str, form: str,
         fmt: Callable[[object], str] = str, unset: str = "unlimited", live: bool = True,
         default: object = None, **extra: object) -> Key:
    return Key(name=name, doc=doc, parse=parse, default=default, live=live, unit=unit,
               format=fmt, form=form, unset=unset, **extra)  # type: ignore[arg-type]


_BITRATE_FORM = "a rate like 10mbit, 500kbit or 1gbit (bits per second, base 1000)"


KEYS: dict[str, Key] = {k.name: k for k in (
    _key("limits.cpu", "CPU time the container may use, in cores (a quota per period)",
         _cpu, unit="cores", fmt=_cpu_str, host_check=_cpu_fits,
         form="cores like 0.5 or 2, or a percentage of one core like 150%; "
              "at most the host's CPU count"),
    _key("limits.cpu.weight", "relative CPU share when CPUs are contended",
         _int_range(1, MAX_WEIGHT), unit="", form=_WEIGHT_FORM, unset="kernel default (100)"),
    _key("limits.cpu.set", "the CPUs the container may run on (pinning)",
         _cpu_set, unit="cpus", form="a list of the host's CPUs like 0, 0-1 or 0,2-3",
         unset="all CPUs", host_check=_cpus_exist),
    _key("limits.memory", "RAM the container may use; beyond it the kernel reclaims, "
         "then OOM-kills inside the container", _memory, unit="bytes", fmt=_size_str,
         form=f"{_SIZE_FORM}; at least {size_to_str(MIN_MEMORY)}"),
    _key("limits.memory.swap", "swap the container may use, on top of limits.memory",
         _size(0), unit="bytes", fmt=_size_str, form=f"0 (no swap) or {_SIZE_FORM}"),
    _key("limits.memory.reservation", "memory protected from reclaim by other containers "
         "(soft limit)", _size(1), unit="bytes", fmt=_size_str,
         form=f"{_SIZE_FORM}; more than 0", unset="none"),
    _key("limits.pids", "processes and threads the container may have at once",
         _int_range(1), unit="processes", form="a whole number of at least 1, like 512"),
    _key("limits.io.weight", "relative I/O share on the container's disk "
         "(only where the disk's scheduler honours weights: BFQ)",
         _int_range(1, MAX_WEIGHT), unit="", form=_WEIGHT_FORM, unset="kernel default (100)"),
    _key("limits.io.read_bps", "read bandwidth from the container's disk",
         _size(1), unit="bytes/s", fmt=_size_str, form=_RATE_FORM),
    _key("limits.io.write_bps", "write bandwidth to the container's disk",
         _size(1), unit="bytes/s", fmt=_size_str, form=_RATE_FORM),
    _key("limits.io.read_iops", "read operations per second on the container's disk",
         _int_range(1), unit="ops/s", form="a whole number of at least 1, like 1000"),
    _key("limits.io.write_iops", "write operations per second on the container's disk",
         _int_range(1), unit="ops/s", form="a whole number of at least 1, like 1000"),
    _key("limits.disk", "hard quota on what the container can write to its filesystem",
         _size(MIN_DISK), unit="bytes",
         fmt=_size_str, form=f"a size of at least {size_to_str(MIN_DISK)}, like 10G",
         unset="unlimited (the host's disk)", grow_only_live=True),
    _key("limits.net.egress", "bandwidth of the traffic the container sends",
         _rate, unit="bit/s", fmt=rate_to_str, form=_BITRATE_FORM),
    _key("limits.net.ingress", "bandwidth of the traffic the container receives",
         _rate, unit="bit/s", fmt=rate_to_str, form=_BITRATE_FORM),
    _key("net.mode", "how the container is networked: routed (a veth with a host route, "
         "OpenVZ venet style), bridge (a veth on the host bridge) or none (loopback only)",
         _net_mode, unit="", form="routed, bridge or none", default="routed", live=False),
    _key("net.ipv4", "the container's IPv4 address (kamra create --ip)", _address(4),
         unit="", form="an IPv4 address in the host's pool, like 10.73.0.5", live=False,
         unset="the next free address of the pool"),
    _key("net.ipv6", "the container's IPv6 address (where an IPv6 pool is configured)",
         _address(6), unit="", form="an IPv6 address in the host's IPv6 pool", live=False,
         unset="the next free address of the IPv6 pool, if there is one"),
    _key("net.nat", "masquerade the container's traffic leaving through other interfaces",
         _bool, unit="", fmt=_bool_str, form="true or false", default=True),
    _key("net.isolated", "block traffic between this container and other containers "
         "(the host and the outside stay reachable)", _bool, unit="", fmt=_bool_str,
         form="true or false", default=False),
    _key("net.nameservers", "the nameservers written to the container's /etc/resolv.conf",
         _nameservers, unit="", fmt=_nameservers_str,
         form="IP addresses separated by commas, like 192.0.2.53,2001:db8::53",
         live=False, unset="the host's (or the network config's)"),
)}


# -- API ------------------------------------------------------------------------------------

def get_key(name: object) -> Key:
    key = KEYS.get(name) if isinstance(name, str) else None
    if key is None:
        text = f"unknown config key {str(name)!r}: see 'kamra config keys'"
        close = difflib.get_close_matches(str(name), KEYS, n=1, cutoff=0.6)
        if close:
            text += f" (did you mean {close[0]!r}?)"
        raise InvalidInput(text)
    return key


def parse_value(key: str, raw: object, *, host: HostInfo | None = None,
                check_host: bool = True) -> object:
    """Normalize one value or raise InvalidInput naming the key, the value and the form.

    ``check_host=False`` skips the checks against this machine (CPU count, online CPUs):
    for values read back from storage, which were checked when they were assigned.
    """
    spec = get_key(key)
    try:
        value = spec.parse(raw)
        if check_host and spec.host_check is not None:
            spec.host_check(value, host or HostInfo.current())
    except BadValue as exc:
        raise InvalidInput(f"{spec.name}: {exc.problem}: {exc.hint or 'use ' + spec.form}") from None
    return value


def parse_assignments(pairs: list[str], *, host: HostInfo | None = None
                      ) -> tuple[dict[str, object], list[str]]:
    """CLI "key=value" items -> (normalized values to set, keys to unset for "key=")."""
    values: dict[str, object] = {}
    unset: list[str] = []
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name:
            raise InvalidInput(f"invalid assignment {pair!r}: write KEY=VALUE, "
                               "e.g. limits.memory=512M (KEY= unsets the key)")
        get_key(name)
        # The last mention of a key wins, as with repeated command-line options.
        values.pop(name, None)
        if name in unset:
            unset.remove(name)
        if raw:
            values[name] = parse_value(name, raw, host=host)
        else:
            unset.append(name)
    return values, unset


def format_value(key: str, value: object) -> str:
    """Display text that parse_value accepts again; the key's meaning of "unset" for None."""
    spec = get_key(key)
    return spec.unset if value is None else spec.format(value)


def check_consistency(values: dict[str, object]) -> None:
    """Rules between keys, on a full set of values (effective config or a plan); None = unset."""
    memory = values.get("limits.memory")
    reservation = values.get("limits.memory.reservation")
    if memory is not None and reservation is not None and reservation > memory:  # type: ignore[operator]
        raise InvalidInput(
            f"limits.memory.reservation ({format_value('limits.memory.reservation', reservation)}) "
            f"is larger than limits.memory ({format_value('limits.memory', memory)}): "
            "a reservation cannot exceed the limit; lower it or raise limits.memory")
