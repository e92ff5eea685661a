"""Paths no other test exercised: lr-grid extension, seed streams, the log meta-objective,
``l2o quickstart``, ``l2o study mnist``, ``l2o fewshot train/eval`` on Omniglot, and the
``torch.optim`` adapter against the core unroll with a trained optimizer.

Everything is shrunk to run in seconds; the tests on real data skip when the shared
data directory (``conftest.shared_data_dir``) is absent.
"""

from __future__ import annotations

import csv
import functools
import json
import math

import pytest
import torch
from torch import nn

import l2o
from conftest import shared_data_dir
from l2o import cli, evaluate, study
from l2o.config import resolve
from l2o.errors import L2OError
from l2o.evaluate import compare, evaluate_rule, parse_optimizer, sum_loss, tune_lr
from l2o.meta import MetaTrainer
from l2o.meta.unroll import meta_term, run, start, unroll
from l2o.optim import LearnedOptimizer
from l2o.rules import SGD, CoordinatewiseLSTM, LSTMRuleConfig, MetaLearnerLSTM
from l2o.seeds import derive_seed, stream
from l2o.tasks import ModuleTask, Quadratic
from l2o.tasks.base import Task

F64 = torch.float64


# -- 1. tune_lr: the grid is extended when the best lr is at an edge --------------------------
class LrRule:
    """A stand-in rule: tune_lr only builds it and hands it to evaluate_rule."""

    def __init__(self, lr: float):
        self.lr = lr


def fake_scores(monkeypatch, score_of):
    """Make ``evaluate_rule`` return losses whose ``sum_loss`` is ``score_of(lr)``; record calls."""
    calls = []

    def fake_evaluate_rule(rule, task, seeds, steps, *args, **kwargs):
        calls.append((rule.lr, list(seeds), steps))
        losses = torch.zeros(steps + 1, len(seeds), dtype=F64)
        losses[1] = score_of(rule.lr)  # rows 2.. stay 0: sum over steps 1..T is the score
        return losses

    monkeypatch.setattr(evaluate, "evaluate_rule", fake_evaluate_rule)
    return calls


def bowl(center: float):
    """A score with its minimum at ``center``, in decades (1 + squared distance in log10)."""
    return lambda lr: 1.0 + (math.log10(lr) - math.log10(center)) ** 2


def half_decades(start: float, sign: int, k: int) -> list[float]:
    return [start * 10 ** (sign * 0.5 * i) for i in range(1, k + 1)]


@pytest.mark.parametrize(
    "grid", [(1e-3, 1e-2, 1e-1), (1e-1, 1e-3, 1e-2)], ids=["sorted", "unsorted"]
)
def test_tune_lr_extends_up_when_best_is_the_largest_lr(monkeypatch, grid):
    calls = fake_scores(monkeypatch, bowl(1.0))
    res = tune_lr(LrRule, task=None, steps=3, problems=4, grid=grid)
    # 0.1 is the best of the grid -> 10^-0.5 (better), 10^0 (better), 10^0.5 (worse): stop
    extra = half_decades(0.1, +1, 3)
    assert [c[0] for c in calls] == pytest.approx([*grid, *extra])
    assert res.lr == pytest.approx(1.0)
    assert sorted(res.scores) == pytest.approx(sorted([*grid, *extra]))
    assert res.scores[max(res.scores)] == pytest.approx(1.25)  # the worse point is recorded too
    # every evaluation: the "tune" stream's problems, the requested horizon
    assert all(seeds == stream("tune", 4) and steps == 3 for _, seeds, steps in calls)


def test_tune_lr_extends_down_when_best_is_the_smallest_lr(monkeypatch):
    calls = fake_scores(monkeypatch, bowl(1e-2))
    res = tune_lr(LrRule, task=None, steps=2, problems=3, grid=(0.1, 1.0, 10.0))
    extra = half_decades(0.1, -1, 3)  # 10^-1.5, 10^-2 (best), 10^-2.5 (worse)
    assert [c[0] for c in calls] == pytest.approx([0.1, 1.0, 10.0, *extra])
    assert res.lr == pytest.approx(1e-2)
    assert min(res.scores) == pytest.approx(10**-2.5)


