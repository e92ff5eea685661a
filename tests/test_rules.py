"""Every rule through the same checks (one table, as optax does), plus oracles vs torch.optim."""

import pytest
import torch

from l2o.rules import NAG, SGD, Adam, CoordinatewiseLSTM, LSTMRuleConfig, RMSprop, UpdateRule

TORCH_EQUIVALENTS = [
    (lambda: SGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda: NAG(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    (lambda: RMSprop(lr=0.01), lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8)),
    (lambda: Adam(lr=0.02), lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.9, 0.999), eps=1e-8)),
]

ALL_RULES = [
    lambda: SGD(0.1),
    lambda: NAG(0.1),
    lambda: RMSprop(0.1),
    lambda: Adam(0.1),
    lambda: CoordinatewiseLSTM(),
    lambda: CoordinatewiseLSTM(LSTMRuleConfig.from_preset("code")),
    lambda: CoordinatewiseLSTM(LSTMRuleConfig(layers=(7,), preprocessing="scale", input_scale=0.5)),
]


def _quad_grad(theta: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return A @ theta


@pytest.mark.parametrize("make_rule, make_torch", TORCH_EQUIVALENTS)
def test_classic_rule_matches_torch_optim(make_rule, make_torch):
    torch.manual_seed(1)
    A = torch.randn(12, 12)
    A = A @ A.T / 12
    p = torch.nn.Parameter(torch.randn(12))
    opt = make_torch([p])
    rule = make_rule()
    theta = p.detach().clone()
    state = rule.init(theta)
    for _ in range(15):
        g = _quad_grad(p.detach(), A)
        p.grad = g.clone()
        opt.step()
        theta, state = rule.step(theta, _quad_grad(theta, A), None, state)
        torch.testing.assert_close(theta, p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lr", [2.0**-5, 2.0**-3])
def test_learned_rule_set_to_sgd_is_exactly_sgd(lr):
    # torch.optim.SGD applies p.add_(g, alpha=-lr) as one fused multiply-add; the
    # rule computes -lr*g then adds. With lr a power of two the product is exact,
    # so both round once and must agree bit for bit.
    rule = CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(), preprocessing="none", output_scale=1.0, zero_head=True)
    )
    with torch.no_grad():
        rule.head.weight.fill_(-lr)
    torch.manual_seed(2)
    A = torch.randn(20, 20)
    p = torch.nn.Parameter(torch.randn(20))
    opt = torch.optim.SGD([p], lr=lr)
    theta = p.detach().clone()
    state = rule.init(theta)
    for _ in range(10):
        p.grad = (A @ p.detach()).clone()
        opt.step()
        with torch.no_grad():
            theta, state = rule.step(theta, A @ theta, None, state)
        assert torch.equal(theta, p.detach())


def test_learned_rule_set_to_sgd_matches_sgd_to_rounding_for_any_lr():
    lr = 0.03
    rule = CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(), preprocessing="none", output_scale=1.0, zero_head=True)
    )
    rule.double()
    with torch.no_grad():
        rule.head.weight.fill_(-lr)
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr)
    theta = p.detach().clone()
    state = rule.init(theta)
    for _ in range(10):
        g = torch.sin(p.detach())
        p.grad = g.clone()
        opt.step()
        with torch.no_grad():
            theta, state = rule.step(theta, torch.sin(theta), None, state)
    torch.testing.assert_close(theta, p.detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("make_rule", ALL_RULES)
def test_rule_table_common_checks(make_rule):
    rule = make_rule()
    assert isinstance(rule, UpdateRule)
    theta = torch.randn(37)
    grad = torch.randn(37)
    state = rule.init(theta)
    new, new_state = rule.step(theta, grad, torch.tensor(1.0), state)
    assert new.shape == theta.shape and new.dtype == theta.dtype
    assert set(new_state) == set(state)
    for k in state:
        assert new_state[k].shape == state[k].shape
    assert torch.isfinite(new).all()
    # coordinatewise: permuting coordinates permutes the update (weights shared, no mixing)
    perm = torch.randperm(37)
    new_p, _ = rule.step(
        theta[perm],
        grad[perm],
        torch.tensor(1.0),
        {k: (v[perm] if v.dim() and v.shape[0] == 37 else v) for k, v in state.items()},
    )
    torch.testing.assert_close(new_p, new[perm], rtol=1e-5, atol=1e-6)
    # a zero gradient at step one moves nothing for the classic rules
    if not hasattr(rule, "parameters"):
        same, _ = rule.step(theta, torch.zeros_like(grad), None, rule.init(theta))
        torch.testing.assert_close(same, theta)


def test_zero_head_gives_exactly_zero_update():
    rule = CoordinatewiseLSTM(zero_head=True)
    theta = torch.randn(100)
    new, _ = rule.step(theta, torch.randn(100), None, rule.init(theta))
    assert torch.equal(new, theta)


def test_lstm_shapes_and_variable_count():
    rule = CoordinatewiseLSTM(LSTMRuleConfig(layers=(20,)))
    # one LSTM layer (w_ih, w_hh, bias) plus the head (w, b)
    assert len(list(rule.parameters())) == 5
    state = rule.init(torch.zeros(5))
    assert state["h0"].shape == (5, 20) and state["c0"].shape == (5, 20)


@pytest.mark.parametrize("bad", [dict(lr=0), dict(lr=-1.0), dict(lr=float("nan"))])
def test_classic_rules_validate_hyperparameters(bad):
    for cls in (SGD, NAG, RMSprop, Adam):
        with pytest.raises(ValueError, match="lr"):
            cls(**bad)


def test_lstm_config_validation():
    with pytest.raises(ValueError, match="preprocessing"):
        LSTMRuleConfig(preprocessing="bogus")
    with pytest.raises(ValueError, match="preset"):
        LSTMRuleConfig.from_preset("nope")
    assert LSTMRuleConfig.from_preset("paper").p == 10.0
    assert LSTMRuleConfig.from_preset("code").output_scale == 0.01
