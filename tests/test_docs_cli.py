"""docs/cli.md covers every l2o command and option (its help blocks come from docs/gen_cli.py)."""

from __future__ import annotations

import argparse
import importlib.util
import re

from conftest import REPO


def _gen():
    spec = importlib.util.spec_from_file_location("docs_gen_cli", REPO / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_command_and_option_is_in_docs_cli():
    gen = _gen()
    text = (REPO / "docs" / "cli.md").read_text()
    blocks = {m.group("cmd"): m.group(0) for m in gen.BLOCK.finditer(text)}
    problems = []
    for cmd, parser in gen.commands().items():
        if cmd not in blocks:
            problems.append(f"{cmd}: no help block")
            continue
        if f"## `{cmd}`" not in text:
            problems.append(f"{cmd}: no heading")
        for action in parser._actions:
            names = list(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                names = list(action.choices)
            for name in names:
                if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", blocks[cmd]):
                    problems.append(f"{cmd}: {name} missing from its help block")
    assert not problems, (
        "docs/cli.md is out of date (run .venv/bin/python docs/gen_cli.py):\n  "
        + "\n  ".join(problems)
    )


def test_help_blocks_are_the_help_text():
    gen = _gen()
    text = (REPO / "docs" / "cli.md").read_text()
    parsers = gen.commands()
    for m in gen.BLOCK.finditer(text):
        assert m.group("cmd") in parsers, f"docs/cli.md documents {m.group('cmd')!r}, not a command"
