"""How large are an ``mlp-lopt`` rule's steps on the paper's MNIST task?

    OMP_NUM_THREADS=1 L2O_DATA=DATA python benchmarks/home_task_steps.py \\
        --rule general=pretrained/general --rule specialist=PATH   # benchmarks/results/home_task_steps.{json,png}

Each rule runs the ``mnist-mlp`` task (L2L's MNIST MLP, the test problems of ``l2o
compare``) for 100 steps.  At every step it records the mean loss over the problems and
the median over all coordinates of the learning rate the rule uses there,
``exp(log_lr + mag * tanh(a) + s)`` (:meth:`l2o.rules.transfer.MLPLOpt.scaled_direction`),
beside the largest one its head allows before step-size adaptation, ``exp(log_lr + mag)``.
A rule whose median sits at that bound in the first steps is held back by it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import l2o
from l2o.evaluate import evaluate_rule
from l2o.layout import layout_for
from l2o.rules.transfer import MLPLOpt
from l2o.seeds import stream
from l2o.tasks.mlp import MnistMLP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RuleWrapper, hardware  # noqa: E402


class StepSizeRecorder(RuleWrapper):
    """``rule`` unchanged, recording the median learning rate of every step, overall and
    per tensor (one problem per run, so a tensor's slice is its coordinates)."""

    def __init__(self, rule: MLPLOpt):
        super().__init__(rule)
        self.medians, self.by_tensor = [], {}

    def step(self, theta, grad, loss, state, layout=None):
        # the rule's own step below recomputes this (twice the cost; the run is unchanged)
        with torch.no_grad():
            layout = layout_for(theta, layout)
            _, log_step, _ = self.rule.scaled_direction(theta, grad, state, layout)
            lr = log_step.exp()
            self.medians.append(float(lr.median()))
            for name, where in layout.slices().items():
                self.by_tensor.setdefault(name, []).append(float(lr[where].median()))
        return super().step(theta, grad, loss, state, layout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rule", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/home_task_steps")
    ap.add_argument("--data-dir", default="", help="data directory (default: $L2O_DATA)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = MnistMLP(split="test", data_dir=args.data_dir)
    seeds = stream("test", args.problems)
    rules, t0 = {}, time.perf_counter()
    for spec in args.rule:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--rule: expected NAME=PATH, got {spec!r}")
        rule = l2o.load(path)
        if not isinstance(rule, MLPLOpt):
            ap.error(f"--rule {name}: {path} is a {type(rule).__name__}, not an mlp-lopt rule")
        recorder = StepSizeRecorder(rule)
        # one problem per call: the median is over one problem's coordinates
        losses = torch.cat([evaluate_rule(recorder, task, [s], args.steps) for s in seeds], 1)

        def over_problems(values):
            return torch.tensor(values).reshape(len(seeds), args.steps).median(0).values

        med = over_problems(recorder.medians)
        by_tensor = {k: over_problems(v) for k, v in recorder.by_tensor.items()}
        rules[name] = {
            "path": path,
            "sum_loss": round(losses[1:].mean(1).sum().item(), 3),
            "lr_bound_before_adaptation": math.exp(rule.log_lr.item() + rule.config.mag),
            "mean_loss": [round(v, 5) for v in losses.mean(1).tolist()],
            "median_lr": [round(v, 6) for v in med.tolist()],
            "median_lr_by_tensor": {
                k: [round(x, 6) for x in v.tolist()] for k, v in by_tensor.items()
            },
        }
        r = rules[name]
        print(
            f"{name}: sum {r['sum_loss']:.2f}, bound {r['lr_bound_before_adaptation']:.4f}, "
            "median lr at steps 1/2/5/10/20/50: "
            + " ".join(f"{r['median_lr'][i - 1]:.4f}" for i in (1, 2, 5, 10, 20, 50)),
            flush=True,
        )
        for k, v in by_tensor.items():
            print(f"  {k}: " + " ".join(f"{v[i - 1]:.4f}" for i in (1, 2, 5, 10, 20, 50)))
    out = {
        "benchmark": "home_task_steps",
        "command": "python benchmarks/home_task_steps.py "
        + " ".join(f"--rule {s}" for s in args.rule),
        "protocol": {
            "task": "mnist-mlp (test split)",
            "problems": args.problems,
            "steps": args.steps,
            "median_lr": "per step: median over problems of the median over coordinates",
            "median_lr_by_tensor": "the same over each tensor's coordinates",
        },
        "rules": rules,
        "machine": hardware(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    base = Path(args.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in rules.items():
        (line,) = a1.plot(range(1, args.steps + 1), r["median_lr"], label=name)
        a1.axhline(r["lr_bound_before_adaptation"], ls=":", color=line.get_color())
        a2.plot(r["mean_loss"], label=f"{name} ({r['sum_loss']:.1f})")
    a1.set(yscale="log", xlabel="step", ylabel="median learning rate (dotted: bound)")
    a2.set(yscale="log", xlabel="step", ylabel="mean loss (sum over steps)")
    a1.legend(), a2.legend()
    fig.tight_layout()
    fig.savefig(base.with_suffix(".png"), dpi=100)
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.png')}")


if __name__ == "__main__":
    main()
