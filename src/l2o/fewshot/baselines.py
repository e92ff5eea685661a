"""Baselines of Ravi & Larochelle's Table 1 on the same Conv-4 learner and episodes.

* **fine-tune** - pre-train the learner as an ordinary classifier over *all*
  meta-training classes (Adam, minibatches), then per episode put a fresh (zero)
  head on the pre-trained body and run plain SGD on the support set, the whole
  network, with its learning rate and number of steps chosen on meta-validation
  episodes from a small grid (:func:`tune_finetune`).
* **nearest neighbour** - classify each query image as the class of the support
  image whose pre-trained features are closest in cosine similarity.

Both use the same BN protocol as the meta-learned methods (``bn_mode``), so every
method of a comparison sees the same episodes, learner and normalisation.
"""

from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import L2OError
from ..meta.unroll import optimize
from ..rules import SGD
from .base import Adapted, FewShotMethod
from .learner import Conv4, LearnerConfig
from .support import SupportProblem

FINETUNE_LRS = (0.5, 0.1, 0.01, 0.001)
FINETUNE_STEPS = (5, 15, 50)


class _PretrainedBody(FewShotMethod):
    """A baseline built on a Conv-4 body pre-trained as an ordinary classifier (:func:`pretrain`)."""

    meta_trained = False

    def __init__(self, learner: LearnerConfig):
        super().__init__(learner)
        self.body = nn.Parameter(Conv4(learner).init_params(0)[: Conv4(learner).body_numel])

    def theta_for(self, learner: Conv4) -> Tensor:
        """The body (detached: baselines are not meta-trained) with a zero head for ``learner``."""
        head = self.body.new_zeros(Conv4.head_numel(learner.config))
        return torch.cat([self.body.detach(), head])


class FineTune(_PretrainedBody):
    """Pre-trained body + fresh zero head, SGD on the support set (lr and steps tuned)."""

    method = "finetune"

    def __init__(self, learner: LearnerConfig, lr: float = 0.1, steps: int = 15):
        super().__init__(learner)
        self.lr = float(lr)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            # the inner loop is l2o.rules.SGD, which takes a positive finite rate
            raise L2OError(f"fine-tune lr must be a positive finite number, got {lr}")
        self.steps = int(steps)

    def inner_steps(self) -> int:
        return self.steps

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
        theta = self.theta_for(learner)
        # Not meta-trained: first-order steps of a frozen SGD, no meta-graph.
        theta, _, _ = optimize(
            SGD(self.lr),
            SupportProblem(learner, support_x, support_y, stats),
            self.steps if steps is None else int(steps),
            theta=theta,
            keep_graph=False,
        )
        if self.steps == 0 and stats is not None:  # still gather the support statistics
            learner.features(theta, support_x, stats)
        return Adapted(learner, theta, stats, use_running=bn_mode == "support-running")

    def config_dict(self) -> dict:
        return {"learner": self.learner_config.to_dict(), "lr": self.lr, "steps": self.steps}


class _NNAdapted(Adapted):
    support_features: Tensor
    support_y: Tensor
    ways: int

    def logits(self, x: Tensor) -> Tensor:
        feats = self.learner.features(self.theta, self.query(x), self.stats, self.use_running)
        q = F.normalize(feats, dim=1)
        sim = q @ self.support_features.t()  # [n_query, n_support] cosine similarities
        # score of a class = similarity of its nearest support image
        scores = sim.new_full((sim.shape[0], self.ways), -2.0)
        return scores.scatter_reduce(1, self.support_y.expand_as(sim), sim, reduce="amax")


class NearestNeighbour(_PretrainedBody):
    """1-nearest-neighbour in cosine similarity on the pre-trained body's features."""

    method = "nearest-neighbour"

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
        theta = self.theta_for(learner)
        with torch.no_grad():
            feats = F.normalize(learner.features(theta, support_x, stats), dim=1)
        out = _NNAdapted(learner, theta, stats, use_running=bn_mode == "support-running")
        out.support_features, out.support_y, out.ways = feats, support_y, ways
        return out

    def config_dict(self) -> dict:
        return {"learner": self.learner_config.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict) -> NearestNeighbour:
        # only the learner: a fine-tune checkpoint's config (lr, steps) also builds one
        return cls(LearnerConfig.from_dict(cfg["learner"]))


class Pretraining:
    """The Conv-4 trained as an ordinary ``dataset.num_classes()``-way classifier, one
    minibatch per :meth:`step` (Adam); minibatches come from a generator seeded with
    ``seed`` over shuffled passes of the data, so a run is reproducible and its whole state
    (weights, Adam, generator, position in the pass) can be checkpointed.
    """

    def __init__(
        self,
        dataset,
        learner: LearnerConfig,
        batch_size: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if dataset.images.shape[1:] != (
            learner.in_channels,
            learner.image_size,
            learner.image_size,
        ):
            raise L2OError(
                f"pre-training images have shape {tuple(dataset.images.shape[1:])}, expected "
                f"{(learner.in_channels, learner.image_size, learner.image_size)}"
            )
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.conv = Conv4(learner.with_ways(dataset.num_classes()))
        self.theta = nn.Parameter(self.conv.init_params(seed).to(device))
        self.opt = torch.optim.Adam([self.theta], lr=lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(dataset.images.shape[0], generator=self.gen)
        self.pos = 0

    def step(self) -> float:
        """One minibatch of Adam; returns its loss."""
        n = self.dataset.images.shape[0]
        if self.pos + self.batch_size > n:
            self.order, self.pos = torch.randperm(n, generator=self.gen), 0
        ix = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        x, y = self.dataset.images[ix].to(self.device), self.dataset.labels[ix].to(self.device)
        loss = F.cross_entropy(self.conv(self.theta, x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    @property
    def body(self) -> Tensor:
        """The flat body (every weight but the classifier head); a view, detached."""
        return self.theta.detach()[: self.conv.body_numel]


def pretrain(
    dataset,
    learner: LearnerConfig,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    callback=None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Train the Conv-4 as a ``dataset.num_classes()``-way classifier; returns the flat body.

    ``callback(step, body, loss)`` is called after every step.  ``l2o fewshot train`` runs
    the same steps through :class:`l2o.fewshot.pretrain.Pretrainer` (validation, best body,
    checkpoints and resume).
    """
    run = Pretraining(dataset, learner, batch_size, lr, seed, device)
    for step in range(1, steps + 1):
        loss = run.step()
        if callback is not None:
            callback(step, run.body, loss)
    return run.body.clone()


def tune_finetune(
    model: FineTune, episodes: list, bn_mode: str, lrs=FINETUNE_LRS, steps=FINETUNE_STEPS
) -> dict:
    """Pick the fine-tune learning rate and step count with the best mean accuracy on ``episodes``."""
    from .evaluate import run_episodes

    results = []
    t0 = time.time()
    for lr, n_steps in itertools.product(lrs, steps):
        model.lr, model.steps = float(lr), int(n_steps)
        accs = run_episodes(model, episodes, bn_mode)
        results.append({"lr": lr, "steps": n_steps, "val_accuracy": 100.0 * sum(accs) / len(accs)})
    best = max(results, key=lambda r: r["val_accuracy"])
    model.lr, model.steps = float(best["lr"]), int(best["steps"])
    return {"grid": results, "chosen": best, "episodes": len(episodes), "seconds": time.time() - t0}
