"""The template store: ``<root>/templates/<name>/{template.toml,rootfs/}``.

Every change happens in a dot-dir beside the templates (``.build-*``, ``.import-*``,
``.trash-*``) and becomes visible with one rename, so a template under its real name
is always complete. Templates are immutable once in place: nothing here writes into
the rootfs of a template that exists.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from kamra.errors import (
    AlreadyExists,
    InvalidInput,
    KamraError,
    KernelError,
    NotFound,
    ResourceBusy,
)
from kamra.names import check_name
from kamra.paths import Layout
from kamra.templates.archive import export_template, import_template
from kamra.templates.busybox import build_busybox
from kamra.templates.debian import build_debian
from kamra.templates.digest import digest_and_size
from kamra.templates.fsutil import discard, remove_tree, scratch_name
from kamra.templates.model import (
    METADATA,
    ROOTFS,
    BuildOptions,
    BuildResult,
    Progress,
    TemplateInfo,
    emit,
    utc_now,
)

log = logging.getLogger(__name__)

Builder = Callable[[str, BuildOptions, Progress | None], BuildResult]

# kind -> builder(rootfs, options, progress). A new kind plugs in by adding an entry.
BUILDERS: dict[str, Builder] = {
    "busybox": build_busybox,
    "debian": build_debian,
}

_SCRATCH_PREFIXES = (".build-", ".import-", ".trash-")


class TemplateStore:
    def __init__(self, layout: Layout):
        self.layout = layout

    @property
    def directory(self) -> str:
        return self.layout.templates

    def _ensure(self) -> None:
        os.makedirs(self.directory, mode=0o755, exist_ok=True)

    def _names(self) -> list[str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        # Dot-dirs are builds, imports and removals in progress, never templates.
        return sorted(e for e in entries if not e.startswith(".")
                      and os.path.isdir(os.path.join(self.directory, e)))

    def list(self) -> list[TemplateInfo]:
        infos = []
        for name in self._names():
            try:
                info = TemplateInfo.load(self.layout.template_dir(name))
            except KamraError as exc:
                # One damaged template must not hide the others.
                log.warning("skipping template %s: %s", name, exc.message)
                continue
            info.name = name  # the directory name is authoritative
            infos.append(info)
        return infos

    def exists(self, name: str) -> bool:
        check_name(name, "template")
        return os.path.isfile(os.path.join(self.layout.template_dir(name), METADATA))

    def get(self, name: str) -> TemplateInfo:
        check_name(name, "template")
        if not self.exists(name):
            names = self._names()
            known = f" (available: {', '.join(names)})" if names else ""
            raise NotFound(f"template '{name}' not found{known}: build one with "
                           "'kamra template build busybox'")
        info = TemplateInfo.load(self.layout.template_dir(name))
        info.name = name  # the directory name is authoritative
        return info

    def _refuse_existing(self, name: str) -> None:
        if self.exists(name):
            digest = TemplateInfo.load(self.layout.template_dir(name)).digest
            raise AlreadyExists(f"template '{name}' already exists ({digest}): remove it first "
                                "or choose --name")
        if os.path.lexists(self.layout.template_dir(name)):
            raise AlreadyExists(f"{self.layout.template_dir(name)} exists but is not a template: "
                                "remove it first or choose --name")

    def _publish(self, scratch: str, name: str) -> None:
        """Rename a finished scratch dir to its name; the name must still be free."""
        final = self.layout.template_dir(name)
        if os.path.lexists(final):  # rename(2) would happily replace an empty directory
            raise AlreadyExists(f"template '{name}' already exists: remove it first "
                                "or choose --name")
        try:
            os.rename(scratch, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AlreadyExists(f"template '{name}' already exists: remove it first "
                                    "or choose --name") from None
            raise KernelError.from_oserror("rename", exc) from None

    def build(self, kind: str, name: str | None = None, suite: str = "bookworm",
              progress: Progress | None = None, mirror: str | None = None) -> TemplateInfo:
        builder = BUILDERS.get(kind)
        if builder is None:
            raise InvalidInput(f"unknown template kind {str(kind)[:40]!r}: use one of "
                               f"{', '.join(sorted(BUILDERS))}")
        name = check_name(name if name is not None else kind, "template")
        self._ensure()
        self._refuse_existing(name)
        scratch = scratch_name(self.directory, "build")
        try:
            os.mkdir(scratch, 0o755)
            rootfs = os.path.join(scratch, ROOTFS)
            os.mkdir(rootfs, 0o755)
            result = builder(rootfs, BuildOptions(suite=suite, mirror=mirror), progress)
            digest, size = digest_and_size(rootfs, lambda n: emit(progress, "digest", n, None,
                                                                  name))
            info = TemplateInfo(name=name, path=scratch, rootfs=rootfs, digest=digest,
                                created=utc_now(), source=result.source, os=result.os,
                                init=list(result.init), stop_signal=result.stop_signal,
                                size=size)
            info.save()
            self._publish(scratch, name)
        except OSError as exc:
            remove_tree(scratch)
            raise KernelError.from_oserror(f"build template '{name}'", exc) from None
        except BaseException:
            remove_tree(scratch)
            raise
        return self.get(name)

    def remove(self, name: str, users: list[str]) -> None:
        """Delete a template; ``users`` are the containers built on it (the engine knows)."""
        check_name(name, "template")
        if users:
            raise ResourceBusy(f"template '{name}' is used by containers: "
                               f"{', '.join(sorted(users))}")
        path = self.layout.template_dir(name)
        if not os.path.lexists(path):
            self.get(name)  # raises the NotFound with its hint
        discard(path)

    def export(self, name: str, file_path: str, progress: Progress | None = None) -> None:
        export_template(self.get(name), file_path, progress)

    def import_(self, file_path: str, name: str, progress: Progress | None = None
                ) -> TemplateInfo:
        check_name(name, "template")
        self._ensure()
        self._refuse_existing(name)
        scratch = import_template(file_path, self.directory, name, progress)
        try:
            self._publish(scratch, name)
        except BaseException:
            remove_tree(scratch)
            raise
        return self.get(name)

    def cleanup_scratch(self) -> list[str]:
        """Remove dot-dirs left by builds, imports or removals a crash interrupted.
        Only safe when no build or import is running (e.g. when kamrad starts)."""
        removed = []
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry.startswith(_SCRATCH_PREFIXES):
                remove_tree(os.path.join(self.directory, entry))
                removed.append(entry)
        return removed
