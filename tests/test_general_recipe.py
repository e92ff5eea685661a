"""configs/general.toml is the recipe of the shipped pretrained/general (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

from l2o.artifact import PRETRAINED_DIR
from l2o.config import resolve

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_file_resolves_to_the_shipped_artifacts_settings():
    cfg = resolve(config_file=str(ROOT / "configs" / "general.toml"))
    shipped = json.loads((PRETRAINED_DIR / "general" / "config.json").read_text())
    training = json.loads((PRETRAINED_DIR / "general" / "training.json").read_text())
    # the task spec and the rule's architecture that the weights were trained with
    assert cfg["task"] == shipped["extra"]["task"]
    assert cfg["rule"]["name"] == shipped["rule"]
    for key, value in shipped["config"].items():
        assert cfg["rule"][key] == value, key
    # and the whole run configuration (training schedule, validation, seed) of that run
    run = training["run_config"]
    for section in ("train", "val"):
        assert cfg[section] == run[section], section
    assert cfg["seed"] == run["seed"]
