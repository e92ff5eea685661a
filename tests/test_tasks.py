"""Tasks: any nn.Module through functional_call, and the two quadratic forms."""

import pytest
import torch
from torch import nn

from l2o.config import resolve
from l2o.meta import MetaTrainer
from l2o.tasks import ModuleTask, Quadratic, QuadraticCode, build_task
from l2o.tasks.base import generator, step_seed


def batch_fn(seed, t):
    g = generator(step_seed(seed, t))
    x = torch.randn(16, 5, generator=g)
    return x, x.sum(1, keepdim=True)


def make_task():
    return ModuleTask(
        lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)),
        nn.functional.mse_loss,
        batch_fn,
    )


def test_module_task_matches_the_module_itself():
    problem = make_task().sample([3])
    theta = problem.init().requires_grad_(True)
    loss = problem.loss(theta, t=4)
    (grad,) = torch.autograd.grad(loss.sum(), theta)

    module = problem.module
    x, y = batch_fn(3, 4)
    ref = nn.functional.mse_loss(module(x), y)
    ref.backward()
    ref_grad = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(loss, ref.reshape(1))
    torch.testing.assert_close(grad, ref_grad)
    assert problem.layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")


def test_module_task_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (make_task().sample([s]).init() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())


def test_module_task_with_batch_norm_buffers():
    task = ModuleTask(
        lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
        nn.functional.mse_loss,
        batch_fn,
    )
    problem = task.sample([0])
    assert "1.running_mean" in problem.buffers
    assert torch.isfinite(problem.loss(problem.init(), 0)).all()


def test_meta_training_on_a_module_task():
    cfg = resolve(
        "quadratic",
        None,
        [
            "train.meta_steps=2",
            "train.instances=2",
            "train.horizon=6",
            "train.unroll=3",
            "val.every=1",
            "val.problems=2",
            "rule.layers=4",
        ],
    )
    trainer = MetaTrainer(cfg, None, task=make_task(), progress=False)
    summary = trainer.train()
    assert summary["updates"] == 4 and summary["skipped"] == 0


def test_quadratic_forms():
    paper = Quadratic().sample([1, 2, 3])
    assert paper.num_instances == 3
    assert torch.equal(paper.init(), torch.zeros(30))  # theta0 = 0
    losses = paper.loss(paper.init(), 0)
    torch.testing.assert_close(losses, (paper.y**2).sum(1))  # f(0) = ||y||^2
    # batching does not change a function: instance 2 alone equals instance 2 in a batch
    alone = Quadratic().sample([3])
    torch.testing.assert_close(alone.loss(alone.init(), 0), losses[2:])
    code = QuadraticCode().sample([5])
    assert code.num_instances == 1 and code.W.min() >= 0 and code.W.max() < 1
    with pytest.raises(ValueError):
        Quadratic(dim=0)
    assert build_task("quadratic:dim=4").dim == 4
