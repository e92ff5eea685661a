"""The official code's ``simple`` problem: f(x) = x^2 with a scalar x starting at 1.

Used by the golden tests of deepmind/learning-to-learn (``meta_test.testResults``
and ``convergence_test``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import ParamLayout, Problem, Task


class SimpleProblem(Problem):
    def __init__(self, n: int):
        self.layout = ParamLayout(("x",), ((n,),), n)  # every scalar its own instance
        self.num_instances = n

    device = torch.device("cpu")

    def init(self) -> Tensor:
        return torch.ones(self.layout.numel, device=self.device)

    def to(self, device) -> SimpleProblem:
        moved = SimpleProblem(self.num_instances)
        moved.device = torch.device(device)
        return moved

    def loss(self, theta: Tensor, t: int) -> Tensor:
        return theta * theta


class Simple(Task):
    name = "simple"
    max_batch = 1_000_000

    def sample(self, seeds: Sequence[int]) -> SimpleProblem:
        return SimpleProblem(len(seeds))
