"""The Python recipes of docs/architecture.md run as they are against the current code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_page_has_recipes():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_recipe_runs(index, tmp_path, monkeypatch):
    from l2o.evaluate import CLASSIC_RULES
    from l2o.fewshot import registry
    from l2o.rules import LEARNED_RULES
    from l2o.tasks import TASKS

    monkeypatch.chdir(tmp_path)
    # recipes register things at run time; leave the registries as they were
    saved = [dict(TASKS), dict(CLASSIC_RULES), dict(LEARNED_RULES)]
    names = registry.names()
    try:
        exec(compile(BLOCKS[index], f"{DOC.name}[{index}]", "exec"), {"__name__": "recipe"})
    finally:
        for table, before in zip((TASKS, CLASSIC_RULES, LEARNED_RULES), saved, strict=True):
            table.clear()
            table.update(before)
        for name in set(registry.names()) - set(names):
            registry.unregister(name)
