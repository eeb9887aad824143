"""Regenerate docs/config.md from the key registry and the built-in plans (so docs and code agree).

Run: .venv/bin/python scripts/gen_config_docs.py > docs/config.md
"""

from __future__ import annotations

from kamra.config.keys import KEYS, Key, format_value
from kamra.config.plans import builtin_plans


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _live(key: Key) -> str:
    if not key.live:
        return "no"
    return "grow only" if key.grow_only_live else "yes"


def _default(key: Key) -> str:
    return key.unset if key.default is None else format_value(key.name, key.default)


def render() -> str:
    plans = builtin_plans()
    out = [
        "# kamra configuration reference", "",
        "Generated from the key registry (`src/kamra/config/keys.py`) and the built-in plans "
        "(`src/kamra/config/plans.d/`) by `scripts/gen_config_docs.py`; "
        "`kamra config keys` prints the same keys.", "",
        "## How a container's configuration is made", "",
        "A container's effective configuration is the built-in defaults, overridden by its "
        "plan, overridden by its own values (`kamra config show NAME` says where each value "
        "came from: `default`, `plan NAME` or `container`).", "",
        "- `kamra create NAME --plan P KEY=VALUE...` and `kamra set NAME KEY=VALUE...` set "
        "values; `KEY=` (empty) removes the container's own value, so the plan's or the "
        "default applies again.",
        "- Sizes are in bytes or with a binary unit: `64K`, `512M`, `1.5G`, `1T`; `512MiB` and "
        "`512MB` mean the same as `512M` (all units are powers of 1024).",
        "- CPU amounts are cores (`0.5`, `2`) or a percentage of one core (`150%` = 1.5 cores).",
        "- CPU lists use the kernel's format (`0`, `0-1`, `0,2-3`) and are shown normalized.",
        "- Each value is checked when it is given; a bad one is refused with one line naming "
        "the key and the accepted form, and nothing is saved. Checks against the host "
        "(CPU count, online CPUs) happen when a value is assigned, not when a stored plan is "
        "read, so a plan written on one machine loads on any other.",
        "- `limits.memory.reservation` may not exceed `limits.memory`.", "",
        "## Keys", "",
        "Live: `yes` changes a running container at once; `grow only` can be raised on a "
        "running container but lowering it needs the container stopped.", "",
    ]
    out += _table(["Key", "Accepted form", "Default", "Live", "Meaning"],
                  [[f"`{k.name}`", k.form, _default(k),
                    _live(k), k.doc] for k in KEYS.values()])
    out += ["", "## Built-in plans", "",
            "A graded series shipped with kamra, like OpenVZ's `ve-*.conf-sample` files. "
            "They are read-only; `kamra plan create` makes your own. A key a plan does not set "
            "keeps its default.", ""]
    out += _table(["Plan", "Description"], [[f"`{p.name}`", p.description] for p in plans.values()])
    used = [key for key in KEYS if any(key in p.values for p in plans.values())]
    out += [""]
    out += _table(["Key"] + [f"`{name}`" for name in plans],
                  [[f"`{key}`"] + [format_value(key, p.values[key]) if key in p.values else "-"
                                   for p in plans.values()] for key in used])
    out += ["", "## User plans", "",
            "`kamra plan create NAME KEY=VALUE... [--description TEXT]` writes "
            "`<root>/plans/NAME.toml`; `kamra plan edit` changes it (running containers using "
            "the plan follow, unless they set the key themselves); `kamra plan remove` refuses "
            "while a container uses the plan. A user plan cannot take a built-in plan's name. "
            "The file has the same layout as a built-in plan:", "",
            "```toml", 'description = "web servers"', "", "[config]",
            '"limits.cpu" = 1.5', '"limits.memory" = "1G"', '"limits.pids" = 1024', "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
