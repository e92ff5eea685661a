"""Tasks: families of optimization problems (optimizees).

A :class:`Task` is a *family*; ``task.sample(seeds)`` draws concrete problem
instances, one per seed, batched into one :class:`Problem` when the task can do
that (``max_batch``).  A problem is a pure function of its parameters:

    theta0 = problem.init()            # flat tensor of every coordinate
    losses = problem.loss(theta, t)    # [P] losses, one per batched instance

``t`` is the step index: a problem draws its own minibatch for step ``t`` from
its seed, so the loss and the gradient at a step share one minibatch, and every
optimizer evaluated on the same seed sees the same minibatches.

Losses come back per instance so that P independent problems optimized at once
stay independent: gradients are taken of ``losses.sum()`` (each instance's
gradient is its own), while reports use the mean over instances.

Parameters are flat: :class:`~l2o.layout.ParamLayout` maps the flat vector to
named tensors (views, no copies) and says which coordinates belong to which of
the P instances, which is what lets every update rule treat all coordinates of
all tensors as one batch while coupling rules stay per instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import ParamLayout


class Problem:
    """A concrete optimization problem (possibly P independent instances batched)."""

    layout: ParamLayout
    num_instances: int = 1

    def init(self) -> Tensor:
        """Flat initial parameters theta0 (a fresh tensor, no grad)."""
        raise NotImplementedError

    def loss(self, theta: Tensor, t: int) -> Tensor:
        """Per-instance losses ``[P]`` at flat parameters ``theta`` on step ``t``'s minibatch."""
        raise NotImplementedError

    def to(self, device: str | torch.device) -> Problem:
        """This problem with its data on ``device`` (theta0 there, losses computed there)."""
        from ..errors import L2OError

        raise L2OError(f"{type(self).__name__} cannot move to {device}; it runs on the CPU only")


class Task:
    """A family of problems. Subclasses set ``name`` and implement :meth:`sample`."""

    name: str = "task"
    #: how many seeds one :class:`Problem` may batch (independent instances in one tensor)
    max_batch: int = 1

    def sample(self, seeds: Sequence[int]) -> Problem:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.name}


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (folded into 63 bits)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) % (2**63 - 1))
    return g


def step_seed(seed: int, t: int) -> int:
    """Seed of the minibatch of step ``t`` of the problem with seed ``seed``."""
    return (int(seed) * 1_000_003 + int(t) * 7_919 + 17) % (2**63 - 1)


class OnDevice(Task):
    """A task whose problems are moved to ``device`` as they are sampled."""

    def __init__(self, task: Task, device: torch.device):
        self.inner, self.device = task, device
        self.name, self.max_batch = task.name, task.max_batch

    def sample(self, seeds: Sequence[int]) -> Problem:
        return self.inner.sample(seeds).to(self.device)

    def describe(self) -> dict:
        return self.inner.describe()


def on_device(task: Task, device: str | torch.device) -> Task:
    """``task`` itself on the CPU (problems are built there), else a :class:`OnDevice`."""
    device = torch.device(device)
    return task if device.type == "cpu" else OnDevice(task, device)
