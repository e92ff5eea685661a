"""The CIFAR-10 ConvNet optimizee, the paper's third problem family (L2L section 3.4).

``cifar10-cnn``: the official ``cifar10`` problem (deepmind/learning-to-learn
``problems.cifar10``): three convolutions of ``channels`` (16) filters, 5 x 5, stride
1, SAME padding, each followed by batch normalization with an offset only (beta, no
scale) -> ReLU -> 2 x 2 max-pool; flatten (16 x 4 x 4 = 256); a linear layer of
``hidden`` (32) units with batch normalization (offset only) and ReLU; the logits.
Pixels / 255, no mean subtraction; minibatch ``batch`` (128) drawn uniformly with
replacement per step from the split with a generator seeded by (problem seed,
step).  Batch normalization uses the minibatch's statistics in every forward (as
the official optimizee, which is always in training mode); there are no running
averages.  22,682 parameters with the defaults.  Weights and biases are drawn
i.i.d. N(0, 0.01^2) per problem seed (the official initializers), offsets start at 0.

Tensor names (the parameter groups of the paper's ``cifar-multi``):
``conv{k}.w`` (the three convolution weights: the ``conv`` LSTM), and
``conv{k}.b``, ``conv{k}.beta``, ``fc0.w``, ``fc0.b``, ``fc0.beta``, ``out.w``,
``out.b`` (everything else: the ``fc`` LSTM).  :data:`CONV_LABELS` gives those
labels to a :class:`~l2o.rules.grouped.GroupedRule`.

``classes=`` a label subset (``classes=3,5``: the optimizee sees only images of
labels 3 and 5 and has 2 logits, label 3 -> logit 0); CIFAR-5 and CIFAR-2 are
subsets of 5 and 2 labels.  Data splits as ``mnist-mlp`` (:mod:`l2o.data.cifar10`):
meta-training on ``train``, validation on ``val`` (both held-out parts of the
training files), ``compare`` / benchmarks on ``test`` (``test_batch.bin``).

The P problem instances of a trajectory form one problem (one flat parameter vector,
one loss per instance).  On CUDA they run as one network: the P instances' images are
stacked on the channel axis, every convolution is a *grouped* convolution
(``groups=P``), batch normalization runs over P x C channels and the linear layers are
``torch.baddbmm`` calls.  On CPU the instances run one after another, which measured
about 2x faster per instance than the grouped kernels (see :func:`forward`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data import cifar10
from ..errors import L2OError
from .base import ParamLayout, Problem, Task, generator, step_seed

#: patterns -> labels of the paper's two-LSTM optimizer (``cifar-multi``)
CONV_LABELS = [("conv*.w", "conv"), ("*", "fc")]
#: batch-norm epsilon (Sonnet's default)
BN_EPS = 1e-3
#: coordinates (instances x parameters) one batched problem may hold
MAX_COORDINATES = 1_000_000


def parse_classes(classes) -> tuple[int, ...]:
    """A label subset as a sorted-as-given tuple; unknown / repeated / fewer than 2 is an error."""
    if classes in ((), None, ""):
        return tuple(range(10))
    if isinstance(classes, str):
        try:
            classes = [int(c) for c in classes.replace(" ", "").split(",") if c]
        except ValueError:
            raise L2OError(f"cifar10-cnn: classes= takes labels 0..9, got {classes!r}") from None
    labels = tuple(int(c) for c in classes)
    bad = [c for c in labels if not 0 <= c <= 9]
    if bad:
        raise L2OError(f"cifar10-cnn: classes= takes labels 0..9, got unknown label {bad[0]}")
    dup = sorted({c for c in labels if labels.count(c) > 1})
    if dup:
        raise L2OError(f"cifar10-cnn: classes= repeats label {dup[0]}")
    if len(labels) < 2:
        raise L2OError(f"cifar10-cnn: classes= needs at least 2 labels, got {list(labels)}")
    return labels


def layer_shapes(channels: int, hidden: int, classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-instance shape) of every parameter tensor, in layout order."""
    shapes, c_in = [], 3
    for k in range(3):
        shapes += [
            (f"conv{k}.w", (channels, c_in, 5, 5)),
            (f"conv{k}.b", (channels,)),
            (f"conv{k}.beta", (channels,)),
        ]
        c_in = channels
    flat = channels * 4 * 4
    shapes += [
        ("fc0.w", (flat, hidden)),
        ("fc0.b", (hidden,)),
        ("fc0.beta", (hidden,)),
        ("out.w", (hidden, classes)),
        ("out.b", (classes,)),
    ]
    return shapes


