"""Distributed meta-training on ``torch.distributed`` (launched by ``torchrun``).

    torchrun --standalone --nproc-per-node 2 -m l2o meta-train --task quadratic --out runs/q

Every process (rank) meta-trains the same rule on its own share of each
trajectory's problem instances (:func:`shard`, a contiguous slice of the seed
stream, so the problems are those of a single-process run); the meta-gradients are
summed over ranks (:func:`all_reduce_sum`) *before* the non-finite check and the
clipping, so every rank takes the same decision and the same step.  Rank 0 alone
writes files.  Backend: gloo on CPU, nccl on CUDA.  Without ``torchrun`` (no
``WORLD_SIZE`` in the environment) the same code runs as one process with no
process group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(device: str = "cpu") -> World:
    """Join the process group ``torchrun`` describes in the environment (once); no-op alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return world()
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend)
        else:
            # Why a prefix per attempt: after an elastic restart the launcher's store still
            # holds the dead attempt's addresses, and a rank that read one of them before
            # its peer re-published failed with "connection refused" (seen in about 1 in 4
            # restarts here).  Keys of attempt N never meet those of attempt N - 1.
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                size,
                is_master=rank == 0 and not agent_store,
                timeout=timedelta(minutes=10),
            )
            prefixed = dist.PrefixStore(f"l2o/attempt{restart}", store)
            dist.init_process_group(backend, store=prefixed, rank=rank, world_size=size)
    return world()


def shard(items: Sequence, w: World) -> list:
    """This rank's contiguous share of ``items`` (sizes differ by at most one)."""
    n = len(items)
    lo, hi = (n * w.rank) // w.size, (n * (w.rank + 1)) // w.size
    return list(items[lo:hi])


def all_reduce_sum(x: Tensor, w: World) -> Tensor:
    """Sum of ``x`` over ranks (``x`` itself alone).  Runs on ``x``'s device."""
    if w.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def gather_to_main(x: Tensor, w: World) -> list[Tensor]:
    """Every rank's ``x`` (same shape on every rank), on rank 0; ``[x]`` alone."""
    if not w.distributed:
        return [x]
    out = [torch.empty_like(x) for _ in range(w.size)]
    dist.all_gather(out, x)
    return out


def barrier(w: World) -> None:
    if w.distributed:
        dist.barrier()
