"""LearnedOptimizer: oracles against torch.optim, state_dict round trips, skipped params, loss."""

import io

import pytest
import torch
from torch import nn

import l2o
from l2o.errors import L2OError
from l2o.optim import LearnedOptimizer
from l2o.rules import NAG, SGD, Adam, CoordinatewiseLSTM, GroupedRule, LSTMRuleConfig, RMSprop


def sgd_lstm(lr: float) -> CoordinatewiseLSTM:
    """A learned rule whose weights make it exactly plain SGD."""
    rule = CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(), preprocessing="none", output_scale=1.0, zero_head=True)
    )
    with torch.no_grad():
        rule.head.weight.fill_(-lr)
    return rule


class Net(nn.Module):
    """Several parameter shapes: 4-D conv kernel, 1-D biases, 2-D matrix, a scalar."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(h) * self.scale


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(t: int):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 4, generator=g)


def train(model, opt, steps: int, start: int = 0, closure: bool = False):
    for t in range(start, start + steps):
        x, y = batch(t)

        def loss_fn(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def lstm_rule(seed: int = 3) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))


def test_sgd_lstm_matches_torch_sgd_exactly():
    # torch.optim.SGD does p.add_(g, alpha=-lr) as one fused multiply-add; with lr a
    # power of two -lr*g is exact, so both round once and agree bit for bit.
    lr = 2.0**-5
    a, b = make_net(), make_net()
    opt_a = LearnedOptimizer(a.parameters(), rule=sgd_lstm(lr))
    opt_b = torch.optim.SGD(b.parameters(), lr=lr)
    train(a, opt_a, 6)
    train(b, opt_b, 6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    "rule, make_torch",
    [
        (SGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (NAG(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
        (RMSprop(lr=0.01), lambda p: torch.optim.RMSprop(p, lr=0.01)),
        (Adam(lr=0.02), lambda p: torch.optim.Adam(p, lr=0.02)),
    ],
)
def test_classic_rules_match_torch_optim(rule, make_torch):
    a, b = make_net(), make_net()
    opt_a, opt_b = LearnedOptimizer(a.parameters(), rule=rule), make_torch(b.parameters())
    train(a, opt_a, 8)
    train(b, opt_b, 8)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_rule", [lstm_rule, lambda: Adam(lr=0.01)])
@pytest.mark.parametrize("through_file", [False, True])
def test_state_dict_round_trip_continues_bit_identically(make_rule, through_file):
    rule = make_rule()
    a = make_net()
    opt_a = LearnedOptimizer(a.parameters(), rule=rule)
    train(a, opt_a, 3)
    sd = opt_a.state_dict()
    assert all(g["rule"] == rule.name for g in sd["param_groups"])
    if through_file:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    b = make_net(seed=1)
    with torch.no_grad():
        for pb, pa in zip(b.parameters(), a.parameters(), strict=True):
            pb.copy_(pa)
    opt_b = LearnedOptimizer(b.parameters(), rule=rule)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["rule"] is rule
    # per-coordinate state is per parameter: state[p] has that parameter's rows
    for p in b.parameters():
        for key, value in opt_b.state[p].items():
            if value.dim() > 0:
                assert value.shape[0] == p.numel(), key
    train(a, opt_a, 4, start=3)
    train(b, opt_b, 4, start=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_load_state_dict_checks_rule_names():
    a = make_net()
    opt_a = LearnedOptimizer(a.parameters(), rule=Adam(0.01))
    train(a, opt_a, 1)
    opt_b = LearnedOptimizer(a.parameters(), rule=lstm_rule())
    with pytest.raises(ValueError, match="saved with rule 'adam'"):
        opt_b.load_state_dict(opt_a.state_dict())


@pytest.mark.parametrize("make_rule", [lstm_rule, lambda: Adam(lr=0.01)])
def test_params_without_grad_are_skipped_and_keep_their_state(make_rule):
    model = make_net()
    opt = LearnedOptimizer(model.parameters(), rule=make_rule())
    train(model, opt, 2)
    frozen = model.fc.weight
    before = frozen.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[frozen].items()}
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(batch(0)[0]), batch(0)[1]).backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before)
    for k, v in opt.state[frozen].items():
        assert torch.equal(v, state_before[k])
    # it resumes afterwards (Adam: with its own step counter, as torch.optim.Adam does)
    train(model, opt, 1)
    assert not torch.equal(frozen, before)


def test_adam_with_a_skipped_param_matches_torch_adam():
    a, b = make_net(), make_net()
    opt_a, opt_b = (
        LearnedOptimizer(a.parameters(), rule=Adam(0.01)),
        torch.optim.Adam(b.parameters(), lr=0.01),
    )
    for t in range(5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            nn.functional.mse_loss(m(batch(t)[0]), batch(t)[1]).backward()
            if t in (1, 2):
                m.conv.bias.grad = None
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_param_groups_with_their_own_rules():
    a, b = make_net(), make_net()
    opt_a = LearnedOptimizer(
        [
            {"params": [a.conv.weight, a.conv.bias]},
            {"params": [a.fc.weight, a.fc.bias, a.scale], "rule": SGD(2**-3)},
        ],
        rule=sgd_lstm(2**-5),
    )
    opt_b = torch.optim.SGD(
        [
            {"params": [b.conv.weight, b.conv.bias]},
            {"params": [b.fc.weight, b.fc.bias, b.scale], "lr": 2**-3},
        ],
        lr=2**-5,
    )
    assert opt_a.param_groups[1]["rule"].name == "sgd"
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


class LossRule:
    """A rule that needs the loss: theta <- theta - 0.1 * loss * g."""

    name = "lossy"
    needs_loss = True
    coordinatewise = True

    def init(self, theta, layout=None):
        return {}

    def step(self, theta, grad, loss, state, layout=None):
        if loss is None:
            raise AssertionError("no loss")
        return theta - 0.1 * loss * grad, state


def test_rule_that_needs_the_loss_gets_it_from_the_closure():
    model = make_net()
    opt = LearnedOptimizer(model.parameters(), rule=LossRule())
    x, y = batch(0)
    with pytest.raises(ValueError, match="needs the loss.*closure"):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    before = params_of(model)
    train(model, opt, 1, closure=True)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_step_returns_the_closure_loss():
    model = make_net()
    opt = LearnedOptimizer(model.parameters(), rule=Adam(0.01))
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) > 0


def test_errors_are_clear():
    model = make_net()
    with pytest.raises(ValueError, match="no update rule"):
        LearnedOptimizer(model.parameters())
    with pytest.raises(ValueError, match="not an update rule"):
        LearnedOptimizer(model.parameters(), rule=object())
    opt = LearnedOptimizer([model.conv.weight], rule=SGD(0.1))
    with pytest.raises(ValueError, match="not an update rule"):
        opt.add_param_group({"params": [model.conv.bias], "rule": "adam"})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="named_parameters"):
        LearnedOptimizer(model.parameters(), rule=GroupedRule([("*", Adam(0.1))]))


def test_grouped_rule_in_learned_optimizer_routes_by_name():
    a, b = make_net(), make_net()
    grouped = GroupedRule([("conv.*", sgd_lstm(0.05)), ("*.bias", SGD(0.2)), ("*", Adam(0.01))])
    opt_a = LearnedOptimizer(a.named_parameters(), rule=grouped)
    opt_b = [
        torch.optim.SGD([b.conv.weight, b.conv.bias], lr=0.05),
        torch.optim.SGD([b.fc.bias], lr=0.2),
        torch.optim.Adam([b.fc.weight, b.scale], lr=0.01),
    ]
    for t in range(4):
        opt_a.zero_grad()
        for o in opt_b:
            o.zero_grad()
        for m in (a, b):
            nn.functional.mse_loss(m(batch(t)[0]), batch(t)[1]).backward()
        opt_a.step()
        for o in opt_b:
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # each tensor has exactly its own sub-rule's state
    assert set(opt_a.state[a.conv.weight]) == set()  # layers=() LSTM: no hidden state
    assert set(opt_a.state[a.fc.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    # round trip through a file
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_c = LearnedOptimizer(a.named_parameters(), rule=grouped)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(opt_c.state[a.fc.weight]["exp_avg"], opt_a.state[a.fc.weight]["exp_avg"])


def test_grouped_rule_unmatched_tensor_is_an_error():
    model = make_net()
    with pytest.raises(L2OError, match="'scale'.*patterns"):
        LearnedOptimizer(
            model.named_parameters(), rule=GroupedRule([("conv.*", Adam(0.1)), ("fc.*", SGD(0.1))])
        )


def test_float64_params_run_a_private_copy_of_the_rule():
    rule = lstm_rule()
    model = make_net().double()
    opt = LearnedOptimizer(model.parameters(), rule=rule)
    x, y = batch(0)
    opt.zero_grad()
    nn.functional.mse_loss(model(x.double()), y.double()).backward()
    opt.step()
    assert rule.head.weight.dtype == torch.float32  # the user's rule is not moved
    assert all(v.dtype == torch.float64 for st in opt.state.values() for v in st.values())


def test_pretrained_rule_runs_if_shipped():
    try:
        rule = l2o.load("pretrained/quadratic")
    except l2o.CheckpointError:
        pytest.skip("no pretrained/quadratic artifact in this checkout")
    model = make_net()
    opt = LearnedOptimizer(model.parameters(), rule=rule)
    train(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    rule = lstm_rule()
    a, b = make_net(), make_net().cuda()
    opt_a, opt_b = (
        LearnedOptimizer(a.parameters(), rule=rule),
        LearnedOptimizer(b.parameters(), rule=rule),
    )
    for t in range(3):
        x, y = batch(t)
        for m, o, dev in ((a, opt_a, "cpu"), (b, opt_b, "cuda")):
            o.zero_grad()
            nn.functional.mse_loss(m(x.to(dev)), y.to(dev)).backward()
            o.step()
    assert rule.head.weight.device.type == "cpu"
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb.cpu(), rtol=1e-4, atol=1e-5)
    sd = opt_b.state_dict()
    opt_c = LearnedOptimizer(b.parameters(), rule=rule)
    opt_c.load_state_dict(sd)
    assert all(v.is_cuda for st in opt_c.state.values() for k, v in st.items() if k != "step")
