"""The base learner: a Conv-4 classifier evaluated from one flat parameter vector.

Ravi & Larochelle's learner (and MAML's) is four blocks of

    conv 3x3 (``filters`` channels, stride 1, pad 1) -> batch norm (eps 1e-3) -> ReLU -> max-pool 2x2

followed by a linear head on the flattened feature map.  Every few-shot method of
:mod:`l2o.fewshot` runs it *functionally*: the parameters are one flat vector
``theta`` (the coordinates an update rule acts on, see :mod:`l2o.rules.base`), laid
out in the fixed order of :meth:`Conv4.layout`

    conv1.weight, conv1.bias, bn1.weight, bn1.bias, ..., conv4.*, bn4.*, head.weight, head.bias

so the head is the tail of the vector (which is what lets a model trained for N ways
be used with another number of ways, :func:`resize_head`).  BN scale and shift are
coordinates; running statistics are *buffers* (:class:`BNStats`), kept apart.

Batch-norm modes (the paper's protocol, Ravi & Larochelle 2017, section 3.3):

* ``"batch"`` - every forward normalises with the statistics of its own batch; the
  query set is normalised transductively with query statistics.  Meta-training
  uses this mode.
* ``"support-running"`` - the support forwards use batch statistics *and*
  accumulate running averages (``running = (1-m) running + m batch``, m = 0.9 by
  default, so they are essentially the last support batch's); the query forward
  uses those running statistics.  They are reset in every episode (the caller
  makes a fresh :class:`BNStats` per episode), so nothing leaks between
  episodes.  The paper's meta-test protocol, with one deviation: the first support
  batch of an episode sets the statistics outright instead of being averaged into
  a (0, 1) start.  After T >= 3 steps with m = 0.9 the two agree to 0.1^T; for the
  1-step methods (MAML, nearest neighbour) the (0, 1) start would leave a 10% bias
  towards mean 0 / variance 1 in every layer, which we measured to push nearest
  neighbour to chance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import L2OError
from ..tasks.base import ParamLayout

BN_MODES = ("batch", "support-running")


@dataclass(frozen=True)
class LearnerConfig:
    """Shape of the Conv-4 learner (stored in every few-shot checkpoint)."""

    in_channels: int = 1
    image_size: int = 28
    ways: int = 5
    filters: int = 32
    blocks: int = 4
    bn_eps: float = 1e-3
    bn_momentum: float = 0.9

    def __post_init__(self):
        if self.feature_size() < 1:
            raise L2OError(
                f"images of {self.image_size}x{self.image_size} are too small for {self.blocks} "
                f"conv blocks with 2x2 max-pooling (need at least {2**self.blocks} pixels)"
            )
        if self.ways < 1:
            raise L2OError(f"ways must be >= 1, got {self.ways}")

    def feature_size(self) -> int:
        s = self.image_size
        for _ in range(self.blocks):
            s //= 2
        return s

    def num_features(self) -> int:
        return self.filters * self.feature_size() ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LearnerConfig:
        return cls(**d)

    def with_ways(self, ways: int) -> LearnerConfig:
        return LearnerConfig(**{**asdict(self), "ways": int(ways)})


@dataclass
class BNStats:
    """Per-episode running statistics of every BN layer (buffers, never coordinates)."""

    means: list[Tensor]
    vars: list[Tensor]
    updates: int = 0  # support forwards accumulated so far

    @classmethod
    def fresh(cls, config: LearnerConfig, device=None, dtype=torch.float32) -> BNStats:
        f = config.filters
        return cls(
            [torch.zeros(f, device=device, dtype=dtype) for _ in range(config.blocks)],
            [torch.ones(f, device=device, dtype=dtype) for _ in range(config.blocks)],
        )


class Conv4:
    """Functional Conv-4: ``logits = Conv4(config)(theta, x, ...)``, no parameters held."""

    def __init__(self, config: LearnerConfig):
        self.config = config
        self.layout = self.make_layout(config)
        self.body_numel = self.layout.numel - self.head_numel(config)

    @staticmethod
    def head_numel(config: LearnerConfig) -> int:
        return config.ways * config.num_features() + config.ways

    @staticmethod
    def make_layout(config: LearnerConfig) -> ParamLayout:
        names, shapes = [], []
        c_in = config.in_channels
        for k in range(1, config.blocks + 1):
            names += [f"conv{k}.weight", f"conv{k}.bias", f"bn{k}.weight", f"bn{k}.bias"]
            shapes += [
                (config.filters, c_in, 3, 3),
                (config.filters,),
                (config.filters,),
                (config.filters,),
            ]
            c_in = config.filters
        names += ["head.weight", "head.bias"]
        shapes += [(config.ways, config.num_features()), (config.ways,)]
        return ParamLayout(tuple(names), tuple(shapes))

    def init_params(self, seed: int = 0) -> Tensor:
        """PyTorch's default initialisation (conv/linear Kaiming-uniform, BN gamma 1, beta 0)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(int(seed))
        parts = []
        c_in = cfg.in_channels
        for _ in range(cfg.blocks):
            fan_in = c_in * 9
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
            parts.append((torch.rand(cfg.filters, c_in, 3, 3, generator=gen) * 2 - 1) * bound)
            parts.append((torch.rand(cfg.filters, generator=gen) * 2 - 1) * bound)
            parts.append(torch.ones(cfg.filters))
            parts.append(torch.zeros(cfg.filters))
            c_in = cfg.filters
        bound = 1.0 / math.sqrt(cfg.num_features())
        parts.append((torch.rand(cfg.ways, cfg.num_features(), generator=gen) * 2 - 1) * bound)
        parts.append((torch.rand(cfg.ways, generator=gen) * 2 - 1) * bound)
        return self.layout.flatten(parts)

    def check_images(self, x: Tensor, what: str = "images") -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise L2OError(
                f"{what} have shape {tuple(x.shape)}, but this model expects [n, {expected[0]}, "
                f"{expected[1]}, {expected[2]}] images (channels x height x width it was trained on)"
            )

    def features(
        self, theta: Tensor, x: Tensor, stats: BNStats | None = None, use_running: bool = False
    ) -> Tensor:
        """Flattened output of the conv body: ``[n, num_features]``.

        With ``use_running`` the BN layers normalise with ``stats`` (running
        statistics); otherwise with batch statistics, and when ``stats`` is given
        they are also accumulated into it (in place, outside autograd).
        """
        cfg = self.config
        p = self.layout.unflatten(theta)
        h = x
        # The first support batch of an episode replaces the (0, 1) start outright; later
        # ones are averaged in with momentum m (see the module docstring).
        momentum = cfg.bn_momentum if stats is None or stats.updates > 0 else 1.0
        for k in range(1, cfg.blocks + 1):
            h = F.conv2d(h, p[f"conv{k}.weight"], p[f"conv{k}.bias"], padding=1)
            rm = stats.means[k - 1] if stats is not None else None
            rv = stats.vars[k - 1] if stats is not None else None
            if use_running and stats is None:
                raise ValueError("use_running needs BN statistics")
            h = F.batch_norm(
                h,
                rm,
                rv,
                p[f"bn{k}.weight"],
                p[f"bn{k}.bias"],
                training=not use_running,
                momentum=momentum,
                eps=cfg.bn_eps,
            )
            h = F.max_pool2d(F.relu(h), 2)
        if stats is not None and not use_running:
            stats.updates += 1
        return h.flatten(1)

    def __call__(
        self, theta: Tensor, x: Tensor, stats: BNStats | None = None, use_running: bool = False
    ) -> Tensor:
        p = self.layout.unflatten(theta)
        return F.linear(
            self.features(theta, x, stats, use_running), p["head.weight"], p["head.bias"]
        )


def resize_head(theta: Tensor, config: LearnerConfig, ways: int) -> Tensor:
    """``theta`` of a learner with ``config.ways`` outputs, turned into one with ``ways`` outputs.

    The body is kept; every row of the new head (weight and bias) is the *mean* of
    the trained rows, so all classes start symmetric and only the support set
    tells them apart (the "zero-trick"/UnicornMAML treatment of a head whose class
    slots are arbitrary anyway).  ``ways == config.ways`` returns ``theta`` as is.
    """
    if ways == config.ways:
        return theta
    n_feat = config.num_features()
    body_numel = theta.numel() - Conv4.head_numel(config)
    body = theta[:body_numel]
    w = theta[body_numel : body_numel + config.ways * n_feat].view(config.ways, n_feat)
    b = theta[body_numel + config.ways * n_feat :]
    w_new = w.mean(0, keepdim=True).expand(ways, n_feat)
    b_new = b.mean().expand(ways)
    return torch.cat([body, w_new.reshape(-1), b_new])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


__all__ = ["BN_MODES", "BNStats", "Conv4", "LearnerConfig", "accuracy", "resize_head"]
