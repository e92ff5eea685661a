"""Few-shot: Meta-Learner LSTM rule, Conv-4 learner, BN protocol, MAML, baselines, CLI.

Tiny generated data (16x16 images, 10 classes) keeps every test fast and offline.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from l2o.checkpoint import load_tensors, save_tensors
from l2o.data.episodes import ClassDataset, EpisodeSampler
from l2o.errors import CheckpointError, L2OError
from l2o.fewshot import (
    BNStats,
    Conv4,
    FineTune,
    LearnerConfig,
    MAMLMethod,
    MetaLSTMMethod,
    NearestNeighbour,
    load,
    save_model,
)
from l2o.fewshot.evaluate import run_episodes, summarize
from l2o.fewshot.learner import resize_head
from l2o.fewshot.train import EpisodicTrainer
from l2o.preprocess import log_sign
from l2o.rules import LEARNED_RULES, SGD, MetaLearnerLSTM, build_learned_rule

SIZE = 16


def synthetic(
    classes: int = 10, per_class: int = 12, seed: int = 0, size: int = SIZE
) -> ClassDataset:
    """Each class is a random binary prototype; images are noisy, shifted copies of it."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(classes, 1, size, size, generator=g) > 0.7).float()
    imgs, labels = [], []
    for c in range(classes):
        for _ in range(per_class):
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(protos[c], shifts=shift, dims=(1, 2))
            x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
            imgs.append(x)
            labels.append(c)
    return ClassDataset(torch.stack(imgs), torch.tensor(labels), [f"c{c}" for c in range(classes)])


def tiny_learner(ways: int = 5, filters: int = 8) -> LearnerConfig:
    return LearnerConfig(in_channels=1, image_size=SIZE, ways=ways, filters=filters)


@pytest.fixture(scope="module")
def data():
    return synthetic()


