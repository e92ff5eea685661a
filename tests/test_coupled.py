"""Coupled rules (issue 16): LSTM+GAC, NTM-BFGS, NTM-L-BFGS, BFGS and L-BFGS.

Oracle rows for each rule live in tests/test_rule_oracles.py; this file checks the
equivalences and the structure: GAC = 0 is the LSTM, a hand-set LSTM+GAC is clipped
gradient descent, instances never mix, ntm-lbfgs with a full window is ntm-bfgs.
"""

from __future__ import annotations

import math

import pytest
import torch

from l2o.errors import L2OError
from l2o.layout import ParamLayout
from l2o.meta.unroll import run
from l2o.rules import (
    BFGS,
    LBFGS,
    LSTMGAC,
    NTMBFGS,
    NTMLBFGS,
    ClippedSGD,
    CoordinatewiseLSTM,
    LSTMGACConfig,
    LSTMRuleConfig,
    NTMBFGSConfig,
    NTMLBFGSConfig,
)
from l2o.tasks.quadratic import Quadratic

F64 = torch.float64


def _randomize(rule, seed: int, std: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return rule


# -- GAC = 0 is the coordinatewise LSTM ---------------------------------------------------------
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "autograd"])
def test_gac_zero_is_the_lstm_exactly(grad_mode):
    torch.manual_seed(0)
    lstm = CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))
    gac = LSTMGAC(LSTMGACConfig.from_preset("paper", gac=0))
    gac.load_state_dict(lstm.state_dict())
    assert gac.coordinatewise
    layout = ParamLayout(("w",), ((3, 40),), instances=3)
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(120, generator=g)
    a, b = theta.clone(), theta.clone()
    sa, sb = lstm.init(a, layout), gac.init(b, layout)
    with torch.set_grad_enabled(grad_mode):
        for _ in range(4):
            grad = torch.randn(120, generator=g)
            a, sa = lstm.step(a, grad, None, sa, layout)
            b, sb = gac.step(b, grad, None, sb, layout)
            assert torch.equal(a, b)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
        if grad_mode:  # the same meta-gradients
            ga = torch.autograd.grad(a.square().sum(), list(lstm.parameters()))
            gb = torch.autograd.grad(b.square().sum(), list(gac.parameters()))
            assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def test_gac_path_without_averaging_cells_is_the_lstm():
    """The GAC code path itself, run with no averaging cell, gives the LSTM's updates."""
    torch.manual_seed(0)
    lstm = CoordinatewiseLSTM(LSTMRuleConfig(layers=(6, 5))).double()
    gac = LSTMGAC(LSTMGACConfig(layers=(6, 5), gac=0)).double()
    gac.load_state_dict(lstm.state_dict())
    grad = torch.randn(30, dtype=F64)
    state = lstm.init(grad)
    u1, s1 = lstm.update(grad, state)
    u2, s2 = gac.gac_update(grad, state, ParamLayout.flat(30))
    torch.testing.assert_close(u1, u2, rtol=1e-12, atol=1e-14)


def test_gac_cells_carry_each_instance_average():
    rule = _randomize(LSTMGAC(LSTMGACConfig(layers=(5, 4), gac=(2, 1))).double(), 0)
    layout = ParamLayout(("w", "b"), ((2, 3), (2,)), instances=2)
    grad = torch.randn(8, dtype=F64)
    _, state = rule.step(torch.zeros(8, dtype=F64), grad, None, rule.init(grad, layout), layout)
    h0 = rule.gac_activations(state)["h0"]
    inst = layout.instance_index()
    for p in range(2):
        rows = h0[inst == p]
        assert torch.allclose(rows, rows[:1].expand_as(rows))  # one value per instance
    assert not torch.allclose(h0[inst == 0][0], h0[inst == 1][0])  # instances differ
    assert state["h0"][:, :3].std(0).min() > 0  # ordinary cells stay per coordinate


def test_gac_config_errors():
    with pytest.raises(ValueError, match="0 <= gac <= 4"):
        LSTMGACConfig(layers=(4,), gac=5)
    with pytest.raises(ValueError, match="one per layer"):
        LSTMGACConfig(layers=(4, 4), gac=(1, 1, 1))