def test_tune_lr_extends_at_most_four_half_decades(monkeypatch):
    calls = fake_scores(monkeypatch, bowl(1e6))  # always better further up
    res = tune_lr(LrRule, task=None, steps=2, problems=2, grid=(1e-3, 1e-2, 1e-1))
    assert len(calls) == 3 + 4
    assert res.lr == pytest.approx(10.0)  # 0.1 x 10^(4 x 0.5)
    assert len(res.scores) == 7


def test_tune_lr_extension_stops_at_divergence(monkeypatch):
    def score(lr):
        return math.inf if lr > 0.5 else bowl(1e6)(lr)

    calls = fake_scores(monkeypatch, score)
    res = tune_lr(LrRule, task=None, steps=2, problems=2, grid=(1e-3, 1e-2, 1e-1))
    assert [c[0] for c in calls] == pytest.approx([1e-3, 1e-2, 1e-1, 10**-0.5, 1.0])
    assert res.lr == pytest.approx(10**-0.5)
    assert res.scores[calls[-1][0]] == math.inf  # the diverged try is kept, scored +inf


def test_tune_lr_extension_stops_on_a_tie(monkeypatch):
    """Only a strictly better score moves the best lr on."""
    calls = fake_scores(monkeypatch, lambda lr: max(1.0, -math.log10(lr)))  # flat from lr = 0.1
    res = tune_lr(LrRule, task=None, steps=2, problems=2, grid=(1e-3, 1e-2, 1e-1))
    assert len(calls) == 4 and res.lr == 0.1


@pytest.mark.parametrize(
    "score",
    [bowl(1e-2), lambda lr: math.inf if lr == 0.1 else bowl(1.0)(lr)],
    ids=["interior-optimum", "next-to-a-diverged-edge"],
)
def test_tune_lr_does_not_extend_from_an_interior_best(monkeypatch, score):
    calls = fake_scores(monkeypatch, score)
    res = tune_lr(LrRule, task=None, steps=2, problems=2, grid=(1e-3, 1e-2, 1e-1))
    assert len(calls) == 3 and res.lr == 1e-2 and set(res.scores) == {1e-3, 1e-2, 1e-1}


def test_tune_lr_all_diverged_is_an_error(monkeypatch):
    fake_scores(monkeypatch, lambda lr: math.inf)

    class T:
        name = "t"

    with pytest.raises(L2OError, match="every learning rate in the grid .* diverged on t"):
        tune_lr(LrRule, task=T(), steps=2, problems=2, grid=(1e-3, 1e-2))


def test_tune_lr_real_run_extends_a_too_small_grid():
    """SGD on quadratics from a grid far below its stable range: the search walks up."""
    task = Quadratic(dim=4)
    res = tune_lr(lambda lr: SGD(lr=lr), task, steps=5, problems=3, grid=(1e-4, 10**-3.5))
    assert res.lr > 10**-3.5 and len(res.scores) > 2
    seeds = stream("tune", 3)
    for lr, s in list(res.scores.items())[:3]:
        assert s == sum_loss(evaluate_rule(SGD(lr=lr), task, seeds, 5))


# -- 2. seed streams: train / val / tune / test never share a problem -------------------------
def test_seed_streams_are_disjoint_at_realistic_sizes():
    train = {s for k in range(10_000) for s in stream("train", 32, 0, k)}  # 10k trajectories
    other_run = {s for k in range(200) for s in stream("train", 32, 1, k)}
    val, tune, test = (set(stream(name, 1_000)) for name in ("val", "tune", "test"))
    assert len(train) == 10_000 * 32 and len(other_run) == 200 * 32  # no repeat inside a stream
    assert len(val) == len(tune) == len(test) == 1_000
    streams = {"train": train, "train(seed 1)": other_run, "val": val, "tune": tune, "test": test}
    names = list(streams)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not streams[a] & streams[b], f"{a} and {b} share seeds"
    # few-shot episode streams are derived from the same hash, under other names
    fewshot = {derive_seed("train", "fewshot", 0), derive_seed("val", "fewshot")}
    assert not fewshot & (train | val | tune | test)
    # 62-bit seeds: generator() folds modulo 2^63 - 1, so distinct seeds stay distinct problems
    assert max(max(s) for s in streams.values()) < 2**62


