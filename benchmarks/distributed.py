"""Distributed meta-training: throughput of 1 vs 2 gloo ranks, and their meta-gradients.

    python benchmarks/distributed.py [--instances 2048] [--trajectories 6]

Both runs meta-train the same rule on the same trajectories (the same total
meta-batch of ``--instances`` quadratics, shared out over the ranks), each rank
with one thread, on 127.0.0.1.  Writes ``benchmarks/results/distributed.json``:

* ``speedup_2_ranks``: trajectories per second with 2 ranks / with 1 rank;
* ``max_abs_grad_diff``: the largest absolute difference between the first
  meta-gradient of the 1-rank run and the all-reduced one of the 2-rank run
  (clipping off, so the raw estimates are compared);
* ``max_abs_weight_diff``: the same for the rule's weights after the run;
* ``machine_ceiling_2_processes``: the speedup of two independent processes with half
  the instances each (no communication) over one process: the most this machine gives.

The workers are plain processes joined by ``torch.distributed`` (what ``torchrun``
sets up from its environment variables), so this script needs no launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, sets: list[str], trajectories: int, out: str):
    """One rank: meta-train ``trajectories`` trajectories, record the first meta-gradient."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from l2o.config import resolve
    from l2o.meta import MetaTrainer

    trainer = MetaTrainer(resolve("quadratic", None, sets), None, progress=False)
    first: list = []
    step = trainer.opt.step

    def recording_step(*a, **k):
        if not first:
            first.append([p.grad.detach().clone() for p in trainer.rule.parameters()])
        return step(*a, **k)

    trainer.opt.step = recording_step
    trainer.run_trajectory(0)  # warm-up (not timed): allocations, process-group start
    t0 = time.perf_counter()
    for k in range(1, trajectories + 1):
        trainer.run_trajectory(k)
    seconds = time.perf_counter() - t0
    if rank == 0:
        torch.save(
            {"grads": first[0], "weights": trainer.rule.state_dict(), "seconds": seconds}, out
        )
    if world > 1:
        torch.distributed.destroy_process_group()


def run(world: int, sets: list[str], trajectories: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        args = (world, free_port(), sets, trajectories, out)
        # fork: the workers inherit this module (a script, not importable by name)
        mp.start_processes(worker, args=args, nprocs=world, start_method="fork", join=True)
        return torch.load(out, weights_only=True)


def run_independent(sets: list[str], trajectories: int) -> float:
    """Two single-process runs side by side, no process group: the machine's own ceiling.

    Each optimizes half the instances; the slower one's time is what a perfect 2-rank run
    (communication free) would take on this machine, cores and caches shared as they are.
    """
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"p{i}.pt") for i in range(2)]
        procs = [ctx.Process(target=_alone, args=(sets, trajectories, o)) for o in outs]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return max(torch.load(o, weights_only=True)["seconds"] for o in outs)


def _alone(sets: list[str], trajectories: int, out: str) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    worker(0, 1, 0, sets, trajectories, out)


def config_sets(instances: int) -> list[str]:
    # Clipping off: the raw estimates are compared.  No validation: throughput only.
    return [f"train.instances={instances}", "train.clip_norm=0", "val.every=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--instances", type=int, default=2048, help="total quadratics per trajectory")
    ap.add_argument("--trajectories", type=int, default=6, help="timed trajectories per run")
    ap.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = ap.parse_args()
    sets = config_sets(args.instances)
    one = run(1, sets, args.trajectories)
    two = run(2, sets, args.trajectories)
    half = config_sets(args.instances // 2)
    independent = run_independent(half, args.trajectories)
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(one["grads"], two["grads"]))
    grad_scale = max(float(a.abs().max()) for a in one["grads"])
    weight_diff = max(
        float((one["weights"][k] - two["weights"][k]).abs().max()) for k in one["weights"]
    )
    result = {
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
        "task": "quadratic (10-dim, the paper's), LSTM 2x20, horizon 100, unroll 20",
        "instances_per_trajectory": args.instances,
        "timed_trajectories": args.trajectories,
        "threads_per_rank": 1,
        "backend": "gloo",
        "trajectories_per_second_1_rank": args.trajectories / one["seconds"],
        "trajectories_per_second_2_ranks": args.trajectories / two["seconds"],
        "speedup_2_ranks": one["seconds"] / two["seconds"],
        # two independent processes of half the instances each, side by side: the speedup
        # this machine allows at all (its 2 cores do not give 2x on compute-bound work)
        "machine_ceiling_2_processes": one["seconds"] / independent,
        "efficiency_vs_ceiling": (one["seconds"] / two["seconds"]) / (one["seconds"] / independent),
        "max_abs_grad_diff": grad_diff,
        "max_abs_grad": grad_scale,
        "max_abs_weight_diff": weight_diff,
        "hardware": hardware(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
