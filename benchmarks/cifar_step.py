"""Cost of one loss-and-gradient step of the ``cifar10-cnn`` optimizee, grouped or not.

    L2O_DATA=DATA .venv/bin/python benchmarks/cifar_step.py   # benchmarks/results/cifar_step.json

``l2o.tasks.cifar.forward`` runs the P instances of a problem either as one grouped
network (``problem.grouped = True``: grouped convolutions, ``groups=P``) or one after
another (``False``; by default CUDA runs grouped, the CPU one after another).  For P in ``--instances`` this script times
``loss_and_grad`` (forward, cross-entropy, backward) both ways in one process, one
thread, interleaved over repeats (medians), and checks that both ways give the same losses.
Images: the ``test`` split of the CIFAR-10 files under the data directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from l2o.errors import L2OError
from l2o.meta.unroll import loss_and_grad
from l2o.tasks import cifar as cifar_task

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import hardware  # noqa: E402


def make_task(data_dir: str | None) -> cifar_task.Cifar10CNN:
    try:
        return cifar_task.Cifar10CNN(data_dir=data_dir or "")
    except L2OError as e:
        raise SystemExit(f"cifar_step: needs the CIFAR-10 binary files ({e})") from None


def run(problem, theta, grouped: bool, t: int) -> tuple[torch.Tensor, float]:
    """Losses at step ``t`` and the seconds ``loss_and_grad`` took, the instances run ``grouped``."""
    problem.grouped = grouped
    t0 = time.perf_counter()
    losses = loss_and_grad(problem, theta, t, keep_graph=False)[0]
    return losses.detach(), time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", default="1,10,44", help="problem sizes P (comma list)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "cifar_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = make_task(args.data_dir)
    rows = []
    for P in (int(p) for p in args.instances.split(",")):
        problem = task.sample(list(range(P)))
        theta = problem.init()
        times = {True: [], False: []}
        for grouped in (True, False):  # warm-up
            run(problem, theta, grouped, 1)
        for _ in range(args.repeats):
            for grouped in (True, False):
                times[grouped].append(run(problem, theta, grouped, 1)[1])
        row = {"instances": P}
        for grouped, name in ((True, "grouped"), (False, "one_after_another")):
            ms = statistics.median(times[grouped]) * 1000
            row[name] = {"ms_per_step": ms, "ms_per_instance_step": ms / P}
        row["loss_max_abs_difference"] = float(
            (run(problem, theta, True, 0)[0] - run(problem, theta, False, 0)[0]).abs().max()
        )
        row["speedup_one_after_another"] = (
            row["grouped"]["ms_per_step"] / row["one_after_another"]["ms_per_step"]
        )
        print(
            f"P={P:3d}: grouped {row['grouped']['ms_per_instance_step']:.1f} ms/instance, "
            f"one after another {row['one_after_another']['ms_per_instance_step']:.1f} ms/instance "
            f"({row['speedup_one_after_another']:.2f}x); losses differ by "
            f"{row['loss_max_abs_difference']:.1e}"
        )
        rows.append(row)
    out = {
        "benchmark": "cifar_step",
        "command": "python benchmarks/cifar_step.py " + " ".join(argv or sys.argv[1:]),
        "data": task.describe(),
        "repeats": args.repeats,
        "hardware": hardware(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return out


if __name__ == "__main__":
    main()
