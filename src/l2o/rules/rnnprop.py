"""RNNprop: a coordinatewise LSTM fed with Adam-normalized inputs (Lv et al., 2017).

The L2L LSTM sees only the (log/sign preprocessed) gradient of its coordinate,
whose scale differs from one network to the next; it fails, for example, when
trained on sigmoid MLPs and run on ReLU ones.  RNNprop (Lv, Jiang and Li,
"Learning Gradient Descent: Better Generalization and Longer Horizons", ICML
2017) gives it scale-free inputs instead, built from running moment estimates
kept in the rule's state for every coordinate:

    m_t = b1 m_{t-1} + (1 - b1) g_t          v_t = b2 v_{t-1} + (1 - b2) g_t^2
    m^_t = m_t / (1 - b1^t)                  v^_t = v_t / (1 - b2^t)
    x_t = [ m^_t / (sqrt(v^_t) + eps),  g_t / (sqrt(v^_t) + eps) ]
    z_t = ELU(W_in x_t + b_in)                                 (input layer, 20 units)
    h_t = LSTM_phi(z_t, h_{t-1})                               (2 x 20, coordinatewise)
    theta_{t+1} = theta_t + output_scale * tanh(W_out h_t + b_out)

The update is bounded by ``output_scale`` (RNNprop's alpha = 0.1) and invariant
to a rescaling of the loss, like Adam's.  b1 = b2 = 0.95 as in the paper.  Like
:class:`~l2o.rules.lstm.CoordinatewiseLSTM`, one small network with shared weights
drives every coordinate of the flat parameter vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layout import ParamLayout
from . import _lstm_kernels as _kernels
from .base import ConfigDict, State
from .lstm import _trunc_normal_, lstm_cell, lstm_layers, run_cells


@dataclass(frozen=True)
class RNNpropConfig(ConfigDict):
    """Hyperparameters of :class:`RNNprop` (stored in every artifact)."""

    ignore_unknown_keys = True  # other rules' keys (``preset``, ``p``...) may be present

    layers: tuple[int, ...] = (20, 20)
    input_layer: int = 20  # units of the ELU input layer; 0 = feed the two features to the LSTM
    beta1: float = 0.95
    beta2: float = 0.95
    eps: float = 1e-8
    output_scale: float = 0.1  # alpha: the largest step of a coordinate
    zero_head: bool = False
    forget_bias: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(h) for h in self.layers))
        if not self.layers or any(h <= 0 for h in self.layers):
            raise ValueError(f"layers must be one or more positive sizes, got {self.layers}")
        if self.input_layer < 0:
            raise ValueError(f"input_layer must be >= 0, got {self.input_layer}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not (self.eps > 0 and math.isfinite(self.output_scale) and self.output_scale > 0):
            raise ValueError("eps and output_scale must be positive")


class RNNprop(nn.Module):
    """RNNprop update rule (module docstring); the update-rule interface of :mod:`l2o.rules.base`."""

    name = "rnnprop"
    needs_loss = False
    coordinatewise = True
    #: Run the LSTM layers with :func:`l2o.rules._lstm_kernels.lstm_layer` (False: ``lstm_cell``).
    fast_kernels = True

    def __init__(self, config: RNNpropConfig | None = None, **kwargs):
        super().__init__()
        self.config = cfg = config if config is not None else RNNpropConfig(**kwargs)
        in_size = 2
        self.inp = None
        if cfg.input_layer:
            self.inp = nn.Linear(2, cfg.input_layer)
            in_size = cfg.input_layer
        self.cells, out_size = lstm_layers(in_size, cfg.layers)
        self.head = nn.Linear(out_size, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.inp is not None:
                _trunc_normal_(self.inp.weight, 1.0 / math.sqrt(2))
                self.inp.bias.zero_()
            for cell in self.cells:
                hidden = cell.weight_hh.shape[1]
                std = 1.0 / math.sqrt(cell.weight_ih.shape[1] + hidden)
                _trunc_normal_(cell.weight_ih, std)
                _trunc_normal_(cell.weight_hh, std)
                _trunc_normal_(cell.bias, std)
                cell.bias[hidden : 2 * hidden] += self.config.forget_bias
            if self.config.zero_head:
                self.head.weight.zero_()
                self.head.bias.zero_()
            else:
                std = 1.0 / math.sqrt(self.head.in_features)
                _trunc_normal_(self.head.weight, std)
                self.head.bias.zero_()

    # -- update-rule interface -------------------------------------------------
    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        n = theta.numel()
        state: State = {
            "step": theta.new_zeros(()),
            "m": theta.new_zeros(n),
            "v": theta.new_zeros(n),
        }
        for k, cell in enumerate(self.cells):
            hidden = cell.weight_hh.shape[1]
            state[f"h{k}"] = theta.new_zeros(n, hidden)
            state[f"c{k}"] = theta.new_zeros(n, hidden)
        return state

    def features(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        """The two normalized inputs ``[N, 2]`` and the updated moment state."""
        cfg = self.config
        t = state["step"] + 1
        m = cfg.beta1 * state["m"] + (1 - cfg.beta1) * grad
        v = cfg.beta2 * state["v"] + (1 - cfg.beta2) * grad * grad
        n = float(t)
        m_hat = m / (1 - cfg.beta1**n)
        denom = (v / (1 - cfg.beta2**n)).sqrt() + cfg.eps
        x = torch.stack([m_hat / denom, grad / denom], dim=1)
        return x, {"step": t, "m": m, "v": v}

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        x, new_state = self.features(grad, state)
        x = x.to(self.head.weight.dtype)
        if self.inp is not None:
            x = F.elu(torch.addmm(self.inp.bias, x, self.inp.weight.t()))
        # The blocked kernel (first-order backward) unless the reference is asked for,
        # e.g. to differentiate through the rule's own backward.
        cell_fn = _kernels.lstm_layer if self.fast_kernels else lstm_cell
        x, cells_state = run_cells(self.cells, x, state, cell_fn)
        new_state.update(cells_state)
        out = torch.addmm(self.head.bias, x, self.head.weight.t()).squeeze(-1)
        update = self.config.output_scale * torch.tanh(out)
        return theta + update.to(theta.dtype), new_state

    def describe(self) -> dict:
        return {"rule": self.name, "config": self.config.to_dict()}
