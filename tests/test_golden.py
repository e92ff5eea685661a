"""Golden tests of deepmind/learning-to-learn (meta_test.testResults, convergence_test).

Problem ``simple`` (f = x^2, x0 = 1), the "linear net" (no LSTM layers, raw
gradient in, zero-initialised head), meta-Adam lr 0.01.  The first unroll makes
zero updates; one Adam step moves w and b to -0.01; the second unroll iterates
x <- 0.98 x - 0.01 five times: x = 0.85588, x^2 = 0.7325327.
"""

import pytest
import torch

from l2o.config import resolve
from l2o.meta import MetaTrainer, start, unroll
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig
from l2o.tasks import Simple


def linear_net():
    return CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(), preprocessing="none", output_scale=1.0, zero_head=True)
    )


def test_official_golden_values():
    torch.manual_seed(0)
    rule = linear_net()
    opt = torch.optim.Adam(rule.parameters(), lr=0.01)
    traj = start(Simple().sample([0]), rule)
    for k in range(2):
        opt.zero_grad()
        meta_loss, _, traj = unroll(rule, traj, 5)
        meta_loss.backward()
        opt.step()
        if k == 0:  # Adam's first step is lr * sign(grad): both weights move to -0.01
            assert rule.head.weight.item() == pytest.approx(-0.01, abs=1e-7)
            assert rule.head.bias.item() == pytest.approx(-0.01, abs=1e-7)
    x = float(traj.theta)
    cost = float(traj.losses)
    assert x == pytest.approx(0.8559, abs=5e-5)
    assert cost == pytest.approx(0.7325327, abs=1e-6)


def test_official_convergence_via_trainer():
    # convergence_test: unroll 20, meta lr 1e-2, 500 epochs x 5 unrolls -> cost < 1e-5.
    cfg = resolve("simple", None, ["train.meta_steps=500", "val.every=0"])
    trainer = MetaTrainer(cfg, None, progress=False)
    trainer.train()
    assert trainer.history[-1]["final_loss"] < 1e-5
