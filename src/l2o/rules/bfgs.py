"""Hand-designed quasi-Newton rules: BFGS and L-BFGS on the update-rule interface.

Both keep their curvature estimate per problem instance (``coordinatewise = False``).
A rule sees one loss and gradient per step and cannot call the function itself, so the
backtracking line search is spread over steps and **every function evaluation is a step**
(it appears in the loss curve and in the sum of losses; the same number of gradient
evaluations as every other optimizer):

* the first step goes from ``theta0`` along ``-g`` with step ``lr`` (``H0 = I``): ``lr`` is
  what :func:`l2o.evaluate.compare` tunes;
* the rule keeps the last *accepted* point ``x`` (loss ``f``, gradient ``g``) and a search
  direction ``d`` with trial step ``alpha``; it returns the trial ``x + alpha d``;
* at the next step it receives the trial's loss and gradient.  Armijo
  (``f_trial <= f + c1 alpha g.d``, and finite) accepts it: the curvature pair
  ``s = x_trial - x``, ``y = g_trial - g`` updates the estimate (skipped when
  ``s.y <= 1e-10 |s| |y|``), the new direction is ``d = -H g`` and the next trial step 1
  (the quasi-Newton step).  Otherwise the step is halved (``backtrack``) and the next
  trial is ``x + alpha d``: a rejected trial costs one evaluation;
* before the first curvature update ``H`` is rescaled to ``(s.y / y.y) I`` (Nocedal &
  Wright, eq. 6.20), so the quasi-Newton step has the problem's units.

``line_search=False`` is the fixed-step variant: every trial is accepted and every step
is ``lr`` times the quasi-Newton direction.

Each instance accepts or rejects on its own (``torch.where`` on per-instance masks);
reductions go through :mod:`l2o.layout`.  :class:`BFGS` stores ``H`` as ``[N, n]`` rows
(row ``i`` = row ``j(i)`` of its instance's matrix, as :mod:`l2o.rules.ntm`), limited to
``max_coordinates`` per instance (an error names ``l-bfgs`` above it);
:class:`LBFGS` keeps the last ``memory`` pairs ``[N, memory]`` and applies the
two-loop recursion (a Python loop over the ``memory`` history slots, vectorized over
coordinates and instances; empty slots have ``rho = 0`` and change nothing).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import L2OError
from ..layout import ParamLayout, broadcast, instance_sum, layout_for
from .base import State
from .ntm import from_instances, local_index, to_instances


def _per_instance_loss(loss, layout: ParamLayout, like: Tensor) -> Tensor:
    if loss is None:
        raise ValueError("BFGS / L-BFGS need the loss (needs_loss = True)")
    loss = torch.as_tensor(loss, dtype=like.dtype, device=like.device).reshape(-1)
    if loss.numel() == 1 and layout.instances > 1:
        raise ValueError(
            f"BFGS / L-BFGS: one loss for {layout.instances} instances; each instance "
            "needs its own (a [P] loss)"
        )
    return loss


class _QuasiNewton:
    needs_loss = True
    coordinatewise = False

    def __init__(
        self, lr: float = 1.0, c1: float = 1e-4, backtrack: float = 0.5, line_search: bool = True
    ):
        lr = float(lr)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        if not 0.0 < c1 < 1.0:
            raise ValueError(f"c1 must be in (0, 1), got {c1}")
        if not 0.0 < backtrack < 1.0:
            raise ValueError(f"backtrack must be in (0, 1), got {backtrack}")
        self.lr, self.c1, self.backtrack = lr, float(c1), float(backtrack)
        self.line_search = bool(line_search)

    @property
    def hparams(self) -> dict:
        return {
            "lr": self.lr,
            "c1": self.c1,
            "backtrack": self.backtrack,
            "line_search": self.line_search,
        }

    # subclasses: curvature state, its update and the direction -H g
    def _init_curvature(self, theta: Tensor, layout: ParamLayout) -> State:
        raise NotImplementedError

    def _update_curvature(self, st: State, s, y, ok, first, layout) -> State:
        raise NotImplementedError

    def _direction(self, st: State, g: Tensor, layout: ParamLayout) -> Tensor:
        raise NotImplementedError

    def _check(self, layout: ParamLayout) -> None:
        pass

    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        layout = layout_for(theta, layout)
        self._check(layout)
        P = layout.instances
        state = {
            "x": theta.detach().clone(),
            "g": torch.zeros_like(theta),
            "d": torch.zeros_like(theta),
            "f": theta.new_zeros(P),
            "alpha": theta.new_zeros(P),
            # accepted iterations so far, per instance (0: nothing accepted yet)
            "iters": theta.new_zeros(P),
        }
        state.update(self._init_curvature(theta, layout))
        return state

    def step(self, theta, grad, loss, state, layout=None):
        layout = layout_for(theta, layout)
        self._check(layout)
        f_new = _per_instance_loss(loss, layout, theta)
        x, g, d, f, alpha, iters = (state[k] for k in ("x", "g", "d", "f", "alpha", "iters"))
        started = iters > 0
        gd = instance_sum(g * d, layout)  # [P]
        if self.line_search:
            armijo = f_new <= f + self.c1 * alpha * gd  # False for NaN
            accept = ~started | (armijo & torch.isfinite(f_new))
        else:
            accept = torch.ones_like(started)
        # curvature pair of accepted trials (instances that had a point before)
        s, y = theta - x, grad - g
        sy = instance_sum(s * y, layout)
        norms = (instance_sum(s * s, layout) * instance_sum(y * y, layout)).sqrt()
        ok = accept & started & (sy > 1e-10 * norms)
        first = ok & (state["pairs"] == 0)
        curv = {k: state[k] for k in self._curvature_keys}
        curv_new = self._update_curvature(curv, s, y, ok, first, layout)
        acc = broadcast(accept, layout)
        x_new = torch.where(acc, theta, x)
        g_new = torch.where(acc, grad, g)
        f_kept = torch.where(accept, f_new, f)
        d_new = -self._direction(curv_new, g_new, layout)
        # not a descent direction (round-off, a bad pair): restart from -g
        descent = instance_sum(g_new * d_new, layout) < 0
        d_new = torch.where(broadcast(descent, layout), d_new, -g_new)
        d_new = torch.where(acc, d_new, d)
        if self.line_search:
            step0 = torch.where(started, torch.ones_like(alpha), torch.full_like(alpha, self.lr))
            alpha_new = torch.where(accept, step0, alpha * self.backtrack)
        else:
            alpha_new = torch.full_like(alpha, self.lr)
        trial = x_new + broadcast(alpha_new, layout) * d_new
        new_state = {
            "x": x_new,
            "g": g_new,
            "d": d_new,
            "f": f_kept,
            "alpha": alpha_new,
            "iters": iters + accept.to(iters.dtype),
            **curv_new,
        }
        return trial, new_state


class BFGS(_QuasiNewton):
    """BFGS with the inverse Hessian ``H`` as a dense matrix per instance (module docstring)."""

    name = "bfgs"
    _curvature_keys = ("H", "pairs")

    def __init__(
        self,
        lr: float = 1.0,
        c1: float = 1e-4,
        backtrack: float = 0.5,
        line_search: bool = True,
        max_coordinates: int = 2048,
    ):
        super().__init__(lr, c1, backtrack, line_search)
        self.max_coordinates = int(max_coordinates)

    def _check(self, layout):
        n = layout.instance_numel
        if n > self.max_coordinates:
            raise L2OError(
                f"bfgs keeps an n x n inverse Hessian per problem instance and is limited to "
                f"{self.max_coordinates} coordinates per instance (max_coordinates); this "
                f"problem has {n}: use l-bfgs"
            )

    def _init_curvature(self, theta, layout):
        n = layout.instance_numel
        eye = torch.nn.functional.one_hot(local_index(layout, theta.device), n)
        return {"H": eye.to(theta.dtype), "pairs": theta.new_zeros(layout.instances)}

    def _update_curvature(self, st, s, y, ok, first, layout):
        H = to_instances(st["H"], layout)  # [P, n, n]
        si, yi = to_instances(s, layout), to_instances(y, layout)  # [P, n]
        sy = (si * yi).sum(1)
        yy = (yi * yi).sum(1)
        scale = torch.where(
            first, sy / torch.where(first, yy, torch.ones_like(yy)), torch.ones_like(sy)
        )
        H = H * scale[:, None, None]
        rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        Hy = torch.bmm(H, yi.unsqueeze(2)).squeeze(2)
        yHy = (yi * Hy).sum(1)
        # H+ = H - rho (s Hy^T + Hy s^T) + (rho^2 yHy + rho) s s^T   (rho = 0: H unchanged)
        outer = lambda u, v: u.unsqueeze(2) * v.unsqueeze(1)  # noqa: E731
        H = (
            H
            - rho[:, None, None] * (outer(si, Hy) + outer(Hy, si))
            + (rho * rho * yHy + rho)[:, None, None] * outer(si, si)
        )
        return {"H": from_instances(H, layout), "pairs": st["pairs"] + ok.to(sy.dtype)}

    def _direction(self, st, g, layout):
        H = to_instances(st["H"], layout)
        return from_instances(torch.bmm(H, to_instances(g, layout).unsqueeze(2)).squeeze(2), layout)


class LBFGS(_QuasiNewton):
    """L-BFGS: the last ``memory`` curvature pairs and the two-loop recursion (module docstring)."""

    name = "l-bfgs"
    _curvature_keys = ("S", "Y", "rho", "gamma", "pairs")

    def __init__(
        self,
        lr: float = 1.0,
        memory: int = 10,
        c1: float = 1e-4,
        backtrack: float = 0.5,
        line_search: bool = True,
    ):
        super().__init__(lr, c1, backtrack, line_search)
        if int(memory) < 1:
            raise ValueError(f"memory must be >= 1, got {memory}")
        self.memory = int(memory)

    @property
    def hparams(self) -> dict:
        return {**super().hparams, "memory": self.memory}

    def _init_curvature(self, theta, layout):
        P, m = layout.instances, self.memory
        return {
            "S": theta.new_zeros(theta.numel(), m),
            "Y": theta.new_zeros(theta.numel(), m),
            "rho": theta.new_zeros(P, m),
            "gamma": theta.new_ones(P),
            "pairs": theta.new_zeros(P),
        }

    def _update_curvature(self, st, s, y, ok, first, layout):
        sy = instance_sum(s * y, layout)
        yy = instance_sum(y * y, layout)
        okc = broadcast(ok, layout).unsqueeze(1)
        S = torch.where(okc, torch.cat([st["S"][:, 1:], s.unsqueeze(1)], 1), st["S"])
        Y = torch.where(okc, torch.cat([st["Y"][:, 1:], y.unsqueeze(1)], 1), st["Y"])
        safe = torch.where(ok, sy, torch.ones_like(sy))
        rho = torch.where(
            ok.unsqueeze(1), torch.cat([st["rho"][:, 1:], (1.0 / safe)[:, None]], 1), st["rho"]
        )
        gamma = torch.where(ok, sy / torch.where(ok, yy, torch.ones_like(yy)), st["gamma"])
        return {"S": S, "Y": Y, "rho": rho, "gamma": gamma, "pairs": st["pairs"] + ok.to(sy.dtype)}

    def _direction(self, st, g, layout):
        S, Y, rho = st["S"], st["Y"], st["rho"]
        q, alphas = g, []
        for i in range(self.memory - 1, -1, -1):  # newest pair last
            a = rho[:, i] * instance_sum(S[:, i] * q, layout)
            alphas.append(a)
            q = q - broadcast(a, layout) * Y[:, i]
        r = broadcast(st["gamma"], layout) * q
        for i, a in zip(range(self.memory), reversed(alphas), strict=True):
            b = rho[:, i] * instance_sum(Y[:, i] * r, layout)
            r = r + broadcast(a - b, layout) * S[:, i]
        return r


__all__ = ["BFGS", "LBFGS"]