# -- a hand-set LSTM+GAC is L2 gradient-norm clipped gradient descent --------------------------
def clipping_lstm_gac(n: int, lr: float, max_norm: float, terms: int = 14) -> LSTMGAC:
    """An LSTM+GAC whose update is -lr * g * min(1, max_norm / ||g||) on n coordinates.

    Layer 1 (3 cells, the last 2 averaging): cell 0 passes w g through (tanh of a small
    value); cells 1 and 2 compute c = sigmoid(+-a g) tanh(+-b g), whose sum is
    tanh(a g / 2) tanh(b g) ~ (a b / 2) g^2, so their averages sum to (a b / 2) ||g||^2 / n:
    t = ||g||^2 / max_norm^2 up to a known factor, the same for every coordinate.
    Layer 2 multiplies the passed-through gradient by functions of t in its gates:
    cell 0 (the unclipped branch) by the output gate sigmoid(-beta (t - 1)); cells
    1..K (the clipped branch) by the output gate sigmoid(beta (t - 1)) and the input gate
    sigmoid(-t / tau_k).  The head sums them with weights that make
    sum_k c_k sigmoid(-t / tau_k) ~ t^-1/2 (least squares on t in [0.7, 150]: a sum of
    sigmoids, like a sum of exponentials, fits a power law closely), so the update is
    -lr g (t < 1) or -lr g / sqrt(t) (t > 1): clipping.  Forget gates are shut and
    recurrent weights zero, so every step is the same function of its gradient.  (The
    kernels' tanh(c) = 2 sigmoid(2c) - 1 has an absolute error ~1e-16, so no cell's c is
    made tiny: the gates stay O(1) and the small scale sits in the head.)
    """
    B, w, a, b, beta = 40.0, 1e-4, 1e-3, 1e-3, 1e4
    t = torch.logspace(math.log10(0.7), math.log10(150.0), 4000, dtype=F64)
    tau = torch.logspace(-1, 3, terms, dtype=F64)
    basis = torch.sigmoid(-t[:, None] / tau[None, :])
    weight = t.sqrt()[:, None]  # relative error
    coef = torch.linalg.lstsq(basis * weight, torch.ones(len(t), 1, dtype=F64)).solution[:, 0]
    K = 2.0 * n / (a * b * max_norm**2)  # t = K * (mean of cell 1 + mean of cell 2)
    H1, H2 = 3, 1 + terms
    rule = LSTMGAC(
        LSTMGACConfig(layers=(H1, H2), gac=(2, 0), preprocessing="none", output_scale=1.0)
    ).double()
    with torch.no_grad():
        for p in rule.parameters():
            p.zero_()
        c1, c2 = rule.cells
        i, f, g, o = (slice(k * H1, (k + 1) * H1) for k in range(4))
        c1.bias[i], c1.bias[f], c1.bias[o] = B, -B, B
        c1.weight_ih[g.start + 0, 0] = w  # pass-through
        c1.bias[i.start + 1], c1.bias[i.start + 2] = 0.0, 0.0
        c1.weight_ih[i.start + 1, 0], c1.weight_ih[i.start + 2, 0] = a, -a
        c1.weight_ih[g.start + 1, 0], c1.weight_ih[g.start + 2, 0] = b, -b
        i, f, g, o = (slice(k * H2, (k + 1) * H2) for k in range(4))
        c2.bias[f] = -B
        c2.weight_ih[g, 0] = 1.0  # every cell reads the passed-through gradient
        # cell 0: unclipped branch, input gate open, output gate sigmoid(-beta (t - 1))
        c2.bias[i.start] = B
        c2.weight_ih[o.start, 1:] = -beta * K
        c2.bias[o.start] = beta
        # cells 1..K: clipped branch, output gate sigmoid(beta (t - 1)), input gate sigmoid(-t/tau)
        c2.weight_ih[o.start + 1 : o.stop, 1:] = beta * K
        c2.bias[o.start + 1 : o.stop] = -beta
        c2.weight_ih[i.start + 1 : i.stop, 1:] = (-K / tau)[:, None]
        rule.head.weight[0, 0] = -lr / w
        rule.head.weight[0, 1:] = -lr / w * coef
    return rule


