"""Regenerate docs/cli.md from the CLI's own argparse definitions (so --help and docs agree).

Run: .venv/bin/python scripts/gen_cli_docs.py > docs/cli.md
"""

from __future__ import annotations

import argparse
import os

from kamra.cli.main import build_parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render() -> str:
    os.environ["COLUMNS"] = "100"
    parser = build_parser()
    parser.prog = "kamra"
    out = ["# kamra command reference", "",
           "Generated from the CLI's own definitions by `scripts/gen_cli_docs.py`; "
           "`kamra COMMAND --help` prints the same.", "", "```", parser.format_help().rstrip(),
           "```", ""]
    for name, sub in subparsers(parser).items():
        out += [f"## kamra {name}", "", "```", sub.format_help().rstrip(), "```", ""]
        for inner_name, inner in subparsers(sub).items():
            out += [f"### kamra {name} {inner_name}", "", "```", inner.format_help().rstrip(),
                    "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
