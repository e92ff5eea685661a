"""Regenerate the ``l2o ... --help`` blocks of docs/cli.md from the parser.

    .venv/bin/python docs/gen_cli.py          # rewrite the blocks in place
    .venv/bin/python docs/gen_cli.py --check  # exit 1 if a block is out of date

Each command has a block between ``<!-- help: l2o COMMAND -->`` and ``<!-- /help -->``;
the prose around the blocks is written by hand and kept.  A command without a block is
appended at the end with a heading, to be described by hand.  tests/test_docs_cli.py checks
that every command has a block and every option of every command appears in it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cli.md"
WIDTH = "100"
BLOCK = re.compile(r"<!-- help: (?P<cmd>[^>]*?) -->\n.*?<!-- /help -->", re.S)


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the l2o CLI by its command line ("l2o", "l2o fewshot train", ...)."""
    sys.path.insert(0, str(REPO / "src"))
    from l2o.cli import build_parser

    found: dict[str, argparse.ArgumentParser] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(f"{name} {sub}", child)

    walk("l2o", build_parser())
    return found


def help_text(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to the terminal; fix it for the docs
    return parser.format_help().rstrip() + "\n"


def render(cmd: str, parser: argparse.ArgumentParser) -> str:
    return f"<!-- help: {cmd} -->\n```text\n{help_text(parser)}```\n<!-- /help -->"


def regenerate(text: str) -> str:
    parsers = commands()
    seen = set()

    def sub(m: re.Match) -> str:
        cmd = m.group("cmd")
        seen.add(cmd)
        if cmd not in parsers:
            raise SystemExit(f"docs/cli.md has a block for {cmd!r}, which is not a command")
        return render(cmd, parsers[cmd])

    text = BLOCK.sub(sub, text)
    for cmd, parser in parsers.items():
        if cmd not in seen:
            text = text.rstrip() + f"\n\n## `{cmd}`\n\n{render(cmd, parser)}\n"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report, do not write")
    args = ap.parse_args(argv)
    old = DOC.read_text()
    new = regenerate(old)
    if args.check:
        if new != old:
            print("docs/cli.md is out of date: run .venv/bin/python docs/gen_cli.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