def test_seed_streams_are_stable():
    assert stream("test", 3) == [derive_seed("test", i) for i in range(3)]
    assert stream("train", 2, 5, 7) == [derive_seed("train", 5, 7, i) for i in range(2)]
    assert stream("val", 2) == stream("val", 5)[:2]  # a prefix does not depend on the count


class RecordingTask(Task):
    """Wraps a task and records the seeds of every problem sampled."""

    def __init__(self, inner: Task):
        self.inner, self.name, self.max_batch = inner, inner.name, inner.max_batch
        self.seeds: list[int] = []

    def sample(self, seeds):
        self.seeds.extend(int(s) for s in seeds)
        return self.inner.sample(seeds)

    def describe(self):
        return self.inner.describe()


def tiny_cfg(*sets):
    return resolve(
        "quadratic",
        sets=[
            "train.meta_steps=2",
            "train.horizon=6",
            "train.unroll=3",
            "train.instances=4",
            "val.every=1",
            "val.problems=3",
            "rule.layers=6",
            *sets,
        ],
    )


def test_meta_training_draws_train_and_val_problems_from_their_streams():
    task = RecordingTask(Quadratic(dim=3))
    cfg = tiny_cfg()
    MetaTrainer(cfg, None, task=task, progress=False).train()
    train = {s for k in range(2) for s in stream("train", 4, cfg["seed"], k)}
    val = set(stream("val", 3))
    assert set(task.seeds) == train | val
    assert not set(task.seeds) & (set(stream("tune", 100)) | set(stream("test", 100)))


def test_compare_evaluates_on_the_test_stream(monkeypatch):
    seen = []

    def fake(rule, task, seeds, steps, *args, **kwargs):
        seen.append(list(seeds))
        return torch.ones(steps + 1, len(seeds))

    monkeypatch.setattr(evaluate, "evaluate_rule", fake)
    compare(Quadratic(), [parse_optimizer("sgd:lr=0.1")], steps=2, problems=5, log=lambda s: None)
    assert seen == [stream("test", 5)]


# -- 3. the "log" meta-objective -----------------------------------------------------------------
def small_rule(seed: int = 0) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(LSTMRuleConfig(layers=(5,), output_scale=0.1)).double()


def replay(rule, problem, steps: int) -> list[torch.Tensor]:
    """Per-step, per-instance losses f(theta_t), t = 1..steps, by the obvious loop."""
    theta = problem.init()
    state = rule.init(theta)
    out = []
    for t in range(steps + 1):
        x = theta.detach().requires_grad_(True)
        losses = problem.loss(x, t)
        (grad,) = torch.autograd.grad(losses.sum(), x)
        if t > 0:
            out.append(losses.detach())
        if t < steps:
            with torch.no_grad():
                theta, state = rule.step(theta, grad, losses.detach(), state)
    return out


def test_log_objective_is_the_sum_over_steps_of_the_mean_log_loss():
    rule = small_rule()
    problem = Quadratic(dim=3, init_std=1.0, dtype=F64).sample([11, 12, 13])
    per_step = replay(rule, problem, 6)
    expected_log = sum(float(torch.log(f).mean()) for f in per_step)
    expected_sum = sum(float(f.mean()) for f in per_step)
    # two truncations of 3 steps: each unroll's meta-loss is its own steps' share
    traj = start(problem, rule)
    m1, l1, traj = unroll(rule, traj, 3, objective="log")
    m2, l2, _ = unroll(rule, traj, 3, objective="log")
    assert torch.allclose(torch.cat([l1, l2]), torch.stack(per_step), rtol=1e-10, atol=0)
    assert float((m1 + m2).detach()) == pytest.approx(expected_log, rel=1e-10)
    # the same trajectory under "sum" gives the plain sum of mean losses
    ms, _, _ = unroll(rule, start(problem, rule), 6, objective="sum")
    assert float(ms.detach()) == pytest.approx(expected_sum, rel=1e-10)
    # and the log meta-loss is differentiable in the rule's weights, with another gradient
    g_log = torch.autograd.grad(m1, list(rule.parameters()))
    m_sum, _, _ = unroll(rule, start(problem, rule), 3, objective="sum")
    g_sum = torch.autograd.grad(m_sum, list(rule.parameters()))
    assert all(torch.isfinite(g).all() for g in g_log)
    assert not all(torch.allclose(a, b) for a, b in zip(g_log, g_sum, strict=True))


