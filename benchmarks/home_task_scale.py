"""Does an optimizer depend on the gradient's scale?  The paper's MNIST task with every
gradient multiplied by a constant.

    OMP_NUM_THREADS=1 L2O_DATA=DATA python benchmarks/home_task_scale.py   # benchmarks/results/home_task_scale.json

Each optimizer runs the ``mnist-mlp`` task (L2L's MNIST MLP, MNIST test images, the test
problems of ``l2o compare``) for 100 steps, with the gradient it is given multiplied by
``c`` (the loss it sees too); the parameters, the minibatches and the loss that is scored
are the task's own.  The score is ``l2o compare``'s: the sum over steps 1..100 of the mean
loss over the problems.  A rule whose update does not depend on the gradient's scale
(Adam-style normalisation, ``mlp-lopt``) scores the same for every ``c``; the paper's LSTM
reads log|g| and so does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import l2o
from l2o.evaluate import evaluate_rule
from l2o.rules import AdamHD
from l2o.seeds import stream
from l2o.tasks.mlp import MnistMLP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RuleWrapper, hardware  # noqa: E402

SCALES = (0.01, 0.1, 1.0, 10.0, 100.0)


class ScaledGradient(RuleWrapper):
    """``rule`` fed ``c`` x the gradient (and ``c`` x the loss)."""

    def __init__(self, rule, c: float):
        super().__init__(rule)
        self.c = float(c)

    def step(self, theta, grad, loss, state, layout=None):
        loss = None if loss is None else loss * self.c
        return super().step(theta, grad * self.c, loss, state, layout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument(
        "--rule",
        action="append",
        help="NAME=PATH of a learned rule (repeatable; default: pretrained/mnist, "
        "pretrained/general and pretrained/general-hd), plus adam-hd (lr 0.01, rate 0.8) always",
    )
    ap.add_argument("--out", default="benchmarks/results/home_task_scale.json")
    ap.add_argument("--data-dir", default="", help="data directory (default: $L2O_DATA)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = args.rule or [
        "mnist=pretrained/mnist",
        "general=pretrained/general",
        "general-hd=pretrained/general-hd",
    ]
    makers = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        makers[name] = lambda path=path: l2o.load(path)
    makers["adam-hd(lr 0.01, hd 0.8)"] = lambda: AdamHD(lr=0.01, hd=0.8)
    task = MnistMLP(split="test", data_dir=args.data_dir)
    seeds = stream("test", args.problems)
    results, t0 = {}, time.perf_counter()
    for name, make in makers.items():
        results[name] = {}
        for c in SCALES:
            losses = evaluate_rule(ScaledGradient(make(), c), task, seeds, args.steps)
            results[name][f"{c:g}"] = round(losses[1:].mean(1).sum().item(), 3)
        print(name, "  ".join(f"x{c}: {v:.1f}" for c, v in results[name].items()), flush=True)
    out = {
        "benchmark": "home_task_scale",
        "command": "python benchmarks/home_task_scale.py",
        "protocol": {
            "task": "mnist-mlp (test split)",
            "problems": args.problems,
            "steps": args.steps,
            "metric": "sum of mean loss over steps 1..T",
            "scales": list(SCALES),
        },
        "sum_loss": results,
        "machine": hardware(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
