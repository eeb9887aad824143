"""The StateStore interface and the record it keeps per container."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
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
    # The remote a live migration committed to (state "migrating"): the container may
    # run there; only asking that host settles it.
    migrating_to: str | None = None
    # On the target: the source host's address, from the moment the container arrived
    # until the source confirms it heard the answer (shown as state "migrating").
    migrating_from: str | None = None
    # On the target: received, but the source has not committed the migration (it may
    # still resume its own copy): a kamrad that restarts in this window drops it.
    arriving: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ContainerRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Forward:
    """A port forward: traffic to the host's ``host_port`` goes to the container's."""

    container: str
    proto: str  # tcp | udp
    host_port: int
    ct_port: int
    host_ip: str = ""  # "" = every host address

    def to_json(self) -> dict:
        return asdict(self)


class StateStore(ABC):
    """Atomic, durable storage of container records, address allocations and forwards."""

    @abstractmethod
    def insert(self, record: ContainerRecord) -> None:
        """Add a new record; raises AlreadyExists if the name is taken."""

    @abstractmethod
    def update(self, record: ContainerRecord) -> None: ...

    @abstractmethod
    def sync(self) -> None:
        """Make every change so far survive a power loss (updates survive a crash of
        kamrad without it). For decisions that must never be forgotten: a migration's
        commit."""

    @abstractmethod
    def get(self, name: str) -> ContainerRecord | None: ...

    @abstractmethod
    def delete(self, name: str) -> None: ...

    @abstractmethod
    def list(self) -> list[ContainerRecord]: ...

    # -- IP address management: an address is held by at most one container, ever ----------
    @abstractmethod
    def allocate_address(self, container: str, candidates: Iterable[str],
                         wanted: str | None = None) -> str:
        """Hold ``wanted`` (Conflict naming the holder if taken) or the first candidate
        nobody holds (Conflict when none is left), atomically across processes."""

    @abstractmethod
    def release_addresses(self, container: str) -> None: ...

    @abstractmethod
    def addresses(self) -> dict[str, str]:
        """Every held address -> its container."""

    # -- port forwards -----------------------------------------------------------------------
    @abstractmethod
    def add_forward(self, forward: Forward) -> None:
        """Conflict if another forward holds the same proto, host address and port."""

    @abstractmethod
    def remove_forward(self, container: str, proto: str, host_port: int,
                       host_ip: str = "") -> bool: ...

    @abstractmethod
    def forwards(self, container: str | None = None) -> list[Forward]: ...

    @abstractmethod
    def close(self) -> None: ...
