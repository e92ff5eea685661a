"""The L2L coordinatewise LSTM optimizer (Andrychowicz et al., 2016, section 2.1).

One small LSTM (default two layers of 20 units) with weights phi shared by every
scalar parameter of the optimizee; each coordinate keeps its own (h, c) per layer.
At each step it reads the (preprocessed) gradient of its coordinate and outputs
that coordinate's update:

    x_t        = preprocess(g_t)                  # [N, F], F = 2 for log/sign
    h_t, c_t   = LSTM_phi(x_t, (h_{t-1}, c_{t-1}))  # all N coordinates are one batch
    theta_{t+1} = theta_t + output_scale * W h_t + b

Because the weights are shared and the coordinates form the batch dimension, the
optimizer is invariant to parameter order and its size is independent of the
optimizee's: the same 3k-weight network drives a 10-parameter quadratic and a
1M-parameter network.

Preprocessing presets (see :data:`PRESETS`): the paper's log/sign with p = 10 and
output x 0.1 (MNIST), the official code's k = 5 and x 0.01, and no preprocessing
with scale 1 (the paper's quadratics).  ``layers=()`` gives the official code's
"linear net" (a Linear head on the raw features), used by its golden tests.

Initialisation follows the official code (Sonnet 1): truncated normal weights and
biases with std 1/sqrt(fan_in), +1 on the forget-gate bias, optional zero head
(then the first update is exactly 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..layout import ParamLayout
from ..preprocess import PREPROCESSINGS, num_features, preprocess
from . import _lstm_compiled as _compiled
from . import _lstm_kernels as _kernels
from . import _lstm_native as _native
from .base import ConfigDict, State

PRESETS: dict[str, dict] = {
    # Andrychowicz et al. 2016, Appendix A and the MNIST experiments.
    "paper": {"preprocessing": "logsign", "p": 10.0, "output_scale": 0.1},
    # deepmind/learning-to-learn default net config (MNIST, CIFAR).
    "code": {"preprocessing": "logsign", "p": 5.0, "output_scale": 0.01},
    # The paper's quadratics: raw gradient in, raw update out.
    "paper-quadratic": {"preprocessing": "none", "output_scale": 1.0},
}


@dataclass(frozen=True)
class LSTMRuleConfig(ConfigDict):
    """Hyperparameters of :class:`CoordinatewiseLSTM` (stored in every artifact)."""

    layers: tuple[int, ...] = (20, 20)
    preprocessing: str = "logsign"
    p: float = 10.0
    input_scale: float = 1.0
    output_scale: float = 0.1
    zero_head: bool = False
    forget_bias: float = 1.0
    preset: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(h) for h in self.layers))
        if any(h <= 0 for h in self.layers):
            raise ValueError(f"layers must be positive sizes, got {self.layers}")
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"preprocessing must be one of {PREPROCESSINGS}, got {self.preprocessing!r}"
            )
        if not self.p > 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if not math.isfinite(self.output_scale) or self.output_scale == 0:
            raise ValueError(f"output_scale must be finite and non-zero, got {self.output_scale}")

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> LSTMRuleConfig:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return cls(**{**PRESETS[preset], **overrides, "preset": preset})


def lstm_layers(in_size: int, layers: tuple[int, ...]) -> tuple[nn.ModuleList, int]:
    """Uninitialised stacked LSTM cells (weight_ih, weight_hh, one bias; gates i, f, g, o).

    Returns the cells and the size of the last layer's output.
    """
    cells = nn.ModuleList()
    for hidden in layers:
        cell = nn.Module()
        cell.weight_ih = nn.Parameter(torch.empty(4 * hidden, in_size))
        cell.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden))
        cell.bias = nn.Parameter(torch.empty(4 * hidden))
        cells.append(cell)
        in_size = hidden
    return cells, in_size


def _trunc_normal_(t: Tensor, std: float) -> Tensor:
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2 * std, b=2 * std)


class CoordinatewiseLSTM(nn.Module):
    """L2L coordinatewise LSTM update rule (an ``nn.Module`` of meta-parameters).

    Gate layout per layer is PyTorch's (i, f, g, o), with one bias vector, so
    weights of two ``nn.LSTMCell``s can be loaded (``bias = b_ih + b_hh``).
    :meth:`update` runs the blocked kernels of :mod:`l2o.rules._lstm_kernels`
    (throughput against two ``nn.LSTMCell``: ``benchmarks/throughput.py``).
    """

    name = "lstm"
    needs_loss = False
    coordinatewise = True
    #: Use the kernels of :mod:`l2o.rules._lstm_kernels` (False: the plain reference).
    fast_kernels = True
    #: Use the compiled kernels of :mod:`l2o.rules._lstm_native` (the no-grad step, and
    #: the layers' forward and elementwise backward in meta-training) where they build
    #: and cover the update (False: always the PyTorch kernels; the environment variable
    #: ``L2O_NATIVE`` decides for all rules).
    native_kernel = True
    #: ``update_(..., compiled=True)`` is available (``LearnedOptimizer(compile=True)``).
    compilable_step = True

    def __init__(self, config: LSTMRuleConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else LSTMRuleConfig(**kwargs)
        cfg = self.config
        self.cells, out_size = lstm_layers(num_features(cfg.preprocessing), cfg.layers)
        self.head = nn.Linear(out_size, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official-code (Sonnet 1) initialisation; see the module docstring."""
        for cell in self.cells:
            hidden = cell.weight_hh.shape[1]
            std = 1.0 / math.sqrt(cell.weight_ih.shape[1] + hidden)
            with torch.no_grad():
                _trunc_normal_(cell.weight_ih, std)
                _trunc_normal_(cell.weight_hh, std)
                _trunc_normal_(cell.bias, std)
                cell.bias[hidden : 2 * hidden] += self.config.forget_bias
        with torch.no_grad():
            if self.config.zero_head:
                self.head.weight.zero_()
                self.head.bias.zero_()
            else:
                std = 1.0 / math.sqrt(self.head.in_features)
                _trunc_normal_(self.head.weight, std)
                _trunc_normal_(self.head.bias, std)

    # -- update-rule interface -------------------------------------------------
    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        n = theta.numel()
        state: State = {}
        for k, cell in enumerate(self.cells):
            hidden = cell.weight_hh.shape[1]
            state[f"h{k}"] = theta.new_zeros(n, hidden)
            state[f"c{k}"] = theta.new_zeros(n, hidden)
        return state

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        update, new_state = self.update(grad, state)
        return theta + update, new_state

    def update(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        """The update for every coordinate of the flat gradient ``grad`` ([N]).

        Without autograd (``torch.no_grad()``, or nothing involved requires grad:
        evaluation, the ``torch.optim`` adapter) this runs the compiled fused step
        (:mod:`l2o.rules._lstm_native`, CPU float32) or else the blocked in-place
        kernel; otherwise one autograd Function per layer with a hand-written,
        first-order backward (see :mod:`l2o.rules._lstm_kernels`).  All equal
        :func:`_reference_update` (the straightforward implementation) up to float
        rounding; ``fast_kernels = False`` (class or instance attribute) selects the
        reference itself, e.g. to differentiate the rule's own backward (double
        backward through the LSTM), which the fast Function does not support.
        """
        if not self.fast_kernels:
            return _reference_update(self, grad, state)
        if not torch.is_grad_enabled() or not (
            grad.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or any(v.requires_grad for v in state.values())
        ):
            lib = self._native_kernel(grad, state)
            if lib is not None:
                return _native.update(self, lib, grad, state, inplace=False)
            return _kernels.update_no_grad(self, grad, state)
        return _kernels.update_autograd(self, grad, state)

    @torch.no_grad()
    def update_(self, grad: Tensor, state: State, compiled: bool = False) -> Tensor:
        """:meth:`update` in place, without autograd: returns the update and overwrites
        ``state``'s tensors with the new state (no ``[N, hidden]`` temporaries).

        For callers that own the state (:class:`l2o.optim.LearnedOptimizer`).  The
        state may be stored in another float dtype (bfloat16); the math runs in the
        rule's dtype.  ``compiled=True`` runs the step through ``torch.compile``
        (:mod:`l2o.rules._lstm_compiled`: the fused path for CUDA; slower than the
        compiled C++ step on CPU).
        """
        if compiled:
            return _compiled.update_(self, grad, state)
        if not self.fast_kernels:
            update, new_state = _reference_update(self, grad, state)
            for k, v in new_state.items():
                state[k].copy_(v)
            return update
        lib = self._native_kernel(grad, state)
        if lib is not None:
            return _native.update(self, lib, grad, state, inplace=True)[0]
        return _kernels.update_no_grad(self, grad, state, inplace=True)[0]

    def _native_kernel(self, grad: Tensor, state: State):
        """The compiled step (:mod:`l2o.rules._lstm_native`) when it is enabled, builds
        and covers this update; None selects the PyTorch kernel."""
        mode = _native.mode()
        if mode == "off" or not self.native_kernel:
            return None
        why = _native.unsupported(self, grad, state)
        if why is None:
            hidden = _native.hidden_sizes(self)
            lib = _native.load(hidden)
            if lib is not None:
                return lib
            why = _native.status(hidden)
        if mode == "on":
            raise _native.NativeKernelError(
                f"L2O_NATIVE=1 but the compiled LSTM step cannot run: {why}"
            )
        return None

    def describe(self) -> dict:
        return {"rule": self.name, "config": self.config.to_dict()}


def run_cells(cells: nn.ModuleList, x: Tensor, state: State, cell_fn=None) -> tuple[Tensor, State]:
    """Stacked LSTM layers on features ``x`` ``[N, F]``: the last layer's ``h`` and the new state.

    ``cell_fn(x, h, c, w_ih, w_hh, bias) -> (h, c)`` is :func:`lstm_cell` by default, or
    the blocked :func:`l2o.rules._lstm_kernels.lstm_layer`.
    """
    cell_fn = cell_fn or lstm_cell
    new_state: State = {}
    for k, cell in enumerate(cells):
        h, c = cell_fn(x, state[f"h{k}"], state[f"c{k}"], cell.weight_ih, cell.weight_hh, cell.bias)
        new_state[f"h{k}"], new_state[f"c{k}"] = h, c
        x = h
    return x, new_state


def update_with_cells(
    rule: CoordinatewiseLSTM, grad: Tensor, state: State, cell_fn=None
) -> tuple[Tensor, State]:
    """``rule.update`` as ordinary autograd ops around ``cell_fn`` (see :func:`run_cells`)."""
    cfg = rule.config
    x = preprocess(grad, cfg.preprocessing, cfg.p, cfg.input_scale).to(rule.head.weight.dtype)
    x, new_state = run_cells(rule.cells, x, state, cell_fn)
    out = torch.addmm(rule.head.bias, x, rule.head.weight.t()).squeeze(-1)
    return cfg.output_scale * out, new_state


def _reference_update(rule: CoordinatewiseLSTM, grad: Tensor, state: State) -> tuple[Tensor, State]:
    """The straightforward implementation (kept as the reference of the fast kernels' tests)."""
    return update_with_cells(rule, grad, state, lstm_cell)


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    """One LSTM step for a batch of coordinates (gate order i, f, g, o).

    tanh(z) is computed as 2 sigmoid(2z) - 1 with one sigmoid over all gates: equal up
    to float rounding, and several times faster on CPU, where PyTorch's tanh is slow.
    """
    gates = torch.addmm(torch.addmm(bias, x, w_ih.t()), h, w_hh.t())
    scale = _kernels.gate_scale(gates.shape[1] // 4, gates.dtype, gates.device)
    i, f, g, o = torch.sigmoid(gates * scale).chunk(4, dim=1)
    c = f * c + i * (2.0 * g - 1.0)
    h = o * (2.0 * torch.sigmoid(2.0 * c) - 1.0)
    return h, c
