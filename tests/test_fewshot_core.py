"""Few-shot adaptation through the core engine: SupportProblem + unroll.optimize.

Every method's ``adapt`` is checked against a hand-written inner loop (the loops the
methods had before they ran through :func:`l2o.meta.unroll.optimize`), logits and
meta-gradients bit for bit, in both BN modes; and ``optimize`` itself against closed
forms on a quadratic: the first-order cut gives ``d theta_T / d theta_0 = I``, the
second order ``prod (I - lr A)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2o.errors import L2OError
from l2o.fewshot import BNStats, Conv4, FineTune, LearnerConfig, MAMLMethod, MetaLSTMMethod
from l2o.fewshot.learner import resize_head
from l2o.fewshot.metalearner import EpisodeRule
from l2o.fewshot.support import SupportProblem
from l2o.layout import ParamLayout
from l2o.meta.unroll import optimize
from l2o.rules import SGD, MetaLearnerLSTM
from l2o.tasks.base import Problem

SIZE = 16


def tiny(ways: int = 5) -> LearnerConfig:
    return LearnerConfig(in_channels=1, image_size=SIZE, ways=ways, filters=4)


def episode(seed: int = 0, ways: int = 5, queries: int = 2):
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(ways, 1, SIZE, SIZE, generator=g) > 0.7).float()

    def draw(n):
        x = protos.repeat_interleave(n, 0)
        x = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        return x, torch.arange(ways).repeat_interleave(n)

    return (*draw(1), *draw(queries))


def perturbed(model, seed: int):
    """Meta-parameters moved off their symmetric initial values (every term nonzero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return model


# -- hand-written inner loops (what the methods did before the core engine) ------------------
def hand_loss_grad(learner, theta, x, y, stats, keep_graph):
    if keep_graph:
        loss = F.cross_entropy(learner(theta, x, stats), y)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        return loss, grad
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        loss = F.cross_entropy(learner(th, x, stats), y)
        (grad,) = torch.autograd.grad(loss, th)
    return loss.detach(), grad


def hand_sgd(theta, learner, sx, sy, stats, lr, steps, keep_graph):
    for _ in range(steps):
        _, grad = hand_loss_grad(learner, theta, sx, sy, stats, keep_graph)
        theta = theta - lr * grad
    return theta


def hand_meta_lstm(model, theta, learner, sx, sy, stats, steps, keep_graph):
    rule = model.rule
    state = rule.init(theta)
    for _ in range(steps):
        loss, grad = hand_loss_grad(learner, theta, sx, sy, stats, keep_graph)
        if model.grad_scale == "batch":
            grad = grad / sx.shape[0]
        theta, state = rule.step(theta, grad, loss, state)
    return theta


def reference_adapt(model, sx, sy, bn_mode, training):
    """The adapted theta and BN statistics by the hand-written loop of ``model``'s method."""
    learner = Conv4(model.learner_config.with_ways(5))
    stats = BNStats.fresh(learner.config) if bn_mode == "support-running" else None
    grad_on = torch.is_grad_enabled()
    if isinstance(model, MetaLSTMMethod):
        theta = resize_head(model.rule.c_init, model.learner_config, 5)
        keep = model.second_order and training and grad_on
        theta = hand_meta_lstm(model, theta, learner, sx, sy, stats, model.steps, keep)
    elif isinstance(model, MAMLMethod):
        theta = resize_head(model.theta0, model.learner_config, 5)
        keep = training and not model.first_order and grad_on
        theta = hand_sgd(theta, learner, sx, sy, stats, model.inner_lr, model.steps, keep)
    else:
        theta = model.theta_for(learner)
        theta = hand_sgd(theta, learner, sx, sy, stats, model.lr, model.steps, False)
    return learner, theta, stats


METHODS = {
    "meta-lstm": lambda: MetaLSTMMethod(tiny(), inner_steps=3, init_seed=1),
    "meta-lstm-second-order": lambda: MetaLSTMMethod(
        tiny(), inner_steps=3, second_order=True, init_seed=2
    ),
    "meta-lstm-no-grad-scale": lambda: MetaLSTMMethod(
        tiny(), inner_steps=2, grad_scale="none", init_seed=3
    ),
    "maml": lambda: MAMLMethod(tiny(), inner_steps=2, inner_lr=0.4),
    "maml-wider-head": lambda: MAMLMethod(tiny(ways=7), inner_steps=2, inner_lr=0.3),
    "fomaml": lambda: MAMLMethod(tiny(), inner_steps=2, inner_lr=0.4, first_order=True),
    "finetune": lambda: FineTune(tiny(), lr=0.1, steps=3),
}
CASES = [("batch", True), ("support-running", False), ("support-running", True)]


@pytest.mark.parametrize("bn_mode,training", CASES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_adapt_equals_hand_written_inner_loop(name, bn_mode, training):
    sx, sy, qx, qy = episode(seed=3)
    model = perturbed(METHODS[name](), seed=len(name))
    params = [p for _, p in model.named_parameters()]

    adapted = model.adapt(sx, sy, 5, bn_mode=bn_mode, training=training)
    logits = adapted.logits(qx)
    learner, theta, stats = reference_adapt(model, sx, sy, bn_mode, training)
    ref = learner(theta, qx, stats, use_running=bn_mode == "support-running")

    assert torch.equal(adapted.theta, theta)
    assert torch.equal(logits, ref)
    if stats is not None:
        assert adapted.stats.updates == stats.updates == model.steps  # one forward per step
        for a, b in zip(adapted.stats.means + adapted.stats.vars, stats.means + stats.vars):
            assert torch.equal(a, b)
    if isinstance(model, FineTune):  # not meta-trained: no meta-graph at all
        assert not logits.requires_grad
        return
    got = torch.autograd.grad(F.cross_entropy(logits, qy), params, allow_unused=True)
    want = torch.autograd.grad(F.cross_entropy(ref, qy), params, allow_unused=True)
    for (pname, _), g, w in zip(model.named_parameters(), got, want):
        assert g is not None and w is not None, pname
        assert torch.equal(g, w), pname


@pytest.mark.parametrize("name", ["meta-lstm", "maml", "finetune"])
def test_evaluation_adapt_under_no_grad(name):
    # The evaluation path (run_episodes, the API) adapts inside no_grad: the first-order
    # support gradients are still taken, and nothing keeps a graph.
    sx, sy, qx, _ = episode(seed=4)
    model = perturbed(METHODS[name](), seed=9)
    with torch.no_grad():
        logits = model.adapt(sx, sy, 5, bn_mode="support-running").logits(qx)
        learner, theta, stats = reference_adapt(model, sx, sy, "support-running", False)
        ref = learner(theta, qx, stats, use_running=True)
    assert not logits.requires_grad
    assert torch.equal(logits, ref)


def test_meta_lstm_gate_log_matches_the_rule_states():
    sx, sy, _, _ = episode(seed=5)
    model = perturbed(METHODS["meta-lstm"](), seed=1)
    gates = []
    model.adapt(sx, sy, 5, bn_mode="batch", training=True, gate_log=gates)
    learner = Conv4(tiny())
    theta = model.rule.c_init
    state = model.rule.init(theta)
    assert len(gates) == model.steps
    for f, i in gates:
        loss, grad = hand_loss_grad(learner, theta, sx, sy, None, False)
        theta, state = model.rule.step(theta, grad / sx.shape[0], loss, state)
        want_f, want_i = MetaLearnerLSTM.gates(state)
        assert torch.equal(f, want_f.detach()) and torch.equal(i, want_i.detach())
        assert not f.requires_grad and not i.requires_grad


# -- the first-order cut and the second order, on the support problem -----------------------
class Spy:
    """A rule that records the loss and gradient it is given, then steps ``rule``."""

    def __init__(self, rule):
        self.rule, self.seen = rule, []
        self.name, self.needs_loss, self.coordinatewise = "spy", True, True

    def init(self, theta, layout=None):
        return self.rule.init(theta, layout)

    def step(self, theta, grad, loss, state, layout=None):
        self.seen.append((grad, loss, layout))
        return self.rule.step(theta, grad, loss, state, layout)


@pytest.mark.parametrize("rule", ["sgd", "meta-lstm"])
def test_first_order_cut_detaches_second_order_keeps(rule):
    sx, sy, _, _ = episode(seed=6)
    model = MetaLSTMMethod(tiny(), inner_steps=2)
    inner = SGD(0.3) if rule == "sgd" else EpisodeRule(model.rule, sx.shape[0])
    learner = Conv4(tiny())
    theta0 = model.rule.c_init
    for second_order in (False, True):
        spy = Spy(inner)
        theta, _, losses = optimize(
            spy, SupportProblem(learner, sx, sy), 3, theta=theta0, second_order=second_order
        )
        assert len(spy.seen) == 3 and losses.shape == (3, 1) and not losses.requires_grad
        assert all(layout is learner.layout for _, _, layout in spy.seen)
        for k, (grad, loss, _) in enumerate(spy.seen):
            if not second_order:  # constants: no second derivatives
                assert grad.grad_fn is None and loss.grad_fn is None
            else:  # create_graph: loss and gradient stay in the graph of theta_0
                assert grad.requires_grad and loss.requires_grad
            assert torch.equal(loss.detach(), losses[k])
        assert theta.requires_grad  # theta_T stays connected to the initialisation


class Quadratic(Problem):
    """f(theta) = 0.5 theta^T A theta, A symmetric positive definite: Hessian A everywhere."""

    def __init__(self, n: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.a = m @ m.t() / n + torch.eye(n, dtype=torch.float64)
        self.layout = ParamLayout.flat(n)
        self.theta0 = torch.randn(n, generator=g, dtype=torch.float64)

    def init(self):
        return self.theta0.clone()

    def loss(self, theta, t):
        return (0.5 * theta @ self.a @ theta).reshape(1)


def test_optimize_first_and_second_order_jacobians_in_closed_form():
    prob, lr, steps = Quadratic(), 0.1, 3
    eye = torch.eye(4, dtype=torch.float64)
    theta0 = prob.init().requires_grad_(True)

    def jacobian(second_order):
        return torch.autograd.functional.jacobian(
            lambda th: optimize(SGD(lr), prob, steps, theta=th, second_order=second_order)[0],
            theta0,
        )

    # theta_T = (I - lr A)^T theta_0 exactly; the first-order cut sees only the identity path.
    assert torch.allclose(jacobian(True), torch.linalg.matrix_power(eye - lr * prob.a, steps))
    assert torch.equal(jacobian(False), eye)
    # values along the way: the losses at theta_0 .. theta_{T-1}, nothing at theta_T
    theta, state, losses = optimize(SGD(lr), prob, steps)
    th = prob.init()
    for k in range(steps):
        assert torch.allclose(losses[k], prob.loss(th, k))
        th = th - lr * (prob.a @ th)
    assert torch.allclose(theta, th) and state == {}


def test_optimize_keep_graph_false_steps_without_a_graph():
    prob = Quadratic()
    theta0 = prob.init().requires_grad_(True)
    theta, _, _ = optimize(SGD(0.1), prob, 2, theta=theta0, keep_graph=False)
    assert not theta.requires_grad
    with pytest.raises(ValueError, match="second_order needs keep_graph"):
        optimize(SGD(0.1), prob, 2, keep_graph=False, second_order=True)


def test_optimize_zero_steps_and_on_step():
    prob = Quadratic()
    theta, state, losses = optimize(SGD(0.1), prob, 0)
    assert torch.equal(theta, prob.init()) and losses.shape == (0, 1)
    calls = []
    optimize(SGD(0.1), prob, 3, on_step=lambda t, th, st: calls.append((t, th.clone())))
    assert [t for t, _ in calls] == [0, 1, 2]


def test_support_problem_is_the_support_cross_entropy_and_fills_the_statistics():
    sx, sy, _, _ = episode(seed=7)
    learner = Conv4(tiny())
    theta = learner.init_params(0)
    stats = BNStats.fresh(learner.config)
    prob = SupportProblem(learner, sx, sy, stats, theta0=theta)
    assert prob.layout is learner.layout and prob.num_instances == 1
    loss = prob.loss(theta, 0)
    assert loss.shape == (1,)
    assert torch.equal(loss[0], F.cross_entropy(learner(theta, sx), sy))
    assert stats.updates == 1
    assert torch.equal(prob.init(), theta) and prob.init() is not theta
    with pytest.raises(ValueError, match="no initial parameters"):
        SupportProblem(learner, sx, sy).init()


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_sgd_inner_rates_must_be_positive_finite(bad):
    # the inner loop is l2o.rules.SGD: a bad rate is a one-line error at construction
    with pytest.raises(L2OError, match="inner_lr must be a positive finite"):
        MAMLMethod(tiny(), inner_lr=bad)
    with pytest.raises(L2OError, match="fine-tune lr must be a positive finite"):
        FineTune(tiny(), lr=bad)
