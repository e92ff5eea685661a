"""What every few-shot method shares: adapt to a support set, then classify queries.

A method is an ``nn.Module`` whose parameters are its meta-parameters (the
Meta-Learner LSTM's weights and ``c_I``, MAML's initialisation, a fine-tune
baseline's pre-trained body).  One episode is

    adapted = method.adapt(support_x, support_y, bn_mode=...)   # inner loop
    logits  = adapted.logits(query_x)                           # query forward

and meta-training minimises the query cross-entropy (:meth:`FewShotMethod.meta_loss`),
always with batch-statistics BN (the paper's meta-training protocol).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import L2OError
from .learner import BN_MODES, BNStats, Conv4, LearnerConfig


@dataclass
class Adapted:
    """A learner adapted to one support set: flat parameters plus that episode's BN statistics."""

    learner: Conv4
    theta: Tensor
    stats: BNStats | None
    use_running: bool

    def query(self, x: Tensor) -> Tensor:
        """``x`` checked against the learner's image shape and moved to the parameters' device."""
        self.learner.check_images(x, "query images")
        return x.to(self.theta.device)

    def logits(self, x: Tensor) -> Tensor:
        """Class scores of ``x``, on the device of the adapted parameters."""
        return self.learner(self.theta, self.query(x), self.stats, self.use_running)

    def predict(self, x: Tensor) -> Tensor:
        """Episode-local class index of every image in ``x`` (on ``x``'s device)."""
        with torch.no_grad():
            return self.logits(x).argmax(1).to(x.device)


def check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise L2OError(f"--bn-mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")


class FewShotMethod(nn.Module):
    """Base class: subclasses implement :meth:`adapt` and :meth:`config_dict`."""

    method: str = ""
    meta_trained: bool = True  # False: trained by ordinary pre-training (baselines)

    def __init__(self, learner: LearnerConfig):
        super().__init__()
        self.learner_config = learner

    @property
    def device(self) -> torch.device:
        """Where the meta-parameters live; episodes are moved here before adaptation."""
        return next(self.parameters()).device

    def learner_for(self, ways: int) -> Conv4:
        return Conv4(self.learner_config.with_ways(ways))

    def check_episode(self, support_x: Tensor, support_y: Tensor, ways: int | None) -> int:
        Conv4(self.learner_config).check_images(support_x, "support images")
        if support_y.dim() != 1 or support_y.numel() != support_x.shape[0]:
            raise L2OError(
                f"support labels must be a 1-D tensor with one label per image, "
                f"got shape {tuple(support_y.shape)} for {support_x.shape[0]} images"
            )
        n = int(support_y.max().item()) + 1 if ways is None else int(ways)
        if support_y.min().item() < 0 or support_y.max().item() >= n:
            raise L2OError(f"support labels must lie in 0..{n - 1}")
        return n

    def begin_episode(
        self, support_x: Tensor, support_y: Tensor, ways: int | None, bn_mode: str
    ) -> tuple[int, Conv4, BNStats | None]:
        """What every :meth:`adapt` starts with: the checks of the BN mode and the support
        set, the learner for the episode's ways, and fresh BN statistics for this episode
        (``support-running`` mode; ``None`` in ``batch`` mode)."""
        check_bn_mode(bn_mode)
        ways = self.check_episode(support_x, support_y, ways)
        learner = self.learner_for(ways)
        stats = (
            BNStats.fresh(learner.config, support_x.device)
            if bn_mode == "support-running"
            else None
        )
        return ways, learner, stats

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        ways: int | None = None,
        bn_mode: str = "support-running",
        steps: int | None = None,
        training: bool = False,
    ) -> Adapted:
        raise NotImplementedError

    def initial_params(self) -> nn.Parameter:
        """The flat learner initialisation this method meta-learns (``c_I``, MAML's theta_0)."""
        raise L2OError(f"{self.method} has no learned initialisation to warm-start")

    def warm_start(self, body: Tensor) -> None:
        """Start the learned initialisation from a pre-trained Conv-4 body, with a zero head.

        ``body`` is the flat body of a fine-tune / nearest-neighbour checkpoint of the same
        learner (filters, channels, image size); the head is zero, as fine-tune's is.
        """
        init = self.initial_params()
        n_body = Conv4(self.learner_config).body_numel
        if body.dim() != 1 or body.numel() != n_body:
            raise L2OError(
                f"warm start: the pre-trained body has {body.numel()} values, this "
                f"{self.method} learner's body has {n_body} (filters, channels or image size differ)"
            )
        with torch.no_grad():
            init[:n_body].copy_(body)
            init[n_body:].zero_()

    def meta_loss(self, episode) -> tuple[Tensor, float]:
        """Query cross-entropy after adapting on the support set (batch-statistics BN)."""
        ways = len(episode.classes)
        adapted = self.adapt(
            episode.support_x, episode.support_y, ways, bn_mode="batch", training=True
        )
        logits = adapted.logits(episode.query_x)
        loss = F.cross_entropy(logits, episode.query_y)
        acc = (logits.argmax(1) == episode.query_y).float().mean().item()
        return loss, acc

    def config_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: dict):
        """The method from its :meth:`config_dict` (``"learner"`` plus constructor arguments)."""
        cfg = dict(cfg)
        return cls(LearnerConfig.from_dict(cfg.pop("learner")), **cfg)

    def inner_steps(self) -> int | None:
        return None

    def training_episodes(self, queries: int) -> tuple[int, int]:
        """(ways, queries per class) of meta-training episodes, given the test episodes' queries:
        the test shape, unless the method trains on other episodes (ProtoNet's wider ones)."""
        return self.learner_config.ways, queries

    def describe(self) -> dict:
        return {"method": self.method, "config": self.config_dict()}
