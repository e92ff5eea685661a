"""Gradient estimators: where a meta-gradient comes from.

The meta-trainer (:mod:`l2o.meta.trainer`) owns the outer loop (meta-optimizer,
schedule, clipping, NaN policy, checkpoints, distribution); an estimator owns how
one meta-gradient is computed.  The interface follows learned_optimization's
``GradientEstimator`` / ``TruncatedStep``:

    worker = estimator.init_worker_state(rule, task, seeds, total, key)
    for length in truncation lengths:          # one meta-update per truncation
        estimate, worker = estimator.compute_gradient_estimate(rule, worker, length)

``seeds`` are this process's problem instances of the trajectory and ``total`` the
number of instances over all processes (``key`` is the trajectory's index, for
estimators that draw noise), so each estimate is this process's share
of the mean over all instances: summing the estimates of every process (an
all-reduce) gives the meta-gradient of the whole meta-batch.

Estimators:

* :class:`TruncatedBPTT` - backpropagation through each truncation of ``length``
  steps (L2L section 2; first order, or ``second_order`` through the optimizee's
  Hessian).  Biased by the truncation; its variance grows with the unroll.
* :class:`PES` - persistent evolution strategies (Vicol, Metz and Sohl-Dickstein,
  ICML 2021): antithetic Gaussian perturbations of the meta-parameters, one pair
  per problem instance, whose accumulated noise makes the estimate unbiased over
  the whole trajectory despite the truncations.  No backpropagation at all.

The few-shot trainer's episodic estimate (adapt on the support set, loss on the
query set) has the same shape: one estimate per meta-update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..errors import L2OError
from ..layout import ParamLayout
from ..seeds import derive_seed
from ..tasks.base import Problem, Task, generator
from .unroll import Trajectory, loss_and_grad, per_instance_term, start, unroll

ESTIMATORS = ("bptt", "pes")


@dataclass
class Estimate:
    """One meta-gradient estimate and what the trainer logs about it."""

    grads: list[Tensor | None]  # aligned with rule.parameters(); None: parameter not reached
    # what the trainer logs, as this process's share (summed over processes): the mean loss
    # per step of the truncation (L2L), or the meta-batch's query loss and accuracy (episodic)
    step_losses: Tensor
    finite: bool  # False: a non-finite loss or gradient (the trainer skips the update)
    metrics: dict = field(default_factory=dict)  # estimator-specific (few-shot: accuracies)


def _chunks(seeds: Sequence[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [list(seeds[i : i + size]) for i in range(0, len(seeds), size)]


# -- truncated backpropagation through time ------------------------------------------------
@dataclass
class _BPTTWorker:
    trajs: list[Trajectory]
    weights: list[float]


class TruncatedBPTT:
    """Truncated backpropagation through the unrolled optimization (L2L, section 2)."""

    name = "bptt"

    def __init__(self, second_order: bool = False, objective: str = "sum"):
        self.second_order, self.objective = bool(second_order), objective

    def init_worker_state(
        self, rule: nn.Module, task: Task, seeds: Sequence[int], total: int, key: int = 0
    ) -> _BPTTWorker:
        groups = _chunks(seeds, task.max_batch)
        trajs = [start(task.sample(g), rule) for g in groups]
        return _BPTTWorker(trajs, [len(g) / total for g in groups])

    def compute_gradient_estimate(
        self, rule: nn.Module, worker: _BPTTWorker, length: int
    ) -> tuple[Estimate, _BPTTWorker]:
        params = list(rule.parameters())
        grads: list[Tensor | None] = [None] * len(params)
        step_mean: Tensor | float = 0.0
        for j, traj in enumerate(worker.trajs):
            meta_loss, losses, worker.trajs[j] = unroll(
                rule, traj, length, second_order=self.second_order, objective=self.objective
            )
            if not torch.isfinite(meta_loss):
                return Estimate(grads, torch.full((length,), math.nan), False), worker
            got = torch.autograd.grad(meta_loss * worker.weights[j], params, allow_unused=True)
            # Summed in chunk order, as .backward() would accumulate them.
            grads = [a if b is None else (b if a is None else a + b) for a, b in zip(got, grads)]
            step_mean = step_mean + losses.mean(1) * worker.weights[j]
        return Estimate(grads, torch.as_tensor(step_mean).reshape(-1), True), worker


# -- persistent evolution strategies ---------------------------------------------------------
class _StepModule(nn.Module):
    """``rule.step`` as a module's forward, so ``functional_call`` can swap its weights."""

    def __init__(self, rule: nn.Module):
        super().__init__()
        self.rule = rule

    def forward(self, theta, grad, loss, state, layout):
        return self.rule.step(theta, grad, loss, state, layout)


