"""Meta-train a coupled rule warm-started from a trained LSTM (the MNIST recipe of issue 16).

    L2O_DATA=DATA python benchmarks/coupled_warm_start.py --rule lstm-gac --out runs/mnist-gac
    L2O_DATA=DATA python benchmarks/coupled_warm_start.py --rule ntm-lbfgs --out runs/mnist-ntm

The rule starts as ``--from`` (default ``pretrained/mnist``), widened by ``--gac`` global
averaging cells per layer whose outgoing weights are zero
(:func:`l2o.rules.gac.widen_lstm`; for ``ntm-lbfgs`` also small random memory heads,
:func:`l2o.rules.ntm.ntm_from_lstm`), so its first updates are the LSTM's; then it is
meta-trained on ``--task`` with the task's defaults and ``--set`` overrides (the same
trainer, validation and ``best/`` selection as ``l2o meta-train``).  Meta-training the
coupled rules from scratch on MNIST (the LSTM's 400 trajectories) did not fit the time
this machine had; this measures what the couplings add on top of a trained LSTM.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from l2o import config as cfgmod  # noqa: E402
from l2o import load  # noqa: E402
from l2o.meta import MetaTrainer  # noqa: E402
from l2o.rules.gac import widen_lstm  # noqa: E402
from l2o.rules.ntm import ntm_from_lstm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rule", choices=["lstm-gac", "ntm-lbfgs"], required=True)
    ap.add_argument("--from", dest="source", default="pretrained/mnist")
    ap.add_argument("--gac", type=int, default=2)
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--task", default="mnist-mlp")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lstm = load(args.source)
    layers = [h + args.gac for h in lstm.config.layers]
    sets = [f"rule.name={args.rule}", f"rule.layers={layers}", f"rule.gac={args.gac}"]
    if args.rule == "lstm-gac":
        rule = widen_lstm(lstm, args.gac)
    else:
        rule = ntm_from_lstm(lstm, gac=args.gac, window=args.window)
        sets.append(f"rule.window={args.window}")
    cfg = cfgmod.resolve(args.task, None, sets + args.sets)
    t0 = time.perf_counter()
    summary = MetaTrainer(cfg, args.out, rule=rule, progress=False).train()
    print(
        f"{args.rule} from {args.source}: {time.perf_counter() - t0:.0f} s, best validation "
        f"{summary['best_val_sum_loss']:.2f} at meta-step {summary['best_meta_step']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
