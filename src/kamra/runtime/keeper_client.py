"""kamrad's side of the keeper: start it if needed, send requests, open sessions."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from kamra.errors import KamraError
from kamra.linux import fdpass
from kamra.paths import Layout, connect_unix


class KeeperError(KamraError):
    pass


class KeeperClient:
    def __init__(self, layout: Layout):
        self.layout = layout

    def connect(self, timeout: float | None = 10) -> socket.socket:
        return connect_unix(self.layout.keeper_socket, timeout)

    def ping(self) -> bool:
        try:
            return bool(self.request({"op": "ping"}, timeout=2).get("ok"))
        except (OSError, KamraError):
            return False

    def ensure_running(self) -> None:
        if self.ping():
            return
        log = os.open(os.path.join(self.layout.run, "keeper.log"),
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # The keeper daemonizes itself (forks, setsid) and exits 0 once it listens.
            result = subprocess.run(
                [sys.executable, "-m", "kamra.runtime.keeper", "--root", self.layout.root],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=30, check=False)
        finally:
            os.close(log)
        if result.returncode != 0 or not self.ping():
            raise KamraError(f"could not start the keeper; see {self.layout.run}/keeper.log")

    def request(self, message: dict, fds: list[int] | tuple[int, ...] = (),
                timeout: float | None = 30) -> dict:
        sock = self.connect(timeout)
        try:
            fdpass.send(sock, message, fds)
            reply, extra = fdpass.recv(sock)
        finally:
            sock.close()
        for fd in extra:
            os.close(fd)
        if reply is None:
            raise KeeperError(f"keeper closed the connection during {message.get('op')}")
        if "error" in reply:
            raise KeeperError(reply["error"])
        return reply

    def session(self, message: dict, fds: list[int] | tuple[int, ...] = ()) -> socket.socket:
        """Send a request and hand back the open connection (exec, attach, watch)."""
        sock = self.connect(None)
        try:
            fdpass.send(sock, message, fds)
        except OSError:
            sock.close()
            raise
        return sock

    def wait_gone(self, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and os.path.exists(self.layout.keeper_socket):
            time.sleep(0.02)
