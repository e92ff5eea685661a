"""One artifact format: a safetensors file whose header describes it (kind, name, config,
provenance), for learned rules and few-shot models alike; one ``l2o.load``."""

from __future__ import annotations

import json

import pytest
import torch

import l2o
from l2o.checkpoint import load_tensors
from l2o.errors import CheckpointError
from l2o.fewshot import MetaLSTMMethod
from l2o.fewshot.api import Predictor
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig
from test_fewshot import tiny_learner


def rule():
    torch.manual_seed(0)
    return CoordinatewiseLSTM(LSTMRuleConfig(layers=(4,)))


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_rule_as_one_file_and_as_a_directory(tmp_path):
    r = rule()
    one = l2o.save(r, tmp_path / "opt.safetensors", extra={"trained_on": "x"})
    _, meta = load_tensors(one)
    assert (
        meta["kind"] == "l2o-rule" and meta["rule"] == "lstm" and meta["extra"]["trained_on"] == "x"
    )
    assert same(l2o.load(one), r) and not l2o.load(one).training
    d = l2o.save(r, tmp_path / "opt")
    # the directory's weights file carries the same description as its config.json
    _, header = load_tensors(d / "optimizer.safetensors")
    assert header == json.loads((d / "config.json").read_text())
    assert same(l2o.load(d), r)
    with pytest.raises(CheckpointError, match="apply to few-shot models"):
        l2o.load(one, method="maml")


def test_a_fewshot_model_through_the_same_save_and_load(tmp_path):
    torch.manual_seed(0)
    m = MetaLSTMMethod(tiny_learner(), inner_steps=2)
    path = l2o.save(m, tmp_path / "m.safetensors", extra={"selection": {"rule": "final"}})
    loaded = l2o.load(path)
    assert isinstance(loaded, Predictor) and loaded.method == "meta-lstm"
    assert same(loaded.model, m) and loaded.meta["selection"] == {"rule": "final"}
    with pytest.raises(CheckpointError, match="one .safetensors file"):
        l2o.save(m, tmp_path / "dir")
    with pytest.raises(CheckpointError, match="expected a learned rule"):
        l2o.save(torch.nn.Linear(2, 2), tmp_path / "x")


def test_shipped_artifacts_written_before_the_header_held_the_config_still_load():
    _, meta = load_tensors(l2o.artifact.resolve("pretrained/quadratic") / "optimizer.safetensors")
    assert "config" not in meta  # the old header: the rule's name alone
    assert isinstance(l2o.load("pretrained/quadratic"), torch.nn.Module)


def test_directory_whose_weights_and_config_disagree_fails_loudly(tmp_path):
    d = l2o.save(rule(), tmp_path / "opt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["config"]["output_scale"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="describe different rules"):
        l2o.load(d)
