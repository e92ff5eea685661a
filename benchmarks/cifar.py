"""Benchmark: the CIFAR experiments of L2L Fig. 7 (two-LSTM optimizer, CIFAR-5/2, 200 steps).

    L2O_DATA=/path/to/data python benchmarks/cifar.py [--problems 100] [--tune-problems 20] \\
        [--optimizer lstm:pretrained/cifar] [--optimizer shared=lstm:runs/cifar-shared] \\
        [--experiments cifar10,cifar5,cifar2] [--baselines-only]
    python benchmarks/cifar.py --markdown --out DIR   # the docs tables of DIR/cifar.json

Runs :func:`l2o.study_cifar.run_study` (the same as ``l2o study cifar``) and writes
``benchmarks/results/cifar/`` (one JSON per experiment and optimizer, ``cifar.json``
with every number, ``cifar.png`` as Fig. 7), then checks the issue's targets:
(a) sum of loss <= 0.85x the best tuned baseline with separate 95% intervals, and
better than one shared LSTM; (b) every learned optimizer beats every tuned baseline
on CIFAR-5 and CIFAR-2; test accuracy after 100 steps >= the best baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--tune-problems", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--optimizer", action="append", default=None, metavar="[NAME=]SPEC")
    ap.add_argument("--experiments", default="cifar10,cifar5,cifar2")
    ap.add_argument("--baselines-only", action="store_true", help="tune and run the baselines only")
    ap.add_argument("--baselines", default="sgd,nag,rmsprop,adam", help="comma-separated, in order")
    ap.add_argument("--out", default=str(HERE / "results" / "cifar"))
    ap.add_argument("--markdown", action="store_true",
                    help="run nothing: print the docs tables of OUT/cifar.json")  # fmt: skip
    args = ap.parse_args(argv)
    if args.markdown:
        from l2o.study_cifar import table

        print(table(json.loads((Path(args.out) / "cifar.json").read_text())))
        return 0

    if not os.environ.get("L2O_DATA") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["L2O_DATA"] = str(REPO.parent / "shared" / "data")  # the development data
    from l2o.study_cifar import run_study

    optimizers = [] if args.baselines_only else (args.optimizer or ["lstm:pretrained/cifar"])
    t0 = time.perf_counter()
    summary = run_study(
        optimizers,
        Path(args.out),
        problems=args.problems,
        tune_problems=args.tune_problems,
        steps=args.steps,
        experiments=[e for e in args.experiments.split(",") if e],
        baselines=[b for b in args.baselines.split(",") if b],
    )
    targets = {}
    ex = summary["experiments"]
    names = [s.partition("=")[0] if "=" in s.split(":", 1)[0] else s for s in optimizers]
    main_opt = names[0] if names else None
    if main_opt and "cifar10" in ex and ex["cifar10"]["best_baseline"]:
        e = ex["cifar10"]["optimizers"][main_opt]
        targets["a_ratio_le_0.85"] = e["ratio_to_best_baseline"] <= 0.85
        targets["a_intervals_separate"] = e["intervals_separate"]
        others = [n for n in names[1:] if n in ex["cifar10"]["optimizers"]]
        for n in others:
            targets[f"a_beats_{n}"] = e["sum_loss"] < ex["cifar10"]["optimizers"][n]["sum_loss"]
    for key in ("cifar5", "cifar2"):
        for n in names:
            if key in ex and "beats_every_baseline" in ex[key]["optimizers"].get(n, {}):
                targets[f"b_{key}_{n}_beats_every_baseline"] = ex[key]["optimizers"][n][
                    "beats_every_baseline"
                ]
    for key in ex:
        for n in names:
            if "accuracy_100_ge_best_baseline" in ex[key]["optimizers"].get(n, {}):
                targets[f"acc100_{key}_{n}_ge_best_baseline"] = ex[key]["optimizers"][n][
                    "accuracy_100_ge_best_baseline"
                ]
    summary["targets"] = targets
    summary["seconds"] = time.perf_counter() - t0
    (Path(args.out) / "cifar.json").write_text(json.dumps(summary, indent=1) + "\n")
    for k, v in targets.items():
        print(f"  {k}: {v}")
    print(f"wrote {args.out}/cifar.json and cifar.png in {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
