"""An episode's support set as a :class:`l2o.tasks.base.Problem`.

Every few-shot method with an inner loop (the Meta-Learner LSTM, MAML, fine-tune)
adapts the learner by optimizing this problem with an update rule through the core
engine (:func:`l2o.meta.unroll.optimize`), the same engine as the L2L half:

    problem = SupportProblem(learner, support_x, support_y, stats)
    theta, state, losses = optimize(rule, problem, steps, theta=theta0, ...)

The loss is the learner's full-batch support cross-entropy, one instance (``[1]``).
BN statistics: in ``support-running`` mode ``stats`` is the episode's fresh
:class:`~l2o.fewshot.learner.BNStats`, and every evaluation of the loss (one per
inner step, no extra forward) normalises with the support batch's statistics and
accumulates them into ``stats`` in place, outside autograd, for the query forward;
in ``batch`` mode ``stats`` is ``None`` and nothing is kept.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..tasks.base import Problem
from .learner import BNStats, Conv4


class SupportProblem(Problem):
    """Support cross-entropy of ``learner`` at flat parameters ``theta`` (full batch, every step)."""

    num_instances = 1

    def __init__(
        self,
        learner: Conv4,
        x: Tensor,
        y: Tensor,
        stats: BNStats | None = None,
        theta0: Tensor | None = None,
    ):
        self.learner = learner
        self.layout = learner.layout
        self.x, self.y, self.stats = x, y, stats
        self.theta0 = theta0

    def init(self) -> Tensor:
        """``theta0`` detached (the adapting method passes its own, differentiable, start)."""
        if self.theta0 is None:
            raise ValueError("this support problem has no initial parameters (pass theta0)")
        return self.theta0.detach().clone()

    def loss(self, theta: Tensor, t: int) -> Tensor:
        # The same batch every step (full-batch adaptation): ``t`` is not used.
        return F.cross_entropy(self.learner(theta, self.x, self.stats), self.y).reshape(1)
