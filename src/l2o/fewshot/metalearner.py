"""The Meta-Learner LSTM few-shot method (Ravi & Larochelle, ICLR 2017, Algorithm 1).

Per episode: ``theta_0 = c_I``; T full-batch steps on the support set, each one

    L_t, g_t = loss and gradient of the learner at theta_{t-1}   # constants (first order)
    g_t      = g_t / B            (the official code's double averaging, ``grad_scale="batch"``)
    theta_t, state = rule.step(theta_{t-1}, g_t, L_t, state)     # l2o.rules.MetaLearnerLSTM

then the query forward at ``theta_T``.  With ``second_order=True`` the support loss
and gradient stay in the graph (``create_graph``), which the paper omits.  Gate
values can be recorded for the paper's figure 3 (:func:`l2o.fewshot.plots.plot_gates`).

The T steps are the core engine's inner loop (:func:`l2o.meta.unroll.optimize`) on the
episode's :class:`~l2o.fewshot.support.SupportProblem`; the ``1/B`` scaling is a thin
rule wrapper (:class:`EpisodeRule`) in front of the Meta-Learner LSTM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import L2OError
from ..layout import ParamLayout
from ..meta.unroll import optimize
from ..rules.base import State
from ..rules.metalearner import MetaLearnerConfig, MetaLearnerLSTM
from .base import Adapted, FewShotMethod
from .learner import Conv4, LearnerConfig, resize_head
from .support import SupportProblem

GRAD_SCALES = ("batch", "none")


class EpisodeRule:
    """The Meta-Learner LSTM as the rule of an episode's inner loop.

    With ``batch`` it receives ``grad / batch`` (the official code divides the mean-loss
    gradient by B again; the loss it reads is left as it is).  The LSTM is coordinatewise
    and a support problem is one instance, so it is stepped without a layout.
    """

    def __init__(self, rule: MetaLearnerLSTM, batch: int | None = None):
        self.rule, self.batch = rule, batch
        self.name = rule.name
        self.needs_loss, self.coordinatewise = rule.needs_loss, rule.coordinatewise

    def init(self, theta: Tensor, layout: ParamLayout | None = None) -> State:
        return self.rule.init(theta)

    def step(self, theta, grad, loss, state, layout=None):
        if self.batch is not None:
            grad = grad / self.batch
        return self.rule.step(theta, grad, loss, state)


class MetaLSTMMethod(FewShotMethod):
    """Conv-4 learner + Meta-Learner LSTM update rule with a learned initialisation ``c_I``."""

    method = "meta-lstm"

    def __init__(
        self,
        learner: LearnerConfig,
        inner_steps: int = 12,
        second_order: bool = False,
        grad_scale: str = "batch",
        hidden: int = 20,
        p: float = 10.0,
        init_seed: int = 0,
    ):
        super().__init__(learner)
        if grad_scale not in GRAD_SCALES:
            raise L2OError(f"grad_scale must be one of {GRAD_SCALES}, got {grad_scale!r}")
        self.steps = int(inner_steps)
        self.second_order = bool(second_order)
        self.grad_scale = grad_scale
        self.init_seed = int(init_seed)
        conv = Conv4(learner)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            self.rule = MetaLearnerLSTM(
                MetaLearnerConfig(num_params=conv.layout.numel, hidden=hidden, p=p)
            )
        self.rule.set_init(conv.init_params(self.init_seed))

    def inner_steps(self) -> int:
        return self.steps

    def initial_params(self):
        return self.rule.c_init

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        ways: int | None = None,
        bn_mode: str = "support-running",
        steps: int | None = None,
        training: bool = False,
        gate_log: list | None = None,
    ) -> Adapted:
        """Run the T inner steps; ``gate_log`` (a list) receives (forget, input) gates per step."""
        ways, learner, stats = self.begin_episode(support_x, support_y, ways, bn_mode)
        theta = resize_head(self.rule.c_init, self.learner_config, ways)
        # The paper's first-order cut (support loss and gradient are constants) unless the
        # second-order variant is being meta-trained.
        second_order = self.second_order and training and torch.is_grad_enabled()
        # grad_scale "batch": the official code divides the mean-loss gradient by B again
        batch = support_x.shape[0] if self.grad_scale == "batch" else None

        def log_gates(t: int, theta: Tensor, state: State) -> None:
            f, i = MetaLearnerLSTM.gates(state)
            gate_log.append((f.detach(), i.detach()))

        theta, _, _ = optimize(
            EpisodeRule(self.rule, batch),
            SupportProblem(learner, support_x, support_y, stats),
            self.steps if steps is None else int(steps),
            theta=theta,
            second_order=second_order,
            on_step=None if gate_log is None else log_gates,
        )
        return Adapted(learner, theta, stats, use_running=bn_mode == "support-running")

    def config_dict(self) -> dict:
        return {
            "learner": self.learner_config.to_dict(),
            "inner_steps": self.steps,
            "second_order": self.second_order,
            "grad_scale": self.grad_scale,
            "hidden": self.rule.config.hidden,
            "p": self.rule.config.p,
            "init_seed": self.init_seed,
        }