def forward(params: dict[str, Tensor], x: Tensor, grouped: bool | None = None) -> Tensor:
    """Logits ``[P, B, classes]`` of P networks (params with leading P) on images ``[P, B, 3, 32, 32]``.

    ``grouped`` (default: on CUDA only) runs the P networks as one grouped network;
    otherwise the instances run one after another.  Why two ways: on CPU the grouped
    kernels are the slower ones.  On one thread with P = 10 and 44 a loss-and-gradient
    step costs about 2x as much per instance grouped as one after another
    (``benchmarks/cifar_step.py``): the grouped first convolution (3 input channels per
    group) is slow in oneDNN, and the element-wise layers over P x 16 channels of 32 x 32
    leave the cache.  Both ways compute the same function (losses equal to float
    rounding).
    """
    if grouped is None:
        grouped = x.is_cuda
    if grouped:
        return _forward_grouped(params, x)
    return torch.stack([_forward_one(params, p, x[p]) for p in range(x.shape[0])])


def _forward_one(params: dict[str, Tensor], p: int, x: Tensor) -> Tensor:
    """Logits ``[B, classes]`` of instance ``p`` on its images ``x`` ``[B, 3, 32, 32]``."""
    h = x
    for k in range(3):
        h = F.conv2d(h, params[f"conv{k}.w"][p], params[f"conv{k}.b"][p], padding=2)
        h = F.batch_norm(h, None, None, None, params[f"conv{k}.beta"][p], training=True, eps=BN_EPS)
        h = F.max_pool2d(torch.relu(h), 2)
    h = torch.addmm(params["fc0.b"][p], h.flatten(1), params["fc0.w"][p])  # [B, hidden]
    h = F.batch_norm(h, None, None, None, params["fc0.beta"][p], training=True, eps=BN_EPS)
    return torch.addmm(params["out.b"][p], torch.relu(h), params["out.w"][p])


