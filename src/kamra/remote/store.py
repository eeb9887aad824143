"""What a host knows of remotes: the ones it may migrate to, and the tokens it accepts.

``<root>/remote/remotes.json``  name -> address, pinned fingerprint, token (0600)
``<root>/remote/tokens.json``   SHA-256 of each token this host accepts (0600)
``<root>/remote/listen``        the address kamrad listens on for other hosts
``<root>/remote/tls/``          this host's certificate and key
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading

from kamra.atomic import write_file
from kamra.errors import AlreadyExists, InvalidInput, NotFound
from kamra.names import check_name

DEFAULT_PORT = 8443
_LOCK = threading.Lock()


def parse_address(text: str) -> tuple[str, int]:
    """HOST[:PORT] (IPv6 as [ADDR]:PORT) -> (host, port)."""
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, raw = text.partition(":")
        port = _port(raw, text)
    if not host:
        raise InvalidInput(f"invalid address {text!r}: give HOST[:PORT], e.g. 192.0.2.7:8443")
    return host, port


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise InvalidInput(f"invalid port in {text!r}: give 1-65535")
    return int(raw)


class RemoteStore:
    def __init__(self, root: str):
        self.dir = os.path.join(root, "remote")
        self.tls_dir = os.path.join(self.dir, "tls")

    def _read(self, name: str) -> dict:
        try:
            with open(os.path.join(self.dir, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _write(self, name: str, data: dict) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        write_file(os.path.join(self.dir, name), json.dumps(data, indent=1), mode=0o600)

    # -- remotes we migrate to ------------------------------------------------------------
    def remotes(self) -> dict[str, dict]:
        return self._read("remotes.json")

    def get(self, name: str) -> dict:
        remote = self.remotes().get(name)
        if remote is None:
            raise NotFound(f"no remote {name!r} (see 'kamra remote list'; add one with "
                           f"'kamra remote add {name} ADDRESS --token T')")
        return remote

    def add(self, name: str, address: str, fingerprint: str, token: str) -> None:
        check_name(name, "remote")
        with _LOCK:
            remotes = self.remotes()
            if name in remotes:
                raise AlreadyExists(f"remote {name!r} exists: remove it first")
            remotes[name] = {"address": address, "fingerprint": fingerprint, "token": token}
            self._write("remotes.json", remotes)

    def remove(self, name: str) -> None:
        with _LOCK:
            remotes = self.remotes()
            if remotes.pop(name, None) is None:
                raise NotFound(f"no remote {name!r} (see 'kamra remote list')")
            self._write("remotes.json", remotes)

    # -- tokens other hosts present to us -------------------------------------------------
    def new_token(self) -> str:
        token = secrets.token_hex(24)
        with _LOCK:
            tokens = self._read("tokens.json")
            tokens.setdefault("sha256", []).append(hashlib.sha256(token.encode()).hexdigest())
            self._write("tokens.json", tokens)
        return token

    def accepts(self, token: object) -> bool:
        if not isinstance(token, str) or not token:
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        return any(hmac.compare_digest(digest, known)
                   for known in self._read("tokens.json").get("sha256", []))

    # -- where we listen --------------------------------------------------------------------
    def listen_address(self) -> str | None:
        try:
            with open(os.path.join(self.dir, "listen")) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def set_listen_address(self, address: str) -> None:
        parse_address(address)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        write_file(os.path.join(self.dir, "listen"), address + "\n", mode=0o600)
