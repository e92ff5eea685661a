"""LearnedOptimizer as torch.optim code expects it: lr / weight_decay per group, schedulers,
validation, step(loss=...), GradScaler, foreach-style grouping, in-place fast path options."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import l2o
from l2o.optim import LearnedOptimizer
from l2o.rules import SGD, Adam, CoordinatewiseLSTM, LSTMRuleConfig


def sgd_lstm(lr: float) -> CoordinatewiseLSTM:
    """A learned rule (in-place path) whose weights make it exactly SGD at step size lr."""
    rule = CoordinatewiseLSTM(
        LSTMRuleConfig(layers=(), preprocessing="none", output_scale=1.0, zero_head=True)
    )
    with torch.no_grad():
        rule.head.weight.fill_(-lr)
    return rule


def lstm_rule(seed: int = 3) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    return CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(t: int):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 4, generator=g)


def loss_of(model, t: int) -> torch.Tensor:
    x, y = batch(t)
    return nn.functional.mse_loss(model(x), y)


def backward(model, t: int) -> torch.Tensor:
    loss = loss_of(model, t)
    loss.backward()
    return loss


def train(model, opt, steps, sched=None, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        backward(model, t)
        opt.step()
        if sched is not None:
            sched.step()


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=0.2, total_steps=8, cycle_momentum=False
    ),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_scale_the_update_as_for_torch_sgd(name):
    # The rule is SGD at step size 1, so the update is exactly -lr_t * g: the same
    # as torch.optim.SGD under the same scheduler, bit for bit.
    a, b = make_net(), make_net()
    opt_a = LearnedOptimizer(a.parameters(), rule=sgd_lstm(1.0), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    sched_a, sched_b = SCHEDULERS[name](opt_a), SCHEDULERS[name](opt_b)
    lrs = []
    for t in range(8):
        before = a.fc.weight.detach().clone()
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            backward(m, t)
            o.step()
        # the update of this step is -lr * grad with the lr the scheduler set
        lr = opt_a.param_groups[0]["lr"]
        torch.testing.assert_close(a.fc.weight - before, -lr * a.fc.weight.grad)
        lrs.append(lr)
        sched_a.step()
        sched_b.step()
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert len(set(lrs)) > 1  # the scheduler did change the lr


def test_lr_multiplies_a_classic_rule_and_weight_decay_is_decoupled():
    # lr x Adam(lr=1) with weight decay == torch.optim.AdamW
    a, b = make_net(), make_net()
    opt_a = LearnedOptimizer(a.parameters(), rule=Adam(lr=1.0), lr=0.01, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    train(a, opt_a, 6)
    train(b, opt_b, 6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_weight_decay_in_place_path_and_per_group_values():
    a = make_net()
    opt_a = LearnedOptimizer(
        [
            {"params": [a.conv.weight, a.conv.bias], "weight_decay": 0.5},
            {"params": [a.fc.weight, a.fc.bias], "lr": 0.25},
        ],
        rule=sgd_lstm(2**-3),
    )
    assert [g["lr"] for g in opt_a.param_groups] == [1.0, 0.25]
    assert [g["weight_decay"] for g in opt_a.param_groups] == [0.5, 0.0]
    for t in range(3):
        before = [p.detach().clone() for p in a.parameters()]
        opt_a.zero_grad()
        backward(a, t)
        opt_a.step()
        grads = [p.grad for p in a.parameters()]
        lr_wd = [(1.0, 0.5), (1.0, 0.5), (0.25, 0.0), (0.25, 0.0)]
        for p, p0, g, (lr, wd) in zip(a.parameters(), before, grads, lr_wd, strict=True):
            torch.testing.assert_close(p, p0 * (1 - lr * wd) - lr * 2**-3 * g)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -0.1}, "lr must be a finite number >= 0"),
        ({"lr": float("nan")}, "lr must be a finite number >= 0"),
        ({"lr": "fast"}, "lr must be .*got 'fast'"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"state_dtype": torch.int32}, "state_dtype must be a floating torch.dtype"),
    ],
)
def test_constructor_validation_names_the_argument(kwargs, message):
    model = make_net()
    with pytest.raises(ValueError, match=message):
        LearnedOptimizer(model.parameters(), rule=SGD(0.1), **kwargs)


def test_group_validation_and_add_param_group():
    model = make_net()
    with pytest.raises(ValueError, match="param group 1: lr must be"):
        LearnedOptimizer(
            [{"params": [model.conv.weight]}, {"params": [model.fc.weight], "lr": -1}],
            rule=SGD(0.1),
        )
    with pytest.raises(TypeError, match="single tensor"):
        LearnedOptimizer(model.fc.weight, rule=SGD(0.1))
    with pytest.raises(ValueError, match="empty parameter list"):
        LearnedOptimizer([], rule=SGD(0.1))
    opt = LearnedOptimizer([model.conv.weight], rule=SGD(0.1), lr=0.5, weight_decay=0.01)
    with pytest.raises(ValueError, match="param group 1: weight_decay"):
        opt.add_param_group({"params": [model.conv.bias], "weight_decay": -2})
    assert len(opt.param_groups) == 1  # the rejected group is not half-added
    opt.add_param_group({"params": [model.fc.weight], "rule": Adam(0.1), "lr": 0.1})
    g = opt.param_groups[1]
    assert (g["lr"], g["weight_decay"], g["rule"].name) == (0.1, 0.01, "adam")


class LossRule:
    """theta <- theta - 0.1 * loss * g: a rule that needs the loss."""

    name, needs_loss, coordinatewise = "lossy", True, True

    def init(self, theta, layout=None):
        return {}

    def step(self, theta, grad, loss, state, layout=None):
        return theta - 0.1 * loss * grad, state


def test_step_with_loss_keyword():
    a, b = make_net(), make_net()
    opt_a = LearnedOptimizer(a.parameters(), rule=LossRule())
    opt_b = LearnedOptimizer(b.parameters(), rule=LossRule())
    opt_a.zero_grad()
    loss = backward(a, 0)
    assert opt_a.step(loss=loss) is loss

    def closure():
        opt_b.zero_grad()
        return backward(b, 0)

    opt_b.step(closure)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="not both"):
        opt_a.step(closure, loss=loss)
    with pytest.raises(ValueError, match=r"step\(loss=loss\)"):
        opt_a.step()


class Recorder:
    """SGD(lr) that records the gradients it is given."""

    name, needs_loss, coordinatewise = "recorder", False, True

    def __init__(self, lr):
        self.lr, self.seen = lr, []

    def init(self, theta, layout=None):
        return {}

    def step(self, theta, grad, loss, state, layout=None):
        self.seen.append(grad.clone())
        return theta - self.lr * grad, state


def test_grad_scaler_unscales_and_skips_non_finite_steps():
    a, b = make_net(), make_net()
    rec_a, rec_b = Recorder(2**-4), Recorder(2**-4)
    opt_a = LearnedOptimizer(a.parameters(), rule=rec_a)
    opt_b = LearnedOptimizer(b.parameters(), rule=rec_b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):
        for m, o, use in ((a, opt_a, True), (b, opt_b, False)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x, y = batch(t)
                loss = nn.functional.mse_loss(m(x).float(), y)
            if use:
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            else:
                loss.backward()
                o.step()
    # power-of-two scale: unscaling is exact, the rule saw the plain gradients
    for ga, gb in zip(rec_a.seen, rec_b.seen, strict=True):
        assert torch.equal(ga, gb)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)

    # a step whose gradients overflow is skipped: parameters and LSTM state untouched
    model = make_net()
    opt = LearnedOptimizer(model.parameters(), rule=lstm_rule())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(loss_of(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    scaler.scale(loss_of(model, 1)).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    for i, st in opt.state_dict()["state"].items():
        assert all(torch.equal(v, state[i][k]) for k, v in st.items())


def test_state_dict_mid_training_with_scheduler_resumes_identically():
    def build(model):
        opt = LearnedOptimizer(model.parameters(), rule=lstm_rule(), weight_decay=0.01)
        return opt, lr_scheduler.CosineAnnealingLR(opt, T_max=8)

    a = make_net()
    opt_a, sched_a = build(a)
    train(a, opt_a, 3, sched_a)
    buf = io.BytesIO()
    torch.save(
        {"model": a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf
    )
    train(a, opt_a, 4, sched_a, start=3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = make_net(seed=1)
    b.load_state_dict(ckpt["model"])
    opt_b, sched_b = build(b)
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    assert opt_b.param_groups[0]["lr"] == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(3 / 8 * torch.pi)).item())
    )
    train(b, opt_b, 4, sched_b, start=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_mixed_dtypes_and_devices_are_grouped_like_torch_foreach():
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    params = []
    for k in range(6):
        dtype = (torch.float32, torch.float64, torch.bfloat16)[k % 3]
        device = devices[k % len(devices)]
        params.append(nn.Parameter(torch.randn(3 + k, dtype=dtype, device=device)))
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LearnedOptimizer(params, rule=lstm_rule())
    ours = {
        (ps[0].device, ps[0].dtype): [id(p) for p in ps]
        for _, ps in opt._buckets(opt.param_groups[0])
    }
    theirs = {
        key: [id(p) for p in lists[0]]
        for key, (lists, _) in _group_tensors_by_device_and_dtype([params]).items()
    }
    assert ours == theirs
    # each (device, dtype) batch steps as a LearnedOptimizer on those parameters alone would
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params, strict=True):
        c.grad = p.grad.clone()
    opt.step()
    for ids in ours.values():
        alone = [c for c, p in zip(copies, params, strict=True) if id(p) in ids]
        LearnedOptimizer(alone, rule=lstm_rule()).step()
    for c, p in zip(copies, params, strict=True):
        assert torch.equal(c, p)
        assert all(v.device == p.device and v.dtype == p.dtype for v in opt.state[p].values())


def test_chunk_size_bfloat16_state_and_non_contiguous_params():
    def run(**kw):
        model = make_net()
        model.conv.to(memory_format=torch.channels_last)  # a non-contiguous parameter
        opt = LearnedOptimizer(model.parameters(), rule=lstm_rule(), **kw)
        train(model, opt, 3)
        return model, opt

    ref, opt_ref = run()
    assert not ref.conv.weight.is_contiguous()
    for chunk in (7, 100, None):
        model, opt = run(chunk_size=chunk)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    model, opt = run(state_dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for st in opt.state.values() for v in st.values())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
    # through a state_dict (torch casts state to the parameters' dtype) it is bfloat16 again
    opt2 = LearnedOptimizer(model.parameters(), rule=lstm_rule(), state_dtype=torch.bfloat16)
    opt2.load_state_dict(opt.state_dict())
    train(model, opt2, 1, start=3)
    assert all(v.dtype == torch.bfloat16 for st in opt2.state.values() for v in st.values())


@pytest.mark.parametrize("preset", ["paper", "paper-quadratic"])
def test_in_place_kernel_equals_the_out_of_place_one(preset):
    from l2o.rules import _lstm_kernels as K
    from l2o.rules.lstm import _reference_update

    torch.manual_seed(0)
    rule = CoordinatewiseLSTM(LSTMRuleConfig.from_preset(preset))
    grad = torch.randn(3000) * 10.0 ** torch.randint(-8, 2, (3000,))
    state = {k: torch.randn_like(v) for k, v in rule.init(grad).items()}
    with torch.no_grad():
        ref, ref_state = _reference_update(rule, grad, state)
    out, new_state = K.update_no_grad(rule, grad, state, block_rows=1000)
    for block in (None, 1000, 999):
        mine = {k: v.clone() for k, v in state.items()}
        update = K.update_no_grad(rule, grad, mine, block_rows=block, inplace=True)[0]
        torch.testing.assert_close(update, ref, rtol=1e-5, atol=2e-6)
        if block == 1000:  # same blocks: the same numbers as out of place
            assert torch.equal(update, out)
            assert all(torch.equal(mine[k], new_state[k]) for k in mine)
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    update = rule.update_(grad, half)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    torch.testing.assert_close(update, ref, rtol=0.05, atol=1e-3 * float(ref.abs().max()))
    rule.fast_kernels = False  # the reference, written back into the state
    mine = {k: v.clone() for k, v in state.items()}
    assert torch.equal(rule.update_(grad, mine), ref)
    assert all(torch.equal(mine[k], ref_state[k]) for k in mine)


def test_in_place_path_only_for_coordinatewise_rules(monkeypatch):
    rule = lstm_rule()
    calls = []
    monkeypatch.setattr(type(rule), "update_", lambda self, g, s: calls.append(1) or 0 * g)
    model = make_net()
    train(model, LearnedOptimizer(model.parameters(), rule=rule, chunk_size=7), 1)
    assert len(calls) > 1  # chunks of 7 coordinates
    calls.clear()
    rule.coordinatewise = False  # a rule that couples coordinates sees the whole batch: step()
    train(model, LearnedOptimizer(model.parameters(), rule=rule, chunk_size=7), 1)
    assert not calls


def test_empty_parameters():
    empty, full = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.ones(3))
    for params in ([empty], [empty, full]):
        opt = LearnedOptimizer(params, rule=lstm_rule())
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        opt.step()
    assert not torch.equal(full, torch.ones(3))


def test_small_cnn_with_cosine_schedule_and_weight_decay_trains_and_round_trips():
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(256, 1, 8, 8, generator=g)
    y_all = (x_all.flatten(1) @ torch.randn(64, generator=g) > 0).long()

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))

    def full_loss(model):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x_all), y_all))

    rule = l2o.load("pretrained/mnist")
    model = make()
    opt = LearnedOptimizer(model.parameters(), rule=rule, weight_decay=1e-3)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    start = full_loss(model)
    order = torch.randint(0, 256, (60, 32), generator=g)

    def steps(model, opt, sched, ts):
        for t in ts:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_all[order[t]]), y_all[order[t]]).backward()
            opt.step()
            sched.step()

    steps(model, opt, sched, range(30))
    buf = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict(), sched.state_dict()), buf)
    steps(model, opt, sched, range(30, 60))
    assert full_loss(model) < 0.8 * start

    buf.seek(0)
    m_sd, o_sd, s_sd = torch.load(buf, weights_only=True)
    other = make()
    other.load_state_dict(m_sd)
    opt2 = LearnedOptimizer(other.parameters(), rule=rule, weight_decay=1e-3)
    sched2 = lr_scheduler.CosineAnnealingLR(opt2, T_max=60)
    opt2.load_state_dict(o_sd)
    sched2.load_state_dict(s_sd)
    steps(other, opt2, sched2, range(30, 60))
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_state_stays_on_cuda_and_grad_scaler_works():
    model = make_net().cuda()
    opt = LearnedOptimizer(model.parameters(), rule=lstm_rule(), weight_decay=0.01)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    scaler = torch.amp.GradScaler("cuda")
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x.cuda()).float(), y.cuda())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert opt.state and all(v.is_cuda for st in opt.state.values() for v in st.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("index", [0, 1])
def test_docs_optim_examples_run(index, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "optim.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[index], f"optim.md[{index}]", "exec"), {"__name__": "example"})
