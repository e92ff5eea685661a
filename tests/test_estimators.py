"""Gradient estimators: truncated BPTT through the trainer, PES (Vicol et al. 2021)."""

import math

import pytest
import torch

import l2o
from conftest import killed_then_resumed
from l2o.config import resolve
from l2o.errors import L2OError
from l2o.meta import MetaTrainer
from l2o.meta.estimators import PES, TruncatedBPTT
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig
from l2o.tasks import build_task


def tiny_rule(seed=0):
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(3,), preprocessing="logsign", output_scale=0.1)
    )


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_pes_estimate_points_along_the_true_gradient():
    # One truncation covering the whole (short) horizon: PES estimates the gradient of the
    # Gaussian-smoothed meta-loss, which for a small sigma is the BPTT gradient.
    task = build_task("quadratic:dim=3")
    rule = tiny_rule()
    seeds = list(range(2000))
    bptt = TruncatedBPTT()
    est, _ = bptt.compute_gradient_estimate(
        rule, bptt.init_worker_state(rule, task, seeds, 2000), 5
    )
    pes = PES(sigma=0.01)
    got, _ = pes.compute_gradient_estimate(rule, pes.init_worker_state(rule, task, seeds, 2000), 5)
    a, b = flat(est.grads), flat(got.grads)
    cos = float(a @ b / (a.norm() * b.norm()))
    assert got.finite and cos > 0.8, cos
    assert 0.5 < float(b.norm() / a.norm()) < 2.0
    # the logged losses are those of the unperturbed problems, up to the perturbation
    assert torch.allclose(got.step_losses, est.step_losses, rtol=0.05)


def test_pes_accumulates_its_noise_over_truncations():
    task = build_task("quadratic:dim=3")
    rule = tiny_rule()
    pes = PES(sigma=0.1)
    w = pes.init_worker_state(rule, task, [1, 2], 2, key=7)
    n = sum(p.numel() for p in rule.parameters())
    noise = [pes._noise(w, n, "cpu")]
    _, w = pes.compute_gradient_estimate(rule, w, 2)
    noise.append(pes._noise(w, n, "cpu"))
    _, w = pes.compute_gradient_estimate(rule, w, 2)
    assert torch.allclose(w.xi, noise[0] + noise[1])
    assert not torch.allclose(noise[0], noise[1])
    assert w.t == 4


def test_pes_noise_depends_on_the_instance_not_on_its_company():
    # Sharding instances over processes must draw the same noise for each instance.
    task = build_task("quadratic:dim=3")
    rule, pes = tiny_rule(), PES(sigma=0.1)
    n = sum(p.numel() for p in rule.parameters())
    both = pes._noise(pes.init_worker_state(rule, task, [5, 6], 2, key=1), n, "cpu")
    one = pes._noise(pes.init_worker_state(rule, task, [6], 2, key=1), n, "cpu")
    assert torch.equal(both[1], one[0])


def test_pes_meta_trains_through_the_trainer_and_resumes_exactly(tmp_path):
    sets = ["train.estimator=pes", "train.instances=8", "train.horizon=10", "train.unroll=5",
            "val.problems=8", "val.every=2", "rule.layers=4", "train.meta_steps=4"]  # fmt: skip
    cfg = resolve("quadratic", None, sets)
    full = MetaTrainer(cfg, tmp_path / "full", progress=False)
    summary = full.train()
    assert summary["updates"] == 8 and summary["skipped"] == 0

    resumed = killed_then_resumed(cfg, tmp_path / "k", at=3)
    for (name, a), b in zip(full.rule.state_dict().items(), resumed.rule.state_dict().values()):
        assert torch.equal(a, b), name


