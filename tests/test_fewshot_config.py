"""``l2o fewshot train`` reads the same TOML + ``--set`` as ``l2o meta-train``; flags are
shorthands for keys; the baselines' pre-training runs on the one outer loop and resumes."""

from __future__ import annotations

import pytest
import torch

from l2o.config import to_toml
from l2o.data.episodes import EpisodeSampler
from l2o.errors import L2OError
from l2o.fewshot.baselines import FineTune
from l2o.fewshot.config import DEFAULTS, resolve
from l2o.fewshot.pretrain import Pretrainer
from l2o.fewshot.setup import model_options
from test_fewshot import synthetic, tiny_learner


def test_defaults_file_set_flags_in_that_order(tmp_path):
    assert resolve()["episodes"] == DEFAULTS["episodes"]
    f = tmp_path / "c.toml"
    f.write_text(
        'method = "protonet"\n[episodes]\nways = 20\nshots = 5\n[model]\ntrain_ways = 40\n'
    )
    cfg = resolve(str(f), ["episodes.shots=1", "train.meta_lr=0.01"], {"ways": 10, "seed": None})
    assert cfg["method"] == "protonet" and cfg["model"]["train_ways"] == 40
    assert (cfg["episodes"]["ways"], cfg["episodes"]["shots"]) == (10, 1)  # flag > --set > file
    assert cfg["train"]["meta_lr"] == 0.01 and cfg["seed"] == 0
    # the saved config.toml resolves to the same config
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(cfg))
    assert resolve(str(saved)) == cfg


@pytest.mark.parametrize(
    "sets, flags, message",
    [
        (["train.meta_lrr=1"], {}, "unknown config key train.'meta_lrr'"),
        (["model.depth=3"], {}, "unknown config key model.'depth'"),
        (
            ["model.train_ways=20"],
            {"method": "maml"},
            "model.train_ways applies to protonet, not maml",
        ),
        ([], {"method": "maml", "train_ways": 20}, "--train-ways applies to protonet, not maml"),
        (
            ["train.init_lr_scale=0.5"],
            {"method": "maml"},
            "train.init_lr_scale applies to meta-lstm",
        ),
        (["train.meta_batch=4"], {"method": "finetune"}, "applies to the meta-trained methods"),
        (["model.inner_steps=two"], {}, "model.inner_steps: cannot read 'two' as int"),
        (["episodes.ways=0"], {}, "episodes.ways must be a positive integer"),
        (["data.dataset=mnist"], {}, "data.dataset must be one of omniglot, miniimagenet"),
        ([], {"method": "protonet", "init_from": "runs/x"}, "--init-from applies to"),
        (["method=nope"], {}, "method must be one of"),
    ],
)
def test_bad_keys_are_one_line_errors(sets, flags, message):
    with pytest.raises(L2OError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(None, sets, flags)


def test_model_options_take_method_defaults_where_unset():
    opts = model_options(resolve(None, ["train.clip=0"], {"method": "meta-lstm"}))
    assert opts.clip == 0.0 and opts.meta_batch is None and opts.second_order is False
    assert not hasattr(opts, "inner_steps")  # the method's default for the configuration


def test_pretraining_killed_and_resumed_is_exact(tmp_path, monkeypatch):
    data = synthetic()
    val = list(EpisodeSampler(synthetic(seed=2), 5, 1, 2, seed=12).episodes(3))

    def run(out):
        return Pretrainer(FineTune(tiny_learner()), data, val, tmp_path / out, 40, 10, seed=3,
                          progress=False)  # fmt: skip

    whole = run("whole")
    whole.train()
    real = Pretrainer.advance

    def killed(self):
        if self.position == 25:  # after the step-20 checkpoint, before step 30's
            raise KeyboardInterrupt
        return real(self)

    with monkeypatch.context() as m:
        m.setattr(Pretrainer, "advance", killed)
        with pytest.raises(KeyboardInterrupt):
            run("part").train()
    resumed = run("part")
    summary = resumed.train(resume=True)
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert summary["best_step"] == whole.best_position and summary["pretrain_steps"] == 40
    assert (tmp_path / "whole" / "metrics.csv").read_bytes() == (
        tmp_path / "part" / "metrics.csv"
    ).read_bytes()
