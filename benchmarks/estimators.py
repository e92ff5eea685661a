"""Gradient estimators at equal wall-clock: truncated BPTT vs PES on the quadratics.

    python benchmarks/estimators.py [--budget 300] [--long-budget 480] [--test 1000]

Two experiments, the L2L LSTM (2x20, log/sign inputs, output x0.1) meta-trained on
the paper's 10-dim quadratics by each estimator for the same wall-clock budget
(one thread each), the best rule by validation then tested on the same fresh
test functions:

* ``short``: the paper's horizon (T = 100, unroll 20); the question is whether PES
  gets within 10% of BPTT's sum of losses at equal time;
* ``long``: T = 1,000 steps, unroll 20 (50 truncations a trajectory), tested on
  1,000-step runs beside Adam with its learning rate tuned for that horizon.

Writes ``benchmarks/results/estimators.json`` (every number, the validation
curves against wall time) and ``estimators.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware  # noqa: E402

import l2o  # noqa: E402
from l2o.config import resolve  # noqa: E402
from l2o.evaluate import compare, parse_optimizer  # noqa: E402
from l2o.meta import MetaTrainer  # noqa: E402
from l2o.tasks import build_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class _Budget(Exception):
    pass


def meta_train(estimator: str, sets: list[str], budget: float, out: Path) -> dict:
    """Meta-train until ``budget`` seconds have passed; the curve of (time, validation)."""
    cfg = resolve("quadratic", None, [f"train.estimator={estimator}", *sets])
    curve = []

    def stop(trainer, row):
        validated = row["val_sum_loss"] == row["val_sum_loss"]  # not NaN
        if validated:
            curve.append((row["wall_time"], row["val_sum_loss"], row["meta_step"]))
        if validated and row["wall_time"] >= budget:  # stop at a validation: best/ is current
            raise _Budget

    trainer = MetaTrainer(cfg, out, progress=False, callback=stop)
    t0 = time.perf_counter()
    try:
        trainer.train()
    except _Budget:
        pass
    if not (out / "best").is_dir():  # no finite validation at all: test the last rule
        trainer._save_artifact("best", float("nan"))
    return {
        "estimator": estimator,
        "config_sets": [f"train.estimator={estimator}", *sets],
        "seconds": time.perf_counter() - t0,
        "trajectories": trainer.meta_step,
        "meta_updates": trainer.updates,
        "skipped_updates": trainer.skipped,
        "best_val_sum_loss": trainer.best_val,
        "best_meta_step": trainer.best_step,
        "validation_curve": curve,
    }


def test(runs: dict, steps: int, problems: int, tune_problems: int) -> dict:
    specs = [parse_optimizer(f"lstm:{r['dir']}") for r in runs.values()]
    specs.append(parse_optimizer("adam"))
    rules = {s.name: l2o.load(s.path) for s in specs if s.kind == "learned"}
    res = compare(
        build_task("quadratic"),
        specs,
        steps=steps,
        problems=problems,
        tune_problems=tune_problems,
        rules=rules,
        log=lambda s: None,
    )
    names = dict(zip([s.name for s in specs], [*runs, "adam (tuned)"], strict=True))
    return {
        names[k]: {
            "sum_loss": v["sum_loss"],
            "sum_loss_ci95": v["sum_loss_ci95"],
            "final_loss": v["final_loss_mean"],
            "hparams": v.get("hparams", {}),
            "mean_loss": v["mean_loss"],
        }
        for k, v in res["optimizers"].items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300, help="seconds per run, T = 100")
    ap.add_argument("--long-budget", type=float, default=480, help="seconds per run, T = 1000")
    ap.add_argument("--test", type=int, default=1000, help="test functions")
    ap.add_argument("--only", choices=["short", "long"], default=None)
    ap.add_argument(
        "--estimators", default="bptt,pes", help="comma-separated, e.g. pes (keeps the others)"
    )
    ap.add_argument(
        "--set", action="append", default=[], help="extra config keys for every run (key=value)"
    )
    ap.add_argument("--tag", default="", help="suffix of the result entries, e.g. -log")
    ap.add_argument("--work", default="runs/estimators", help="run directories")
    ap.add_argument("--out", default=str(RESULTS / "estimators.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    result: dict = {
        "command": "python benchmarks/estimators.py " + " ".join(sys.argv[1:]),
        "hardware": hardware(),
        "rule": "lstm 2x20, logsign p=10, output x0.1 (the quadratic recipe)",
    }
    out = Path(args.out)
    if out.exists():
        result = {**json.loads(out.read_text()), **{k: result[k] for k in ("command", "hardware")}}
    experiments = {
        "short": (["train.meta_steps=100000", "val.every=10"], args.budget, 100),
        "long": (
            [
                "train.meta_steps=100000",
                "train.horizon=1000",
                "train.unroll=20",
                "train.instances=64",
                "val.every=2",
                "val.problems=64",
            ],
            args.long_budget,
            1000,
        ),  # fmt: skip
    }
    for name, (sets, budget, steps) in experiments.items():
        if args.only and name != args.only:
            continue
        key = name + args.tag
        previous = result.get(key, {}).get("runs", {})
        runs = {}
        for est in args.estimators.split(","):
            d = work / f"{key}-{est}"
            if d.exists():
                import shutil

                shutil.rmtree(d)
            runs[est] = {**meta_train(est, sets + args.set, budget, d), "dir": str(d)}
            print(f"{name} {est}: {runs[est]['trajectories']} trajectories, best val "
                  f"{runs[est]['best_val_sum_loss']:.2f}", flush=True)  # fmt: skip
        tested = test(runs, steps, args.test, 100)
        for est in runs:
            runs[est]["test"] = tested[est]
        for est, run in previous.items():  # runs of the other estimator, kept from before
            if est not in runs:
                runs[est] = run
                tested[est] = run["test"]
        entry = {"horizon": steps, "budget_seconds": budget, "test_functions": args.test,
                 "extra_sets": args.set, "runs": runs, "adam_tuned": tested["adam (tuned)"]}  # fmt: skip
        adam = tested["adam (tuned)"]["sum_loss"]
        for est in runs:
            entry[f"{est}_beats_tuned_adam"] = tested[est]["sum_loss"] < adam
        if "bptt" in tested and "pes" in tested:
            b, p = tested["bptt"]["sum_loss"], tested["pes"]["sum_loss"]
            entry["pes_over_bptt"] = p / b
            entry["pes_within_10pct_of_bptt"] = p <= 1.1 * b
        result[key] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in entry.items() if k != "runs"}, indent=1)[:2000])
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result if isinstance(result[n], dict) and "runs" in result[n]]
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(6 * max(1, len(names)), 4))
    axes = [axes] if len(names) <= 1 else list(axes)
    for ax, name in zip(axes, names, strict=False):
        for est, run in result[name]["runs"].items():
            c = run["validation_curve"]
            if c:
                ax.plot([x[0] for x in c], [x[1] for x in c], label=est)
        adam = result[name]["adam_tuned"]["sum_loss"]
        ax.axhline(adam, color="gray", ls="--", label=f"tuned Adam (test) {adam:.1f}")
        ax.set_yscale("log")
        ax.set_xlabel("wall-clock seconds (one thread)")
        ax.set_ylabel("validation sum of losses")
        ax.set_title(f"{name}: T = {result[name]['horizon']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
