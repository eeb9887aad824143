"""OS templates: building (busybox, debootstrap), digests, export and safe import."""

from kamra.templates.archive import export_template, import_template
from kamra.templates.digest import digest_and_size, tree_digest
from kamra.templates.model import BuildOptions, BuildResult, Progress, TemplateInfo
from kamra.templates.store import BUILDERS, TemplateStore

__all__ = [
    "BUILDERS",
    "BuildOptions",
    "BuildResult",
    "Progress",
    "TemplateInfo",
    "TemplateStore",
    "digest_and_size",
    "export_template",
    "import_template",
    "tree_digest",
]
