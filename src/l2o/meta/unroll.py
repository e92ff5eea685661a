"""Truncated backpropagation through unrolled optimization (L2L, section 2).

A trajectory of horizon T is cut into unrolls of U steps.  Inside an unroll

    for t = 1..U:
        theta_t        = rule(theta_{t-1}, g_{t-1}, state)       # depends on phi
        L_t, g_t       = f(theta_t; batch_t), grad f(theta_t; batch_t)
        meta_loss     += w_t * mean_P(L_t)

so over the whole trajectory the meta-loss is sum_{t=1..T} f(theta_t): every
post-update loss counted once, the initial loss f(theta_0) (constant in phi)
never.  Each step evaluates f and its gradient once, the same cost as a
hand-designed optimizer.  The last (L_U, g_U) of an unroll is carried into the
next one, detached, so no evaluation is repeated at the truncation.

Why ``torch.autograd.grad`` and not ``loss.backward()``: ``autograd.grad``
returns the optimizee gradient without touching ``.grad`` of the meta-parameters
and without walking the whole unroll graph at every step (the O(U^2) trap of
several earlier ports).  Without ``create_graph`` the gradient it returns is
*detached*: that is the paper's first-order assumption dL/dphi through g = 0
(the dashed edges of Fig. 2).  ``second_order=True`` keeps the gradient in the
graph (``create_graph=True``) so the meta-gradient includes Hessian terms.

:func:`optimize` is the same step as a plain differentiable inner loop, for callers
whose meta-loss is taken after the loop (the few-shot methods' adaptation to a
support set, :mod:`l2o.fewshot.support`): no meta-loss along the way, no truncation,
and the first-order cut or the second order chosen per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..rules.base import State, UpdateRule
from ..tasks.base import Problem

META_OBJECTIVES = ("sum", "log")


@dataclass
class Trajectory:
    """Where an optimization trajectory stands between two unrolls (all detached)."""

    problem: Problem
    theta: Tensor
    state: State
    losses: Tensor  # [P] losses at theta
    grad: Tensor  # gradient of losses.sum() at theta
    t: int = 0


def loss_and_grad(
    problem: Problem, theta: Tensor, t: int, *, keep_graph: bool, second_order: bool = False
):
    """Per-instance losses ``[P]`` and the flat gradient of their sum at ``theta``.

    With ``keep_graph`` the loss stays connected to the meta-parameters (for the
    meta-loss) and the graph is retained; the returned gradient is detached
    unless ``second_order``.
    """
    if not theta.requires_grad:
        # A truncation point or evaluation: theta is a leaf here.
        theta = theta.detach().requires_grad_(True)
    losses = problem.loss(theta, t)
    (grad,) = torch.autograd.grad(
        losses.sum(), theta, retain_graph=keep_graph or second_order, create_graph=second_order
    )
    return losses, grad


def start(problem: Problem, rule: UpdateRule) -> Trajectory:
    """Fresh trajectory: theta0 from the problem, zero rule state, f and grad at theta0."""
    theta = problem.init()
    losses, grad = loss_and_grad(problem, theta, 0, keep_graph=False)
    with torch.no_grad():
        state = rule.init(theta, problem.layout)
    return Trajectory(problem, theta.detach(), state, losses.detach(), grad.detach(), 0)


def per_instance_term(losses: Tensor, objective: str) -> Tensor:
    """Each instance's contribution to the meta-loss at one step: f, or log f."""
    if objective == "sum":
        return losses
    if objective == "log":
        # log f: every decade of progress counts the same (Wichrowska et al. 2017).
        return torch.log(losses.clamp_min(1e-12))
    raise ValueError(f"meta objective must be one of {META_OBJECTIVES}, got {objective!r}")


def meta_term(losses: Tensor, objective: str) -> Tensor:
    """One step's contribution to the meta-loss: mean over instances of f or log f."""
    return per_instance_term(losses, objective).mean()


def unroll(
    rule: UpdateRule,
    traj: Trajectory,
    length: int,
    *,
    second_order: bool = False,
    objective: str = "sum",
) -> tuple[Tensor, Tensor, Trajectory]:
    """Run ``length`` differentiable steps from ``traj``.

    Returns (meta_loss, step_losses [length, P] detached, the next trajectory
    with theta and state detached: the truncation).
    """
    theta, state, grad, losses = traj.theta, traj.state, traj.grad, traj.losses
    meta_loss = torch.zeros((), dtype=theta.dtype, device=theta.device)
    step_losses = []
    for k in range(length):
        t = traj.t + k + 1
        # Each instance's own loss (rules that read it broadcast it to its coordinates).
        theta, state = rule.step(theta, grad, losses.detach(), state, traj.problem.layout)
        losses, grad = loss_and_grad(
            traj.problem, theta, t, keep_graph=True, second_order=second_order
        )
        meta_loss = meta_loss + meta_term(losses, objective)
        step_losses.append(losses.detach())
    # The truncation: the next unroll starts from values, not from this graph.
    nxt = Trajectory(
        traj.problem,
        theta.detach(),
        {k: v.detach() for k, v in state.items()},
        losses.detach(),
        grad.detach(),
        traj.t + length,
    )
    return meta_loss, torch.stack(step_losses), nxt