def _forward_grouped(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """:func:`forward` as one network: grouped convolutions (``groups=P``), batched linears."""
    P, B = x.shape[:2]
    h = x.transpose(0, 1).reshape(B, P * 3, 32, 32)  # instance p's channels at [3p, 3p+3)
    for k in range(3):
        w = params[f"conv{k}.w"]  # [P, O, I, 5, 5]
        O = w.shape[1]
        h = F.conv2d(
            h, w.reshape(P * O, *w.shape[2:]), params[f"conv{k}.b"].reshape(-1), padding=2, groups=P
        )
        h = F.batch_norm(
            h, None, None, None, params[f"conv{k}.beta"].reshape(-1), training=True, eps=BN_EPS
        )
        h = F.max_pool2d(torch.relu(h), 2)
    C = h.shape[1] // P
    h = h.reshape(B, P, C * h.shape[2] * h.shape[3]).transpose(0, 1)  # [P, B, C*4*4]
    h = torch.baddbmm(params["fc0.b"].unsqueeze(1), h, params["fc0.w"])  # [P, B, hidden]
    hidden = h.shape[2]
    h = F.batch_norm(
        h.transpose(0, 1).reshape(B, P * hidden),
        None,
        None,
        None,
        params["fc0.beta"].reshape(-1),
        training=True,
        eps=BN_EPS,
    )
    h = torch.relu(h).reshape(B, P, hidden).transpose(0, 1)
    return torch.baddbmm(params["out.b"].unsqueeze(1), h, params["out.w"])


class CifarProblem(Problem):
    """``P`` independent ConvNets: per-instance mean cross-entropy on each one's own minibatch."""

    #: how :func:`forward` runs the P instances: ``None`` (by device), ``True`` (one grouped
    #: network) or ``False`` (one after another); set it to compare the two
    grouped: bool | None = None

    def __init__(self, task: Cifar10CNN, seeds: Sequence[int], images: Tensor, labels: Tensor):
        self.task, self.seeds = task, [int(s) for s in seeds]
        self.images, self.labels = images, labels
        self.num_instances = P = len(self.seeds)
        per = layer_shapes(task.channels, task.hidden, len(task.classes))
        self.layout = ParamLayout(tuple(n for n, _ in per), tuple((P, *s) for _, s in per), P)
        self.theta0 = self._init(per)

    def _init(self, per) -> Tensor:
        out: list[list[Tensor]] = [[] for _ in per]
        for seed in self.seeds:
            g = generator(seed)
            for j, (name, shape) in enumerate(per):
                if name.endswith(".beta"):
                    out[j].append(torch.zeros(shape))
                else:
                    out[j].append(torch.randn(shape, generator=g) * self.task.init_std)
        return self.layout.flatten([torch.stack(ts) for ts in out])

    def init(self) -> Tensor:
        return self.theta0.clone()

    def to(self, device) -> CifarProblem:
        device = torch.device(device)
        cache = self.task.__dict__.setdefault("_device_data", {})
        if device not in cache:
            cache[device] = (self.images.to(device), self.labels.to(device))
        moved = copy.copy(self)
        moved.images, moved.labels = cache[device]
        moved.theta0 = self.theta0.to(device)
        return moved

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        """Images ``[P, B, 3, 32, 32]`` and labels ``[P, B]`` of step ``t``."""
        n, b = self.images.shape[0], self.task.batch
        idx = torch.stack(
            [torch.randint(n, (b,), generator=generator(step_seed(s, t))) for s in self.seeds]
        ).to(self.images.device)
        return self.images[idx], self.labels[idx]

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        return forward(self.layout.unflatten(theta), x, grouped=self.grouped)

    def loss(self, theta: Tensor, t: int) -> Tensor:
        x, y = self.batch(t)
        h = self.logits(theta, x)
        P, B = y.shape
        ce = F.cross_entropy(h.reshape(P * B, -1), y.reshape(-1), reduction="none")
        return ce.view(P, B).mean(1)

    @torch.no_grad()
    def accuracy(self, theta: Tensor, images: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
        """Per-instance accuracy ``[P]`` on ``images``/``labels`` (batch statistics per chunk)."""
        P, correct = self.num_instances, 0
        for i in range(0, images.shape[0], chunk):
            x = images[i : i + chunk].to(theta.device)
            h = self.logits(theta, x.unsqueeze(0).expand(P, *x.shape))
            correct = correct + (h.argmax(-1) == labels[i : i + chunk].to(theta.device)).sum(1)
        return correct.float() / images.shape[0]


class Cifar10CNN(Task):
    """The official CIFAR-10 ConvNet (options in the module docstring)."""

    name = "cifar10-cnn"

    def __init__(
        self,
        classes: tuple[int, ...] = (),
        channels: int = 16,
        hidden: int = 32,
        batch: int = 128,
        split: str = "",
        data_dir: str = "",
        init_std: float = 0.01,
    ):
        self.classes = parse_classes(classes)
        if channels <= 0 or hidden <= 0 or batch <= 0:
            raise L2OError(
                f"cifar10-cnn: channels, hidden and batch must be positive, got "
                f"{channels}, {hidden}, {batch}"
            )
        if batch < 2:
            raise L2OError("cifar10-cnn: batch normalization needs batch >= 2")
        if split not in ("",) + cifar10.SPLITS:
            raise L2OError(
                f"cifar10-cnn: split must be one of {cifar10.SPLITS} (or empty: by use), got {split!r}"
            )
        if not (init_std > 0 and math.isfinite(init_std)):
            raise L2OError(f"cifar10-cnn: init_std must be > 0, got {init_std}")
        self.channels, self.hidden, self.batch = int(channels), int(hidden), int(batch)
        self.split, self.data_dir, self.init_std = split, data_dir, float(init_std)
        self.images, self.labels = self._data(self.effective_split)
        self.parameters = sum(
            math.prod(s) for _, s in layer_shapes(self.channels, self.hidden, len(self.classes))
        )
        self.max_batch = max(1, min(100, MAX_COORDINATES // self.parameters))

    def _data(self, split: str) -> tuple[Tensor, Tensor]:
        x, y = cifar10.split(split, self.data_dir or None)
        if self.classes == tuple(range(10)):
            return x, y
        keep = torch.zeros(10, dtype=torch.bool)
        remap = torch.full((10,), -1, dtype=torch.long)
        for i, c in enumerate(self.classes):
            keep[c], remap[c] = True, i
        mask = keep[y]
        if not bool(mask.any()):
            raise L2OError(f"cifar10-cnn: no {split} images of labels {list(self.classes)}")
        return x[mask], remap[y[mask]]

    @property
    def effective_split(self) -> str:
        return self.split or "test"

    def for_role(self, role: str) -> Cifar10CNN:
        """This task for meta-training (``"train"``) or validation (``"val"``); see mnist-mlp."""
        if self.split or role not in ("train", "val"):
            return self
        other = copy.copy(self)
        other.split = role
        other.images, other.labels = other._data(role)
        other.__dict__.pop("_device_data", None)
        return other

    def test_data(self) -> tuple[Tensor, Tensor]:
        """The images accuracy is reported on: the test file's images of the label subset."""
        other = copy.copy(self)
        other.split = "test"
        return other._data("test")

    def describe(self) -> dict:
        return {
            "task": self.name,
            "classes": list(self.classes),
            "channels": self.channels,
            "hidden": self.hidden,
            "batch": self.batch,
            "split": self.effective_split,
            "init_std": self.init_std,
            "parameters": self.parameters,
        }

    def sample(self, seeds: Sequence[int]) -> CifarProblem:
        if not 1 <= len(seeds) <= self.max_batch:
            raise ValueError(
                f"{self.name} batches 1..{self.max_batch} problems, got {len(seeds)} seeds"
            )
        return CifarProblem(self, seeds, self.images, self.labels)