def test_meta_optimizer_and_scheduler_are_given_to_the_trainer(tmp_path):
    cfg = resolve("quadratic", None, ["train.instances=4", "train.horizon=10", "train.unroll=5",
                                      "val.every=0", "rule.layers=4", "train.meta_steps=3"])  # fmt: skip
    rule = tiny_rule()
    opt = torch.optim.SGD(rule.parameters(), lr=0.1, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    trainer = MetaTrainer(cfg, tmp_path / "r", rule=rule, meta_optimizer=opt, lr_scheduler=sched,
                          progress=False)  # fmt: skip
    trainer.train()
    assert trainer.opt is opt and trainer.updates == 6
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # the lr of the last update of each trajectory (2 updates each, halved every 2)
    assert [r["lr"] for r in trainer.history] == pytest.approx([0.1, 0.05, 0.025])
    # a resumed run restores the scheduler too
    again_rule = tiny_rule()
    opt2 = torch.optim.SGD(again_rule.parameters(), lr=0.1, momentum=0.5)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    again = MetaTrainer(cfg, tmp_path / "r", rule=again_rule, meta_optimizer=opt2,
                        lr_scheduler=lambda o: sched2, progress=False)  # fmt: skip
    again.load_checkpoint(tmp_path / "r" / "last.ckpt")
    assert sched2.last_epoch == 6 and opt2.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_pes_refuses_second_order_and_bad_sigma():
    with pytest.raises(L2OError, match="second_order"):
        resolve("quadratic", None, ["train.estimator=pes", "train.second_order=true"])
    with pytest.raises(L2OError, match="pes_sigma"):
        resolve("quadratic", None, ["train.pes_sigma=0"])


def test_resuming_with_another_meta_optimizer_or_estimator_fails_by_name(tmp_path):
    sets = ["train.instances=4", "train.horizon=10", "train.unroll=5", "val.every=0",
            "rule.layers=4", "train.meta_steps=1"]  # fmt: skip
    MetaTrainer(resolve("quadratic", None, sets), tmp_path, progress=False).train()
    rule = tiny_rule()
    other = MetaTrainer(
        resolve("quadratic", None, sets), tmp_path, rule=rule, progress=False,
        meta_optimizer=torch.optim.SGD(rule.parameters(), lr=0.1),
    )  # fmt: skip
    with pytest.raises(l2o.CheckpointError, match="meta_optimizer: checkpoint Adam vs now SGD"):
        other.train(resume=True)
    with pytest.raises(l2o.CheckpointError, match="estimator: checkpoint bptt vs now pes"):
        MetaTrainer(
            resolve("quadratic", None, sets), tmp_path, progress=False, estimator=PES()
        ).train(resume=True)


def test_pes_on_a_task_that_does_not_batch_gives_the_batched_estimate(monkeypatch):
    # Tasks with max_batch = 1 (the task family) run every particle as its own problem; the
    # estimate, the logged losses and the accumulated noise must not depend on the grouping.
    task = build_task("quadratic:dim=3")
    rule, pes = tiny_rule(), PES(sigma=0.1)
    seeds = [3, 4, 5]
    w = pes.init_worker_state(rule, task, seeds, 3, key=2)
    assert len(w.groups) == 1
    got = [pes.compute_gradient_estimate(rule, w, 3)[0] for _ in range(2)]
    monkeypatch.setattr(type(task), "max_batch", 1)
    w1 = pes.init_worker_state(rule, task, seeds, 3, key=2)
    assert len(w1.groups) == 6
    alone = [pes.compute_gradient_estimate(rule, w1, 3)[0] for _ in range(2)]
    for a, b in zip(got, alone):
        assert torch.allclose(flat(a.grads), flat(b.grads), rtol=1e-4, atol=1e-5)
        assert torch.allclose(a.step_losses, b.step_losses, rtol=1e-5)
    assert torch.equal(w.xi, w1.xi)


def test_pes_meta_trains_the_task_family(tmp_path):
    # The family draws a different model per seed and batches none of them (max_batch 1).
    sets = ["rule.layers=[4]", "train.meta_steps=2", "train.horizon=6", "train.horizon_min=0", "train.unroll=3",
            "train.instances=2", "val.problems=1", "val.every=1", "val.steps=6", "train.estimator=pes"]  # fmt: skip
    trainer = MetaTrainer(
        resolve("family:datasets=synthetic", None, sets), tmp_path, progress=False
    )
    summary = trainer.train()
    assert summary["updates"] == 4 and summary["skipped"] == 0


def test_validation_metric_final_log_selects_by_where_runs_end(tmp_path):
    from l2o.evaluate import validation_scores

    losses = torch.tensor([[4.0, 400.0], [2.0, 300.0], [1.0, 100.0], [0.5, 10.0]])
    torch.testing.assert_close(validation_scores(losses, "sum"), torch.tensor([3.5, 410.0]))
    # 3 steps: the last max(1, 3 // 20) = 1 step, relative to step 0, floored at 1e-3
    torch.testing.assert_close(
        validation_scores(losses, "final-log"), torch.tensor([0.125, 0.025]).log()
    )
    tiny = torch.tensor([[2.0], [1e-12]])
    assert float(validation_scores(tiny, "final-log")) == pytest.approx(math.log(1e-3))
    assert not torch.isfinite(
        validation_scores(torch.tensor([[1.0], [math.nan]]), "final-log")
    ).any()
    with pytest.raises(L2OError, match="val.metric"):
        resolve("quadratic", None, ["val.metric=last"])
    sets = ["train.instances=4", "train.horizon=10", "train.unroll=5", "val.every=1",
            "val.problems=4", "rule.layers=4", "train.meta_steps=2", "val.metric=final-log"]  # fmt: skip
    trainer = MetaTrainer(resolve("quadratic", None, sets), tmp_path, progress=False)
    trainer.train()
    losses = l2o.evaluate.evaluate_rule(trainer.rule, trainer.val_task, trainer.val_seeds, 10)
    want = (losses[-1] / losses[0]).clamp_min(1e-3).log().mean()
    assert trainer.validate() == pytest.approx(float(want), rel=1e-5)