@torch.no_grad()
def _rule_step_no_grad(rule, theta, grad, loss, state, layout):
    return rule.step(theta, grad, loss, state, layout)


def run(rule: UpdateRule, problem: Problem, steps: int) -> Tensor:
    """Optimize ``problem`` for ``steps`` steps with a frozen rule (no meta-graph).

    Returns the per-instance losses ``[steps + 1, P]``; row 0 is the initial loss.
    Non-finite losses are kept (the caller decides how to score divergence); once
    every instance is non-finite the remaining rows are filled with NaN.
    """
    traj = start(problem, rule)
    theta, state, losses, grad = traj.theta, traj.state, traj.losses, traj.grad
    rows = [losses]
    for t in range(1, steps + 1):
        theta, state = _rule_step_no_grad(rule, theta, grad, losses, state, problem.layout)
        losses, grad = loss_and_grad(problem, theta, t, keep_graph=False)
        losses = losses.detach()
        rows.append(losses)
        if not torch.isfinite(losses).any():
            rows.extend([torch.full_like(losses, math.nan)] * (steps - t))
            break
    return torch.stack(rows)


def optimize(
    rule: UpdateRule,
    problem: Problem,
    steps: int,
    *,
    theta: Tensor | None = None,
    state: State | None = None,
    keep_graph: bool = True,
    second_order: bool = False,
    on_step=None,
) -> tuple[Tensor, State, Tensor]:
    """``steps`` steps of ``rule`` on ``problem`` from ``theta``: a differentiable inner loop.

    Step ``t = 0..steps-1`` evaluates the loss and gradient at ``theta_t`` (``loss(theta, t)``,
    once per step, nothing evaluated at the returned ``theta_steps``) and applies
    ``theta_{t+1}, state = rule.step(theta_t, g_t, L_t, state, layout)``.  This is the inner
    loop of the few-shot methods (:mod:`l2o.fewshot`: MAML's SGD, the Meta-Learner LSTM,
    fine-tuning), where the meta-loss is taken on the returned parameters (the query set),
    not on the losses along the way.

    ``theta`` defaults to ``problem.init()`` and may be connected to meta-parameters (a
    learned initialisation); ``state`` defaults to ``rule.init(theta, layout)``.

    * ``keep_graph=True``: the steps run in the caller's grad mode, so ``theta_t`` and the
      state stay in the graph of the rule's weights and of the initial ``theta``.
      ``keep_graph=False``: the rule steps run under ``no_grad`` (a frozen rule, no meta-graph).
    * ``second_order=False`` is the first-order cut (L2L's and Ravi & Larochelle's
      assumption, first-order MAML): loss and gradient are computed on a *detached* copy of
      ``theta_t`` (with grad enabled, even inside ``no_grad``), so they reach the rule as
      constants and the meta-gradient has no second derivatives.
      ``second_order=True`` differentiates through them: the gradient is taken with
      ``create_graph`` and the rule receives loss and gradient with their graphs (full
      MAML, the second-order Meta-Learner LSTM).  It needs ``keep_graph``.

    ``on_step(t, theta, state)``, if given, is called after every step with the new values.
    Returns ``(theta_steps, state, losses [steps, P])``: the parameters and state after the
    last step, and the detached losses the rule saw (at ``theta_0 .. theta_{steps-1}``).
    """
    if second_order and not keep_graph:
        raise ValueError("second_order needs keep_graph (second derivatives of what graph?)")
    if theta is None:
        theta = problem.init()
    if state is None:
        state = rule.init(theta, problem.layout)
    step = rule.step if keep_graph else partial(_rule_step_no_grad, rule)
    rows = []
    for t in range(int(steps)):
        if second_order:
            losses, grad = loss_and_grad(problem, theta, t, keep_graph=True, second_order=True)
        else:
            # The first-order cut: a detached copy of theta is a fresh leaf, so the loss and
            # the gradient are constants to the meta-graph.
            with torch.enable_grad():
                losses, grad = loss_and_grad(problem, theta.detach(), t, keep_graph=False)
            losses = losses.detach()
        theta, state = step(theta, grad, losses, state, problem.layout)
        rows.append(losses.detach())
        if on_step is not None:
            on_step(t, theta, state)
    if not rows:
        return theta, state, theta.new_empty((0, problem.num_instances))
    return theta, state, torch.stack(rows)
