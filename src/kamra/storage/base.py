"""The interface every storage backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod


class StorageBackend(ABC):
    """Creates, mounts and removes a container's root filesystem.

    ``container_dir`` is ``<root>/containers/<name>``; the mounted root filesystem
    appears at ``<container_dir>/rootfs`` on the host, so the host sees into it.
    """

    name = "abstract"

    def __init__(self, root: str):
        self.root = root

    @abstractmethod
    def create(self, container_dir: str, template_rootfs: str) -> None:
        """Make the container's private storage (must be O(1) in template size)."""

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
