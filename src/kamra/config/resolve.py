"""Effective configuration: built-in defaults <- plan <- container overrides."""

from __future__ import annotations

from kamra.config.keys import KEYS

DEFAULT = "default"
CONTAINER = "container"


def plan_source(plan_name: str | None) -> str:
    return f"plan {plan_name}" if plan_name else "plan"


def effective(plan_name: str | None, plan_values: dict[str, object],
              overrides: dict[str, object]) -> dict[str, tuple[object, str]]:
    """Every key in KEYS -> (value, where it came from).

    Values are taken as already normalized (they were parsed when stored). A None value
    counts as absent, so a layer can only set a key, not mask a lower layer's value.
    Keys the registry does not know (left by another kamra version) are ignored here
    rather than failing every `config show`.
    """
    result: dict[str, tuple[object, str]] = {}
    for name, key in KEYS.items():
        if overrides.get(name) is not None:
            result[name] = (overrides[name], CONTAINER)
        elif plan_values.get(name) is not None:
            result[name] = (plan_values[name], plan_source(plan_name))
        else:
            result[name] = (key.default, DEFAULT)
    return result


def limits_only(resolved: dict[str, tuple[object, str]]) -> dict[str, object]:
    """The limits to enforce: "limits.*" keys that have a value (None means no limit)."""
    return {name: value for name, (value, _) in resolved.items()
            if name.startswith("limits.") and value is not None}
