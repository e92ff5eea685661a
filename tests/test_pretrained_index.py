"""``l2o pretrained`` lists every shipped artifact, and each one loads by its name."""

from __future__ import annotations

import json

import pytest
import torch

import l2o
from l2o import cli
from l2o.artifact import PRETRAINED_DIR, shipped

NAMES = [item["name"] for item in shipped()]


def test_every_shipped_directory_is_listed_with_a_card():
    dirs = sorted(d.name for d in PRETRAINED_DIR.iterdir() if d.is_dir() and d.name[0] not in "._")
    assert [n.removeprefix("pretrained/") for n in NAMES] == dirs
    for item in shipped():
        assert item["for"] and item["headline"] != "see TRAINING.md", item["name"]


@pytest.mark.parametrize("name", NAMES)
def test_each_loads_by_its_name(name):
    obj = l2o.load(name)
    kind = next(i["kind"] for i in shipped() if i["name"] == name)
    if kind == "rule":
        assert isinstance(obj, torch.nn.Module) and not obj.training
    else:
        assert obj.method and l2o.fewshot.load(name).method == obj.method
        assert (PRETRAINED_DIR / name.split("/", 1)[1] / "TRAINING.md").is_file()
        size = (PRETRAINED_DIR / name.split("/", 1)[1] / "model.safetensors").stat().st_size
        assert size < 5_000_000


def test_cli_lists_them(capsys):
    assert cli.main(["pretrained"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES)
    assert cli.main(["pretrained", "--json"]) == 0
    assert [i["name"] for i in json.loads(capsys.readouterr().out)] == NAMES
