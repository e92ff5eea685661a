"""LSTM+GAC: the L2L LSTM with global averaging cells (Andrychowicz et al. 2016, section 2.2).

The coordinatewise LSTM (:mod:`l2o.rules.lstm`) sees one coordinate at a time.  In
LSTM+GAC the *last* ``gac[k]`` cells of layer ``k`` are global averaging cells: after
the layer has run coordinatewise, their outgoing activations ``h`` are replaced by their
average over the coordinates of the problem instance, and that average is what every
coordinate of the instance receives (the next layer's input, the head and, through the
state, the layer's own recurrent input at the next step)::

    h_k, c_k          = LSTMCell_k(x, h_k(t-1), c_k(t-1))             # every coordinate
    h_k[:, GAC cells] = mean over the instance's coordinates of h_k[:, GAC cells]
    x                 = h_k                                           # into layer k + 1

The cell states ``c`` stay per coordinate.  Averages are taken per problem instance
(:func:`l2o.layout.instance_mean`), never across the independent instances of a
meta-batch, and per parameter group when the rule is a sub-rule of a
:class:`~l2o.rules.GroupedRule` (each sub-rule sees its group's layout).  The average is
one ``index_add`` per layer over all coordinates: no Python loop over coordinates.

``gac = 0`` is the coordinatewise LSTM exactly (the same kernels run); a test checks
it.  With enough cells the rule can express L2 gradient-norm clipping (the GAC cells
carry the mean squared gradient, the next layer's gates turn it into the clipping
factor): ``tests/test_coupled.py`` hand-sets such a network and compares it with
:class:`~l2o.rules.ClippedSGD`.

:class:`GACController` (the LSTM+GAC stack alone) is also the controller of the NTM
rules (:mod:`l2o.rules.ntm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..layout import ParamLayout, broadcast, instance_mean, layout_for
from ..preprocess import PREPROCESSINGS, num_features, preprocess
from . import _lstm_kernels as _kernels
from .base import ConfigDict, State
from .lstm import CoordinatewiseLSTM, LSTMRuleConfig, lstm_cell


def _gac_tuple(gac, layers: tuple[int, ...]) -> tuple[int, ...]:
    """``gac`` (one count for every layer, or one per layer) as one count per layer."""
    if isinstance(gac, int | float) and not isinstance(gac, bool):
        counts = (int(gac),) * len(layers)
    else:
        counts = tuple(int(g) for g in gac)
    if len(counts) != len(layers):
        raise ValueError(
            f"gac: expected one count or one per layer ({len(layers)}), got {list(counts)}"
        )
    for k, (g, h) in enumerate(zip(counts, layers, strict=True)):
        if not 0 <= g <= h:
            raise ValueError(f"gac: layer {k} has {h} cells, so 0 <= gac <= {h}; got {g}")
    return counts


@dataclass(frozen=True)
class LSTMGACConfig(LSTMRuleConfig):
    """:class:`~l2o.rules.LSTMRuleConfig` plus ``gac``: global averaging cells per layer.

    ``gac`` is one count for every layer or a tuple with one count per layer; the last
    ``gac[k]`` cells of layer ``k`` are the averaging ones.
    """

    gac: int | tuple[int, ...] = 2

    def __post_init__(self):
        super().__post_init__()
        g = self.gac
        object.__setattr__(
            self, "gac", g if isinstance(g, int) and not isinstance(g, bool) else tuple(g)
        )
        _gac_tuple(self.gac, self.layers)

    @property
    def gac_per_layer(self) -> tuple[int, ...]:
        return _gac_tuple(self.gac, self.layers)


def average_cells(h: Tensor, count: int, layout: ParamLayout) -> Tensor:
    """``h`` ``[N, H]`` with its last ``count`` columns replaced by their per-instance mean."""
    if count == 0:
        return h
    hidden = h.shape[1]
    shared = broadcast(instance_mean(h[:, hidden - count :], layout), layout)
    return torch.cat([h[:, : hidden - count], shared], dim=1)


def run_gac_cells(
    cells: nn.ModuleList,
    gac: tuple[int, ...],
    x: Tensor,
    state: State,
    layout: ParamLayout,
    fast: bool = True,
) -> tuple[Tensor, State]:
    """Stacked LSTM+GAC layers on features ``x`` ``[N, F]``: the last ``h`` and the new state.

    Each layer runs coordinatewise (the blocked kernel of :mod:`l2o.rules._lstm_kernels`,
    or :func:`l2o.rules.lstm.lstm_cell` when ``fast`` is False), then its GAC columns are
    averaged per instance.
    """
    cell_fn = _kernels.lstm_layer if fast else lstm_cell
    new_state: State = {}
    for k, cell in enumerate(cells):
        h, c = cell_fn(x, state[f"h{k}"], state[f"c{k}"], cell.weight_ih, cell.weight_hh, cell.bias)
        h = average_cells(h, gac[k], layout)
        new_state[f"h{k}"], new_state[f"c{k}"] = h, c
        x = h
    return x, new_state


class LSTMGAC(CoordinatewiseLSTM):
    """LSTM+GAC update rule (module docstring): an ``nn.Module`` of meta-parameters.

    Same weights, preprocessing, head and state keys as
    :class:`~l2o.rules.CoordinatewiseLSTM` (so an LSTM's ``state_dict`` loads into it);
    the GAC columns of every layer's ``h`` in the state hold the instance averages.
    """

    name = "lstm-gac"
    coordinatewise = False

    def __init__(self, config: LSTMGACConfig | None = None, **kwargs):
        config = config if config is not None else LSTMGACConfig(**kwargs)
        super().__init__(config)
        self.gac = config.gac_per_layer
        # No averaging cell: the coordinatewise LSTM itself (same kernels, same numbers).
        self.coordinatewise = not any(self.gac)

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        if self.coordinatewise:
            return super().step(theta, grad, loss, state, layout)
        update, new_state = self.update(grad, state, layout_for(theta, layout))
        return theta + update, new_state

    @property
    def update_(self):
        """The LSTM's in-place chunked update (``LearnedOptimizer``) only without GACs: an
        average needs every coordinate of the instance at once."""
        return getattr(super(), "update_", None) if self.coordinatewise else None

    def update(
        self, grad: Tensor, state: State, layout: ParamLayout | None = None
    ) -> tuple[Tensor, State]:
        """The update of every coordinate (``layout`` None: one instance)."""
        if self.coordinatewise:
            return super().update(grad, state)
        return self.gac_update(grad, state, layout_for(grad, layout))

    def gac_update(self, grad: Tensor, state: State, layout: ParamLayout) -> tuple[Tensor, State]:
        """The update ``[N]`` and new state, GAC columns averaged per instance of ``layout``."""
        cfg = self.config
        x = preprocess(grad, cfg.preprocessing, cfg.p, cfg.input_scale).to(self.head.weight.dtype)
        x, new_state = run_gac_cells(self.cells, self.gac, x, state, layout, self.fast_kernels)
        out = torch.addmm(self.head.bias, x, self.head.weight.t()).squeeze(-1)
        return cfg.output_scale * out, new_state

    def gac_activations(self, state: State) -> dict[str, Tensor]:
        """The averaged cells of a state: ``{"h{k}": [N, gac[k]]}`` for layers with GACs."""
        out = {}
        for k, g in enumerate(self.gac):
            if g:
                h = state[f"h{k}"]
                out[f"h{k}"] = h[:, h.shape[1] - g :]
        return out


@dataclass(frozen=True)
class ControllerConfig(ConfigDict):
    """Shared by the NTM rules: the LSTM+GAC controller and its input preprocessing."""

    layers: tuple[int, ...] = (20, 20)
    gac: int | tuple[int, ...] = 2
    preprocessing: str = "logsign"
    p: float = 10.0
    input_scale: float = 1.0
    output_scale: float = 0.1
    zero_head: bool = False
    forget_bias: float = 1.0
    preset: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(h) for h in self.layers))
        if not self.layers or any(h <= 0 for h in self.layers):
            raise ValueError(f"layers must be one or more positive sizes, got {self.layers}")
        g = self.gac
        object.__setattr__(
            self, "gac", g if isinstance(g, int) and not isinstance(g, bool) else tuple(g)
        )
        _gac_tuple(self.gac, self.layers)
        if self.preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"preprocessing must be one of {PREPROCESSINGS}, got {self.preprocessing!r}"
            )
        if not self.p > 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if not (self.output_scale == self.output_scale and self.output_scale != 0):
            raise ValueError(f"output_scale must be finite and non-zero, got {self.output_scale}")

    @property
    def gac_per_layer(self) -> tuple[int, ...]:
        return _gac_tuple(self.gac, self.layers)

    @property
    def features(self) -> int:
        return num_features(self.preprocessing)


__all__ = [
    "LSTMGAC",
    "ControllerConfig",
    "LSTMGACConfig",
    "average_cells",
    "run_gac_cells",
    "widen_lstm",
]


def _widen_cells(old_cells: nn.ModuleList, new_cells: nn.ModuleList) -> None:
    """Copy each old LSTM layer into the first cells of the wider new one (gates i, f, g, o).

    The new (averaging) cells keep their fresh initialisation, but every weight from them
    into an old cell is zero, and so are the weights from new input features (the last
    columns: an NTM's reads) into old cells: the old cells compute what they computed.
    """
    for old, new in zip(old_cells, new_cells, strict=True):
        H, H2 = old.weight_hh.shape[1], new.weight_hh.shape[1]
        n_in = old.weight_ih.shape[1]
        with torch.no_grad():
            for q in range(4):
                rows_old, rows_new = slice(q * H, (q + 1) * H), slice(q * H2, q * H2 + H)
                new.weight_ih[rows_new] = 0.0
                new.weight_ih[rows_new, :n_in] = old.weight_ih[rows_old]
                new.weight_hh[rows_new] = 0.0
                new.weight_hh[rows_new, :H] = old.weight_hh[rows_old]
                new.bias[rows_new] = old.bias[rows_old]


def widen_lstm(lstm: CoordinatewiseLSTM, gac: int = 2) -> LSTMGAC:
    """An LSTM+GAC that computes exactly what ``lstm`` computes, plus ``gac`` averaging cells.

    Every layer gets ``gac`` new cells (the averaging ones, last); the old cells keep
    their weights, and every weight from a new cell into an old cell or into the head is
    zero, so the first updates are the LSTM's (to float rounding of the wider matmuls).
    Meta-training from there learns to use the averages (a warm start from a trained LSTM:
    ``pretrained/mnist-gac``'s recipe).
    """
    d = lstm.config.to_dict()
    d["layers"] = [h + gac for h in lstm.config.layers]
    rule = LSTMGAC(LSTMGACConfig.from_dict({**d, "gac": gac}))
    rule = rule.to(dtype=lstm.head.weight.dtype)
    _widen_cells(lstm.cells, rule.cells)
    with torch.no_grad():
        H = lstm.head.weight.shape[1]
        rule.head.weight.zero_()
        rule.head.weight[:, :H] = lstm.head.weight
        rule.head.bias.copy_(lstm.head.bias)
    return rule
