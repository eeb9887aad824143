"""kamrad's TCP listener for other kamra hosts: TLS, then a token, then requests.

Each connection gets a thread. Its first message must be ``{"op": "hello", "token": T}``
with a token this host issued (``kamra remote token``); anything else closes the
connection. After that, requests are served by a handler object (the engine's
migration target) until the peer hangs up: ``handler.serve(sock)`` owns the socket.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable

from kamra.remote import tls, wire
from kamra.remote.store import RemoteStore, parse_address

log = logging.getLogger("kamra.remote")


class RemoteListener:
    def __init__(self, store: RemoteStore, address: str,
                 serve: Callable[[ssl.SSLSocket, str], None]):
        self.store = store
        self.address = address
        self.serve = serve
        cert, key = tls.ensure_certificate(store.tls_dir)
        self.fingerprint = tls.fingerprint_of_file(cert)
        self.context = tls.server_context(cert, key)
        host, port = parse_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.closed = False
        self.thread = threading.Thread(target=self._accept_loop, name="kamra-remote",
                                       daemon=True)
        self.thread.start()
        log.info("listening for other hosts on %s (certificate %s)", address, self.fingerprint)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                raw, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(raw, f"{peer[0]}:{peer[1]}"),
                             name="kamra-remote-peer", daemon=True).start()

    def _connection(self, raw: socket.socket, peer: str) -> None:
        raw.settimeout(30)
        tls.tune(raw)
        try:
            sock = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS with %s failed: %s", peer, exc)
            raw.close()
            return
        with sock:
            try:
                hello, _ = wire.recv(sock)
                if hello.get("op") != "hello" or not self.store.accepts(hello.get("token")):
                    log.warning("refused %s: no valid token", peer)
                    wire.send(sock, {"error": "this host does not accept that token (make "
                                              "one here with 'kamra remote token')"})
                    return
                wire.send(sock, {"ok": True, "fingerprint": self.fingerprint})
                sock.settimeout(None)
                self.serve(sock, peer)
            except (OSError, wire.WireError, ValueError) as exc:
                log.warning("connection from %s ended: %s", peer, exc)
