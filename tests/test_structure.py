"""Rules see structure: layouts, per-instance coupling, per-instance losses."""

import pytest
import torch

from l2o.layout import ParamLayout, broadcast, instance_mean, instance_sum
from l2o.meta.unroll import run
from l2o.rules import SGD, ClippedSGD, MetaLearnerConfig, MetaLearnerLSTM
from l2o.tasks import build_task


def test_layout_instance_and_tensor_index():
    lay = ParamLayout(("w", "b"), ((2, 3, 2), (2, 2)), instances=2)
    assert lay.instance_numel == 8
    assert lay.instance_index().tolist() == [0] * 6 + [1] * 6 + [0, 0, 1, 1]
    assert lay.tensor_index().tolist() == [0] * 12 + [1] * 4
    x = torch.arange(16.0)
    assert instance_sum(x, lay).tolist() == [
        sum(range(6)) + 12 + 13,
        sum(range(6, 12)) + 14 + 15,
    ]
    assert torch.allclose(instance_mean(x, lay), instance_sum(x, lay) / 8)
    assert broadcast(torch.tensor([1.0, 2.0]), lay).tolist() == [1.0] * 6 + [2.0] * 6 + [
        1.0,
        1.0,
        2.0,
        2.0,
    ]
    assert lay.subset(["b"]) == ParamLayout(("b",), ((2, 2),), 2)


def test_layout_rejects_tensors_without_the_instance_axis():
    with pytest.raises(ValueError, match="instance axis first"):
        ParamLayout(("w", "b"), ((2, 3), (3,)), instances=2)
    with pytest.raises(ValueError, match="unique"):
        ParamLayout(("w", "w"), ((1,), (1,)))


def test_batched_tasks_declare_their_instances():
    assert build_task("quadratic").sample([1, 2, 3]).layout.instances == 3
    assert build_task("quadratic-code").sample([1]).layout.instances == 1


class MeanCentredSGD:
    """A test rule that averages over coordinates: g - mean(g) per instance, then SGD."""

    name = "mean-centred-sgd"
    needs_loss = False
    coordinatewise = False

    def init(self, theta, layout=None):
        return {}

    def step(self, theta, grad, loss, state, layout=None):
        centred = grad - broadcast(instance_mean(grad, layout), layout)
        return theta - 0.05 * centred, state


@pytest.mark.parametrize("rule", [ClippedSGD(lr=0.1, max_norm=0.5), MeanCentredSGD()])
def test_coupling_rule_on_two_problems_together_equals_each_alone(rule):
    task = build_task("quadratic")
    together = run(rule, task.sample([11, 12]), 20)
    alone = torch.cat([run(rule, task.sample([s]), 20) for s in (11, 12)], dim=1)
    assert torch.allclose(together, alone, rtol=1e-6, atol=1e-6)
    # and the coupling is real: one instance's norm changes the other's step when mixed
    mixed = ParamLayout(("theta",), ((20,),))
    p = task.sample([11, 12])
    theta, grad = p.init(), torch.randn(20)
    per_instance, _ = rule.step(theta, grad, None, {}, p.layout)
    mixed_step, _ = rule.step(theta, grad, None, {}, mixed)
    assert not torch.allclose(per_instance, mixed_step)


def test_clipped_sgd_equals_clip_grad_norm_then_sgd():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w.grad = torch.randn(5) * 10
    theta, grad = w.detach().clone(), w.grad.clone()
    torch.nn.utils.clip_grad_norm_([w], 1.0)
    ref = theta - 0.1 * w.grad
    new, _ = ClippedSGD(lr=0.1, max_norm=1.0).step(theta, grad, None, {})
    assert torch.allclose(new, ref, atol=1e-7)
    small = torch.full((5,), 1e-3)
    new, _ = ClippedSGD(lr=0.1, max_norm=1.0).step(theta, small, None, {})
    assert torch.equal(new, theta - 0.1 * small)  # under the norm: plain SGD


def test_meta_learner_lstm_reads_each_instance_loss():
    torch.manual_seed(0)
    rule = MetaLearnerLSTM(MetaLearnerConfig(num_params=10, hidden=4))
    task = build_task("quadratic")
    together = run(rule, task.sample([3, 4]), 5)
    alone = torch.cat([run(rule, task.sample([s]), 5) for s in (3, 4)], dim=1)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_mlp_instances_are_independent_under_a_coupling_rule(tmp_path):
    pytest.importorskip("l2o.data.mnist")
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("needs MNIST in ../shared/data or $L2O_DATA")
    task = build_task(f"mnist-mlp:data_dir={data}")
    rule = ClippedSGD(lr=0.5, max_norm=0.2)
    together = run(rule, task.sample([5, 6]), 4)
    alone = torch.cat([run(rule, task.sample([s]), 4) for s in (5, 6)], dim=1)
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert run(SGD(0.1), task.sample([5]), 1).shape == (2, 1)