@dataclass
class _ParticleGroup:
    """Particles that run as one batched problem (one instance per particle)."""

    problem: Problem
    index: Tensor  # [m] the group's particles among the 2P (+ particles 0..P-1, - P..2P-1)
    layout: ParamLayout  # one instance's layout (tensors without their instance axis)
    perm: Tensor  # flat positions in instance-major order
    theta: Tensor
    grad: Tensor
    losses: Tensor  # [m]
    state: dict


@dataclass
class _PESWorker:
    groups: list[_ParticleGroup]
    seeds: list[int]
    weight: float  # 1 / total instances over all processes
    xi: Tensor  # [P, n_meta] noise accumulated since the trajectory started
    t: int = 0
    key: int = 0
    truncation: int = 0


class PES:
    """Persistent evolution strategies with antithetic pairs (Vicol et al. 2021).

    Each problem instance is one antithetic pair: it is optimized twice, by the rule
    with meta-parameters ``phi + eps`` and ``phi - eps``.  At every truncation a fresh
    ``eps ~ N(0, sigma^2 I)`` is drawn per pair and added to the pair's accumulated
    noise ``xi``; with ``L+`` and ``L-`` the two particles' losses over the truncation,

        grad ~= sum_pairs  w * (L+ - L-) * xi / (2 sigma^2),     w = 1 / total instances

    which is an unbiased estimate of the gradient of the Gaussian-smoothed meta-loss
    over the whole trajectory, however short the truncations.  The noise of a pair is
    a function of (instance seed, truncation), so resuming or sharding instances over
    processes draws the same noise.  The 2P particles run under ``torch.no_grad`` as
    batched problems of at most ``task.max_batch`` instances each (all 2P in one problem
    when the task batches them: the P seeds twice; one problem per particle for a task
    that does not batch, such as the task family), each group with one ``vmap`` over its
    per-particle weight sets (a loop over particles for rules ``vmap`` cannot trace).
    """

    name = "pes"

    def __init__(self, sigma: float = 0.01, objective: str = "sum"):
        if not (sigma > 0 and math.isfinite(sigma)):
            raise L2OError(f"train.pes_sigma must be a positive number, got {sigma}")
        self.sigma, self.objective = float(sigma), objective
        self._vmap_ok: dict[int, bool] = {}

    def init_worker_state(
        self, rule: nn.Module, task: Task, seeds: Sequence[int], total: int, key: int = 0
    ) -> _PESWorker:
        seeds = [int(s) for s in seeds]
        P = len(seeds)
        groups = []
        for chunk in _chunks(list(range(2 * P)), task.max_batch):
            problem = task.sample([seeds[i % P] for i in chunk])
            layout = problem.layout
            if layout.instances != len(chunk):
                raise L2OError(
                    f"train.estimator=pes needs a task whose problems keep one instance per seed "
                    f"({task.name} gives {layout.instances} for {len(chunk)} seeds)"
                )
            theta = problem.init()
            device = theta.device
            perm = torch.argsort(layout.instance_index(device), stable=True)
            losses, grad = loss_and_grad(problem, theta, 0, keep_graph=False)
            one = self._instance_layout(layout)
            with torch.no_grad():
                st = rule.init(theta[perm].view(len(chunk), -1)[0], one)
            state = {k: v.unsqueeze(0).expand(len(chunk), *v.shape).clone() for k, v in st.items()}
            index = torch.tensor(chunk, dtype=torch.long, device=device)
            groups.append(
                _ParticleGroup(
                    problem, index, one, perm, theta.detach(), grad.detach(), losses.detach(), state
                )  # fmt: skip
            )
        n_meta = sum(p.numel() for p in rule.parameters())
        xi = torch.zeros(P, n_meta, device=groups[0].theta.device)
        return _PESWorker(groups, seeds, 1.0 / total, xi, 0, key)

    @staticmethod
    def _instance_layout(layout: ParamLayout) -> ParamLayout:
        """One instance's layout (tensors without their instance axis; a one-instance
        layout has none)."""
        if layout.instances == 1:
            return layout
        return ParamLayout(layout.names, tuple(s[1:] for s in layout.shapes))

    def _noise(self, w: _PESWorker, n_meta: int, device) -> Tensor:
        rows = [
            torch.randn(n_meta, generator=generator(derive_seed("pes", s, w.key, w.truncation)))
            for s in w.seeds
        ]
        return torch.stack(rows).to(device) * self.sigma

    def _particles_step(self, rule, params: dict, theta, grad, losses, state, layout):
        """One step of a group's particles: theta, grad ``[m, n]``, per-particle weights."""
        wrapper = _StepModule(rule)

        def one(p, th, g, loss, st):
            return functional_call(wrapper, {f"rule.{k}": v for k, v in p.items()},
                                   (th, g, loss, st, layout))  # fmt: skip

        if self._vmap_ok.get(id(rule), True):
            try:
                return vmap(one)(params, theta, grad, losses, state)
            except RuntimeError as e:
                if "vmap" not in str(e):
                    raise
                self._vmap_ok[id(rule)] = False  # e.g. a rule that reads a counter with float()
        outs = [
            one({k: v[i] for k, v in params.items()}, theta[i], grad[i], losses[i],
                {k: v[i] for k, v in state.items()})
            for i in range(theta.shape[0])
        ]  # fmt: skip
        return (
            torch.stack([o[0] for o in outs]),
            {k: torch.stack([o[1][k] for o in outs]) for k in outs[0][1]},
        )

    def _run_group(self, rule, g: _ParticleGroup, per: dict, t0: int, length: int) -> tuple:
        """``length`` steps of one group: its per-particle meta-loss and per-step loss sums."""
        m = len(g.index)
        mine = {k: v[g.index] for k, v in per.items()}
        total = torch.zeros(m, device=g.theta.device)
        step_sums = []
        theta, grad, losses, state = g.theta, g.grad, g.losses, g.state
        for k in range(length):
            new_im, state = self._particles_step(
                rule, mine, theta[g.perm].view(m, -1), grad[g.perm].view(m, -1), losses, state,
                g.layout,
            )  # fmt: skip
            theta = torch.empty_like(theta)
            theta[g.perm] = new_im.reshape(-1)
            with torch.enable_grad():
                losses, grad = loss_and_grad(g.problem, theta, t0 + k + 1, keep_graph=False)
            losses, grad = losses.detach(), grad.detach()
            total = total + per_instance_term(losses, self.objective)
            step_sums.append(losses.sum())
        g.theta, g.grad, g.losses, g.state = theta, grad, losses, state
        return total, torch.stack(step_sums)

    def compute_gradient_estimate(
        self, rule: nn.Module, w: _PESWorker, length: int
    ) -> tuple[Estimate, _PESWorker]:
        names = [n for n, _ in rule.named_parameters()]
        params = [p.detach() for _, p in rule.named_parameters()]
        flat = torch.cat([p.reshape(-1) for p in params])
        device = w.xi.device
        P = len(w.seeds)
        eps = self._noise(w, flat.numel(), device)
        w.xi = w.xi + eps
        both = torch.cat([flat + eps, flat - eps])  # [2P, n_meta]: + particles, then -
        per, start_ = {}, 0
        for n, p in zip(names, params, strict=True):
            per[n] = both[:, start_ : start_ + p.numel()].view(2 * P, *p.shape)
            start_ += p.numel()
        # The fast LSTM kernels write into buffers (not traceable by vmap): use the reference.
        fast = getattr(rule, "fast_kernels", None)
        if fast is not None:
            rule.fast_kernels = False
        totals = torch.zeros(2 * P, device=device)
        step_sums = torch.zeros(length, device=device)
        try:
            with torch.no_grad():
                for g in w.groups:
                    total, sums = self._run_group(rule, g, per, w.t, length)
                    totals[g.index] = total
                    step_sums = step_sums + sums
        finally:
            if fast is not None:
                rule.fast_kernels = fast
        w.t += length
        w.truncation += 1
        diff = (totals[:P] - totals[P:]) * w.weight  # [P]
        finite = bool(torch.isfinite(diff).all())
        g = (diff[:, None] * w.xi).sum(0) / (2 * self.sigma**2)
        grads, start_ = [], 0
        for p in params:
            grads.append(g[start_ : start_ + p.numel()].view_as(p).to(p.dtype))
            start_ += p.numel()
        # logged: each pair's mean loss per step, as this process's share of the mean
        return Estimate(grads, step_sums * (w.weight / 2), finite), w


