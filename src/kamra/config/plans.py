"""Resource plans: named sets of config values, kept apart from the containers using them.

Built-in plans ship with the package (``plans.d/*.toml``, read-only); user plans are
``<root>/plans/<name>.toml``. A user plan can never take a built-in's name, so a plan
name means the same thing on every kamra root.
"""

from __future__ import annotations

import fcntl
import functools
import os
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

import tomli_w

from kamra.atomic import write_file
from kamra.config.keys import KEYS, check_consistency, format_value, get_key, parse_value
from kamra.errors import AlreadyExists, InvalidInput, KamraError, NotFound, ResourceBusy
from kamra.names import check_name
from kamra.paths import Layout

# Not "plans/": beside plans.py a directory of that name would be found as a namespace
# package kamra.config.plans by setuptools; a dotted name is plainly data.
BUILTIN_DIR = "plans.d"
# The graded series in its natural order; `plan list` shows built-ins this way.
BUILTIN_ORDER = ("micro", "small", "medium", "large", "unlimited")
SUFFIX = ".toml"


@dataclass
class Plan:
    name: str
    description: str
    values: dict[str, object] = field(default_factory=dict)  # normalized
    builtin: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "builtin": self.builtin,
                "values": dict(self.values),
                "display": {key: format_value(key, value) for key, value in self.values.items()}}


def parse_plan(name: str, text: str, origin: str, builtin: bool = False) -> Plan:
    """A plan from its TOML text; errors name ``origin`` (the file) and the bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"plan file {origin}: not valid TOML: {exc}") from None
    extra = set(data) - {"description", "config"}
    if extra:
        raise InvalidInput(f"plan file {origin}: unknown entry {sorted(extra)[0]!r}: "
                           "a plan has a description and a [config] table")
    description = data.get("description", "")
    config = data.get("config", {})
    if not isinstance(description, str) or not isinstance(config, dict):
        raise InvalidInput(f"plan file {origin}: description must be a string "
                           "and config a table of \"key\" = value")
    values: dict[str, object] = {}
    try:
        for key, raw in config.items():
            # No host checks: a plan must load on any machine (see keys.parse_value).
            values[key] = parse_value(key, raw, check_host=False)
        check_consistency(values)
    except InvalidInput as exc:
        raise InvalidInput(f"plan file {origin}: {exc.message}") from None
    return Plan(name=name, description=description, values=_ordered(values), builtin=builtin)


def render_plan(plan: Plan) -> str:
    """TOML for a user plan; sizes written as "512M" so the file reads like the built-ins."""
    config = {}
    for key, value in plan.values.items():
        spec = KEYS[key]
        config[key] = format_value(key, value) if spec.unit.startswith("bytes") else value
    header = (f"# kamra plan {plan.name!r}: written by kamra, change it with "
              f"'kamra plan edit {plan.name}'.\n")
    return header + tomli_w.dumps({"description": plan.description, "config": config})


def _ordered(values: dict[str, object]) -> dict[str, object]:
    """Registry order, so files and listings are stable whatever order keys were given in."""
    return {key: values[key] for key in KEYS if key in values}


@functools.cache
def builtin_plans() -> dict[str, Plan]:
    """The plans shipped in the package, read once (importlib.resources: wheel or source tree)."""
    folder = resources.files(__package__).joinpath(BUILTIN_DIR)
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(SUFFIX):
            name = entry.name[: -len(SUFFIX)]
            found[name] = parse_plan(name, entry.read_text(encoding="utf-8"),
                                     f"{BUILTIN_DIR}/{entry.name}", builtin=True)
    rank = {name: i for i, name in enumerate(BUILTIN_ORDER)}
    return {name: found[name]
            for name in sorted(found, key=lambda n: (rank.get(n, len(rank)), n))}


def _description(description: object) -> str:
    if not isinstance(description, str) or "\n" in description or "\r" in description:
        raise InvalidInput("plan description must be one line of text")
    return description.strip()


class PlanStore:
    def __init__(self, layout: Layout):
        self.layout = layout

    @property
    def directory(self) -> str:
        return self.layout.plans

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize read-modify-write of plan files (two edits must not lose one)."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(os.path.join(self.directory, ".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load_user(self, name: str) -> Plan | None:
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KamraError(f"cannot read plan file {path}: {exc.strerror}") from None
        return parse_plan(name, text, path)

    def _user_names(self) -> list[str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        names = []
        builtins = builtin_plans()
        for entry in entries:
            name = entry[: -len(SUFFIX)] if entry.endswith(SUFFIX) else ""
            # A hand-placed file named like a built-in is ignored: built-ins always win.
            if name and name not in builtins and _valid_name(name):
                names.append(name)
        return sorted(names)

    def list(self) -> list[Plan]:
        """Built-ins in their graded order, then user plans by name."""
        plans = list(builtin_plans().values())
        for name in self._user_names():
            plan = self._load_user(name)
            if plan is not None:  # removed between listdir and open
                plans.append(plan)
        return plans

    def get(self, name: str) -> Plan:
        if not isinstance(name, str) or not name:
            raise InvalidInput("plan name is empty: see 'kamra plan list'")
        builtin = builtin_plans().get(name)
        if builtin is not None:
            return builtin
        plan = self._load_user(name) if _valid_name(name) else None
        if plan is None:
            raise NotFound(f"plan {name!r} does not exist: see 'kamra plan list'")
        return plan

    def create(self, name: str, values: dict[str, object], description: str = "") -> Plan:
        check_name(name, "plan")
        if name in builtin_plans():
            raise AlreadyExists(f"plan {name!r} is a built-in plan: choose another name")
        plan = Plan(name=name, description=_description(description),
                    values=_ordered(_parse_all(values)))
        check_consistency(plan.values)
        with self._locked():
            if os.path.exists(self._path(name)):
                raise AlreadyExists(f"plan {name!r} already exists: change it with "
                                    f"'kamra plan edit {name}' or choose another name")
            write_file(self._path(name), render_plan(plan))
        return plan

    def update(self, name: str, values: dict[str, object], unset: Sequence[str] = (),
               description: str | None = None) -> Plan:
        self._refuse_builtin(name, "changed", "create your own with 'kamra plan create'")
        parsed = _parse_all(values)
        for key in unset:
            get_key(key)
        with self._locked():
            old = self.get(name)
            merged = {k: v for k, v in old.values.items() if k not in unset}
            merged.update(parsed)
            plan = Plan(name=name, values=_ordered(merged),
                        description=old.description if description is None
                        else _description(description))
            check_consistency(plan.values)
            write_file(self._path(name), render_plan(plan))
        return plan

    def remove(self, name: str, users: Sequence[str]) -> None:
        self._refuse_builtin(name, "removed", "it ships with kamra")
        with self._locked():
            self.get(name)
            if users:
                raise ResourceBusy(f"plan {name!r} is used by {', '.join(sorted(users))}: "
                                   "switch them to another plan first "
                                   "(kamra set NAME --plan P, or --no-plan)")
            os.unlink(self._path(name))

    def _refuse_builtin(self, name: str, done: str, advice: str) -> None:
        if isinstance(name, str) and name in builtin_plans():
            raise InvalidInput(f"built-in plan {name!r} cannot be {done}: {advice}")


def _valid_name(name: str) -> bool:
    try:
        check_name(name, "plan")
    except InvalidInput:
        return False
    return True


def _parse_all(values: dict[str, object]) -> dict[str, object]:
    return {key: parse_value(key, raw) for key, raw in values.items()}