def test_hand_set_lstm_gac_is_clipped_gradient_descent():
    n, lr, max_norm = 8, 0.3, 1.5
    rule = clipping_lstm_gac(n, lr, max_norm)
    clipped = ClippedSGD(lr=lr, max_norm=max_norm)
    layout = ParamLayout(("w",), ((2, n),), instances=2)  # two instances, clipped separately
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(2 * n, generator=g, dtype=F64)
    state = rule.init(theta, layout)
    scales = []
    for _ in range(30):  # norms log-uniform in [0.1, 10] x max_norm, several steps of state
        grad = torch.randn(2 * n, generator=g, dtype=F64).view(2, n)
        target = max_norm * 10 ** (torch.rand(2, 1, generator=g, dtype=F64) * 2 - 1)
        grad = (grad / grad.norm(dim=1, keepdim=True) * target).reshape(-1)
        new, state = rule.step(theta, grad, None, state, layout)
        ref, _ = clipped.step(theta, grad, None, {}, layout)
        # ClippedSGD's 1e-6 in max_norm / (norm + 1e-6) is below this tolerance
        err = (new - ref).view(2, n).norm(dim=1) / (ref - theta).view(2, n).norm(dim=1)
        assert err.max() < 1e-4, (target.flatten().tolist(), err.tolist())
        scales += (target.flatten() / max_norm).tolist()
        theta = new
    assert min(scales) < 0.5 and max(scales) > 3  # both branches were exercised


# -- every coupling is per instance ----------------------------------------------------------
def _coupled_rules():
    torch.manual_seed(0)
    return {
        "lstm-gac": LSTMGAC(LSTMGACConfig(layers=(6, 5), gac=2)),
        "ntm-bfgs": NTMBFGS(NTMBFGSConfig(layers=(6,), gac=2, output_scale=0.02)),
        "ntm-lbfgs": NTMLBFGS(NTMLBFGSConfig(layers=(6,), gac=2, window=5, output_scale=0.02)),
        "bfgs": BFGS(lr=0.01),
        "l-bfgs": LBFGS(lr=0.01, memory=3),
        "bfgs-fixed": BFGS(lr=0.005, line_search=False),
    }


@pytest.mark.parametrize("name", list(_coupled_rules()))
def test_two_instances_together_equal_each_alone(name):
    """In float64: in float32 the per-instance sums round differently batched or alone, and a
    quasi-Newton line search can turn such a difference into another accept/reject."""
    rule = _coupled_rules()[name]
    if isinstance(rule, torch.nn.Module):
        rule.double()
    task = Quadratic(dtype=F64)
    together = run(rule, task.sample([11, 12]), 30)
    alone = torch.cat([run(rule, task.sample([s]), 30) for s in (11, 12)], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(_coupled_rules()))
def test_instances_across_several_tensors(name):
    """Instance p owns row p of every tensor: the rule must gather it across tensors."""
    rule = _coupled_rules()[name]
    if isinstance(rule, torch.nn.Module):
        rule.double()
    both = ParamLayout(("w", "b"), ((2, 3, 2), (2, 2)), instances=2)
    one = ParamLayout(("w", "b"), ((3, 2), (2,)))
    rows = [list(range(6)) + [12, 13], list(range(6, 12)) + [14, 15]]
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(16, generator=g, dtype=F64)
    thetas = [theta[r] for r in rows]
    state = rule.init(theta, both)
    states = [rule.init(t, one) for t in thetas]
    for _ in range(5):
        grad = torch.randn(16, generator=g, dtype=F64)
        loss = torch.rand(2, generator=g, dtype=F64)
        theta, state = rule.step(theta, grad, loss, state, both)
        for p in range(2):
            thetas[p], states[p] = rule.step(
                thetas[p], grad[rows[p]], loss[p : p + 1], states[p], one
            )
            torch.testing.assert_close(theta[rows[p]], thetas[p], rtol=1e-10, atol=1e-12)


# -- NTM memory --------------------------------------------------------------------------------
def test_ntm_bfgs_size_limit_names_ntm_lbfgs():
    rule = NTMBFGS(NTMBFGSConfig(layers=(4,), max_coordinates=100))
    with pytest.raises(L2OError, match="ntm-lbfgs"):
        rule.init(torch.zeros(101))
    rule.init(torch.zeros(100))  # at the limit: fine
    layout = ParamLayout(("w",), ((4, 60),), instances=4)  # 60 per instance: fine
    rule.init(torch.zeros(240), layout)
    with pytest.raises(L2OError, match="this problem has 15910: use ntm-lbfgs"):
        NTMBFGS().init(torch.zeros(15910))
    with pytest.raises(L2OError, match="l-bfgs"):
        BFGS(max_coordinates=10).init(torch.zeros(11))


