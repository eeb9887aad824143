"""Which Debian mirror the host uses, read from its apt configuration.

kamra never hard-codes a mirror: the host's apt sources already say which one is
reachable (a local mirror, a proxy, a snapshot), and debootstrap should use the same.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from kamra.errors import InvalidInput

APT_DIR = "/etc/apt"
# URI schemes debootstrap can fetch from (apt's own transports such as tor+ or mirror+ are not).
_SCHEMES = ("http://", "https://", "ftp://", "file:/")


@dataclass
class AptSource:
    types: list[str]
    uris: list[str]
    suites: list[str]
    origin: str  # file it came from, for error messages


def _strip_comment(line: str) -> str:
    return line.split("#", 1)[0].strip()


def parse_one_line(text: str, origin: str) -> list[AptSource]:
    """The classic format: ``deb [opt=val ...] URI suite [component ...]``."""
    sources = []
    for raw in text.splitlines():
        words = _strip_comment(raw).split()
        if not words:
            continue
        kind, rest = words[0], words[1:]
        if rest and rest[0].startswith("["):
            # Options may be written "[a=b c=d]" or "[ a=b ]": skip to the closing bracket.
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2:
            sources.append(AptSource([kind], [rest[0]], [rest[1]], origin))
    return sources


def parse_deb822(text: str, origin: str) -> list[AptSource]:
    """The .sources format: stanzas of ``Key: value`` fields separated by blank lines."""
    sources = []
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        sources.append(AptSource(stanza.get("types", "").split(), stanza.get("uris", "").split(),
                                 stanza.get("suites", "").split(), origin))
    return sources


def _stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key = ""
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, ""
        elif raw[0] in " \t" and key:
            current[key] += " " + raw.strip()  # continuation line
        elif ":" in raw:
            name, value = raw.split(":", 1)
            key = name.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def read_sources(apt_dir: str = APT_DIR) -> list[AptSource]:
    """Every source in the order apt reads them: sources.list, then sources.list.d sorted."""
    sources: list[AptSource] = []
    main = os.path.join(apt_dir, "sources.list")
    parts = sorted(glob.glob(os.path.join(apt_dir, "sources.list.d", "*.list"))
                   + glob.glob(os.path.join(apt_dir, "sources.list.d", "*.sources")))
    for path in [main, *parts]:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError):
            continue
        parse = parse_deb822 if path.endswith(".sources") else parse_one_line
        sources.extend(parse(text, path))
    return sources


def _plain(suite: str) -> bool:
    # "bookworm" or "stable", not "bookworm-security", "bookworm-updates" or "bookworm/updates".
    return bool(suite) and "-" not in suite and "/" not in suite


def find_mirror(suite: str, apt_dir: str = APT_DIR) -> str:
    """The first deb URI serving ``suite`` itself; failing that, the first serving any
    plain release suite (a bookworm host can still debootstrap trixie from its mirror)."""
    candidates = [
        (uri, source.suites)
        for source in read_sources(apt_dir) if "deb" in source.types
        for uri in source.uris if uri.startswith(_SCHEMES)
    ]
    for uri, suites in candidates:
        if suite in suites:
            return uri
    for uri, suites in candidates:
        if any(_plain(s) for s in suites):
            return uri
    raise InvalidInput(f"no Debian mirror found in {apt_dir}/sources.list or sources.list.d: "
                       "add a 'deb' source for the release (e.g. a line 'deb <mirror-uri> "
                       f"{suite} main') or give the mirror explicitly")
