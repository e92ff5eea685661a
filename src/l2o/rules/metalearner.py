"""The Meta-Learner LSTM of Ravi & Larochelle (ICLR 2017) as an update rule.

Gradient descent ``theta_t = theta_{t-1} - alpha g_t`` is an LSTM cell update
``c_t = f_t * c_{t-1} + i_t * c~_t`` with ``c = theta``, ``c~ = -g``, ``i = alpha``,
``f = 1``.  The meta-learner learns the gates, per coordinate and per step, and the
initial cell state ``c_0 = c_I`` (the learner's initialisation).  As in the
official code (which differs from the paper's equations, see the reference spec
section 1.2), for every coordinate j of the flat parameter vector:

    x_t        = [pre(L_t), pre(g_t^j)]                          # 4 features, p = 10
    h_t, s_t   = LSTM_1(x_t, (h_{t-1}, s_{t-1}))                 # 4 -> 20, shared weights
    a^f_t      = W_F . [h_t ; theta_{t-1} ; a^f_{t-1}] + b_F     # pre-activation fed back
    a^i_t      = W_I . [h_t ; theta_{t-1} ; a^i_{t-1}] + b_I     # theta enters raw
    theta_t    = sigmoid(a^f_t) theta_{t-1} - sigmoid(a^i_t) g_t # the raw gradient

with ``a^f_0 = a^i_0 = 0``.  Initialisation as the official code: every weight
U(-0.01, 0.01) (layer 1 included, one bias vector), ``b_F ~ U(4, 5)`` and
``b_I ~ U(-5, -4)`` so the rule starts close to gradient descent with a small step
and a slight weight decay; ``c_I`` is set by the caller to the learner's default
initialisation (:meth:`MetaLearnerLSTM.set_init`).

The rule is pure like every rule of :mod:`l2o.rules`: the caller decides what is
differentiable.  The paper ignores second derivatives: the caller passes ``loss``
and ``grad`` detached, while the chain ``c_0 -> ... -> c_T`` (gates depend on
theta) stays in the graph; passing them with their graph gives the second-order
variant.  ``sigmoid(state["a_f"])`` and ``sigmoid(state["a_i"])`` are the gate
values of the last step (the paper's figure 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layout import ParamLayout, broadcast, layout_for
from ..preprocess import log_sign
from ._lstm_kernels import gate_scale
from .base import ConfigDict, State


@dataclass(frozen=True)
class MetaLearnerConfig(ConfigDict):
    """Hyperparameters of :class:`MetaLearnerLSTM`."""

    num_params: int
    hidden: int = 20
    p: float = 10.0
    init_range: float = 0.01
    forget_bias: tuple[float, float] = (4.0, 5.0)  # official code; the PyTorch port uses (4, 6)
    input_bias: tuple[float, float] = (-5.0, -4.0)

    def __post_init__(self):
        object.__setattr__(self, "forget_bias", tuple(float(v) for v in self.forget_bias))
        object.__setattr__(self, "input_bias", tuple(float(v) for v in self.input_bias))
        if self.num_params < 1 or self.hidden < 1 or not self.p > 0:
            raise ValueError(f"invalid meta-learner config {self}")


class MetaLearnerLSTM(nn.Module):
    """Ravi & Larochelle's two-layer meta-learner; ``c_I`` is a parameter of size ``num_params``."""

    name = "meta-lstm"
    needs_loss = True
    coordinatewise = True

    def __init__(self, config: MetaLearnerConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else MetaLearnerConfig(**kwargs)
        h = self.config.hidden
        self.weight_ih = nn.Parameter(torch.empty(4 * h, 4))
        self.weight_hh = nn.Parameter(torch.empty(4 * h, h))
        self.bias = nn.Parameter(torch.empty(4 * h))
        self.w_f = nn.Parameter(torch.empty(h + 2))  # [h ; theta ; a^f_{t-1}]
        self.w_i = nn.Parameter(torch.empty(h + 2))
        self.b_f = nn.Parameter(torch.empty(()))
        self.b_i = nn.Parameter(torch.empty(()))
        self.c_init = nn.Parameter(torch.zeros(self.config.num_params))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r = self.config.init_range
        with torch.no_grad():
            for w in (self.weight_ih, self.weight_hh, self.bias, self.w_f, self.w_i):
                w.uniform_(-r, r)
            self.b_f.uniform_(*self.config.forget_bias)
            self.b_i.uniform_(*self.config.input_bias)

    def set_init(self, theta0: Tensor) -> None:
        """Set ``c_I`` (the learned initialisation) to ``theta0``, e.g. the learner's default init."""
        if theta0.shape != self.c_init.shape:
            raise ValueError(
                f"c_I has {self.c_init.numel()} coordinates, got {tuple(theta0.shape)}"
            )
        with torch.no_grad():
            self.c_init.copy_(theta0)

    # -- update-rule interface -------------------------------------------------
    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        n, h = theta.numel(), self.config.hidden
        z = theta.new_zeros
        return {"h": z(n, h), "c": z(n, h), "a_f": z(n), "a_i": z(n)}

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        if loss is None:
            raise ValueError("the Meta-Learner LSTM needs the learner's loss (needs_loss = True)")
        cfg = self.config
        layout = layout_for(theta, layout)
        # Each coordinate reads its own instance's loss (one value per instance, or one scalar).
        loss = loss.reshape(-1) if loss.dim() else loss.reshape(1)
        x = torch.cat([broadcast(log_sign(loss, cfg.p), layout), log_sign(grad, cfg.p)], dim=1)
        hd = cfg.hidden
        # One LSTM step (gate order i, f, g, o): a single matmul and one contiguous sigmoid
        # over all gates is ~1.6x faster on CPU than per-gate calls on strided chunks.  tanh
        # is computed as 2 sigmoid(2z) - 1 (exact up to rounding): PyTorch's CPU tanh is
        # several times slower than its sigmoid, and this step runs on every coordinate.
        w = torch.cat([self.weight_ih, self.weight_hh], 1)
        s = gate_scale(hd, w.dtype, w.device)
        gates = torch.addmm(self.bias * s, torch.cat([x, state["h"]], 1), (w * s[:, None]).t())
        sig = torch.sigmoid(gates)
        tanh_g = sig[:, 2 * hd : 3 * hd] * 2.0 - 1.0
        c = torch.addcmul(sig[:, hd : 2 * hd] * state["c"], sig[:, :hd], tanh_g)
        h = sig[:, 3 * hd :] * (torch.sigmoid(c * 2.0) * 2.0 - 1.0)
        a_f = h @ self.w_f[:hd] + self.w_f[hd] * theta + self.w_f[hd + 1] * state["a_f"] + self.b_f
        a_i = h @ self.w_i[:hd] + self.w_i[hd] * theta + self.w_i[hd + 1] * state["a_i"] + self.b_i
        new_theta = torch.sigmoid(a_f) * theta - torch.sigmoid(a_i) * grad
        return new_theta, {"h": h, "c": c, "a_f": a_f, "a_i": a_i}

    @staticmethod
    def gates(state: State) -> tuple[Tensor, Tensor]:
        """(forget, input) gate values of the step that produced ``state``."""
        return torch.sigmoid(state["a_f"]), torch.sigmoid(state["a_i"])

    def describe(self) -> dict:
        return {"rule": self.name, "config": self.config.to_dict()}
