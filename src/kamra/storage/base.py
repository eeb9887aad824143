"""The interface every storage backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kamra.errors import InvalidInput


@dataclass
class DiskUsage:
    """What a container has written: bytes and inodes, and the hard limits on them
    (``None``: no limit but the host's disk)."""

    used: int
    inodes: int
    limit: int | None = None
    inodes_limit: int | None = None


class StorageBackend(ABC):
    """Creates, mounts and removes a container's root filesystem.

    ``container_dir`` is ``<root>/containers/<name>``; the mounted root filesystem
    appears at ``<container_dir>/rootfs`` on the host, so the host sees into it.

    A disk quota (``limits.disk``, bytes) is the storage's business: ``create`` takes
    the initial one, ``set_quota`` changes it (or makes the storage match the
    configuration again, e.g. before a start) and ``usage`` reports against it.
    """

    name = "abstract"

    def __init__(self, root: str):
        self.root = root

    @abstractmethod
    def create(self, container_dir: str, template_rootfs: str,
               quota: int | None = None) -> None:
        """Make the container's private storage. Without a quota this must be O(1) in the
        template's size; with one it may cost what making the quota's filesystem costs."""

    @abstractmethod
    def mount(self, container_dir: str, template_rootfs: str) -> str:
        """Mount the root filesystem; returns its path. Idempotent."""

    @abstractmethod
    def unmount(self, container_dir: str) -> None:
        """Unmount the root filesystem. Idempotent."""

    @abstractmethod
    def is_mounted(self, container_dir: str) -> bool: ...

    @abstractmethod
    def destroy(self, container_dir: str) -> None:
        """Remove the container's storage (unmounted first)."""

    @abstractmethod
    def upper_dir(self, container_dir: str) -> str:
        """Where the container's writes land on the host (while mounted)."""

    @abstractmethod
    def usage(self, container_dir: str) -> DiskUsage: ...

    def set_quota(self, container_dir: str, quota: int | None) -> None:
        """Make the storage enforce ``quota`` bytes (``None``: none). Idempotent: a no-op
        when it already does. Mounted storage may only grow (``Conflict`` otherwise)."""
        if quota is not None:
            raise InvalidInput(f"limits.disk: the {self.name} storage cannot enforce a disk "
                               "quota: remove the key")
