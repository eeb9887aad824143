"""kamrad's TLS identity: a self-signed certificate made on first use, pinned by peers.

As with Incus remotes, a host's certificate is trusted by its fingerprint (SHA-256 of the
DER form), recorded when the remote is added; no certificate authority is involved.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess

from kamra.errors import KamraError

CERT = "server.crt"
KEY = "server.key"
# A peer that vanishes (power loss, a network partition) must not leave a container
# frozen until the operation timeout: keepalive probes after 10 s of silence, three
# unanswered 5 s apart end the connection; data unacknowledged for 30 s ends it too.
KEEPALIVE = (10, 5, 3)
USER_TIMEOUT_MS = 30_000


def tune(sock: socket.socket) -> None:
    """Options for every connection between kamra hosts, on both sides."""
    # Requests and answers are small and waited for: Nagle's delay would add up to tens
    # of milliseconds to each while a container is frozen.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def ensure_certificate(directory: str) -> tuple[str, str]:
    """The host's certificate and key under ``directory``, made (P-256, 10 years) if
    missing."""
    cert, key = os.path.join(directory, CERT), os.path.join(directory, KEY)
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    os.makedirs(directory, mode=0o700, exist_ok=True)
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "3650", "-subj", "/CN=kamra", "-keyout", key + ".new",
         "-out", cert + ".new"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KamraError(f"could not make a TLS certificate with openssl: "
                         f"{result.stderr.strip()[-300:]}")
    os.chmod(key + ".new", 0o600)
    os.rename(key + ".new", key)
    os.rename(cert + ".new", cert)
    return cert, key


def fingerprint_of_der(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_of_file(cert: str) -> str:
    with open(cert) as f:
        return fingerprint_of_der(ssl.PEM_cert_to_DER_cert(f.read()))


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    return context


def connect(address: tuple[str, int], pinned: str | None,
            timeout: float = 10) -> tuple[ssl.SSLSocket, str]:
    """A TLS connection to ``address``; its certificate must have the ``pinned``
    fingerprint (None: trust on first use, the caller pins what is returned)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # The pin replaces the CA check: the name and chain of a self-signed cert mean nothing.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise KamraError(f"cannot reach {address[0]}:{address[1]}: {exc.strerror or exc}") \
            from None
    tune(raw)
    try:
        sock = context.wrap_socket(raw)
    except (OSError, ssl.SSLError) as exc:
        raw.close()
        raise KamraError(f"TLS with {address[0]}:{address[1]} failed: {exc}") from None
    der = sock.getpeercert(binary_form=True) or b""
    seen = fingerprint_of_der(der)
    if pinned is not None and seen != pinned:
        sock.close()
        raise KamraError(f"{address[0]}:{address[1]} presented certificate {seen}, not the "
                         f"pinned {pinned}: refusing (if the host was reinstalled, remove "
                         "and add the remote again)")
    return sock, seen