# -- preprocessing ---------------------------------------------------------------------------
def test_preprocessing_thresholds():
    p = 10.0
    thr = math.exp(-p)
    x = torch.tensor([thr, -thr, 2 * thr, 0.5 * thr, 0.0, 1.0, -3.0], dtype=torch.float64)
    out = log_sign(x, p)
    # at the threshold both branches agree: (-1, sign)
    assert torch.allclose(out[0], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out[1], torch.tensor([-1.0, -1.0], dtype=torch.float64))
    # above: (log|x|/p, sign)
    assert torch.allclose(out[2], torch.tensor([math.log(2 * thr) / p, 1.0], dtype=torch.float64))
    assert torch.allclose(out[5], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(out[6], torch.tensor([math.log(3.0) / p, -1.0], dtype=torch.float64))
    # below: (-1, e^p x)
    assert torch.allclose(out[3], torch.tensor([-1.0, 0.5], dtype=torch.float64))
    assert torch.allclose(out[4], torch.tensor([-1.0, 0.0], dtype=torch.float64))


# -- the rule ----------------------------------------------------------------------------------
def test_metalearner_registered_and_rebuilds():
    assert "meta-lstm" in LEARNED_RULES
    rule = MetaLearnerLSTM(num_params=7)
    again = build_learned_rule("meta-lstm", rule.describe()["config"])
    assert isinstance(again, MetaLearnerLSTM) and again.c_init.numel() == 7
    assert 4.0 <= rule.b_f.item() <= 5.0 and -5.0 <= rule.b_i.item() <= -4.0
    assert rule.weight_ih.abs().max() <= 0.01 and rule.needs_loss


def test_forget_one_input_constant_is_exactly_sgd():
    torch.manual_seed(0)
    n, lr = 50, 0.0375
    rule = MetaLearnerLSTM(num_params=n)
    with torch.no_grad():
        rule.w_f.zero_()
        rule.w_i.zero_()
        rule.b_f.fill_(100.0)  # sigmoid(100) == 1.0 exactly in float32
        rule.b_i.fill_(math.log(lr / (1 - lr)))
    lr_eff = torch.sigmoid(rule.b_i).item()
    theta = torch.randn(n)
    grad = torch.randn(n)
    new, _ = rule.step(theta, grad, torch.tensor(0.7), rule.init(theta))
    expected, _ = SGD(lr=lr_eff).step(theta, grad, None, SGD(lr=lr_eff).init(theta))
    p = torch.nn.Parameter(theta.clone())
    p.grad = grad.clone()
    torch.optim.SGD([p], lr=lr_eff).step()
    assert torch.equal(new, expected)  # bit-exact against the library's SGD rule
    # torch.optim.SGD fuses the multiply-add (alpha=-lr), so it may differ in the last bit
    assert torch.allclose(new, p.detach(), rtol=0, atol=1e-6)


def test_rule_step_needs_loss():
    rule = MetaLearnerLSTM(num_params=3)
    with pytest.raises(ValueError, match="loss"):
        rule.step(torch.zeros(3), torch.zeros(3), None, rule.init(torch.zeros(3)))


# -- learner -----------------------------------------------------------------------------------
def test_learner_matches_torch_modules():
    cfg = tiny_learner(ways=3)
    conv = Conv4(cfg)
    theta = conv.init_params(1)
    net = torch.nn.Sequential(
        *[
            m
            for k in range(4)
            for m in (
                torch.nn.Conv2d(1 if k == 0 else 8, 8, 3, padding=1),
                torch.nn.BatchNorm2d(8, eps=1e-3),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            )
        ],
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    params = [p for p in net.parameters()]
    assert sum(p.numel() for p in params) == theta.numel()
    torch.nn.utils.vector_to_parameters(theta, params)
    x = torch.rand(6, 1, SIZE, SIZE)
    assert torch.allclose(conv(theta, x), net.train()(x), atol=1e-5)


def test_resize_head_keeps_body():
    cfg = tiny_learner(ways=5)
    theta = Conv4(cfg).init_params(0)
    big = resize_head(theta, cfg, 20)
    conv20 = Conv4(cfg.with_ways(20))
    assert big.numel() == conv20.layout.numel
    assert torch.equal(big[: conv20.body_numel], theta[: conv20.body_numel])


# -- gradient flow --------------------------------------------------------------------------
def test_gradients_reach_every_metaparameter_first_order(data):
    torch.manual_seed(0)
    model = MetaLSTMMethod(tiny_learner(), inner_steps=3)
    ep = EpisodeSampler(data, 5, 1, 3, seed=1).episode(0)
    loss, _ = model.meta_loss(ep)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.rule.c_init.grad.abs().sum() > 0


def _support_grads(model, ep, second_order_training: bool):
    """The gradients the rule receives, recorded by wrapping its step."""
    seen = []
    step = model.rule.step

    def spy(theta, grad, loss, state):
        seen.append((grad, loss))
        return step(theta, grad, loss, state)

    model.rule.step = spy
    try:
        model.adapt(ep.support_x, ep.support_y, 5, bn_mode="batch", training=second_order_training)
    finally:
        del model.rule.step
    return seen


def test_no_gradient_through_learner_gradient_unless_second_order(data):
    torch.manual_seed(0)
    ep = EpisodeSampler(data, 5, 1, 3, seed=1).episode(0)
    first = MetaLSTMMethod(tiny_learner(), inner_steps=3)
    for grad, loss in _support_grads(first, ep, True):
        assert not grad.requires_grad and not loss.requires_grad
    second = MetaLSTMMethod(tiny_learner(), inner_steps=3, second_order=True)
    second.load_state_dict(first.state_dict())
    seen = _support_grads(second, ep, True)
    assert all(g.requires_grad and loss.requires_grad for g, loss in seen[1:])
    # and the meta-gradients differ (second-order terms are present)
    g1 = torch.autograd.grad(first.meta_loss(ep)[0], first.rule.c_init)[0]
    g2 = torch.autograd.grad(second.meta_loss(ep)[0], second.rule.c_init)[0]
    assert not torch.allclose(g1, g2)


def test_metalstm_second_order_term_vanishes_with_the_step(data):
    # The dropped terms go through d(step)/d(theta) = -sigma(a_i) H: with the input gate near 0
    # the first-order meta-gradient must equal the second-order one; with a learned gate near
    # 1 (what meta-training reaches) it need not.
    ep = EpisodeSampler(data, 5, 1, 3, seed=1).episode(0)
    first = MetaLSTMMethod(tiny_learner(), inner_steps=3, grad_scale="none")
    second = MetaLSTMMethod(tiny_learner(), inner_steps=3, grad_scale="none", second_order=True)
    second.load_state_dict(first.state_dict())

    def cosine(input_bias: float) -> float:
        grads = []
        for model in (first, second):
            with torch.no_grad():
                model.rule.b_i.fill_(input_bias)
            grads.append(torch.autograd.grad(model.meta_loss(ep)[0], model.rule.c_init)[0])
        return F.cosine_similarity(*grads, dim=0).item()

    small, large = cosine(-12.0), cosine(6.0)
    assert small > 0.9999  # input gate 6e-6
    assert large < 0.99  # input gate 0.998


def test_maml_first_order_vs_second_order(data):
    ep = EpisodeSampler(data, 5, 1, 3, seed=1).episode(0)
    m2 = MAMLMethod(tiny_learner(), inner_steps=2, inner_lr=0.4)
    m1 = MAMLMethod(tiny_learner(), inner_steps=2, inner_lr=0.4, first_order=True)
    m1.load_state_dict(m2.state_dict())
    g2 = torch.autograd.grad(m2.meta_loss(ep)[0], m2.theta0)[0]
    g1 = torch.autograd.grad(m1.meta_loss(ep)[0], m1.theta0)[0]
    # FOMAML's meta-gradient is the query gradient at the adapted parameters
    adapted = m1.adapt(ep.support_x, ep.support_y, 5, bn_mode="batch")
    th = adapted.theta.detach().requires_grad_()
    q = torch.autograd.grad(F.cross_entropy(adapted.learner(th, ep.query_x), ep.query_y), th)[0]
    assert torch.allclose(g1, q, atol=1e-6)
    assert not torch.allclose(g1, g2)
    # ... and the second-order term is O(inner_lr): as the step shrinks the two agree
    for m in (m1, m2):
        m.inner_lr = 1e-4
    g2 = torch.autograd.grad(m2.meta_loss(ep)[0], m2.theta0)[0]
    g1 = torch.autograd.grad(m1.meta_loss(ep)[0], m1.theta0)[0]
    assert F.cosine_similarity(g1, g2, dim=0) > 0.999


# -- batch norm protocol ----------------------------------------------------------------------
def test_bn_statistics_reset_between_episodes(data):
    torch.manual_seed(0)
    model = MetaLSTMMethod(tiny_learner(), inner_steps=4).eval()
    sampler = EpisodeSampler(data, 5, 2, 3, seed=3)
    a, b = sampler.episode(0), sampler.episode(1)
    with torch.no_grad():
        fresh = model.adapt(b.support_x, b.support_y, 5)
        model.adapt(a.support_x, a.support_y, 5)
        after_a = model.adapt(b.support_x, b.support_y, 5)
    for m1, m2 in zip(
        fresh.stats.means + fresh.stats.vars, after_a.stats.means + after_a.stats.vars, strict=True
    ):
        assert torch.equal(m1, m2)
    assert torch.equal(fresh.logits(b.query_x), after_a.logits(b.query_x))
    # running statistics moved away from their (0, 1) start and are what the query uses
    init = BNStats.fresh(model.learner_config)
    assert not torch.allclose(fresh.stats.means[0], init.means[0])
    assert fresh.use_running


def test_bn_modes_differ_on_query(data):
    model = MAMLMethod(tiny_learner(), inner_steps=1)
    ep = EpisodeSampler(data, 5, 1, 3, seed=3).episode(0)
    with torch.no_grad():
        batch = model.adapt(ep.support_x, ep.support_y, 5, bn_mode="batch").logits(ep.query_x)
        run = model.adapt(ep.support_x, ep.support_y, 5, bn_mode="support-running").logits(
            ep.query_x
        )
    assert not torch.allclose(batch, run)
    with pytest.raises(L2OError, match="bn-mode"):
        model.adapt(ep.support_x, ep.support_y, 5, bn_mode="population")


# -- evaluation ---------------------------------------------------------------------------
def test_summarize_ci():
    s = summarize([0.5, 0.7, 0.9, 0.7])
    std = torch.tensor([50.0, 70.0, 90.0, 70.0]).std().item()
    assert s["accuracy"] == pytest.approx(70.0)
    assert s["ci95"] == pytest.approx(1.96 * std / 2.0)


# -- end to end ---------------------------------------------------------------------------
def test_meta_lstm_end_to_end_improves_over_chance(tmp_path):
    torch.manual_seed(0)
    train_ds, val_ds = synthetic(seed=1), synthetic(seed=2)
    model = MetaLSTMMethod(tiny_learner(), inner_steps=5, grad_scale="none")
    train_s = EpisodeSampler(train_ds, 5, 1, 5, seed=11)
    val_eps = list(EpisodeSampler(val_ds, 5, 1, 5, seed=12).episodes(20))
    before = summarize(run_episodes(model.eval(), val_eps, "support-running"))["accuracy"]
    trainer = EpisodicTrainer(
        model.train(),
        train_s,
        val_eps,
        tmp_path,
        meta_steps=120,
        val_every=60,
        meta_lr=5e-3,
        progress=False,
    )
    summary = trainer.train()
    assert (
        summary["best_val_accuracy"] > 40.0 and summary["best_val_accuracy"] > before
    )  # chance is 20%
    best = load(tmp_path)
    assert best.meta["selection"]["episode"] in (60, 120)
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3


def test_resume_is_exact(tmp_path, data):
    val_eps = list(EpisodeSampler(data, 5, 1, 2, seed=12).episodes(3))
    sampler = EpisodeSampler(data, 5, 1, 2, seed=11)

    def make():
        return MAMLMethod(tiny_learner(), inner_steps=1, first_order=True)

    full = EpisodicTrainer(
        make(), sampler, val_eps, tmp_path / "full", 8, 4, meta_batch=2, progress=False
    )
    full.train()
    part = EpisodicTrainer(
        make(), sampler, val_eps, tmp_path / "part", 4, 4, meta_batch=2, progress=False
    )
    part.train()
    resumed = EpisodicTrainer(
        make(), sampler, val_eps, tmp_path / "part", 8, 4, meta_batch=2, progress=False
    )
    resumed.train(resume=True)
    assert resumed.episode == 8 and resumed.updates == 4
    assert torch.equal(full.model.theta0, resumed.model.theta0)
    with pytest.raises(L2OError, match="already holds a run"):
        EpisodicTrainer(make(), sampler, val_eps, tmp_path / "part", 8, 4, progress=False).train()
    # --resume before the first checkpoint (or before the directory exists) starts the run
    fresh = EpisodicTrainer(
        make(), sampler, val_eps, tmp_path / "fresh", 8, 4, meta_batch=2, progress=False
    )
    fresh.train(resume=True)
    assert torch.equal(full.model.theta0, fresh.model.theta0)


def train_killed_at(trainer: EpisodicTrainer, episode: int, monkeypatch) -> None:
    """Train until ``episode`` and stop there as a killed process would (no final save)."""
    real_update = EpisodicTrainer.meta_update

    def killed(self):
        if self.episode == episode:
            raise KeyboardInterrupt
        return real_update(self)

    with monkeypatch.context() as m:
        m.setattr(EpisodicTrainer, "meta_update", killed)
        with pytest.raises(KeyboardInterrupt):
            trainer.train()


def test_cosine_meta_lr_schedule_and_killed_run_resumes_exactly(tmp_path, data, monkeypatch):
    val_eps = list(EpisodeSampler(data, 5, 1, 2, seed=12).episodes(2))
    sampler = EpisodeSampler(data, 5, 1, 2, seed=11)

    def trainer(out, schedule="cosine", steps=8, lr=0.01):
        model = MAMLMethod(tiny_learner(), inner_steps=1, first_order=True)
        return EpisodicTrainer(
            model, sampler, val_eps, tmp_path / out, steps, 4, meta_lr=lr,
            meta_batch=2, progress=False, meta_lr_schedule=schedule,
        )  # fmt: skip

    full = trainer("full")
    lrs = []
    real_update = EpisodicTrainer.meta_update

    def logged(self):
        lrs.append(self.current_meta_lr())
        return real_update(self)

    monkeypatch.setattr(EpisodicTrainer, "meta_update", logged)
    full.train()
    # cosine from 0.01 at episode 0 to 0 at the end; one value per meta-update (2 episodes)
    expected = [0.005 * (1 + math.cos(math.pi * e / 8)) for e in (0, 2, 4, 6)]
    assert lrs == pytest.approx(expected)
    assert full.opt.param_groups[0]["lr"] == pytest.approx(expected[-1])

    # a run killed after its episode-4 checkpoint resumes onto the same parameters
    monkeypatch.setattr(EpisodicTrainer, "meta_update", real_update)
    train_killed_at(trainer("part"), 4, monkeypatch)
    resumed = trainer("part")
    resumed.train(resume=True)
    assert torch.equal(full.model.theta0, resumed.model.theta0)
    with pytest.raises(CheckpointError, match="meta-lr-schedule"):
        trainer("part", schedule="constant").train(resume=True)
    with pytest.raises(CheckpointError, match="same --meta-steps"):
        trainer("part", steps=12).train(resume=True)
    with pytest.raises(CheckpointError, match="meta-lr 0.01"):
        trainer("part", lr=0.02).train(resume=True)
    with pytest.raises(L2OError, match="meta_lr_schedule must be one of"):
        trainer("other", schedule="linear")

    # a checkpoint written before the schedule existed: a constant-rate run whose rate
    # is read back from Adam's parameter groups
    trainer("old", schedule="constant", steps=4).train()
    tensors, meta = load_tensors(tmp_path / "old" / "last.ckpt")
    for key in ("meta_lr", "meta_lr_schedule", "meta_steps"):
        del meta[key]
    save_tensors(tmp_path / "old" / "last.ckpt", tensors, meta)
    with pytest.raises(CheckpointError, match=r"meta-lr 0.01 \(constant\)"):
        trainer("old", schedule="constant", lr=0.02).train(resume=True)
    assert trainer("old", schedule="constant").train(resume=True)["episodes"] == 8


def test_init_lr_scale_slows_c0_alone_and_resumes_exactly(tmp_path, data, monkeypatch):
    val_eps = list(EpisodeSampler(data, 5, 1, 2, seed=12).episodes(2))
    sampler = EpisodeSampler(data, 5, 1, 2, seed=11)

    def trainer(out, scale, steps=4):
        torch.manual_seed(0)
        model = MetaLSTMMethod(tiny_learner(), inner_steps=2)
        return EpisodicTrainer(
            model, sampler, val_eps, tmp_path / out, steps, 2, meta_lr=0.01,
            progress=False, init_lr_scale=scale,
        )  # fmt: skip

    # one meta-update from the same start: Adam's first step is linear in the rate, so
    # c_0 moves by exactly `scale` times as much and the LSTM's weights move the same
    runs = {}
    for scale in (1.0, 0.25, 0.0):
        t = trainer(f"one-{scale}", scale)
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        t.meta_update()
        runs[scale] = {k: v - before[k] for k, v in t.model.state_dict().items()}
    full, quarter, frozen = runs[1.0], runs[0.25], runs[0.0]
    assert full["rule.c_init"].abs().max() > 0
    assert torch.allclose(quarter["rule.c_init"], 0.25 * full["rule.c_init"], atol=1e-7)
    assert torch.count_nonzero(frozen["rule.c_init"]) == 0
    for key in full:
        if key != "rule.c_init":
            assert torch.allclose(quarter[key], full[key], atol=1e-7), key
            assert torch.allclose(frozen[key], full[key], atol=1e-7), key

    # two parameter groups survive a kill and a resume
    whole = trainer("whole", 0.25, steps=8)
    whole.train()
    train_killed_at(trainer("part", 0.25, steps=8), 4, monkeypatch)
    resumed = trainer("part", 0.25, steps=8)
    resumed.train(resume=True)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [g["lr"] for g in resumed.opt.param_groups] == pytest.approx([0.01, 0.0025])
    with pytest.raises(CheckpointError, match="init-lr-scale 0.25"):
        trainer("part", 1.0, steps=12).train(resume=True)
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["init_lr_scale"] == 0.25

    for bad in (-1.0, math.nan):
        with pytest.raises(L2OError, match="init_lr_scale must be a finite number >= 0"):
            trainer("bad", bad)
    with pytest.raises(L2OError, match="maml has no learned initialisation apart"):
        EpisodicTrainer(
            MAMLMethod(tiny_learner()), sampler, val_eps, tmp_path / "m", 2, 2, init_lr_scale=0.5
        )


# -- api and errors -----------------------------------------------------------------------
def test_api_adapt_predict_and_errors(tmp_path, data):
    torch.manual_seed(0)
    model = MetaLSTMMethod(tiny_learner(), inner_steps=2)
    save_model(model, tmp_path / "m.safetensors", selection={"rule": "final"})
    pred = load(tmp_path / "m.safetensors")
    ep = EpisodeSampler(data, 7, 2, 3, seed=5).episode(0)  # 7 ways on a 5-way model: head resized
    out = pred.adapt(ep.support_x, ep.support_y).predict(ep.query_x)
    assert out.shape == (21,) and out.max() < 7
    with pytest.raises(L2OError, match="expects"):
        pred.adapt(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(L2OError, match="missing"):
        pred.adapt(ep.support_x[:4], torch.tensor([0, 2, 0, 2]))
    with pytest.raises(L2OError, match="meta-lstm checkpoint, not maml"):
        load(tmp_path / "m.safetensors", method="maml")
    with pytest.raises(L2OError, match="expects"):
        pred.adapt(ep.support_x, ep.support_y).predict(torch.rand(3, 1, 8, 8))
    with pytest.raises(L2OError):
        EpisodeSampler(data, 11, 1, 3)  # more ways than classes
    with pytest.raises(L2OError):
        EpisodeSampler(data, 5, 5, 10)  # more shots + queries than images per class


def test_baselines_finetune_and_nearest_neighbour(data):
    from l2o.fewshot.baselines import pretrain, tune_finetune

    cfg = tiny_learner()
    body = pretrain(synthetic(seed=4), cfg, steps=30, batch_size=32)
    ft, nn_ = FineTune(cfg), NearestNeighbour(cfg)
    with torch.no_grad():
        ft.body.copy_(body)
        nn_.body.copy_(body)
    eps = list(EpisodeSampler(data, 5, 1, 3, seed=9).episodes(6))
    tuning = tune_finetune(ft, eps, "support-running", lrs=(0.1, 0.01), steps=(2, 5))
    assert tuning["chosen"]["lr"] in (0.1, 0.01) and len(tuning["grid"]) == 4
    acc_nn = summarize(run_episodes(nn_, eps, "support-running"))["accuracy"]
    assert acc_nn > 20.0
    # 1-shot nearest neighbour classifies each support image as itself
    ep = eps[0]
    with torch.no_grad():
        assert torch.equal(
            nn_.adapt(ep.support_x, ep.support_y, 5, bn_mode="batch").predict(ep.support_x),
            ep.support_y,
        )


def test_gates_recorded_and_plotted(tmp_path, data):
    from l2o.fewshot.plots import collect_gates, plot_gates

    model = MetaLSTMMethod(tiny_learner(), inner_steps=3)
    eps = list(EpisodeSampler(data, 5, 1, 3, seed=9).episodes(2))
    gates = collect_gates(model, eps)
    assert set(gates["forget"]) == {
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "conv4.weight",
        "head.weight",
    }
    assert len(gates["input"]["head.weight"]) == 2 and len(gates["input"]["head.weight"][0]) == 3
    assert 0.98 < gates["forget"]["conv1.weight"][0][0] < 1.0
    assert plot_gates(gates, tmp_path / "g.png").stat().st_size > 0


def test_cli_errors(tmp_path, capsys, monkeypatch):
    from l2o.cli import main

    monkeypatch.delenv("L2O_DATA", raising=False)
    rc = main(["fewshot", "train", "--method", "meta-lstm", "--out", str(tmp_path / "r")])
    assert rc == 2 and "--data-dir" in capsys.readouterr().err
    save_model(MAMLMethod(tiny_learner()), tmp_path / "m.safetensors")
    rc = main(
        [
            "fewshot",
            "eval",
            "--checkpoint",
            str(tmp_path / "m.safetensors"),
            "--method",
            "meta-lstm",
            "--data-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2 and "maml checkpoint" in capsys.readouterr().err
    rc = main(["fewshot", "train", "--method", "finetune", "--init-lr-scale", "0.1",
               "--data-dir", str(tmp_path), "--out", str(tmp_path / "f")])  # fmt: skip
    assert (
        rc == 2 and "--init-lr-scale applies to meta-lstm, not finetune" in capsys.readouterr().err
    )
    assert json.loads(json.dumps({"ok": 1}))


def test_warm_start_from_pretrained_body(tmp_path, data):
    from l2o.fewshot.setup import warm_start_from

    cfg = tiny_learner()
    ft = FineTune(cfg)
    with torch.no_grad():
        ft.body.normal_()
    save_model(ft, tmp_path / "ft.safetensors")
    n_body = Conv4(cfg).body_numel
    for model in (MetaLSTMMethod(cfg, inner_steps=2), MAMLMethod(cfg)):
        warm_start_from(model, tmp_path / "ft.safetensors")
        init = model.initial_params()
        assert torch.equal(init[:n_body], ft.body) and not init[n_body:].any()  # zero head
        ep = EpisodeSampler(data, 5, 1, 3, seed=2).episode(0)
        loss, _ = model.meta_loss(ep)
        (g,) = torch.autograd.grad(loss, [init])
        assert g[:n_body].abs().sum() > 0  # the pre-trained body is still meta-learned
    with pytest.raises(L2OError, match="values"):
        MetaLSTMMethod(tiny_learner(filters=4)).warm_start(ft.body.detach())
    with pytest.raises(L2OError, match="differs"):
        warm_start_from(MetaLSTMMethod(tiny_learner(filters=4)), tmp_path / "ft.safetensors")
    save_model(MAMLMethod(cfg), tmp_path / "maml.safetensors")
    with pytest.raises(L2OError, match="expected a finetune"):
        warm_start_from(MetaLSTMMethod(cfg), tmp_path / "maml.safetensors")
    with pytest.raises(L2OError, match="no learned initialisation"):
        FineTune(cfg).warm_start(ft.body.detach())


def test_paired_difference():
    from l2o.fewshot.evaluate import paired_difference

    a = {"episode_seed": 1, "episodes": 4, "per_episode_accuracy": [80.0, 60.0, 90.0, 70.0]}
    b = {"episode_seed": 1, "episodes": 4, "per_episode_accuracy": [78.0, 59.0, 87.0, 68.0]}
    d = paired_difference(a, b)
    assert d["difference"] == pytest.approx(2.0) and d["episodes"] == 4
    sd = torch.tensor([2.0, 1.0, 3.0, 2.0]).std().item()
    assert d["ci95"] == pytest.approx(1.96 * sd / 2)
    with pytest.raises(ValueError, match="same episode list"):
        paired_difference(a, {**b, "episode_seed": 2})


# -- devices ----------------------------------------------------------------------------------
def test_device_errors_are_clear(tmp_path):
    from l2o.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(L2OError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(L2OError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.fixture
def exact_cuda():
    """Full fp32 (cuDNN convolutions default to TF32) and deterministic cuDNN kernels, so CUDA
    can be compared with the CPU and a resumed CUDA run with an uninterrupted one."""
    b = torch.backends
    saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    b.cudnn.deterministic = True
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.deterministic = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("method", ["meta-lstm", "maml", "fomaml"])
def test_cuda_meta_gradient_matches_cpu(data, method, exact_cuda):
    ep = EpisodeSampler(data, 5, 1, 3, seed=12).episode(0)
    grads = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        if method == "meta-lstm":
            model = MetaLSTMMethod(tiny_learner(), inner_steps=3)
        else:
            model = MAMLMethod(tiny_learner(), inner_steps=2, first_order=method == "fomaml")
        model.to(dev).train()
        loss, _ = model.meta_loss(ep.to(dev))
        loss.backward()
        grads[dev] = [p.grad.cpu() for p in model.parameters()]
    for a, b in zip(grads["cpu"], grads["cuda"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("method", ["meta-lstm", "maml", "finetune"])
def test_cuda_train_resume_load_evaluate(tmp_path, data, method, exact_cuda):
    """Training, resuming, saving and loading on CUDA; a loaded model predicts as on the CPU."""
    from l2o.fewshot.baselines import pretrain

    val_eps = list(EpisodeSampler(data, 5, 1, 3, seed=12).episodes(4))
    sampler = EpisodeSampler(data, 5, 1, 3, seed=11)
    torch.manual_seed(0)
    if method == "finetune":
        model = FineTune(tiny_learner(), lr=0.1, steps=5).to("cuda")
        body = pretrain(data, tiny_learner(), 20, batch_size=16, device="cuda")
        assert body.device.type == "cuda"
        with torch.no_grad():
            model.body.copy_(body)
        path = tmp_path / "m.safetensors"
        save_model(model, path)
    else:
        make = {
            "meta-lstm": lambda: MetaLSTMMethod(tiny_learner(), inner_steps=3),
            "maml": lambda: MAMLMethod(tiny_learner(), inner_steps=1, inner_lr=0.4),
        }[method]
        full = EpisodicTrainer(
            make(), sampler, val_eps, tmp_path / "full", 6, 3, 1e-2, progress=False, device="cuda"
        )
        full.train()
        assert all(p.device.type == "cuda" for p in full.model.parameters())
        EpisodicTrainer(
            make(), sampler, val_eps, tmp_path / "part", 3, 3, 1e-2, progress=False, device="cuda"
        ).train()
        resumed = EpisodicTrainer(
            make(), sampler, val_eps, tmp_path / "part", 6, 3, 1e-2, progress=False, device="cuda"
        )
        resumed.train(resume=True)
        for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
            torch.testing.assert_close(a, b)
        path = tmp_path / "full"
    on_gpu, on_cpu = load(path, device="cuda"), load(path)
    assert on_gpu.model.device.type == "cuda" and on_cpu.model.device.type == "cpu"
    ep = val_eps[0]  # CPU tensors: moved to the model, predictions come back on the CPU
    out = on_gpu.adapt(ep.support_x, ep.support_y).predict(ep.query_x)
    assert out.device.type == "cpu" and out.shape == ep.query_y.shape
    gpu_accs = run_episodes(on_gpu.model, val_eps, "support-running")
    cpu_accs = run_episodes(on_cpu.model, val_eps, "support-running")
    assert max(abs(x - y) for x, y in zip(cpu_accs, gpu_accs, strict=True)) <= 1 / 15 + 1e-9