@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "autograd"])
def test_ntm_lbfgs_with_a_full_window_is_ntm_bfgs(grad_mode):
    """With window >= write_heads x steps no pair leaves the window: the same memory."""
    steps, heads = 6, 3
    cfg = {"layers": (5, 4), "gac": 1, "write_heads": heads, "read_heads": 2}
    full = _randomize(NTMBFGS(NTMBFGSConfig(**cfg)).double(), 1, 0.3)
    window = NTMLBFGS(NTMLBFGSConfig(**cfg, window=steps * heads)).double()
    window.load_state_dict(full.state_dict())
    short = NTMLBFGS(NTMLBFGSConfig(**cfg, window=heads * 2)).double()
    short.load_state_dict(full.state_dict())
    layout = ParamLayout(("w", "b"), ((2, 3, 3), (2, 3)), instances=2)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(layout.numel, generator=g, dtype=F64)
    a, b, c = theta, theta, theta
    sa, sb, sc = (r.init(theta, layout) for r in (full, window, short))
    with torch.set_grad_enabled(grad_mode):
        for _ in range(steps):
            grad = torch.randn(layout.numel, generator=g, dtype=F64)
            a, sa = full.step(a, grad, None, sa, layout)
            b, sb = window.step(b, grad, None, sb, layout)
            c, sc = short.step(c, grad, None, sc, layout)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(a, c)  # a short window forgets: a different rule


def test_ntm_memory_is_written_and_read():
    rule = _randomize(NTMBFGS(NTMBFGSConfig(layers=(4,), memory_init=0.0)).double(), 2)
    grad = torch.randn(5, dtype=F64)
    state = rule.init(grad)
    assert torch.equal(state["memory"], torch.zeros(5, 5, dtype=F64))
    _, state = rule.step(torch.zeros(5, dtype=F64), grad, None, state)
    assert torch.linalg.matrix_rank(state["memory"]) == 3  # three write heads


# -- BFGS / L-BFGS ------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [BFGS(lr=0.01), LBFGS(lr=0.01, memory=10)], ids=["bfgs", "l-bfgs"])
def test_quasi_newton_solves_quadratics(rule):
    losses = run(rule, Quadratic(dtype=F64).sample(list(range(20))), 100)
    assert losses[-1].max() < 1e-8  # every 10-dim function solved in 100 evaluations
    assert torch.isfinite(losses).all()


def test_line_search_counts_every_evaluation():
    """A rejected trial is a step: the next trial goes back to the accepted point."""
    rule = BFGS(lr=10.0)  # far too long a first step on this quadratic
    theta = torch.tensor([1.0, -2.0], dtype=F64)
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=F64)

    def f(x):
        return 0.5 * x @ A @ x, A @ x

    state = rule.init(theta)
    x0, (loss, grad) = theta, f(theta)
    trial, state = rule.step(theta, grad, loss, state)  # accepts theta0, tries theta0 - 10 g
    torch.testing.assert_close(trial, x0 - 10.0 * grad)
    loss2, grad2 = f(trial)
    assert loss2 > loss
    trial2, state = rule.step(trial, grad2, loss2, state)  # rejected: half the step from x0
    torch.testing.assert_close(trial2, x0 - 5.0 * grad)
    assert float(state["iters"][0]) == 1


def test_bfgs_needs_the_loss():
    rule = BFGS()
    with pytest.raises(ValueError, match="need the loss"):
        rule.step(torch.zeros(3), torch.ones(3), None, rule.init(torch.zeros(3)))


# -- the rules in the library's machinery --------------------------------------------------------
@pytest.mark.parametrize("name", ["lstm-gac", "ntm-bfgs", "ntm-lbfgs"])
def test_meta_train_load_and_compare(name, tmp_path):
    from l2o import config as cfgmod
    from l2o import load
    from l2o.evaluate import compare, parse_optimizer
    from l2o.meta import MetaTrainer
    from l2o.tasks import build_task

    sets = [f"rule.name={name}", "rule.layers=[6,6]", "rule.gac=1", "train.meta_steps=2"]
    sets += ["train.instances=4", "train.horizon=10", "train.unroll=5", "val.every=2"]
    sets += ["val.problems=4"]
    if name == "ntm-lbfgs":
        sets.append("rule.window=6")
    cfg = cfgmod.resolve("quadratic", None, sets)
    MetaTrainer(cfg, tmp_path / "run", progress=False).train()
    rule = load(str(tmp_path / "run"))
    assert rule.name == name and rule.gac == (1, 1)
    if name == "ntm-lbfgs":
        assert rule.config.window == 6
    res = compare(
        build_task("quadratic"),
        [parse_optimizer(f"{name}:{tmp_path / 'run'}"), parse_optimizer("bfgs:lr=0.1")],
        steps=10,
        problems=3,
        log=lambda s: None,
    )
    assert all(math.isfinite(e["sum_loss"]) for e in res["optimizers"].values())


