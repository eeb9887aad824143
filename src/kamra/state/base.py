"""The StateStore interface and the record it keeps per container."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field


@dataclass
class ContainerRecord:
    name: str
    template: str
    template_digest: str
    hostname: str
    storage: str = "overlay"
    created_at: float = 0.0
    state: str = "stopped"  # stopped | starting | running | stopping
    init_pid: int = 0
    init_start: int | None = None  # process start time: guards against pid reuse
    started_at: float | None = None
    stopped_at: float | None = None
    last_exit: dict | None = None  # {"status": int, "code": int|None, "signal": str|None, "reason": str}
    init: list[str] = field(default_factory=list)  # argv; empty = the template's init
    stop_signal: str = "SIGTERM"
    console: bool = True  # False when the init's stdio belongs to a client (kamra run)
    ephemeral: bool = False  # destroyed when its init exits (kamra run --rm)
    plan: str | None = None  # resource plan; the container's own overrides are in config
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ContainerRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class StateStore(ABC):
    """Atomic, durable storage of container records."""

    @abstractmethod
    def insert(self, record: ContainerRecord) -> None:
        """Add a new record; raises AlreadyExists if the name is taken."""

    @abstractmethod
    def update(self, record: ContainerRecord) -> None: ...

    @abstractmethod
    def get(self, name: str) -> ContainerRecord | None: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def list(self) -> list[ContainerRecord]: ...

    @abstractmethod
    def close(self) -> None: ...
