"""NTM-BFGS and NTM-L-BFGS: an LSTM+GAC controller with an external memory (L2L Appendix B).

An LSTM+GAC controller (:mod:`l2o.rules.gac`) runs coordinatewise and reads from and
writes to a memory ``M`` that plays the role of an inverse-Hessian approximation, one
memory per problem instance (and per parameter group under a
:class:`~l2o.rules.GroupedRule`).  Each coordinate ``i`` of an instance with ``n``
coordinates emits, from its controller output ``h_i``, one linear head::

    u_i, r_i (R read heads), a_i, b_i (W write heads) = Linear(h_i)

and one step is::

    x_i   = [preprocess(g_i), rho_i(t-1)]                  # gradient + last step's reads
    h_i   = LSTM+GAC(x_i)                                  # GAC averages per instance
    M    <- M + (1/n) sum_h a_h b_h^T                      # W rank-one writes
    rho   = M r                                            # R reads; rho_i returns to i
    theta_i <- theta_i + output_scale * (u_i + sum_k rho_{k,i})

``M`` starts at ``memory_init * I``.  The writes and reads are batched matrix products
over instances (``baddbmm`` / ``bmm``, heads in the contraction): no Python loop over
coordinates or heads.  Defaults follow the paper's BFGS construction: 1 read head, 3
write heads, 2 GACs per layer.  (BFGS's inverse update is three rank-one terms,
``-rho s (Hy)^T``, ``-rho (Hy) s^T`` and ``(rho^2 y^T H y + rho) s s^T``, whose scalars
are averages over coordinates: two GACs.)

* :class:`NTMBFGS` (``ntm-bfgs``) keeps ``M`` as a matrix: ``n x n`` per instance, for
  small problems (quadratics).  Above ``max_coordinates`` coordinates per instance it is
  an :class:`~l2o.errors.L2OError` naming ``ntm-lbfgs``.
* :class:`NTMLBFGS` (``ntm-lbfgs``) keeps ``M`` implicitly as the last ``window`` write
  pairs, ``M = memory_init * I + (1/n) sum_k a_k b_k^T``, applied in ``O(n window)``
  (one per-instance reduction ``B^T r``), so it scales to the MNIST MLP.  With a window of
  at least ``write_heads x steps`` no pair ever leaves it and it computes exactly what
  ``ntm-bfgs`` computes (a test).

State, all per coordinate (leading dimension = the number of coordinates, so the
:class:`~l2o.optim.LearnedOptimizer` splits it per parameter like an LSTM's): the
controller's ``h{k}``/``c{k}``, the last reads ``read`` ``[N, R]``, and ``memory``
``[N, n]`` (row ``i`` is row ``j(i)`` of its instance's ``M``, ``j(i)`` the coordinate's
index within its instance) for ``ntm-bfgs``, ``write_a``/``write_b`` ``[N, window]``
(oldest pair first) for ``ntm-lbfgs``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import L2OError
from ..layout import ParamLayout, broadcast, instance_sum, layout_for
from ..preprocess import preprocess
from .base import State
from .gac import ControllerConfig, run_gac_cells
from .lstm import _trunc_normal_, lstm_layers


@dataclass(frozen=True)
class NTMBFGSConfig(ControllerConfig):
    """Hyperparameters of :class:`NTMBFGS` (stored in every artifact)."""

    read_heads: int = 1
    write_heads: int = 3
    memory_init: float = 1.0  # M starts at memory_init * I
    max_coordinates: int = 2048  # per instance: the n x n memory's limit

    def __post_init__(self):
        super().__post_init__()
        if self.read_heads < 1 or self.write_heads < 1:
            raise ValueError(
                f"read_heads and write_heads must be >= 1, got {self.read_heads}, {self.write_heads}"
            )
        if not math.isfinite(self.memory_init):
            raise ValueError(f"memory_init must be finite, got {self.memory_init}")
        if self.max_coordinates < 1:
            raise ValueError(f"max_coordinates must be >= 1, got {self.max_coordinates}")


@dataclass(frozen=True)
class NTMLBFGSConfig(ControllerConfig):
    """Hyperparameters of :class:`NTMLBFGS` (stored in every artifact)."""

    read_heads: int = 1
    write_heads: int = 3
    memory_init: float = 1.0
    window: int = 30  # write pairs kept (10 steps of 3 write heads)

    def __post_init__(self):
        super().__post_init__()
        if self.read_heads < 1 or self.write_heads < 1:
            raise ValueError(
                f"read_heads and write_heads must be >= 1, got {self.read_heads}, {self.write_heads}"
            )
        if not math.isfinite(self.memory_init):
            raise ValueError(f"memory_init must be finite, got {self.memory_init}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


@functools.lru_cache(maxsize=64)
def _instance_major(layout: ParamLayout, device: torch.device):
    """``(perm, inverse)``: ``x[perm].view(P, n)`` puts each instance's coordinates in a row.

    ``None`` when the flat order already is instance-major (one tensor, or one instance).
    """
    P = layout.instances
    if P == 1 or len(layout.names) == 1:
        return None
    parts, start = [], 0
    for size in layout.sizes:
        parts.append(torch.arange(start, start + size, device=device).view(P, size // P))
        start += size
    perm = torch.cat(parts, dim=1).reshape(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    return perm, inverse


def local_index(layout: ParamLayout, device) -> Tensor:
    """The index of every coordinate within its instance (``0..n-1``), ``[N]``."""
    n = layout.instance_numel
    plan = _instance_major(layout, torch.device(device))
    pos = torch.arange(layout.numel, device=device) if plan is None else plan[1]
    return pos % n


def to_instances(x: Tensor, layout: ParamLayout) -> Tensor:
    """``[N, ...]`` in flat order to ``[P, n, ...]`` (instance-major)."""
    plan = _instance_major(layout, x.device)
    if plan is not None:
        x = x.index_select(0, plan[0])
    return x.reshape(layout.instances, layout.instance_numel, *x.shape[1:])


def from_instances(x: Tensor, layout: ParamLayout) -> Tensor:
    """Inverse of :func:`to_instances`: ``[P, n, ...]`` back to ``[N, ...]`` in flat order."""
    x = x.reshape(layout.numel, *x.shape[2:])
    plan = _instance_major(layout, x.device)
    return x if plan is None else x.index_select(0, plan[1])


class _NTMBase(nn.Module):
    """The controller, the heads and the step; subclasses own the memory."""

    needs_loss = False
    coordinatewise = False
    fast_kernels = True

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.gac = cfg.gac_per_layer
        self.cells, out = lstm_layers(cfg.features + cfg.read_heads, cfg.layers)
        # u (1), reads r (R), write vectors a (W) and b (W)
        self.head = nn.Linear(out, 1 + cfg.read_heads + 2 * cfg.write_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The LSTM's (Sonnet 1) initialisation; ``zero_head`` zeroes every head."""
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

    # -- memory (subclasses) --------------------------------------------------------------
    def _check(self, layout: ParamLayout) -> None:
        pass

    def init_memory(self, theta: Tensor, layout: ParamLayout) -> State:
        raise NotImplementedError

    def write_read(self, a, b, r, state: State, layout: ParamLayout):
        raise NotImplementedError

    # -- update-rule interface ------------------------------------------------------------
    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        layout = layout_for(theta, layout)
        self._check(layout)
        n, dtype = theta.numel(), self.head.weight.dtype
        state: State = {}
        for k, cell in enumerate(self.cells):
            hidden = cell.weight_hh.shape[1]
            state[f"h{k}"] = theta.new_zeros(n, hidden, dtype=dtype)
            state[f"c{k}"] = theta.new_zeros(n, hidden, dtype=dtype)
        state["read"] = theta.new_zeros(n, self.config.read_heads, dtype=dtype)
        state.update(self.init_memory(theta.to(dtype), layout))
        return state

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        layout = layout_for(theta, layout)
        self._check(layout)
        update, new_state = self.update(grad, state, layout)
        return theta + update.to(theta.dtype), new_state

    def update(self, grad: Tensor, state: State, layout: ParamLayout) -> tuple[Tensor, State]:
        cfg = self.config
        R, W = cfg.read_heads, cfg.write_heads
        dtype = self.head.weight.dtype
        feats = preprocess(grad, cfg.preprocessing, cfg.p, cfg.input_scale).to(dtype)
        x = torch.cat([feats, state["read"]], dim=1)
        h, new_state = run_gac_cells(self.cells, self.gac, x, state, layout, self.fast_kernels)
        out = torch.addmm(self.head.bias, h, self.head.weight.t())
        u, r = out[:, 0], out[:, 1 : 1 + R]
        a, b = out[:, 1 + R : 1 + R + W], out[:, 1 + R + W :]
        read, memory = self.write_read(a, b, r, state, layout)
        new_state["read"] = read
        new_state.update(memory)
        return cfg.output_scale * (u + read.sum(1)), new_state

    def describe(self) -> dict:
        return {"rule": self.name, "config": self.config.to_dict()}