def test_log_objective_clamps_a_zero_loss():
    term = meta_term(torch.tensor([0.0, math.e], dtype=F64), "log")
    assert float(term) == pytest.approx((math.log(1e-12) + 1.0) / 2)
    with pytest.raises(ValueError, match="meta objective"):
        meta_term(torch.ones(2), "mean")


def test_meta_training_with_log_objective_runs_and_uses_it():
    weights, summaries = {}, {}
    for objective in ("log", "sum"):
        trainer = MetaTrainer(
            tiny_cfg(f"train.objective={objective}"), None, task=Quadratic(dim=3), progress=False
        )
        summaries[objective] = trainer.train()
        weights[objective] = [p.detach().clone() for p in trainer.rule.parameters()]
        assert all(math.isfinite(r["meta_loss"]) for r in trainer.history)
    s = summaries["log"]
    assert s["meta_steps"] == 2 and s["updates"] == 4 and s["skipped"] == 0
    assert math.isfinite(s["best_val_sum_loss"])
    assert all(torch.isfinite(w).all() for w in weights["log"])
    # same seed, same problems: only the objective differs, so the weights must
    assert not all(torch.equal(a, b) for a, b in zip(weights["log"], weights["sum"], strict=True))


# -- 4. l2o quickstart ---------------------------------------------------------------------------
def test_quickstart_end_to_end(tmp_path, monkeypatch, capsys):
    sizes = []
    real_run_compare = cli.run_compare

    def small_compare(task_spec, specs, steps, problems, tune_problems, out, title=None):
        sizes.append((steps, problems, tune_problems))
        return real_run_compare(task_spec, specs, 20, 10, 5, out, title)

    monkeypatch.setattr(cli, "run_compare", small_compare)
    out = tmp_path / "qs"
    assert cli.main(["quickstart", "--out", str(out), "--meta-steps", "2"]) == 0
    assert sizes == [(100, 100, 100)]  # the protocol quickstart asks for (shrunk here)
    run_dir = out / "run"
    res = json.loads((out / "results.json").read_text())
    learned = f"lstm:{run_dir}"
    assert set(res["optimizers"]) == {learned, "adam", "rmsprop", "sgd", "nag"}
    assert res["task_name"] == "quadratic" and res["steps"] == 20 and res["problems"] == 10
    for name, entry in res["optimizers"].items():
        assert len(entry["mean_loss"]) == 21 and math.isfinite(entry["sum_loss"])
        if name == learned:
            assert entry["kind"] == "learned" and entry["hparams"]["rule"] == "lstm"
        else:
            assert entry["kind"] == "classic" and entry["hparams"]["lr"] > 0
            assert entry["tuning"]["problems"] == 5
    # the meta-training run: 2 trajectories, artifacts, plots, the resolved config
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["meta_step"]) for r in csv.DictReader(f)] == [1, 2]
    assert "meta_steps = 2" in (run_dir / "config.toml").read_text()
    for rel in ("best/optimizer.safetensors", "final/optimizer.safetensors", "last.ckpt"):
        assert (run_dir / rel).is_file(), rel
    for png in (run_dir / "validation.png", out / "curves.png"):
        assert png.stat().st_size > 1000
    with open(out / "curves.csv") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 21 and len(rows[0]) == 1 + 2 * 5
    assert isinstance(l2o.load(run_dir), CoordinatewiseLSTM)
    printed = capsys.readouterr().out
    assert "[1/2]" in printed and "[2/2]" in printed and str(out / "results.json") in printed


# -- 5. l2o study mnist on the real MNIST ---------------------------------------------------------
def real_data(kind: str):
    root = shared_data_dir()
    if root is None or not (root / kind).is_dir():
        pytest.skip(f"shared {kind} data not found (set L2O_DATA or put it in ../shared/data)")
    return root