# -- episodic (few-shot) ------------------------------------------------------------------------
@dataclass
class _EpisodicWorker:
    episodes: list[int]  # indices into the sampler's seeded episode stream
    total: int  # episodes of the meta-batch over all processes


class Episodic:
    """Few-shot meta-gradients (Ravi & Larochelle 2017, Algorithm 1; Finn et al. 2017).

    For each episode of the meta-batch the method adapts a learner on the support set
    through its inner loop (``method.meta_loss``: the Meta-Learner LSTM's rule, MAML's
    SGD steps), and the meta-loss is the query cross-entropy averaged over the
    meta-batch.  Episodes are indices into the sampler's seeded stream, so sharding
    them over processes or resuming replays exactly the same episodes.
    """

    name = "episodic"

    def __init__(self, sampler):
        self.sampler = sampler

    def init_worker_state(
        self, model: nn.Module, task=None, seeds: Sequence[int] = (), total: int = 1, key: int = 0
    ) -> _EpisodicWorker:
        return _EpisodicWorker([int(i) for i in seeds], int(total))

    def compute_gradient_estimate(
        self, model: nn.Module, worker: _EpisodicWorker, length: int = 1
    ) -> tuple[Estimate, _EpisodicWorker]:
        params = list(model.parameters())
        grads: list[Tensor | None] = [None] * len(params)
        losses, accs = [], []
        for i in worker.episodes:
            episode = self.sampler.episode(i).to(model.device)
            loss, acc = model.meta_loss(episode)
            got = torch.autograd.grad(loss / worker.total, params, allow_unused=True)
            # Summed in episode order, as .backward() would accumulate them.
            grads = [a if b is None else (b if a is None else a + b) for a, b in zip(got, grads)]
            losses.append(loss.item())
            accs.append(acc)
        finite = math.isfinite(sum(losses))
        # What the trainer logs, as this process's share of the meta-batch means (summed
        # over processes by the updater): query loss and query accuracy.
        logged = torch.tensor([sum(losses), sum(accs)], dtype=torch.float64) / worker.total
        return Estimate(grads, logged, finite, {"losses": losses, "accuracies": accs}), worker


def build_estimator(name: str, *, second_order: bool, objective: str, sigma: float):
    """The estimator named by ``train.estimator``."""
    if name == "bptt":
        return TruncatedBPTT(second_order=second_order, objective=objective)
    if name == "pes":
        if second_order:
            raise L2OError("train.second_order applies to train.estimator=bptt, not pes")
        return PES(sigma=sigma, objective=objective)
    raise L2OError(f"train.estimator must be one of {ESTIMATORS}, got {name!r}")
