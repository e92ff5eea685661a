"""Random quadratics f(theta) = ||W theta - y||^2 (Andrychowicz et al. 2016, section 3.1).

Two forms exist and both are here, named:

* ``quadratic`` - the paper's: 10-dim, W and y drawn i.i.d. N(0, 1), theta0 = 0,
  a new function per trajectory.  Each function is its own instance (per-instance
  loss = ||W theta - y||^2, so one function's gradient is unaffected by how many are
  batched).  Initial loss ||y||^2 is about 10.
* ``quadratic-code`` - the official TensorFlow code's: W, y ~ U[0, 1), x0 ~ N(0,
  0.01^2), 128 functions per problem and the loss is their *mean* (one instance).
  The gradient of each function is then scaled by 1/128.

Every function is generated from its own seed, so function ``i`` of a test set is
the same whether it is evaluated alone or batched with others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import ParamLayout, Problem, Task, generator


class QuadraticProblem(Problem):
    def __init__(self, W: Tensor, y: Tensor, theta0: Tensor, mean_over_batch: bool):
        self.W, self.y, self.theta0 = W, y, theta0
        self.mean_over_batch = mean_over_batch
        self.num_instances = 1 if mean_over_batch else W.shape[0]
        # The paper's form: row p of theta is function p (its own instance).  The code's
        # form is one instance whose loss averages 128 functions.
        self.layout = ParamLayout(("theta",), (tuple(theta0.shape),), self.num_instances)

    def init(self) -> Tensor:
        return self.theta0.reshape(-1).clone()

    def to(self, device) -> QuadraticProblem:
        W, y, x = (v.to(device) for v in (self.W, self.y, self.theta0))
        return QuadraticProblem(W, y, x, self.mean_over_batch)

    def loss(self, theta: Tensor, t: int) -> Tensor:
        x = theta.view(self.theta0.shape)
        r = torch.einsum("bij,bj->bi", self.W, x) - self.y
        per_fn = (r * r).sum(-1)
        return per_fn.mean().reshape(1) if self.mean_over_batch else per_fn


class Quadratic(Task):
    """The paper's random quadratics (Gaussian W, y; theta0 = 0 by default)."""

    name = "quadratic"
    max_batch = 1_000_000

    def __init__(self, dim: int = 10, init_std: float = 0.0, dtype: torch.dtype = torch.float32):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.dim, self.init_std, self.dtype = int(dim), float(init_std), dtype

    def describe(self) -> dict:
        return {"task": self.name, "dim": self.dim, "init_std": self.init_std}

    def sample(self, seeds: Sequence[int]) -> QuadraticProblem:
        d = self.dim
        Ws, ys, xs = [], [], []
        for s in seeds:
            g = generator(s)
            Ws.append(torch.randn(d, d, generator=g, dtype=self.dtype))
            ys.append(torch.randn(d, generator=g, dtype=self.dtype))
            xs.append(torch.randn(d, generator=g, dtype=self.dtype) * self.init_std)
        return QuadraticProblem(
            torch.stack(Ws), torch.stack(ys), torch.stack(xs), mean_over_batch=False
        )


class QuadraticCode(Task):
    """The official code's quadratic: 128 functions, W, y ~ U[0,1), mean loss."""

    name = "quadratic-code"
    max_batch = 1

    def __init__(self, dim: int = 10, batch: int = 128, init_std: float = 0.01):
        if dim <= 0 or batch <= 0:
            raise ValueError(f"dim and batch must be positive, got dim={dim}, batch={batch}")
        self.dim, self.batch, self.init_std = int(dim), int(batch), float(init_std)

    def describe(self) -> dict:
        return {"task": self.name, "dim": self.dim, "batch": self.batch, "init_std": self.init_std}

    def sample(self, seeds: Sequence[int]) -> QuadraticProblem:
        if len(seeds) != 1:
            raise ValueError(
                "quadratic-code batches its 128 functions itself; sample one seed at a time"
            )
        g = generator(seeds[0])
        b, d = self.batch, self.dim
        W = torch.rand(b, d, d, generator=g)
        y = torch.rand(b, d, generator=g)
        x = torch.randn(b, d, generator=g) * self.init_std
        return QuadraticProblem(W, y, x, mean_over_batch=True)