def test_study_mnist_quick_on_real_mnist(tmp_path, monkeypatch, capsys):
    root = real_data("mnist")
    monkeypatch.setenv("L2O_DATA", str(root))  # restored afterwards (--data-dir sets it)
    # quick mode, shrunk further: 5-step horizons, a 2-architecture sweep
    monkeypatch.setitem(study.QUICK, "steps_div", 20)
    monkeypatch.setitem(study.QUICK, "units", (10, 20))
    monkeypatch.setitem(study.QUICK, "layers", (1,))
    out = tmp_path / "study"
    argv = ["study", "mnist", "--out", str(out), "--quick", "--problems", "2"]
    argv += ["--tune-problems", "2", "--experiments", "train,sweep", "--data-dir", str(root)]
    argv += ["--optimizer", "lstm:pretrained/mnist"]
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] and summary["problems"] == 2 and summary["tune_problems"] == 2
    row = summary["experiments"]["train"]
    names = {"lstm:pretrained/mnist", "sgd", "nag", "rmsprop", "adam"}
    assert set(row["optimizers"]) == names and row["steps"] == 5
    sums = {n: e["sum_loss"] for n, e in row["optimizers"].items()}
    assert all(math.isfinite(v) for v in sums.values())
    assert row["best"] == min(sums, key=sums.get)
    assert row["best_baseline_sum_loss"] == min(v for n, v in sums.items() if n in study.BASELINES)
    lstm = row["optimizers"]["lstm:pretrained/mnist"]
    assert lstm["ratio_to_best_baseline"] == pytest.approx(
        lstm["sum_loss"] / row["best_baseline_sum_loss"]
    )
    assert all(row["optimizers"][b]["lr"] > 0 for b in study.BASELINES)
    sweep = summary["sweep"]
    assert sweep["units"] == [10, 20] and sweep["layers"] == [1] and sweep["steps"] == 5
    assert {len(p) for p in sweep["points"].values()} == {2}
    for rel in ("train/results.json", "train/curves.png", "sweep/sweep.png", "summary.md"):
        assert (out / rel).is_file(), rel
    assert "| (a) training setting" in (out / "summary.md").read_text()
    # the sweep's training architecture (20x1, 5 steps) is the "train" experiment, not recomputed
    assert not (out / "sweep" / "h20x1" / "baselines.json").exists()
    assert (out / "sweep" / "h10x1" / "baselines.json").is_file()
    # a second run reuses every cached result and writes the same summary
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert again["experiments"] == summary["experiments"] and again["sweep"] == summary["sweep"]


# -- 6. l2o fewshot train (meta-lstm) then eval, on the real Omniglot ----------------------------
def test_fewshot_train_meta_lstm_then_eval_on_omniglot(tmp_path, monkeypatch, capsys):
    root = real_data("omniglot")
    from l2o.data import omniglot

    # decode the PNGs once for both commands (train and eval each load the splits)
    monkeypatch.setattr(omniglot, "load_omniglot", functools.cache(omniglot.load_omniglot))
    run_dir = tmp_path / "omni"
    argv = ["fewshot", "train", "--method", "meta-lstm", "--dataset", "omniglot"]
    argv += ["--data-dir", str(root), "--ways", "3", "--shots", "1", "--queries", "2"]
    argv += ["--inner-steps", "2", "--meta-steps", "3", "--val-every", "2"]
    argv += ["--val-episodes", "2", "--filters", "4", "--no-progress", "--out", str(run_dir)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "meta-lstm"
    assert 0.0 <= summary["best_val_accuracy"] <= 100.0
    split = json.loads((run_dir / "split.json").read_text())
    assert split["dataset"] == "omniglot" and split["split"] == "by-alphabet"
    parts = {k: set(v) for k, v in split["classes"].items()}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"])
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["episode"]) for r in csv.DictReader(f)] == [2, 3]
    for name in ("best.safetensors", "final.safetensors", "last.ckpt"):
        assert (run_dir / name).is_file(), name
    # the resolved config is saved and resolves to itself (flags were shorthands for its keys)
    from l2o.fewshot.config import resolve

    saved = resolve(str(run_dir / "config.toml"))
    assert saved["episodes"] == {"ways": 3, "shots": 1, "queries": 2}
    assert saved["model"] == {"filters": 4, "inner_steps": 2} and saved["train"]["meta_steps"] == 3
    report_path = tmp_path / "eval.json"
    argv = ["fewshot", "eval", "--checkpoint", str(run_dir), "--data-dir", str(root)]
    argv += ["--episodes", "3", "--queries", "2", "--json", str(report_path), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["method"] == "meta-lstm" and report["split"] == "test"
    assert (report["ways"], report["shots"], report["queries"]) == (3, 1, 2)
    assert report["trained"] == {"ways": 3, "shots": 1, "inner_steps": 2}
    assert report["inner_steps"] == 2 and report["episodes"] == 3
    accs = report["per_episode_accuracy"]
    assert len(accs) == 3 and all(0.0 <= a <= 100.0 for a in accs)
    assert report["accuracy"] == pytest.approx(sum(accs) / 3)
    assert "accuracy" in capsys.readouterr().out


# -- 7. a trained optimizer through the torch.optim adapter equals the core unroll ---------------
def mlp_task() -> ModuleTask:
    def batch_fn(seed, t):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        x = torch.randn(16, 5, generator=g)
        return x, torch.sin(x[:, :1]) - 0.5 * x[:, 1:2]

    return ModuleTask(
        lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)),
        nn.functional.mse_loss,
        batch_fn,
        name="tiny-mlp",
    )


