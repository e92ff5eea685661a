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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