def test_config_key_of_another_rule_is_an_error():
    from l2o import config as cfgmod

    with pytest.raises(L2OError, match="rule.window does not apply to rule 'ntm-bfgs'"):
        cfgmod.resolve("quadratic", None, ["rule.name=ntm-bfgs", "rule.window=3"])
    with pytest.raises(L2OError, match="rule.gac does not apply to rule 'lstm'"):
        cfgmod.resolve("quadratic", None, ["rule.gac=3"])


@pytest.mark.parametrize("name", ["lstm-gac", "ntm-lbfgs", "l-bfgs"])
def test_learned_optimizer_steps_a_module_like_the_rule(name):
    from l2o.optim import LearnedOptimizer

    torch.manual_seed(0)
    rule = {
        "lstm-gac": lambda: LSTMGAC(LSTMGACConfig(layers=(6,), gac=2)),
        "ntm-lbfgs": lambda: NTMLBFGS(NTMLBFGSConfig(layers=(6,), window=4)),
        "l-bfgs": lambda: LBFGS(lr=0.1, memory=3),
    }[name]()
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    params = list(model.parameters())
    layout = ParamLayout(tuple(f"p{i}" for i in range(4)), tuple(p.shape for p in params))
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    state = rule.init(theta, layout)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = LearnedOptimizer(model.parameters(), rule=rule)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(4):
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            parts = layout.unflatten(th)
            out = torch.func.functional_call(
                model, {n: parts[f"p{i}"] for i, (n, _) in enumerate(model.named_parameters())}, x
            )
            loss = torch.nn.functional.mse_loss(out, y)
            (grad,) = torch.autograd.grad(loss, th)
        with torch.no_grad():
            theta, state = rule.step(theta, grad, loss.detach(), state, layout)
        opt.step(closure)
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(flat, theta, rtol=1e-5, atol=1e-6)


def test_widened_lstm_starts_as_the_lstm():
    from l2o.rules.gac import widen_lstm
    from l2o.rules.ntm import ntm_from_lstm

    torch.manual_seed(0)
    lstm = _randomize(CoordinatewiseLSTM(LSTMRuleConfig(layers=(5, 4))).double(), 4)
    gac, ntm = widen_lstm(lstm, 2), ntm_from_lstm(lstm, gac=1, head_std=0.0, window=4)
    assert gac.config.layers == (7, 6) and gac.gac == (2, 2) and ntm.gac == (1, 1)
    layout = ParamLayout(("w",), ((2, 6),), instances=2)
    g = torch.Generator().manual_seed(0)
    thetas = [torch.zeros(12, dtype=F64)] * 3
    states = [r.init(thetas[0], layout) for r in (lstm, gac, ntm)]
    for _ in range(4):
        grad = torch.randn(12, generator=g, dtype=F64)
        for i, r in enumerate((lstm, gac, ntm)):
            thetas[i], states[i] = r.step(thetas[i], grad, None, states[i], layout)
        torch.testing.assert_close(thetas[1], thetas[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(thetas[2], thetas[0], rtol=1e-12, atol=1e-14)


def test_couplings_stay_within_each_parameter_group():
    """Under a GroupedRule each coupled sub-rule averages / remembers over its own group."""
    from l2o.rules import GroupedRule

    torch.manual_seed(0)
    gac = _randomize(LSTMGAC(LSTMGACConfig(layers=(4,), gac=2)).double(), 5)
    ntm = _randomize(NTMLBFGS(NTMLBFGSConfig(layers=(4,), window=4)).double(), 6, 0.3)
    rule = GroupedRule([("w*", gac), ("*", ntm)])
    layout = ParamLayout(("w1", "b1", "w2"), ((2, 3), (2,), (2, 2)), instances=2)
    sub_w = layout.subset(["w1", "w2"])
    sub_b = layout.subset(["b1"])
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(12, generator=g, dtype=F64)
    iw, ib = [*range(6), *range(8, 12)], [6, 7]
    tw, tb = theta[iw], theta[ib]
    state, sw, sb = rule.init(theta, layout), gac.init(tw, sub_w), ntm.init(tb, sub_b)
    for _ in range(3):
        grad = torch.randn(12, generator=g, dtype=F64)
        theta, state = rule.step(theta, grad, None, state, layout)
        tw, sw = gac.step(tw, grad[iw], None, sw, sub_w)
        tb, sb = ntm.step(tb, grad[ib], None, sb, sub_b)
        torch.testing.assert_close(theta[iw], tw, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(theta[ib], tb, rtol=1e-12, atol=1e-14)