def adapter_losses(task: ModuleTask, seed: int, rule, steps: int) -> tuple[list[float], nn.Module]:
    """The plain training loop: a fresh module of the task's problem, LearnedOptimizer steps."""
    model = task.sample([seed]).module  # functional_call never modifies it
    opt = LearnedOptimizer(model.parameters(), rule=rule)
    losses = []
    for t in range(steps + 1):
        x, y = task.batch_fn(seed, t)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = task.loss_fn(model(x), y)
            loss.backward()
            return loss

        if t < steps:
            losses.append(float(opt.step(closure).detach()))
        else:
            with torch.no_grad():
                losses.append(float(task.loss_fn(model(x), y)))
    return losses, model


@pytest.mark.parametrize(
    "name", ["pretrained/quadratic", "pretrained/mnist", "pretrained/mnist-rnnprop", "meta-lstm"]
)
def test_learned_optimizer_on_a_module_equals_the_core_unroll(name):
    task, seed, steps = mlp_task(), 5, 8
    if name == "meta-lstm":  # a rule that reads the loss (the closure's) as well
        torch.manual_seed(0)
        rule = MetaLearnerLSTM(num_params=1)
    else:
        rule = l2o.load(name)
    problem = task.sample([seed])
    core = run(rule, problem, steps)[:, 0]
    losses, model = adapter_losses(task, seed, rule, steps)
    torch.testing.assert_close(torch.tensor(losses), core, rtol=1e-5, atol=1e-7)
    # and the parameters end where the core unroll's theta ends
    theta = problem.init()
    state = rule.init(theta)
    for t in range(steps):
        x = theta.detach().requires_grad_(True)
        loss = problem.loss(x, t)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        with torch.no_grad():
            theta, state = rule.step(theta, grad, loss.detach(), state)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, theta, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]


def test_study_device_is_checked_before_any_work(tmp_path, capsys):
    rc = cli.main(["study", "mnist", "--out", str(tmp_path / "s"), "--device", "gpu"])
    assert rc == 2 and "--device: 'gpu' is not a device" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    if not torch.cuda.is_available():
        rc = cli.main(["study", "mnist", "--out", str(tmp_path / "s"), "--device", "cuda"])
        assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


def test_rnnprop_keys_are_rule_keys_and_no_other_rule_takes_them():
    from l2o.config import resolve
    from l2o.meta.trainer import build_rule

    cfg = resolve("quadratic", None, ["rule.name=rnnprop", "rule.beta1=0.9", "rule.input_layer=0"])
    rule = build_rule(cfg["rule"])
    assert rule.config.beta1 == 0.9 and rule.config.input_layer == 0 and rule.config.beta2 == 0.95
    with pytest.raises(L2OError, match="rule.beta1 does not apply to rule 'lstm'"):
        resolve("quadratic", None, ["rule.beta1=0.9"])
