"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017) on the same Conv-4 body.

The meta-parameters are the Conv-4 body alone (no head, no inner loop).  Per episode

    c_k       = mean of the support embeddings of class k          (the prototypes)
    logits_qk = -|| f(x_q) - c_k ||^2                              (squared Euclidean)

and meta-training minimises the query cross-entropy of these logits with the
episodic trainer of :mod:`l2o.fewshot.train`.  As in the paper, training episodes
may have more classes than test episodes (``train_ways``; Snell et al. train
Omniglot with 60-way episodes for both 1-shot and 5-shot): more classes per
episode make the softmax harder and the embedding more discriminative.  The
prototypes work for any number of ways, so one model serves every test setting.
``train_queries`` sets the query images per class of training episodes (the paper:
5 on Omniglot, which also keeps a 60-way episode cheap; None: as the test episodes).

Batch norm follows the shared protocol: the support forward gathers the episode's
statistics (``support-running``) and the query forward uses them, exactly as for
nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import L2OError
from .base import Adapted, FewShotMethod
from .learner import Conv4, LearnerConfig
from .registry import MethodSpec, register


def prototypes(features: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``[ways, d]`` mean of the rows of ``features`` with each label 0..ways-1."""
    sums = features.new_zeros(ways, features.shape[1]).index_add(0, labels, features)
    counts = torch.bincount(labels, minlength=ways).to(features.dtype)
    return sums / counts.unsqueeze(1)


def squared_distances(queries: Tensor, protos: Tensor) -> Tensor:
    """``[n, ways]`` squared Euclidean distances; exact differences, not the expanded
    ``|q|^2 - 2 q.c + |c|^2`` form, which cancels badly when a query sits on a prototype."""
    return (queries.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


@dataclass
class ProtoAdapted(Adapted):
    """Prototypes of one support set; queries are scored by negative squared distance."""

    prototypes: Tensor

    def logits(self, x: Tensor) -> Tensor:
        feats = self.learner.features(self.theta, self.query(x), self.stats, self.use_running)
        return -squared_distances(feats, self.prototypes)


class ProtoNet(FewShotMethod):
    """Conv-4 embedding + class-mean prototypes; trained on ``train_ways``-way episodes."""

    method = "protonet"

    def __init__(
        self,
        learner: LearnerConfig,
        train_ways: int | None = None,
        train_queries: int | None = None,
        init_seed: int = 0,
    ):
        super().__init__(learner)
        self.train_ways = learner.ways if train_ways is None else int(train_ways)
        self.train_queries = None if train_queries is None else int(train_queries)
        if self.train_queries is not None and self.train_queries < 1:
            raise L2OError(f"--train-queries must be >= 1, got {self.train_queries}")
        if self.train_ways < learner.ways:
            # Fewer training ways than test ways is allowed by the maths but never by the paper;
            # most likely the two options were swapped.
            raise L2OError(
                f"--train-ways must be at least --ways ({learner.ways}), got {self.train_ways}"
            )
        self.init_seed = int(init_seed)
        conv = Conv4(learner)
        self.body = nn.Parameter(conv.init_params(self.init_seed)[: conv.body_numel])

    def training_episodes(self, queries: int) -> tuple[int, int]:
        return self.train_ways, self.train_queries or queries

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        ways: int | None = None,
        bn_mode: str = "support-running",
        steps: int | None = None,
        training: bool = False,
    ) -> Adapted:
        """Prototypes of the support set (``steps`` is ignored: there is no inner loop)."""
        ways, learner, stats = self.begin_episode(support_x, support_y, ways, bn_mode)
        # features() reads a full learner vector; the head slots are never used
        theta = torch.cat([self.body, self.body.new_zeros(Conv4.head_numel(learner.config))])
        feats = learner.features(theta, support_x, stats)
        return ProtoAdapted(
            learner,
            theta,
            stats,
            use_running=bn_mode == "support-running",
            prototypes=prototypes(feats, support_y, ways),
        )

    def config_dict(self) -> dict:
        return {
            "learner": self.learner_config.to_dict(),
            "train_ways": self.train_ways,
            "train_queries": self.train_queries,
            "init_seed": self.init_seed,
        }


def default_hparams(dataset: str, ways: int, shots: int) -> dict:
    # Snell et al.: 60-way training episodes with 5 queries per class on Omniglot (our
    # meta-train split has 145 classes, so 60 fits), 30-way 1-shot / 20-way 5-shot with
    # 15 queries on miniImageNet; Adam at 1e-3, no clipping, one episode per update.
    if dataset == "omniglot":
        train_ways, train_queries = 60, 5
    else:
        train_ways, train_queries = (30 if shots == 1 else 20), 15
    return {
        "inner_steps": None,
        "clip": None,
        "meta_batch": 1,
        "train_ways": max(train_ways, ways),
        "train_queries": train_queries,
    }


register(
    MethodSpec(
        name="protonet",
        cls=ProtoNet,
        build=lambda learner, hp, args: ProtoNet(
            learner,
            train_ways=hp["train_ways"],
            train_queries=hp["train_queries"],
            init_seed=args.seed,
        ),
        hparams=default_hparams,
        options=("train_ways", "train_queries"),
        # 60-way episodes, 0.4 s (1-shot) / 0.6 s (5-shot) each on a free core and about
        # 0.5 / 0.9 s beside other jobs: 1,600 fit in 15 min for 1-shot (5w5s: pass 1,000)
        bench_steps=1600,
    )
)
