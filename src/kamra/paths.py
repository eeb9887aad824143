"""Where everything lives under a data root (DESIGN.md, "Data layout")."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass

DEFAULT_ROOT = "/var/lib/kamra"


def default_root() -> str:
    return os.environ.get("KAMRA_ROOT") or DEFAULT_ROOT


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def at(cls, root: str) -> Layout:
        return cls(os.path.realpath(root))

    @property
    def db(self) -> str:
        return os.path.join(self.root, "kamra.db")

    @property
    def templates(self) -> str:
        return os.path.join(self.root, "templates")

    @property
    def containers(self) -> str:
        return os.path.join(self.root, "containers")

    @property
    def plans(self) -> str:
        return os.path.join(self.root, "plans")

    @property
    def run(self) -> str:
        return os.path.join(self.root, "run")

    @property
    def locks(self) -> str:
        return os.path.join(self.root, "run", "locks")

    @property
    def daemon_socket(self) -> str:
        return os.path.join(self.run, "kamrad.sock")

    @property
    def daemon_pid(self) -> str:
        return os.path.join(self.run, "kamrad.pid")

    @property
    def daemon_log(self) -> str:
        return os.path.join(self.run, "kamrad.log")

    @property
    def keeper_socket(self) -> str:
        return os.path.join(self.run, "keeper.sock")

    @property
    def keeper_pid(self) -> str:
        return os.path.join(self.run, "keeper.pid")

    def template_dir(self, name: str) -> str:
        return os.path.join(self.templates, name)

    def container_dir(self, name: str) -> str:
        return os.path.join(self.containers, name)

    @property
    def root_id(self) -> str:
        """A short id of this root, so two kamra roots on one machine never share a cgroup."""
        return hashlib.sha256(self.root.encode()).hexdigest()[:8]

    def ensure(self) -> None:
        for path in (self.root, self.templates, self.containers, self.plans, self.run, self.locks):
            os.makedirs(path, mode=0o700 if path == self.run else 0o755, exist_ok=True)


class ShortPath:
    """A Unix socket address usable whatever the length of its real path.

    sun_path holds 108 bytes; a deep data root would not fit. We open the socket's
    directory with O_PATH and address the socket as /proc/self/fd/N/NAME.
    """

    def __init__(self, path: str):
        self._dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_CLOEXEC)
        self.address = f"/proc/self/fd/{self._dirfd}/{os.path.basename(path)}"

    def close(self) -> None:
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1

    def __enter__(self) -> str:
        return self.address

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_unix(path: str, timeout: float | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    if timeout is not None:
        sock.settimeout(timeout)
    try:
        if len(path) < 100:
            sock.connect(path)
        else:
            with ShortPath(path) as short:
                sock.connect(short)
    except OSError:
        sock.close()
        raise
    return sock


def bind_unix(path: str, backlog: int = 128) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if len(path) < 100:
        sock.bind(path)
    else:
        with ShortPath(path) as short:
            sock.bind(short)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def write_pid_file(path: str) -> None:
    """Record our pid atomically (a reader never sees a half-written file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_files(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
