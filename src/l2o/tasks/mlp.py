"""MNIST MLP classifiers, the paper's second problem family (L2L section 3.2).

``mnist-mlp``: an MLP 784 -> hidden... -> 10 with ``activation`` (sigmoid, relu or
tanh) and cross-entropy, trained on a fresh minibatch of ``batch`` images per
step, drawn uniformly *with replacement* from the split (as the official code
does) with a generator seeded by :func:`~l2o.tasks.base.step_seed` (problem seed,
step): the minibatch of a step is a function of (seed, step) only, so every
optimizer evaluated on a seed sees the same minibatches.

Defaults are the paper's: one hidden layer of 20 sigmoid units, batch 128.
Parameters are initialised as in the official code (deepmind/learning-to-learn
``problems.mnist``): every weight and bias i.i.d. N(0, ``init_std``^2) with
``init_std = 0.01``, seeded per problem; ``init_std=0`` uses PyTorch's
``nn.Linear`` default initialisation instead (also seeded per problem).

Data splits (:mod:`l2o.data.mnist`): ``split=train`` (MNIST-train 0..49,999),
``val`` (MNIST-train 50,000..59,999) or ``test`` (t10k).  The default ``split=``
(empty) means "by use": meta-training uses ``train`` and its validation ``val``
(:meth:`MnistMLP.for_role`, called by the trainer), while ``compare``, ``l2o
study`` and the benchmarks evaluate (and tune baselines) on ``test``, images
meta-training never saw.  ``data_dir`` overrides ``--data-dir`` / ``$L2O_DATA``.

The network is evaluated functionally on the flat parameter vector (no
``nn.Module``): several independent problems are batched into one
:class:`MLPProblem` whose tensors carry a leading instance dimension and whose
layers are ``torch.baddbmm`` calls, so evaluating 100 optimizees costs a few
batched matrix products per step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data import mnist
from .base import ParamLayout, Problem, Task, generator, step_seed

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
#: coordinates (instances x parameters) one batched problem may hold
MAX_COORDINATES = 1_000_000


class MLPProblem(Problem):
    """``P`` independent MLPs: per-instance mean cross-entropy on each one's own minibatch."""

    def __init__(self, task: MnistMLP, seeds: Sequence[int], images: Tensor, labels: Tensor):
        self.task, self.seeds = task, [int(s) for s in seeds]
        self.images, self.labels = images, labels
        self.num_instances = P = len(self.seeds)
        sizes = task.sizes
        names, shapes = [], []
        for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            names += [f"w{k}", f"b{k}"]
            shapes += [(P, i, o), (P, o)]
        self.layout = ParamLayout(tuple(names), tuple(shapes), P)
        self.act = ACTIVATIONS[task.activation]
        self.theta0 = self._init()

    def _init(self) -> Tensor:
        per: list[list[Tensor]] = [[] for _ in self.layout.names]
        for seed in self.seeds:
            g = generator(seed)
            for j, shape in enumerate(self.layout.shapes):
                shp = shape[1:]
                if self.task.init_std > 0:
                    per[j].append(torch.randn(shp, generator=g) * self.task.init_std)
                else:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for w and b
                    fan_in = self.layout.shapes[j - (j % 2)][1]
                    bound = 1.0 / math.sqrt(fan_in)
                    per[j].append((torch.rand(shp, generator=g) * 2 - 1) * bound)
        return self.layout.flatten([torch.stack(ts) for ts in per])

    def init(self) -> Tensor:
        return self.theta0.clone()

    def to(self, device) -> MLPProblem:
        device = torch.device(device)
        cache = self.task.__dict__.setdefault("_device_data", {})
        if device not in cache:  # the data set moves once per task and device, not per problem
            cache[device] = (self.images.to(device), self.labels.to(device))
        moved = copy.copy(self)
        moved.images, moved.labels = cache[device]
        moved.theta0 = self.theta0.to(device)
        return moved

    def batch(self, t: int) -> tuple[Tensor, Tensor]:
        """Images ``[P, B, 784]`` and labels ``[P, B]`` of step ``t`` (one minibatch per instance)."""
        n, b = self.images.shape[0], self.task.batch
        idx = torch.stack(
            [torch.randint(n, (b,), generator=generator(step_seed(s, t))) for s in self.seeds]
        )
        idx = idx.to(self.images.device)
        return self.images[idx], self.labels[idx]

    def loss(self, theta: Tensor, t: int) -> Tensor:
        x, y = self.batch(t)
        params = self.layout.unflatten(theta)
        layers = len(self.task.sizes) - 1
        h = x
        for k in range(layers):
            h = torch.baddbmm(params[f"b{k}"].unsqueeze(1), h, params[f"w{k}"])
            if k < layers - 1:
                h = self.act(h)
        P, B = y.shape
        ce = F.cross_entropy(h.reshape(P * B, -1), y.reshape(-1), reduction="none")
        return ce.view(P, B).mean(1)


class MnistMLP(Task):
    """MLP classifiers on MNIST (options in the module docstring)."""

    name = "mnist-mlp"

    def __init__(
        self,
        hidden: tuple[int, ...] = (20,),
        activation: str = "sigmoid",
        batch: int = 128,
        split: str = "",
        data_dir: str = "",
        init_std: float = 0.01,
    ):
        hidden = (hidden,) if isinstance(hidden, int) else tuple(int(h) for h in hidden)
        if any(h <= 0 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if batch <= 0:
            raise ValueError(f"batch must be positive, got {batch}")
        if split not in ("",) + mnist.SPLITS:
            raise ValueError(
                f"split must be one of {mnist.SPLITS} (or empty: by use), got {split!r}"
            )
        if not (init_std >= 0 and math.isfinite(init_std)):
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.hidden, self.activation, self.batch = hidden, activation, int(batch)
        self.split, self.data_dir, self.init_std = split, data_dir, float(init_std)
        self.images, self.labels = mnist.split(self.effective_split, data_dir or None)
        self.sizes = (self.images.shape[1], *hidden, 10)
        numel = sum(i * o + o for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True))
        self.max_batch = max(1, min(50, MAX_COORDINATES // numel))

    @property
    def effective_split(self) -> str:
        return self.split or "test"

    def for_role(self, role: str) -> MnistMLP:
        """This task for meta-training (``role="train"``) or validation (``"val"``).

        An explicit ``split`` is kept; the default (empty) becomes ``train`` / ``val``.
        """
        if self.split or role not in ("train", "val"):
            return self
        other = copy.copy(self)
        other.split = role
        other.images, other.labels = mnist.split(role, self.data_dir or None)
        return other

    def describe(self) -> dict:
        return {
            "task": self.name,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "batch": self.batch,
            "split": self.effective_split,
            "init_std": self.init_std,
            "parameters": sum(
                i * o + o for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True)
            ),
        }

    def sample(self, seeds: Sequence[int]) -> MLPProblem:
        if not 1 <= len(seeds) <= self.max_batch:
            raise ValueError(
                f"{self.name} batches 1..{self.max_batch} problems, got {len(seeds)} seeds"
            )
        return MLPProblem(self, seeds, self.images, self.labels)
