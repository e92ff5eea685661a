"""Any ``nn.Module`` + loss + data as a task, through ``torch.func.functional_call``.

    task = ModuleTask(
        model_fn=lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)),
        loss_fn=nn.functional.mse_loss,
        batch_fn=lambda seed, t: my_batch(seed, t),   # -> (inputs, targets)
    )

Each problem builds a fresh module with its own seed (PyTorch's default
initialisation under that seed, or ``init_fn(module, generator)``), so the
parameters are the module's own, flattened in ``named_parameters`` order.  The
module itself is never modified: the flat parameter vector is viewed as named
tensors and passed to ``functional_call``.  Buffers (batch-norm statistics) are
passed along unchanged; put batch-norm layers in ``train()`` mode (batch
statistics, as in the paper) or disable ``track_running_stats``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .base import ParamLayout, Problem, Task, generator

BatchFn = Callable[[int, int], tuple]


class ModuleProblem(Problem):
    def __init__(self, module: nn.Module, loss_fn: Callable, batch_fn: BatchFn, seed: int):
        self.module, self.loss_fn, self.batch_fn, self.seed = module, loss_fn, batch_fn, seed
        named = {n: p.detach() for n, p in module.named_parameters()}
        if not named:
            raise ValueError("the module has no parameters to optimize")
        self.layout = ParamLayout.from_tensors(named)
        self.theta0 = self.layout.flatten(list(named.values())).clone()
        self.buffers = dict(module.named_buffers())

    def init(self) -> Tensor:
        return self.theta0.clone()

    def to(self, device) -> ModuleProblem:
        moved = copy.copy(self)
        moved.module = copy.deepcopy(self.module).to(device)
        moved.theta0 = self.theta0.to(device)
        moved.buffers = dict(moved.module.named_buffers())
        return moved

    def loss(self, theta: Tensor, t: int) -> Tensor:
        inputs, targets = self.batch_fn(self.seed, t)
        inputs, targets = inputs.to(theta.device), targets.to(theta.device)
        params = self.layout.unflatten(theta)
        out = functional_call(self.module, {**params, **self.buffers}, (inputs,))
        return self.loss_fn(out, targets).reshape(1)


class ModuleTask(Task):
    """Wraps a module factory, a loss and a per-(seed, step) batch function."""

    max_batch = 1

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        batch_fn: BatchFn,
        init_fn: Callable[[nn.Module, torch.Generator], None] | None = None,
        name: str = "module",
    ):
        self.model_fn, self.loss_fn, self.batch_fn, self.init_fn = (
            model_fn,
            loss_fn,
            batch_fn,
            init_fn,
        )
        self.name = name

    def sample(self, seeds: Sequence[int]) -> ModuleProblem:
        if len(seeds) != 1:
            raise ValueError(f"{self.name} samples one problem per seed; got {len(seeds)} seeds")
        seed = int(seeds[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % (2**63 - 1))
            module = self.model_fn()
        if self.init_fn is not None:
            self.init_fn(module, generator(seed))
        return ModuleProblem(module, self.loss_fn, self.batch_fn, seed)
