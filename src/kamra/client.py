"""Talks to kamrad over its Unix socket; starts kamrad when it does not answer.

The CLI imports this on every command, so it imports almost nothing: no http.client,
no engine, no driver. Requests are small HTTP/1.1 messages written by hand.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

from kamra.errors import DaemonUnavailable, KamraError, from_json


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        if len(path) < 100:
            sock.connect(path)
        else:
            # sun_path holds 108 bytes: reach a deep root through its directory's fd.
            dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
            finally:
                os.close(dirfd)
    except OSError:
        sock.close()
        raise
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Response:
    def __init__(self, status: int, headers: dict[str, str], sock: socket.socket, rest: bytes):
        self.status = status
        self.headers = headers
        self.sock = sock
        self.rest = rest

    def body(self) -> bytes:
        length = self.headers.get("content-length")
        data = bytearray(self.rest)
        if length is not None:
            need = int(length)
            while len(data) < need:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return bytes(data[:need])
        while chunk := self.sock.recv(65536):
            data += chunk
        return bytes(data)

    def lines(self):
        buffer = bytearray(self.rest)
        while True:
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer = bytearray(rest)
                if line.strip():
                    yield json.loads(line)
            chunk = self.sock.recv(65536)
            if not chunk:
                if buffer.strip():
                    yield json.loads(buffer)
                return
            buffer += chunk


class Client:
    def __init__(self, root: str, *, autostart: bool = True, timeout: float | None = None):
        self.root = os.path.realpath(root)
        self.socket_path = os.path.join(self.root, "run", "kamrad.sock")
        self.autostart = autostart
        self.timeout = timeout

    # -- connection -----------------------------------------------------------------------
    def _open(self) -> socket.socket:
        try:
            return _connect(self.socket_path, self.timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if not self.autostart:
                raise DaemonUnavailable(f"kamrad is not running for {self.root}: "
                                        "start it with 'kamra daemon start'") from None
        self.start_daemon()
        return _connect(self.socket_path, self.timeout)

    def start_daemon(self, wait: float = 30) -> None:
        import fcntl

        run_dir = os.path.join(self.root, "run")
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        # Clients that find no kamrad at the same moment start one between them: the
        # first takes the lock and starts it, the others wait and then find it serving.
        lock = os.open(os.path.join(run_dir, "kamrad.start.lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                _connect(self.socket_path, 1).close()
                return  # started by another client while this one waited
            except OSError:
                pass
            self._spawn_daemon(run_dir, wait)
        finally:
            os.close(lock)

    def _spawn_daemon(self, run_dir: str, wait: float) -> None:
        import subprocess  # only here: it costs milliseconds on every other command

        log = os.open(os.path.join(run_dir, "kamrad.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "kamra.daemon.main", "--root", self.root],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                cwd="/")
        finally:
            os.close(log)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                _connect(self.socket_path, 1).close()
                return
            except OSError:
                if daemon.poll() is not None:
                    break
                time.sleep(0.01)
        raise DaemonUnavailable(f"kamrad did not start; see {run_dir}/kamrad.log")

    def ping(self) -> dict | None:
        try:
            sock = _connect(self.socket_path, 5)
        except OSError:
            return None
        try:
            return self._exchange(sock, "GET", "/v1/ping", None)
        except (OSError, KamraError):
            return None

    # -- requests -------------------------------------------------------------------------
    def _send(self, sock: socket.socket, method: str, path: str, body: object,
              extra: str = "", upgrading: bool = False) -> Response:
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: kamrad\r\n{extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        sock.sendall(head.encode() + payload)
        data = bytearray()
        while b"\r\n\r\n" not in data:
            # Upgrading, not one byte past the headers may be read: the session's first
            # message can follow at once, with descriptors a plain recv would drop.
            chunk = sock.recv(65536, socket.MSG_PEEK if upgrading else 0)
            if not chunk:
                raise DaemonUnavailable("kamrad closed the connection without answering "
                                        "(see kamrad.log under the data root's run/)")
            if upgrading:
                end = (bytes(data[-3:]) + chunk).find(b"\r\n\r\n")
                take = len(chunk) if end < 0 else end + 4 - min(3, len(data))
                chunk = _recv_exactly(sock, take)
            data += chunk
        head_bytes, _, rest = bytes(data).partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return Response(status, headers, sock, rest)

    def _exchange(self, sock: socket.socket, method: str, path: str, body: object) -> object:
        try:
            response = self._send(sock, method, path, body)
            data = json.loads(response.body() or b"null")
        finally:
            sock.close()
        if response.status >= 400:
            raise from_json((data or {}).get("error", {}))
        return data

    def request(self, method: str, path: str, body: object = None) -> object:
        return self._exchange(self._open(), method, path, body)

    def upgrade(self, path: str, body: object) -> socket.socket:
        """POST that switches the connection to a session; returns the raw socket."""
        sock = self._open()
        try:
            response = self._send(sock, "POST", path, body,
                                  "Connection: Upgrade\r\nUpgrade: kamra-session\r\n",
                                  upgrading=True)
            if response.status != 101:
                data = json.loads(response.body() or b"null")
                raise from_json((data or {}).get("error", {}))
        except BaseException:
            sock.close()
            raise
        return sock

    def stream(self, path: str, body: object,
               on_progress: Callable[[dict], None] | None = None) -> object:
        sock = self._open()
        try:
            response = self._send(sock, "POST", path, body)
            if response.status >= 400:
                data = json.loads(response.body() or b"null")
                raise from_json((data or {}).get("error", {}))
            for line in response.lines():
                if "progress" in line:
                    if on_progress:
                        on_progress(line["progress"])
                elif "error" in line:
                    raise from_json(line["error"])
                elif "result" in line:
                    return line["result"]
        finally:
            sock.close()
        raise KamraError("kamrad ended the stream without a result")
