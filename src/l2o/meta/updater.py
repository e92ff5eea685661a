"""One meta-update, written once for every trainer (L2L and few-shot).

    updater = MetaUpdater(params, optimizer, scheduler, clip_norm, world)
    updated, grad_norm, step_losses = updater.apply(estimate)

What happens to a meta-gradient estimate (:class:`~l2o.meta.estimators.Estimate`)
after an estimator has produced it:

1. under ``torchrun``, one all-reduce sums over ranks the gradients, which
   parameters they reached, the non-finite flag and the logged losses, so every
   rank takes the same decision below (no rank waits in a collective another
   rank skipped);
2. a non-finite loss or gradient norm skips the update and counts it
   (``consecutive_nonfinite``; the trainer decides when to stop);
3. otherwise the global gradient norm is clipped (``clip_norm > 0``), the
   meta-optimizer steps and the scheduler (if any) steps once per update.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import L2OError
from . import distributed
from .estimators import Estimate


class MetaUpdater:
    """Reduces, checks, clips and applies meta-gradients for ``params``."""

    def __init__(
        self,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        clip_norm: float = 0.0,
        world: distributed.World | None = None,
    ):
        self.params = list(params)
        self.opt, self.scheduler = optimizer, scheduler
        self.clip_norm = float(clip_norm or 0.0)
        self.world = world if world is not None else distributed.World()
        self.updates = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0

    def reduce(self, estimate: Estimate) -> tuple[list[Tensor | None], bool, Tensor]:
        """(gradients, finite, step losses) summed over ranks (unchanged alone)."""
        grads = estimate.grads
        if not self.world.distributed:
            return grads, estimate.finite, estimate.step_losses
        params = self.params
        dev, dt = params[0].device, params[0].dtype
        flat = torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
            + [
                torch.tensor([g is not None for g in grads], dtype=dt, device=dev),
                torch.tensor([0.0 if estimate.finite else 1.0], dtype=dt, device=dev),
                estimate.step_losses.to(dev, dt).reshape(-1),
            ]
        )
        flat = distributed.all_reduce_sum(flat, self.world)
        n = sum(p.numel() for p in params)
        reached = flat[n : n + len(params)]
        bad = float(flat[n + len(params)]) > 0
        out, start = [], 0
        for j, p in enumerate(params):
            out.append(flat[start : start + p.numel()].view_as(p) if reached[j] > 0 else None)
            start += p.numel()
        return out, not bad, flat[n + len(params) + 1 :]

    def apply(self, estimate: Estimate) -> tuple[bool, float, Tensor]:
        """Reduce ``estimate``, then skip it or clip it and step; (updated, norm, losses)."""
        grads, finite, step_losses = self.reduce(estimate)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        grad_norm = math.nan
        if finite:
            present = [g for g in grads if g is not None]
            if not present:
                raise L2OError(
                    "the meta-loss does not depend on any meta-parameter "
                    "(every meta-gradient is missing); check the rule and the estimator"
                )
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in present])
            )
            finite = bool(torch.isfinite(norm))
            grad_norm = float(norm)
        if not finite:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive_nonfinite += 1
            return False, grad_norm, step_losses
        if self.clip_norm > 0:
            nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.updates += 1
        self.consecutive_nonfinite = 0
        return True, grad_norm, step_losses