class NTMBFGS(_NTMBase):
    """NTM-BFGS: the memory is an ``n x n`` matrix per instance (module docstring)."""

    name = "ntm-bfgs"

    def __init__(self, config: NTMBFGSConfig | None = None, **kwargs):
        super().__init__(config if config is not None else NTMBFGSConfig(**kwargs))

    def _check(self, layout: ParamLayout) -> None:
        n, limit = layout.instance_numel, self.config.max_coordinates
        if n > limit:
            raise L2OError(
                f"ntm-bfgs keeps an n x n memory per problem instance and is limited to "
                f"{limit} coordinates per instance (max_coordinates); this problem has {n}: "
                "use ntm-lbfgs (a window of write pairs, O(n window))"
            )

    def init_memory(self, theta: Tensor, layout: ParamLayout) -> State:
        n = layout.instance_numel
        eye = torch.nn.functional.one_hot(local_index(layout, theta.device), n).to(theta.dtype)
        return {"memory": self.config.memory_init * eye}

    def write_read(self, a, b, r, state, layout):
        n = layout.instance_numel
        M = to_instances(state["memory"], layout)  # [P, n, n]
        M = torch.baddbmm(
            M, to_instances(a, layout), to_instances(b, layout).transpose(1, 2), alpha=1.0 / n
        )
        read = from_instances(torch.bmm(M, to_instances(r, layout)), layout)
        return read, {"memory": from_instances(M, layout)}


