"""Hand-designed update rules: SGD, NAG, RMSprop, Adam.

Each matches the corresponding ``torch.optim`` optimizer (same defaults, same
operation order) to float precision; ``tests/test_rules.py`` checks this.  They
are written out-of-place so they are differentiable when asked (for example an
SGD inner loop inside MAML).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layout import broadcast, instance_sum, layout_for
from .base import State


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    return lr


class SGD:
    """Plain gradient descent: theta <- theta - lr * g."""

    name = "sgd"
    needs_loss = False
    coordinatewise = True

    def __init__(self, lr: float = 0.01):
        self.lr = _check_lr(lr)

    @property
    def hparams(self) -> dict:
        return {"lr": self.lr}

    def init(self, theta: Tensor, layout=None) -> State:
        return {}

    def step(self, theta, grad, loss, state, layout=None):
        return theta - self.lr * grad, state


class NAG:
    """Nesterov momentum as in ``torch.optim.SGD(momentum=mu, nesterov=True)``.

    1. b <- mu * b + g            (b starts at 0, so b_1 = g)
    2. theta <- theta - lr * (g + mu * b)
    """

    name = "nag"
    needs_loss = False
    coordinatewise = True

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        self.lr = _check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    @property
    def hparams(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum}

    def init(self, theta: Tensor, layout=None) -> State:
        return {"momentum_buffer": torch.zeros_like(theta)}

    def step(self, theta, grad, loss, state, layout=None):
        buf = self.momentum * state["momentum_buffer"] + grad
        return theta - self.lr * (grad + self.momentum * buf), {"momentum_buffer": buf}


class RMSprop:
    """RMSprop as in ``torch.optim.RMSprop`` (alpha 0.99, eps 1e-8, no momentum).

    1. v <- alpha * v + (1 - alpha) * g^2
    2. theta <- theta - lr * g / (sqrt(v) + eps)
    """

    name = "rmsprop"
    needs_loss = False
    coordinatewise = True

    def __init__(self, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8):
        self.lr = _check_lr(lr)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.alpha, self.eps = float(alpha), float(eps)

    @property
    def hparams(self) -> dict:
        return {"lr": self.lr, "alpha": self.alpha, "eps": self.eps}

    def init(self, theta: Tensor, layout=None) -> State:
        return {"square_avg": torch.zeros_like(theta)}

    def step(self, theta, grad, loss, state, layout=None):
        v = self.alpha * state["square_avg"] + (1 - self.alpha) * grad * grad
        return theta - self.lr * grad / (v.sqrt() + self.eps), {"square_avg": v}


class Adam:
    """Adam as in ``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8).

    1. m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2 ;  t <- t + 1
    2. theta <- theta - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    name = "adam"
    needs_loss = False
    coordinatewise = True

    def __init__(self, lr: float = 0.001, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr = _check_lr(lr)
        for nm, b in (("b1", b1), ("b2", b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{nm} must be in [0, 1), got {b}")
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)

    @property
    def hparams(self) -> dict:
        return {"lr": self.lr, "b1": self.b1, "b2": self.b2, "eps": self.eps}

    def init(self, theta: Tensor, layout=None) -> State:
        return {
            # float32 like torch.optim.Adam: a bf16/fp16 counter would stop at 256/2048.
            "step": torch.zeros((), dtype=torch.float32, device=theta.device),
            "exp_avg": torch.zeros_like(theta),
            "exp_avg_sq": torch.zeros_like(theta),
        }

    def step(self, theta, grad, loss, state, layout=None):
        t = state["step"] + 1
        m = torch.lerp(state["exp_avg"], grad, 1 - self.b1)  # same op as torch.optim.Adam
        v = self.b2 * state["exp_avg_sq"] + (1 - self.b2) * grad * grad
        n = float(t)
        bias1 = 1 - self.b1**n
        bias2_sqrt = math.sqrt(1 - self.b2**n)
        denom = v.sqrt() / bias2_sqrt + self.eps
        new = theta - (self.lr / bias1) * m / denom
        return new, {"step": t, "exp_avg": m, "exp_avg_sq": v}


class ClippedSGD:
    """Gradient descent with the gradient's L2 norm clipped, per problem instance.

    theta <- theta - lr * g * min(1, max_norm / ||g||), ``||g||`` over the coordinates of
    each instance (``torch.nn.utils.clip_grad_norm_`` applied to one model, then SGD).
    It couples coordinates (``coordinatewise = False``): the norm is a reduction, taken
    per instance through the layout so independent problems batched together stay
    independent.  It is also what a hand-set LSTM+GAC can express (L2L section 2.2).
    """

    name = "clipped-sgd"
    needs_loss = False
    coordinatewise = False

    def __init__(self, lr: float = 0.01, max_norm: float = 1.0):
        self.lr = _check_lr(lr)
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
        self.max_norm = float(max_norm)

    @property
    def hparams(self) -> dict:
        return {"lr": self.lr, "max_norm": self.max_norm}

    def init(self, theta: Tensor, layout=None) -> State:
        return {}

    def step(self, theta, grad, loss, state, layout=None):
        layout = layout_for(theta, layout)
        norm = instance_sum(grad * grad, layout).sqrt()  # [P]
        # clip_grad_norm_'s factor: max_norm / (norm + 1e-6), capped at 1
        scale = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        return theta - self.lr * grad * broadcast(scale, layout), state


CLASSIC_RULES = {
    "sgd": SGD,
    "nag": NAG,
    "rmsprop": RMSprop,
    "adam": Adam,
    "clipped-sgd": ClippedSGD,
}
