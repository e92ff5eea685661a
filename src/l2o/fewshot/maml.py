"""MAML and first-order MAML (Finn et al., ICML 2017) on the same functional Conv-4.

MAML is the Meta-Learner LSTM with ``f_t = 1`` and ``i_t = alpha`` fixed: only the
initialisation ``theta_0`` is meta-learned.  Per episode

    theta_s = theta_{s-1} - alpha * grad L_support(theta_{s-1}),   s = 1..steps

and the meta-loss is the query cross-entropy at ``theta_steps``.  Full MAML keeps the
inner gradients in the graph (``create_graph``, second-order meta-gradients);
first-order MAML treats them as constants, so ``d theta_steps / d theta_0 = I``.
The inner loop is the core engine's: rule :class:`l2o.rules.SGD` (``alpha``) on the
episode's :class:`~l2o.fewshot.support.SupportProblem`, :func:`l2o.meta.unroll.optimize`.
The outer loop (Adam, meta-batch) is :mod:`l2o.fewshot.train`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import L2OError
from ..meta.unroll import optimize
from ..rules import SGD
from .base import Adapted, FewShotMethod
from .learner import Conv4, LearnerConfig, resize_head
from .support import SupportProblem


class MAMLMethod(FewShotMethod):
    """Learned initialisation + plain SGD inner loop; ``first_order`` gives FOMAML."""

    method = "maml"

    def __init__(
        self,
        learner: LearnerConfig,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        first_order: bool = False,
        init_seed: int = 0,
    ):
        super().__init__(learner)
        self.steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        if not (self.inner_lr > 0 and math.isfinite(self.inner_lr)):
            # the inner loop is l2o.rules.SGD, which takes a positive finite rate
            raise L2OError(f"inner_lr must be a positive finite number, got {inner_lr}")
        self.first_order = bool(first_order)
        self.init_seed = int(init_seed)
        self.method = "fomaml" if self.first_order else "maml"
        self.theta0 = nn.Parameter(Conv4(learner).init_params(self.init_seed))

    def inner_steps(self) -> int:
        return self.steps

    def initial_params(self):
        return self.theta0

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        ways: int | None = None,
        bn_mode: str = "support-running",
        steps: int | None = None,
        training: bool = False,
    ) -> Adapted:
        ways, learner, stats = self.begin_episode(support_x, support_y, ways, bn_mode)
        theta = resize_head(self.theta0, self.learner_config, ways)
        # Second order only while meta-training a full MAML; otherwise the first-order cut.
        second_order = training and not self.first_order and torch.is_grad_enabled()
        theta, _, _ = optimize(
            SGD(self.inner_lr),
            SupportProblem(learner, support_x, support_y, stats),
            self.steps if steps is None else int(steps),
            theta=theta,
            second_order=second_order,
        )
        return Adapted(learner, theta, stats, use_running=bn_mode == "support-running")

    def config_dict(self) -> dict:
        return {
            "learner": self.learner_config.to_dict(),
            "inner_steps": self.steps,
            "inner_lr": self.inner_lr,
            "first_order": self.first_order,
            "init_seed": self.init_seed,
        }
