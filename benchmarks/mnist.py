"""Benchmark: the shipped MNIST optimizer(s) on the paper's MNIST protocol and its generalization tests.

    L2O_DATA=/path/to/data python benchmarks/mnist.py [--problems 100] [--sweep] [--quick]

Protocol: 100 evaluation runs (fresh
initializations and minibatches, MNIST t10k images that meta-training never
saw), 100 steps (200 for experiment (b)); SGD, NAG, RMSprop and Adam get their
learning rate tuned per experiment on 20 separate problems.  Runs the study of
:mod:`l2o.study` (experiments (a)-(e), and the sweep (f) with ``--sweep``) with
``pretrained/mnist`` (and ``pretrained/mnist-rnnprop`` when shipped), writes
``benchmarks/results/mnist.json`` (+ per-experiment PNGs under
``benchmarks/results/mnist/``), prints the table and checks the targets:

* (a) ``sum_loss`` <= 45 and <= 0.65 x the best tuned baseline;
* (b) best over steps 101-200;  (c), (d) best;  (e) ReLU reported as measured.

The meta-training time of each shipped optimizer is read from its
``training.json`` (written when it was produced, see its ``TRAINING.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--tune-problems", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also run the architecture sweep (f)")
    ap.add_argument("--quick", action="store_true", help="smoke run (few problems, short horizons)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    if not os.environ.get("L2O_DATA") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["L2O_DATA"] = str(
            REPO.parent / "shared" / "data"
        )  # the development checkout's data
    import torch

    from l2o.artifact import PRETRAINED_DIR
    from l2o.study import run_study

    optimizers = ["lstm:pretrained/mnist"]
    if (PRETRAINED_DIR / "mnist-rnnprop" / "config.json").is_file():
        optimizers.append("rnnprop:pretrained/mnist-rnnprop")
    experiments = ["train", "steps200", "hidden40", "layers2", "relu"] + (
        ["sweep"] if args.sweep else []
    )
    out = Path(args.out)
    t0 = time.perf_counter()
    summary = run_study(
        optimizers,
        out / "mnist",
        problems=args.problems,
        tune_problems=args.tune_problems,
        experiments=experiments,
        quick=args.quick,
    )
    seconds = time.perf_counter() - t0

    training = {}
    for spec in optimizers:
        name = spec.split(":", 1)[1].split("/", 1)[1]
        f = PRETRAINED_DIR / name / "training.json"
        training[spec] = json.loads(f.read_text()) if f.is_file() else None

    ex = summary["experiments"]
    lstm = optimizers[0]

    def sl(exp, opt, key="sum_loss"):
        return ex[exp]["optimizers"][opt][key] if exp in ex else math.nan

    def best_is(exp, opt, key="sum_loss"):
        if exp not in ex:
            return None
        vals = {n: e.get(key, math.inf) for n, e in ex[exp]["optimizers"].items()}
        return min(vals, key=vals.get) == opt

    targets = {}
    if "train" in ex:
        targets["a_sum_loss_le_45"] = sl("train", lstm) <= 45
        targets["a_ratio_le_0.65"] = sl("train", lstm, "ratio_to_best_baseline") <= 0.65
    targets["b_best_steps_101_200"] = best_is("steps200", lstm, "sum_loss_101_end")
    targets["c_best_hidden40"] = best_is("hidden40", lstm)
    targets["d_best_two_layers"] = best_is("layers2", lstm)
    targets["e_relu_best (reported, not a target)"] = best_is("relu", lstm)
    result = {
        "benchmark": "mnist",
        "protocol": {
            "problems": summary["problems"],
            "tune_problems": summary["tune_problems"],
            "steps": 100,
            "test_data": summary["test_data"],
        },
        "optimizers": optimizers,
        "summary": summary,
        "targets": targets,
        "meta_training": training,
        "seconds": seconds,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist.json").write_text(json.dumps(result, indent=2) + "\n")
    print("targets:")
    for k, v in targets.items():
        print(f"  {k}: {v}")
    for spec, tr in training.items():
        if tr:
            print(
                f"meta-training of {spec}: {tr.get('train_seconds', math.nan):.0f} s "
                f"({tr.get('meta_steps')} trajectories, best validation at meta-step {tr.get('best_meta_step')}, "
                f"{tr.get('machine', '')})"
            )
    print(f"wrote {out / 'mnist.json'} and {out / 'mnist'}/ in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
