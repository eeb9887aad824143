"""What a template is: its metadata (template.toml) and the types builders share."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import tomli_w

from kamra.atomic import write_file
from kamra.errors import InvalidInput

METADATA = "template.toml"
ROOTFS = "rootfs"
# Bumped when template.toml changes incompatibly, so an old kamra refuses a newer template.
FORMAT = 1

# progress(event) with event = {"phase": str, "current": int, "total": int | None, "message": str}
Progress = Callable[[dict], None]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_SIGNAL = re.compile(r"SIG[A-Z0-9]+(?:[+-][0-9]+)?\Z")


def emit(progress: Progress | None, phase: str, current: int = 0, total: int | None = None,
         message: str = "") -> None:
    if progress is not None:
        progress({"phase": phase, "current": current, "total": total, "message": message})


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BuildOptions:
    """Inputs a builder may use; kinds ignore what they do not need."""

    suite: str = "bookworm"
    mirror: str | None = None  # None: take it from the host's apt configuration


@dataclass
class BuildResult:
    """What a builder knows about the rootfs it made; the store adds name, digest and size."""

    source: str
    os: str
    init: list[str]
    stop_signal: str


@dataclass
class TemplateInfo:
    name: str
    path: str
    rootfs: str
    digest: str
    created: str
    source: str
    os: str
    init: list[str] = field(default_factory=lambda: ["/sbin/init"])
    stop_signal: str = "SIGTERM"
    size: int = 0

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "rootfs": self.rootfs,
            "digest": self.digest,
            "created": self.created,
            "source": self.source,
            "os": self.os,
            "init": list(self.init),
            "stop_signal": self.stop_signal,
            "size": self.size,
        }

    def to_toml(self) -> bytes:
        # path and rootfs are not stored: they follow from where the directory is.
        data = {"format": FORMAT, **self.to_json()}
        del data["path"], data["rootfs"]
        return tomli_w.dumps(data).encode()

    def save(self) -> None:
        write_file(os.path.join(self.path, METADATA), self.to_toml())

    @classmethod
    def load(cls, template_dir: str) -> TemplateInfo:
        """Read and validate template.toml; the file may come from an untrusted archive."""
        meta = os.path.join(template_dir, METADATA)
        try:
            with open(meta, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise InvalidInput(f"{meta} is missing") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{meta} is not valid TOML: {exc}") from None
        return cls.from_dict(data, template_dir)

    @classmethod
    def from_dict(cls, data: dict, template_dir: str) -> TemplateInfo:
        where = os.path.join(template_dir, METADATA)

        def bad(key: str, what: str) -> InvalidInput:
            return InvalidInput(f"{where}: '{key}' is missing or not {what}")

        def text(key: str) -> str:
            value = data.get(key)
            if not isinstance(value, str):
                raise bad(key, "a string")
            return value

        def number(key: str) -> int:
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(key, "a non-negative integer")
            return value

        fmt = number("format")
        if fmt > FORMAT:
            raise InvalidInput(f"{where}: format {fmt} is newer than this kamra understands "
                               f"({FORMAT}): upgrade kamra")
        digest = text("digest")
        if not _DIGEST.match(digest):
            raise InvalidInput(f"{where}: digest {digest[:80]!r} is not 'sha256:<64 hex digits>'")
        init = data.get("init")
        if not isinstance(init, list) or not init \
                or not all(isinstance(arg, str) and arg for arg in init):
            raise bad("init", "a non-empty list of strings")
        stop_signal = text("stop_signal")
        if not _SIGNAL.match(stop_signal):
            raise InvalidInput(f"{where}: stop_signal {stop_signal[:40]!r} is not a signal name")
        return cls(
            # Informational: the directory name is authoritative (the store overrides it),
            # so an archive made elsewhere under another name still imports.
            name=text("name"),
            path=template_dir,
            rootfs=os.path.join(template_dir, ROOTFS),
            digest=digest,
            created=text("created"),
            source=text("source"),
            os=text("os"),
            init=list(init),
            stop_signal=stop_signal,
            size=number("size"),
        )