class NTMLBFGS(_NTMBase):
    """NTM-L-BFGS: the memory is the last ``window`` write pairs (module docstring)."""

    name = "ntm-lbfgs"

    def __init__(self, config: NTMLBFGSConfig | None = None, **kwargs):
        super().__init__(config if config is not None else NTMLBFGSConfig(**kwargs))

    def init_memory(self, theta: Tensor, layout: ParamLayout) -> State:
        zeros = theta.new_zeros(theta.numel(), self.config.window)
        return {"write_a": zeros, "write_b": zeros.clone()}

    def write_read(self, a, b, r, state, layout):
        m, n = self.config.window, layout.instance_numel
        A = torch.cat([state["write_a"], a], dim=1)[:, -m:]  # [N, m], oldest first
        B = torch.cat([state["write_b"], b], dim=1)[:, -m:]
        Btr = instance_sum(B.unsqueeze(2) * r.unsqueeze(1), layout)  # [P, m, R]
        read = self.config.memory_init * r + torch.einsum(
            "nm,nmr->nr", A, broadcast(Btr, layout)
        ) / float(n)
        return read, {"write_a": A, "write_b": B}


__all__ = ["NTMBFGS", "NTMLBFGS", "NTMBFGSConfig", "NTMLBFGSConfig", "ntm_from_lstm"]


def ntm_from_lstm(lstm, cls=None, gac: int = 2, head_std: float = 1e-3, **config) -> _NTMBase:
    """An NTM rule (``cls``: :class:`NTMLBFGS` by default) whose controller starts as ``lstm``.

    The controller is ``lstm`` widened by ``gac`` averaging cells per layer
    (:func:`l2o.rules.gac.widen_lstm`); the read features enter with zero weights; the
    ``u`` head is the LSTM's head; the read and write heads are small (``head_std`` times
    their usual initialisation) and random, so the first updates are the LSTM's plus a
    small memory term, and meta-training learns to use the memory.  ``config``: the NTM
    keys (``window``, ``write_heads``, ...).
    """
    from .gac import _widen_cells

    cls = cls or NTMLBFGS
    cfg_cls = NTMLBFGSConfig if cls is NTMLBFGS else NTMBFGSConfig
    d = {k: v for k, v in lstm.config.to_dict().items() if k != "preset"}
    d["layers"] = [h + gac for h in lstm.config.layers]
    rule = cls(cfg_cls.from_dict({**d, "gac": gac, **config}))
    rule = rule.to(dtype=lstm.head.weight.dtype)
    _widen_cells(lstm.cells, rule.cells)
    with torch.no_grad():
        H = lstm.head.weight.shape[1]
        rule.head.weight.mul_(head_std)
        rule.head.bias.mul_(head_std)
        rule.head.weight[0] = 0.0
        rule.head.weight[0, :H] = lstm.head.weight[0]
        rule.head.bias[0] = lstm.head.bias[0]
    return rule
