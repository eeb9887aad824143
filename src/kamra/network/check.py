"""Find other firewalls that would drop kamra's forwarded traffic (Docker's, a distro's).

Packets traverse every base chain on the forward hook, whatever table it is in, and
one drop anywhere is final: kamra's own accept cannot override Docker's ``policy drop``.
kamra never edits another table; it tells the user what to add.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence

from kamra.errors import KamraError
from kamra.network.names import VETH_PREFIX
from kamra.network.nft import open_backend

DEFAULT_INTERFACES = (f"{VETH_PREFIX}*",)


def _nft_ruleset() -> list[dict]:
    try:
        backend = open_backend()
    except KamraError:
        return []
    try:
        ok, out, _ = backend.run("list ruleset\n", as_json=True)
    finally:
        backend.close()
    if not ok or not out.strip():
        return []
    try:
        return json.loads(out).get("nftables", [])
    except ValueError:
        return []


def _is_plain_drop(rule: dict) -> bool:
    """A rule that drops everything: no match, only counters and a drop/reject verdict."""
    exprs = rule.get("expr", [])
    verdicts = [e for e in exprs if "drop" in e or "reject" in e]
    return bool(verdicts) and all("counter" in e or e in verdicts for e in exprs)


def _iptables_name(pattern: str) -> str:
    return pattern[:-1] + "+" if pattern.endswith("*") else pattern


def _nft_advice(family: str, table: str, chain: str, interfaces: Sequence[str],
                chains_in_table: set[str]) -> str:
    # Docker's filter table has a DOCKER-USER chain meant for exactly this; iptables-nft
    # tables (upper-case chains) are better edited with iptables, which owns them.
    if "DOCKER-USER" in chains_in_table:
        tool = "ip6tables" if family == "ip6" else "iptables"
        rules = [f"{tool} -I DOCKER-USER {flag} {_iptables_name(p)} -j ACCEPT"
                 for p in interfaces for flag in ("-i", "-o")]
    elif chain.isupper() and family in ("ip", "ip6"):
        tool = "ip6tables" if family == "ip6" else "iptables"
        rules = [f"{tool} -I {chain} {flag} {_iptables_name(p)} -j ACCEPT"
                 for p in interfaces for flag in ("-i", "-o")]
    else:
        rules = [f'nft insert rule {family} {table} {chain} {key} "{p}" accept'
                 for p in interfaces for key in ("iifname", "oifname")]
    return "; ".join(rules)


def _from_nft(own_table: str, interfaces: Sequence[str]) -> list[str]:
    items = _nft_ruleset()
    chains: dict[tuple[str, str, str], dict] = {}
    rules: dict[tuple[str, str, str], list[dict]] = {}
    names: dict[tuple[str, str], set[str]] = {}
    for item in items:
        if "chain" in item:
            c = item["chain"]
            key = (c["family"], c["table"], c["name"])
            chains[key] = c
            names.setdefault(key[:2], set()).add(c["name"])
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault((r["family"], r["table"], r["chain"]), []).append(r)
    found = []
    for key, chain in chains.items():
        family, table, name = key
        if (family, table) == ("inet", own_table) or chain.get("hook") != "forward":
            continue
        if family not in ("ip", "ip6", "inet"):
            continue  # bridge-family forward chains see bridged frames only
        chain_rules = rules.get(key, [])
        if chain.get("policy") == "drop":
            why = "has policy drop"
        elif chain_rules and _is_plain_drop(chain_rules[-1]):
            why = "ends in a drop rule"
        else:
            continue
        advice = _nft_advice(family, table, name, interfaces, names.get((family, table), set()))
        found.append(f"nftables chain {family} {table} {name} (forward hook) {why}: "
                     f"containers' forwarded traffic is dropped there; to let it through: "
                     f"{advice}")
    return found


def _run(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def _from_legacy_iptables(interfaces: Sequence[str]) -> list[str]:
    """iptables-legacy tables are invisible to nft: ask the legacy tools themselves."""
    found = []
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        if shutil.which(tool) is None:
            continue
        out = _run([tool, "-S", "FORWARD"])
        if not out:
            continue
        lines = out.splitlines()
        rules = [line for line in lines if line.startswith("-A FORWARD")]
        if "-P FORWARD DROP" in lines:
            why = "has policy DROP"
        elif rules and rules[-1] in ("-A FORWARD -j DROP", "-A FORWARD -j REJECT"):
            why = "ends in a DROP rule"
        else:
            continue
        user = _run([tool, "-S", "DOCKER-USER"])
        chain = "DOCKER-USER" if user else "FORWARD"
        advice = "; ".join(f"{tool} -I {chain} {flag} {_iptables_name(p)} -j ACCEPT"
                           for p in interfaces for flag in ("-i", "-o"))
        found.append(f"{tool} chain FORWARD {why}: containers' forwarded traffic is "
                     f"dropped there; to let it through: {advice}")
    return found


def _iptables_is_legacy() -> bool:
    """Plain `iptables` only matters when it is the legacy backend (else nft shows it)."""
    if shutil.which("iptables") is None:
        return False
    out = _run(["iptables", "-V"]) or ""
    return "legacy" in out


def foreign_forward_blockers(own_table: str = "kamra",
                             interfaces: Sequence[str] = DEFAULT_INTERFACES) -> list[str]:
    """One line per foreign firewall chain that would drop forwarded container traffic.

    Looks at the calling thread's network namespace: the nftables ruleset (every
    table but ``inet own_table``) and, where installed, iptables-legacy. ``interfaces``
    are kamra's interface patterns (veths "kv*", plus bridge names) for the advice.
    Failures to inspect are ignored: this is a diagnostic, never a gate.
    """
    found = _from_nft(own_table, interfaces)
    legacy = _from_legacy_iptables(interfaces)
    if not legacy and _iptables_is_legacy():
        out = _run(["iptables", "-S", "FORWARD"])
        if out and "-P FORWARD DROP" in out.splitlines():
            advice = "; ".join(f"iptables -I FORWARD {flag} {_iptables_name(p)} -j ACCEPT"
                               for p in interfaces for flag in ("-i", "-o"))
            legacy.append("iptables chain FORWARD has policy DROP: containers' forwarded "
                          f"traffic is dropped there; to let it through: {advice}")
    return found + legacy
