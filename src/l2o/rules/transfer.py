"""``mlp-lopt``: a per-coordinate MLP on scale-free features that starts as Adam.

Built to transfer to models it never saw (issue 18; after learned_optimization's
``mlp_lopt``).  Every coordinate gets the same features, none of which changes
when the gradient is multiplied by a constant (up to Adam's ``eps``):

    v    = b2 v + (1 - b2) g^2,   d = sqrt(v / (1 - b2^t)) + eps       (b2 = 0.999)
    m_b  = b m_b + (1 - b) g      for b in (0.5, 0.9, 0.99)
    x    = [ m^_b / d (three timescales),  g / d,
             theta / rms(theta of its tensor, its instance),
             tanh(t / 10), tanh(t / 100), tanh(t / 1000) ]

``features`` adds optional columns, still free of the gradient's scale
(:func:`extra_features`): ``grad-rel`` = ln(|g| / RMS of g over its tensor), what Adam's
per-coordinate normalisation discards; ``tensor-rel`` = ln(RMS of g over the tensor / over
the whole model), how a tensor's gradient compares with the others'; ``param-scale`` =
ln(RMS of theta over its tensor), the tensor's absolute scale; ``tensor-pos`` = the
tensor's place in the parameter order (-1 first .. +1 last) and ``vector`` = 1 for a
one-dimensional tensor, which tell a tensor's role in the network.

A small MLP (``layers``, ReLU) maps ``x`` to two numbers ``(r, a)`` per coordinate:

    adam = m^_0.9 / d                                  (Adam's direction)
    theta <- theta - exp(log_lr) * exp(mag * tanh(a)) * (adam + residual * tanh(r))

The MLP's last layer starts at zero, so at meta-initialisation the rule *is*
Adam (0.9, 0.999, eps) with learning rate ``exp(log_lr) = init_lr``; meta-training
only has to improve on it, and the learned part of a step is bounded: the step
size moves by at most a factor ``exp(mag)`` and the direction by at most
``residual`` in Adam's units.  ``log_lr`` is a meta-parameter.  The parameter
feature is normalised per tensor *and* per instance (never across instances), so
the rule stays independent across the problems of a meta-batch.

With ``hd > 0`` each (tensor, instance) block also adapts its own log step size
online, by a multiplicative hypergradient rule (Baydin et al. 2018, "Online
learning rate adaptation with hypergradient descent", in log space):

    c_t = cos(g_t, u_{t-1})   over the block    (u: the block's previous update)
    s_t = clip(s_{t-1} + hd * c_t, -hd_bound, hd_bound),    s_0 = 0
    theta <- theta - exp(log_lr + s_t) * exp(mag * tanh(a)) * (...)

A gradient that still points along the last step (c > 0: the step was too short)
raises the block's step size; one that points back (c < 0: overshoot) lowers it.
The cosine is free of the gradient's scale, so the rule stays scale-invariant, and
``hd`` (a meta-parameter, ``log_hd``, unless ``hd_learned`` is false) starts at the
configured rate.  At meta-init (zero head) the rule is then Adam with this
adaptation: the hand-designed :class:`AdamHD` (``adam-hd``), plus the MLP's zero output.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..layout import ParamLayout, layout_for
from .base import ConfigDict, State

#: momentum timescales fed as features (0.9 is also Adam's first moment)
BETAS = (0.5, 0.9, 0.99)
ADAM_B1_INDEX = 1
ADAM_B2 = 0.999
#: step-counter features tanh(t / tau)
TIMESCALES = (10.0, 100.0, 1000.0)
NUM_FEATURES = len(BETAS) + 1 + 1 + len(TIMESCALES)
#: optional extra features (``features="grad-rel+tensor-rel"``), each one column, each
#: free of the gradient's scale (module docstring)
EXTRA_FEATURES = ("grad-rel", "tensor-rel", "param-scale", "tensor-pos", "vector")
#: coordinates per block of the no-grad MLP evaluation (bounds its temporaries)
MLP_BLOCK_ROWS = 16384


@dataclass(frozen=True)
class MLPLOptConfig(ConfigDict):
    """Hyperparameters of :class:`MLPLOpt` (stored in every artifact)."""

    ignore_unknown_keys = True  # the [rule] table also holds other rules' keys

    layers: tuple[int, ...] = (32, 32)
    init_lr: float = 1e-3  # Adam's learning rate at meta-init (log_lr starts at its log)
    eps: float = 1e-8
    mag: float = 1.0  # step size factor in [exp(-mag), exp(mag)]
    residual: float = 0.1  # bound of the learned direction term, in units of Adam's direction
    hd: float = 0.0  # rate of the per-block hypergradient step-size adaptation (0: off)
    hd_bound: float = 3.0  # the adapted log step size stays within +-hd_bound
    hd_learned: bool = True  # hd is a meta-parameter (False: fixed at the configured rate)
    features: str = ""  # extra features joined by "+", from EXTRA_FEATURES ("": none)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(h) for h in self.layers))
        if any(h <= 0 for h in self.layers):
            raise ValueError(f"layers must be positive sizes, got {self.layers}")
        if not (self.init_lr > 0 and math.isfinite(self.init_lr)):
            raise ValueError(f"init_lr must be positive, got {self.init_lr}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if not (self.mag >= 0 and self.residual >= 0):
            raise ValueError("mag and residual must be >= 0")
        check_hd(self.hd, self.hd_bound)
        unknown = [f for f in self.extra_features if f not in EXTRA_FEATURES]
        if unknown or len(set(self.extra_features)) != len(self.extra_features):
            raise ValueError(
                f"features must be distinct names from {EXTRA_FEATURES} joined by '+', "
                f"got {self.features!r}"
            )

    @property
    def extra_features(self) -> tuple[str, ...]:
        return tuple(f for f in self.features.split("+") if f)


def blockwise(fn, layout: ParamLayout, *xs: Tensor) -> Tensor:
    """``fn`` of each (tensor, instance) block of ``xs`` (given as ``[P, n]``, returning
    ``[P, 1]``), broadcast back to every coordinate of the block."""
    P = layout.instances
    parts = []
    for sl, size in zip(layout.slices().values(), layout.sizes, strict=True):
        value = fn(*(x[sl].reshape(P, size // P) for x in xs))
        parts.append(value.expand(P, size // P).reshape(-1))
    return torch.cat(parts)


def tensor_rms(x: Tensor, layout: ParamLayout) -> Tensor:
    """RMS of ``x`` over each (tensor, instance) block, broadcast back to every coordinate."""
    return blockwise(lambda b: b.pow(2).mean(1, keepdim=True).sqrt(), layout, x)


def _cosine_rows(x: Tensor, y: Tensor) -> Tensor:
    dot = (x * y).sum(1, keepdim=True)
    norms = x.pow(2).sum(1, keepdim=True).sqrt() * y.pow(2).sum(1, keepdim=True).sqrt()
    return torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.zeros_like(dot))


def block_cosine(a: Tensor, b: Tensor, layout: ParamLayout) -> Tensor:
    """Cosine of ``a`` and ``b`` over each (tensor, instance) block, broadcast to its coordinates.

    A block where either vector is zero (the first step's missing previous update) gets 0.
    """
    return blockwise(_cosine_rows, layout, a, b)


def instance_rms(x: Tensor, layout: ParamLayout) -> Tensor:
    """RMS of ``x`` over all tensors of each instance, broadcast back to every coordinate.

    Summed block by block like :func:`tensor_rms` (not ``l2o.layout.instance_mean``, whose
    ``index_add`` sums in another order): the recorded runs with ``tensor-rel`` used this.
    """
    P = layout.instances
    blocks = [
        (x[sl].reshape(P, size // P), size // P)
        for sl, size in zip(layout.slices().values(), layout.sizes, strict=True)
    ]
    total = sum(b.pow(2).sum(1) for b, _ in blocks)
    rms = (total / layout.instance_numel).sqrt().unsqueeze(1)
    return torch.cat([rms.expand(P, n).reshape(-1) for _, n in blocks])


@functools.lru_cache(maxsize=64)
def tensor_place(layout: ParamLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per coordinate: its tensor's place in the order, -1..+1 (0 for one tensor), and
    whether the tensor is one-dimensional (1.0 / 0.0, the instance axis not counted)."""
    n = len(layout.shapes)
    lead = 1 if layout.instances > 1 else 0
    place = torch.tensor(
        [2.0 * k / (n - 1) - 1.0 if n > 1 else 0.0 for k in range(n)], device=device
    )
    vector = torch.tensor([float(len(s) - lead == 1) for s in layout.shapes], device=device)
    index = layout.tensor_index(device)
    return place[index], vector[index]


def extra_features(
    names: tuple[str, ...], grad: Tensor, theta_rms: Tensor, layout: ParamLayout
) -> list[Tensor]:
    """The optional feature columns ``names`` (``MLPLOptConfig.features``), in that order.

    ``theta_rms`` is the parameter's per-(tensor, instance) RMS, broadcast to every
    coordinate (the parameter feature's normaliser, computed once).  None of the columns
    depends on the gradient's scale: the first two are log-ratios of gradient magnitudes,
    the others do not read the gradient.

    - ``grad-rel``: ln(|g| / RMS of g over its tensor): how large this coordinate's gradient is
      next to its tensor's (what Adam's per-coordinate normalisation throws away);
    - ``tensor-rel``: ln(RMS of g over its tensor / RMS of g over the whole model): how large
      this tensor's gradient is next to the other tensors';
    - ``param-scale``: ln(RMS of theta over its tensor): the tensor's absolute scale (a tiny
      initialisation wants steps large next to Adam's lr);
    - ``tensor-pos``: the tensor's place in the parameter order, -1 (first) to +1 (last), 0
      for a single tensor (for a model's ``parameters()``: input side to output side);
    - ``vector``: 1 for a one-dimensional tensor (biases, norm gains), else 0.
    The input clamp (+-10) bounds the logs of zeros.
    """
    tiny = 1e-30
    log_g_rms = None
    if "grad-rel" in names or "tensor-rel" in names:
        log_g_rms = torch.log(tensor_rms(grad, layout) + tiny)
    cols = []
    for name in names:
        if name == "grad-rel":
            cols.append(torch.log(grad.abs() + tiny) - log_g_rms)
        elif name == "tensor-rel":
            cols.append(log_g_rms - torch.log(instance_rms(grad, layout) + tiny))
        elif name == "param-scale":
            cols.append(torch.log(theta_rms + 1e-12))
        elif name in ("tensor-pos", "vector"):
            pos, vector = tensor_place(layout, grad.device)
            cols.append((pos if name == "tensor-pos" else vector).to(grad.dtype))
        else:
            raise ValueError(f"unknown feature {name!r}; valid: {EXTRA_FEATURES}")
    return cols


def check_hd(hd: float, hd_bound: float) -> None:
    """The hypergradient options of ``mlp-lopt`` and ``adam-hd``."""
    if not (hd >= 0 and math.isfinite(hd)):
        raise ValueError(f"hd must be >= 0 (0: no step-size adaptation), got {hd}")
    if not (hd_bound > 0 and math.isfinite(hd_bound)):
        raise ValueError(f"hd_bound must be positive, got {hd_bound}")


def adapt_log_step(
    s: Tensor, grad: Tensor, prev_update: Tensor, rate, bound: float, layout: ParamLayout
) -> Tensor:
    """One hypergradient update of the per-block log step size ``s`` (module docstring)."""
    # Why detached: the agreement of this gradient with the last update is an input to the
    # rule, like the gradient itself; meta-gradients reach a learned rate through s.
    cos = block_cosine(grad, prev_update, layout).detach()
    return (s + rate * cos).clamp(-bound, bound)


class AdamHD:
    """Adam whose log step size adapts per (tensor, instance) by the hypergradient rule.

    Hand-designed (nothing learned): ``mlp-lopt`` with ``hd`` at meta-initialisation
    without its MLP, i.e. ``theta <- theta - lr * exp(s) * adam``, ``s`` updated as in
    the module docstring at rate ``hd`` within ``+-hd_bound`` (Baydin et al. 2018, in log
    space and through a cosine, so it does not depend on the gradient's scale).
    """

    name = "adam-hd"
    needs_loss = False
    coordinatewise = False  # s is one number per (tensor, instance) block

    def __init__(
        self, lr: float = 0.001, hd: float = 0.1, hd_bound: float = 3.0, eps: float = 1e-8
    ):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        check_hd(hd, hd_bound)
        self.lr, self.hd, self.hd_bound = float(lr), float(hd), float(hd_bound)
        self.eps = float(eps)

    @property
    def hparams(self) -> dict:
        return {"lr": self.lr, "hd": self.hd, "hd_bound": self.hd_bound, "eps": self.eps}

    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        return {
            "step": torch.zeros((), dtype=torch.float32, device=theta.device),
            "m": torch.zeros_like(theta),
            "v": torch.zeros_like(theta),
            "s": torch.zeros_like(theta),
            "u": torch.zeros_like(theta),
        }

    def step(self, theta, grad, loss, state, layout=None):
        layout = layout_for(theta, layout)
        t = state["step"] + 1
        n = float(t)
        b1 = BETAS[ADAM_B1_INDEX]
        m = torch.lerp(state["m"], grad, 1 - b1)  # Adam's operation order, as mlp-lopt's
        v = ADAM_B2 * state["v"] + (1 - ADAM_B2) * grad * grad
        adam = (m / (1 - b1**n)) / (v.sqrt() / math.sqrt(1 - ADAM_B2**n) + self.eps)
        s = adapt_log_step(state["s"], grad, state["u"], self.hd, self.hd_bound, layout)
        update = self.lr * torch.exp(s) * adam
        return theta - update, {"step": t, "m": m, "v": v, "s": s, "u": update}


class MLPLOpt(nn.Module):
    """The ``mlp-lopt`` rule (module docstring); the interface of :mod:`l2o.rules.base`."""

    name = "mlp-lopt"
    needs_loss = False
    coordinatewise = False  # the parameter feature is normalised per (tensor, instance)

    def __init__(self, config: MLPLOptConfig | None = None, **kwargs):
        super().__init__()
        self.config = cfg = config if config is not None else MLPLOptConfig(**kwargs)
        sizes = (NUM_FEATURES + len(cfg.extra_features), *cfg.layers)
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], 2)
        self.log_lr = nn.Parameter(torch.tensor(math.log(cfg.init_lr)))
        if cfg.hd > 0:
            log_hd = torch.tensor(math.log(cfg.hd))
            if cfg.hd_learned:
                self.log_hd = nn.Parameter(log_hd)
            else:
                self.register_buffer("log_hd", log_hd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for lin in self.hidden:
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(lin.in_features))
                lin.bias.zero_()
            # zero head: at meta-init the rule is exactly Adam(init_lr)
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.log_lr.fill_(math.log(self.config.init_lr))
            if self.config.hd > 0:
                self.log_hd.fill_(math.log(self.config.hd))

    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        state: State = {
            "step": torch.zeros((), dtype=torch.float32, device=theta.device),
            "v": torch.zeros_like(theta),
        }
        for i in range(len(BETAS)):
            state[f"m{i}"] = torch.zeros_like(theta)
        if self.config.hd > 0:
            # per coordinate, constant over each (tensor, instance) block: the adapted log
            # step size s, and the previous update u (what the next gradient is compared with)
            state["s"] = torch.zeros_like(theta)
            state["u"] = torch.zeros_like(theta)
        return state

    def features(
        self, theta: Tensor, grad: Tensor, state: State, layout: ParamLayout
    ) -> tuple[Tensor, Tensor, State]:
        """(features ``[N, F]``, Adam's direction ``[N]``, new state)."""
        eps = self.config.eps
        t = state["step"] + 1
        n = float(t)
        v = ADAM_B2 * state["v"] + (1 - ADAM_B2) * grad * grad
        denom = v.sqrt() / math.sqrt(1 - ADAM_B2**n) + eps
        new_state: State = {"step": t, "v": v}
        feats, adam = [], None
        for i, b in enumerate(BETAS):
            m = torch.lerp(state[f"m{i}"], grad, 1 - b)  # Adam's operation order
            new_state[f"m{i}"] = m
            f = (m / (1 - b**n)) / denom
            feats.append(f)
            if i == ADAM_B1_INDEX:
                adam = f
        feats.append(grad / denom)
        # parameter / its tensor's RMS (per instance); a zero tensor (fresh biases) gives 0
        theta_rms = tensor_rms(theta.detach(), layout)
        feats.append(theta / (theta_rms + 1e-12))
        for tau in TIMESCALES:
            feats.append(torch.full_like(theta, math.tanh(n / tau)))
        feats += extra_features(self.config.extra_features, grad, theta_rms, layout)
        # Bounded inputs: a huge normalised value (a gradient spike) cannot blow up the MLP.
        x = torch.stack(feats, dim=1).clamp(-10.0, 10.0)
        return x, adam, new_state

    def mlp(self, x: Tensor) -> Tensor:
        """The per-coordinate network: features ``[n, F]`` -> ``(r, a)`` as ``[n, 2]``."""
        h = x.to(self.head.weight.dtype)
        for lin in self.hidden:
            h = torch.relu(lin(h))
        return self.head(h)

    def scaled_direction(
        self, theta: Tensor, grad: Tensor, state: State, layout: ParamLayout
    ) -> tuple[Tensor, Tensor, State]:
        """(direction ``[N]`` in Adam's units, log step size ``[N]``, new state but ``u``).

        The update is ``exp(log_step) * direction``; ``exp(log_step)`` is the per-coordinate
        learning rate the rule uses at this step (``benchmarks/home_task_steps.py`` reads it)."""
        cfg = self.config
        x, adam, new_state = self.features(theta, grad, state, layout)
        if torch.is_grad_enabled():
            out = self.mlp(x)
        else:
            # Without autograd nothing needs the hidden activations afterwards: run the MLP
            # over row blocks so its [N, width] temporaries stay bounded on large models.
            out = x.new_empty(x.shape[0], 2, dtype=self.head.weight.dtype)
            for s in range(0, x.shape[0], MLP_BLOCK_ROWS):
                out[s : s + MLP_BLOCK_ROWS] = self.mlp(x[s : s + MLP_BLOCK_ROWS])
        r, a = out[:, 0], out[:, 1]
        direction = adam + cfg.residual * torch.tanh(r)
        log_step = self.log_lr + cfg.mag * torch.tanh(a)
        if cfg.hd > 0:
            rate = torch.exp(self.log_hd)
            s = adapt_log_step(state["s"], grad, state["u"], rate, cfg.hd_bound, layout)
            new_state["s"] = s
            log_step = log_step + s
        return direction, log_step, new_state

    def step(
        self,
        theta: Tensor,
        grad: Tensor,
        loss: Tensor | None,
        state: State,
        layout: ParamLayout | None = None,
    ) -> tuple[Tensor, State]:
        layout = layout_for(theta, layout)
        direction, log_step, new_state = self.scaled_direction(theta, grad, state, layout)
        update = (torch.exp(log_step) * direction).to(theta.dtype)
        if self.config.hd > 0:
            new_state["u"] = update.detach()
        return theta - update, new_state

    def describe(self) -> dict:
        return {"rule": self.name, "config": self.config.to_dict()}
