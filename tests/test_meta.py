"""Meta-training: gradient flow, the second-order cut, NaN handling, exact resume."""

import math

import pytest
import torch

import l2o
from conftest import killed_then_resumed
from l2o.config import resolve
from l2o.errors import NonFiniteError
from l2o.meta import MetaTrainer, start, unroll
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig
from l2o.tasks import Quadratic
from l2o.tasks.base import ParamLayout, Problem, Task


def small_cfg(*sets):
    return resolve(
        "quadratic",
        None,
        [
            "train.instances=8",
            "train.horizon=20",
            "train.unroll=5",
            "val.problems=8",
            "val.every=2",
            "rule.layers=8,8",
            *sets,
        ],
    )


def test_meta_gradient_reaches_every_lstm_weight():
    rule = CoordinatewiseLSTM(LSTMRuleConfig(layers=(20, 20), preprocessing="logsign"))
    traj = start(Quadratic().sample(list(range(16))), rule)
    meta_loss, _, _ = unroll(rule, traj, 5)
    meta_loss.backward()
    for name, p in rule.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    before = {n: p.detach().clone() for n, p in rule.named_parameters()}
    torch.optim.Adam(rule.parameters(), lr=1e-3).step()
    for name, p in rule.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"


class _SpyRule(torch.nn.Module):
    """Wraps a rule and records whether the gradient it is fed carries a graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.name, self.needs_loss, self.seen = inner, "spy", False, []

    def init(self, theta, layout=None):
        return self.inner.init(theta, layout)

    def step(self, theta, grad, loss, state, layout=None):
        self.seen.append(grad.requires_grad)
        return self.inner.step(theta, grad, loss, state, layout)


@pytest.mark.parametrize("second_order", [False, True])
def test_optimizee_gradient_is_constant_unless_second_order(second_order):
    rule = _SpyRule(
        CoordinatewiseLSTM(LSTMRuleConfig(layers=(4,), preprocessing="none", output_scale=0.1))
    )
    traj = start(Quadratic().sample([1, 2]), rule)
    meta_loss, _, _ = unroll(rule, traj, 4, second_order=second_order)
    meta_loss.backward()
    # step 1 sees the carried (detached) gradient; later steps see fresh ones
    assert rule.seen[0] is False
    assert all(s is second_order for s in rule.seen[1:])


def test_second_order_changes_the_meta_gradient():
    torch.manual_seed(3)
    base = CoordinatewiseLSTM(LSTMRuleConfig(layers=(4,), preprocessing="none", output_scale=0.1))
    grads = []
    for second_order in (False, True):
        rule = CoordinatewiseLSTM(base.config)
        rule.load_state_dict(base.state_dict())
        traj = start(Quadratic().sample([5]), rule)
        meta_loss, _, _ = unroll(rule, traj, 4, second_order=second_order)
        meta_loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in rule.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_truncation_cuts_the_graph_between_unrolls():
    rule = CoordinatewiseLSTM(LSTMRuleConfig(layers=(4,), preprocessing="none"))
    traj = start(Quadratic().sample([1]), rule)
    _, _, traj = unroll(rule, traj, 3)
    assert not traj.theta.requires_grad and not any(v.requires_grad for v in traj.state.values())
    assert traj.t == 3


def test_meta_loss_counts_each_post_update_loss_once():
    # With a zero-output rule theta never moves: meta-loss = U * f(theta0).
    rule = CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(), preprocessing="none", zero_head=True, output_scale=1.0)
    )
    problem = Quadratic().sample([7])
    traj = start(problem, rule)
    meta_loss, losses, _ = unroll(rule, traj, 6)
    assert losses.shape == (6, 1)
    assert float(meta_loss.detach()) == pytest.approx(6 * float(traj.losses.mean()), rel=1e-6)


@pytest.fixture
def one_thread():
    # Bit-exact comparisons need a fixed BLAS thread count: MKL may use fewer threads
    # on a loaded machine, which changes summation order (seen once in CI-like runs).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_equals_uninterrupted(tmp_path, one_thread):
    cfg = small_cfg("train.meta_steps=6")
    full = MetaTrainer(cfg, tmp_path / "full", progress=False)
    full.train()

    # killed after the checkpoint at 4, before the one at 6
    resumed = killed_then_resumed(cfg, tmp_path / "killed", at=5)
    for (name, a), b in zip(full.rule.state_dict().items(), resumed.rule.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    rows = (tmp_path / "killed" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]
    full_rows = (tmp_path / "full" / "metrics.csv").read_text().strip().splitlines()
    # same metrics except wall time
    assert [r.rsplit(",", 1)[0] for r in rows] == [r.rsplit(",", 1)[0] for r in full_rows]


def test_resume_can_extend_meta_steps_but_not_change_other_settings(tmp_path):
    MetaTrainer(small_cfg("train.meta_steps=2"), tmp_path, progress=False).train()
    MetaTrainer(small_cfg("train.meta_steps=4"), tmp_path, progress=False).train(resume=True)
    with pytest.raises(l2o.CheckpointError, match="train.meta_lr"):
        MetaTrainer(
            small_cfg("train.meta_steps=6", "train.meta_lr=0.5"), tmp_path, progress=False
        ).train(resume=True)
    with pytest.raises(l2o.L2OError, match="--resume"):
        MetaTrainer(small_cfg("train.meta_steps=6"), tmp_path, progress=False).train()


def test_outputs_of_a_run(tmp_path):
    trainer = MetaTrainer(small_cfg("train.meta_steps=4"), tmp_path, progress=False)
    summary = trainer.train()
    for name in (
        "config.toml",
        "metrics.csv",
        "last.ckpt",
        "best/config.json",
        "best/optimizer.safetensors",
        "final/optimizer.safetensors",
    ):
        assert (tmp_path / name).exists(), name
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"meta_step", "meta_loss", "val_sum_loss", "wall_time", "skipped"} <= set(header)
    rule = l2o.load(tmp_path)
    assert isinstance(rule, CoordinatewiseLSTM) and rule.config.layers == (8, 8)
    assert math.isfinite(summary["best_val_sum_loss"])
    import tomllib

    saved = tomllib.loads((tmp_path / "config.toml").read_text())
    assert saved["train"]["meta_steps"] == 4 and saved["rule"]["layers"] == [8, 8]


class _NaNProblem(Problem):
    def __init__(self, nan_from: int):
        self.layout = ParamLayout(("x",), ((3,),))
        self.nan_from = nan_from

    def init(self):
        return torch.ones(3)

    def loss(self, theta, t):
        value = (theta * theta).sum()
        return (value * math.nan if t >= self.nan_from else value).reshape(1)


class _NaNTask(Task):
    name = "nan"

    def __init__(self, nan_from):
        self.nan_from = nan_from

    def sample(self, seeds):
        return _NaNProblem(self.nan_from)


def test_nonfinite_meta_steps_are_skipped_and_counted(tmp_path):
    cfg = resolve(
        "simple", None, ["train.meta_steps=3", "train.horizon=10", "train.unroll=5", "val.every=0"]
    )
    trainer = MetaTrainer(cfg, tmp_path, task=_NaNTask(nan_from=7), progress=False)
    before = [p.detach().clone() for p in trainer.rule.parameters()]
    summary = trainer.train()
    # each trajectory: first unroll fine, second unroll NaN -> skipped
    assert summary["skipped"] == 3 and summary["updates"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.rule.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.rule.parameters()))
    assert "skipped" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_too_many_nonfinite_steps_stop_the_run_with_checkpoint_intact(tmp_path):
    cfg = resolve(
        "simple",
        None,
        [
            "train.meta_steps=50",
            "train.horizon=10",
            "train.unroll=5",
            "val.every=0",
            "train.max_nonfinite=3",
        ],
    )
    trainer = MetaTrainer(cfg, tmp_path, task=_NaNTask(nan_from=1), progress=False)
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite"):
        trainer.train()
    assert trainer.meta_step == 3


def test_checkpoints_are_written_between_validations(tmp_path):
    cfg = small_cfg("train.meta_steps=5", "val.every=0", "train.checkpoint_every=2")

    class Killed(Exception):
        pass

    def kill(trainer, row):
        if trainer.meta_step == 3:
            raise Killed

    with pytest.raises(Killed):
        MetaTrainer(cfg, tmp_path, progress=False, callback=kill).train()
    resumed = MetaTrainer(cfg, tmp_path, progress=False)
    resumed.load_checkpoint(tmp_path / "last.ckpt")
    assert resumed.meta_step == 2


def test_extending_meta_steps_keeps_the_cosine_schedule(tmp_path):
    cfg = small_cfg("train.meta_steps=2", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1")
    first = MetaTrainer(cfg, tmp_path, progress=False)
    first.train()
    floor = 0.1 * cfg["train"]["meta_lr"]
    longer = MetaTrainer(
        small_cfg("train.meta_steps=4", "train.lr_schedule=cosine", "train.min_lr_ratio=0.1"),
        tmp_path,
        progress=False,
    )
    longer.train(resume=True)
    assert longer.schedule_meta_steps == 2
    assert all(r["lr"] == pytest.approx(floor) for r in longer.history)


def test_fresh_run_removes_stale_artifacts(tmp_path):
    MetaTrainer(small_cfg("train.meta_steps=1"), tmp_path / "a", progress=False).train()
    (tmp_path / "a" / "last.ckpt").unlink()
    stamp = (tmp_path / "a" / "best" / "optimizer.safetensors").stat().st_mtime_ns
    MetaTrainer(
        small_cfg("train.meta_steps=1", "val.every=0"), tmp_path / "a", progress=False
    ).train()
    assert (tmp_path / "a" / "best" / "optimizer.safetensors").stat().st_mtime_ns != stamp


def test_preset_from_set_overrides_config_file_values(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[rule]\npreset = "paper"\np = 10.0\noutput_scale = 0.1\n')
    cfg = resolve("quadratic", str(cfg_file), ["rule.preset=code"])
    assert (cfg["rule"]["p"], cfg["rule"]["output_scale"]) == (5.0, 0.01)
    cfg = resolve("quadratic", str(cfg_file), ["rule.p=3"])
    assert (cfg["rule"]["p"], cfg["rule"]["output_scale"]) == (3.0, 0.1)
    cfg = resolve("quadratic", None, ["rule.preset=code", "rule.output_scale=0.5"])
    assert (cfg["rule"]["p"], cfg["rule"]["output_scale"]) == (5.0, 0.5)


def test_saved_config_toml_round_trips(tmp_path):
    import tomllib

    from l2o.config import to_toml

    cfg = resolve("quadratic", None, ["rule.layers=[12,12]"])
    cfg["rule"]["groups"] = '[\n  {"pattern": "*", "rule": "lstm"}\n]'
    assert tomllib.loads(to_toml(cfg)) == json_roundtrip(cfg)


def json_roundtrip(x):
    import json

    return json.loads(json.dumps(x))


def test_horizons_drawn_per_trajectory(tmp_path, one_thread):
    # train.horizon_min: each trajectory's horizon is a log-uniform draw from
    # [horizon_min, horizon] fixed by (seed, k); the cosine schedule still ends at its floor.
    cfg = small_cfg("train.meta_steps=6", "train.horizon=40", "train.horizon_min=5",
                    "train.lr_schedule=cosine", "train.min_lr_ratio=0.1", "val.every=0",
                    "train.checkpoint_every=2")  # fmt: skip
    trainer = MetaTrainer(cfg, tmp_path / "full", progress=False)
    horizons = [trainer.horizon_of(k) for k in range(200)]
    assert min(horizons) >= 5 and max(horizons) <= 40 and len(set(horizons)) > 10
    # log-uniform: about half of the draws below the geometric midpoint sqrt(5 * 40) = 14.1
    assert 70 < sum(h < 14.1 for h in horizons) < 130
    assert horizons == [MetaTrainer(cfg, None, progress=False).horizon_of(k) for k in range(200)]
    lengths = [trainer.unroll_lengths_of(k) for k in range(6)]
    assert [sum(x) for x in lengths] == horizons[:6] and all(max(x) <= 5 for x in lengths)
    trainer.train()
    assert trainer.updates == sum(len(x) for x in lengths)
    lr = trainer.opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * cfg["train"]["meta_lr"])
    with pytest.raises(l2o.L2OError, match="train.horizon_min"):
        small_cfg("train.horizon_min=21")

    resumed = killed_then_resumed(cfg, tmp_path / "k", at=3)
    assert resumed.updates == trainer.updates
    for (name, a), b in zip(trainer.rule.state_dict().items(), resumed.rule.state_dict().values()):
        assert torch.equal(a, b), name
