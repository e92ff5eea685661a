"""The paper's CIFAR experiments (L2L section 3.4, Fig. 7): ``l2o study cifar``.

    l2o study cifar --optimizer lstm:pretrained/cifar [--optimizer shared=lstm:runs/cifar-shared] \\
        [--optimizer sub5=lstm:runs/cifar-sub5] --out runs/cifar-study --data-dir DIR

Experiments (each optimizee trained on the test file's images, never seen by
meta-training; SGD, NAG, RMSprop and Adam get their learning rate tuned *per
experiment* on separate problems of the ``tune`` seed stream, by the sum of the
mean loss over 100 steps):

=========  =========================================================================
``cifar10``  (a) all 10 labels: the two-LSTM optimizer vs the baselines (and one shared LSTM)
``cifar5``   (b) labels 0-4 (CIFAR-5): the CIFAR-10 optimizer, and LSTM-sub if given
``cifar2``   (b) labels 0-1 (CIFAR-2)
=========  =========================================================================

(c) every run lasts ``steps`` = 200 steps (twice the training horizon): the sum of
the mean loss over steps 1-100 is experiment (a)/(b)'s metric, steps 101-200 (c)'s.
After 100 and after 200 steps each optimizee's **test accuracy** is measured on all
the test images of its label subset (batch statistics, 1,024 images a chunk).

A learned optimizer is named ``NAME=SPEC`` (``sub5=lstm:runs/x``) or just ``SPEC``;
``subN`` optimizers run only in the experiment of N labels (LSTM-sub: meta-trained
on the other labels).  Every optimizer's result is cached as
``OUT/EXPERIMENT/NAME.json`` (stamped with the protocol), so an interrupted or
extended study reruns only what is missing.  Outputs: ``OUT/cifar.json`` (every
number) and ``OUT/cifar.png`` (Fig. 7: one panel per data set, mean loss with 95%
intervals).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

BASELINES = ("sgd", "nag", "rmsprop", "adam")
EXPERIMENTS = {
    "cifar10": ("CIFAR-10 (10 labels)", "cifar10-cnn"),
    "cifar5": ("CIFAR-5 (labels 0-4)", "cifar10-cnn:classes=0,1,2,3,4"),
    "cifar2": ("CIFAR-2 (labels 0-1)", "cifar10-cnn:classes=0,1"),
}
#: starting grid per baseline (tune_lr extends it by half-decades past an edge optimum)
GRIDS = {
    "sgd": (0.1, 0.3, 1.0),
    "nag": (0.03, 0.1, 0.3),
    "rmsprop": (0.001, 0.003, 0.01),
    "adam": (0.003, 0.01, 0.03),
}
TRAIN_STEPS = 100


def run_with_accuracy(rule, problem, steps: int, test_images, test_labels, at=(100, 200)):
    """Losses ``[steps + 1, P]`` and ``{step: accuracy [P]}`` of a frozen rule on ``problem``."""
    from .meta.unroll import _rule_step_no_grad, loss_and_grad, start

    traj = start(problem, rule)
    theta, state, losses, grad = traj.theta, traj.state, traj.losses, traj.grad
    rows, acc = [losses], {}
    for t in range(1, steps + 1):
        theta, state = _rule_step_no_grad(rule, theta, grad, losses, state, problem.layout)
        losses, grad = loss_and_grad(problem, theta, t, keep_graph=False)
        losses = losses.detach()
        rows.append(losses)
        if t in at:
            acc[t] = problem.accuracy(theta.detach(), test_images, test_labels)
    return torch.stack(rows), acc


def _ci(x: torch.Tensor) -> float:
    n = x.numel()
    return float(1.96 * x.double().std() / math.sqrt(n)) if n > 1 else 0.0


def evaluate(rule, task, seeds: Sequence[int], steps: int) -> dict:
    """Every number of one optimizer on the problems ``seeds`` (see the module docstring)."""
    from .rules import CLASSIC_RULES  # noqa: F401  (registry import side effects)

    images, labels = task.test_data()
    if isinstance(rule, torch.nn.Module):
        rule.eval()
    cols, accs = [], {}
    chunk = max(1, task.max_batch)
    for i in range(0, len(seeds), chunk):
        losses, acc = run_with_accuracy(
            rule,
            task.sample(list(seeds[i : i + chunk])),
            steps,
            images,
            labels,
            at=(TRAIN_STEPS, steps),
        )
        cols.append(losses)
        for k, v in acc.items():
            accs.setdefault(k, []).append(v)
    x = torch.cat(cols, dim=1).double()  # [steps + 1, n]
    first = x[1 : TRAIN_STEPS + 1].sum(0)
    out = {
        "mean_loss": [float(v) for v in x.mean(1)],
        "std_loss": [float(v) for v in x.std(1)] if x.shape[1] > 1 else [0.0] * x.shape[0],
        "sum_loss": float(first.mean()),
        "sum_loss_ci95": _ci(first),
        "per_problem_sum_loss": [float(v) for v in first],
        "diverged": int((~torch.isfinite(x[-1])).sum()),
    }
    if steps > TRAIN_STEPS:
        late = x[TRAIN_STEPS + 1 :].sum(0)
        out["sum_loss_101_end"] = float(late.mean())
        out["sum_loss_101_end_ci95"] = _ci(late)
    for k, v in accs.items():
        a = torch.cat(v).double()
        out[f"test_accuracy_{k}"] = float(a.mean())
        out[f"test_accuracy_{k}_ci95"] = _ci(a)
    return out


def _named(spec: str) -> tuple[str, str]:
    if "=" in spec.split(":", 1)[0]:
        name, _, rest = spec.partition("=")
        return name.strip(), rest.strip()
    return spec, spec


def _earlier_tuning(earlier: dict | None, stamp: dict) -> tuple[float, dict] | None:
    """The learning rate and grid scores of an earlier entry tuned under the same protocol.

    Tuning depends only on the data set, the number of tuning runs and the grid (it
    uses its own seed stream and the training horizon), so a study rerun with more
    test runs or steps reuses it instead of tuning again.
    """
    if earlier is None or "tuning" not in earlier:
        return None
    old = earlier.get("stamp", {})
    if any(old.get(k) != stamp[k] for k in ("spec", "tune", "grid")):
        return None
    return float(earlier["hparams"]["lr"]), earlier["tuning"]


def run_study(
    optimizers: Sequence[str],
    out: Path,
    problems: int = 100,
    tune_problems: int = 20,
    steps: int = 200,
    experiments: Sequence[str] | None = None,
    baselines: Sequence[str] = BASELINES,
    log: Callable[[str], None] = print,
) -> dict:
    from .artifact import load
    from .evaluate import tune_lr
    from .rules import CLASSIC_RULES
    from .seeds import stream
    from .study import weights_digest
    from .tasks import build_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test_seeds = stream("test", problems)
    learned = [_named(s) for s in optimizers]
    summary: dict = {
        "protocol": {
            "problems": problems,
            "tune_problems": tune_problems,
            "steps": steps,
            "train_horizon": TRAIN_STEPS,
            "tuning_metric": f"sum of mean loss over steps 1-{TRAIN_STEPS}",
            "test_data": "CIFAR-10 test_batch.bin images of each label subset",
        },
        "experiments": {},
    }
    for key in list(EXPERIMENTS) if experiments is None else experiments:
        label, spec = EXPERIMENTS[key]
        task = build_task(spec)
        n_labels = len(task.classes)
        exp_dir = out / key
        exp_dir.mkdir(exist_ok=True)
        entries: dict = {}

        def cached(name, stamp, compute, exp_dir=exp_dir, key=key):
            """The entry stamped ``stamp``, or ``compute(earlier entry or None)`` saved."""
            path = exp_dir / (name.replace("/", "_").replace(":", "_") + ".json")
            earlier = json.loads(path.read_text()) if path.is_file() else None
            if earlier is not None and earlier.get("stamp") == stamp:
                log(f"  {key}/{name}: cached")
                return earlier
            t0 = time.perf_counter()
            got = compute(earlier)
            got["stamp"], got["seconds"] = stamp, time.perf_counter() - t0
            path.write_text(json.dumps(got, indent=1) + "\n")
            log(f"  {key}/{name}: sum {got['sum_loss']:.2f} ({got['seconds']:.0f} s)")
            return got

        for b in baselines:
            cls = CLASSIC_RULES[b]
            stamp = {
                "spec": spec,
                "problems": problems,
                "tune": tune_problems,
                "steps": steps,
                "grid": list(GRIDS[b]),
            }

            def compute(earlier, cls=cls, b=b, task=task, stamp=stamp, key=key):
                done = _earlier_tuning(earlier, stamp)
                if done is None:
                    tuned = tune_lr(
                        lambda lr: cls(lr=lr), task, TRAIN_STEPS, tune_problems, GRIDS[b]
                    )
                    lr, scores = tuned.lr, {repr(k): v for k, v in sorted(tuned.scores.items())}
                else:
                    lr, scores = done
                    log(f"  {key}/{b}: tuning reused (lr {lr}), only the test runs are new")
                res = evaluate(cls(lr=lr), task, test_seeds, steps)
                res["hparams"] = {"lr": lr}
                res["tuning"] = scores
                return res

            entries[b] = cached(b, stamp, compute)
        for name, lspec in learned:
            if name.startswith("sub") and name[3:].isdigit() and int(name[3:]) != n_labels:
                continue
            path = lspec.split(":", 1)[1]
            rule = load(path)
            stamp = {
                "spec": spec,
                "problems": problems,
                "steps": steps,
                "weights": weights_digest(rule),
            }

            def compute(earlier, rule=rule, path=path, task=task):
                res = evaluate(rule, task, test_seeds, steps)
                res["hparams"] = {"path": path}
                return res

            entries[name] = cached(name, stamp, compute)
        best = min(baselines, key=lambda b: entries[b]["sum_loss"]) if baselines else None
        for name, _ in learned:
            if name in entries and best is not None:
                e, bb = entries[name], entries[best]
                e["ratio_to_best_baseline"] = e["sum_loss"] / bb["sum_loss"]
                e["intervals_separate"] = (
                    e["sum_loss"] + e["sum_loss_ci95"] < bb["sum_loss"] - bb["sum_loss_ci95"]
                )
                e["beats_every_baseline"] = all(
                    e["sum_loss"] < entries[b]["sum_loss"] for b in baselines
                )
                acc = f"test_accuracy_{TRAIN_STEPS}"
                e["accuracy_100_ge_best_baseline"] = e.get(acc, 0) >= max(
                    entries[b].get(acc, 0) for b in baselines
                )
        summary["experiments"][key] = {
            "label": label,
            "task": task.describe(),
            "best_baseline": best,
            "optimizers": entries,
        }
    (out / "cifar.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "cifar.png")
    log(table(summary))
    return summary


def table(summary: dict) -> str:
    """One markdown table per experiment of a summary (the docs tables are printed by this)."""
    proto = summary["protocol"]
    steps, horizon = proto["steps"], proto["train_horizon"]
    late = steps > horizon
    lines = [
        f"{proto['problems']} test runs, baselines tuned on {proto['tune_problems']} runs, "
        f"{steps} steps; +- is the 95% interval of the mean"
    ]
    for exp in summary["experiments"].values():
        best = exp["best_baseline"]
        head = ["optimizer", "tuned lr", f"sum 1-{horizon}", "ratio to best baseline"]
        head += [f"sum {horizon + 1}-{steps}"] if late else []
        head += [f"acc @{horizon}"] + ([f"acc @{steps}"] if late else [])
        lines += ["", f"**{exp['label']}**", "", "| " + " | ".join(head) + " |"]
        lines.append("|---" * len(head) + "|")
        for name, e in exp["optimizers"].items():
            lr = e.get("hparams", {}).get("lr")
            if best is None:
                ratio = "-"
            elif name == best:
                ratio = "best baseline"
            else:
                ratio = f"{e['sum_loss'] / exp['optimizers'][best]['sum_loss']:.3f}"
            row = [
                name,
                "-" if lr is None else f"{lr:g}",
                f"{e['sum_loss']:.2f} +- {e['sum_loss_ci95']:.2f}",
                ratio,
            ]
            if late:
                row.append(f"{e['sum_loss_101_end']:.2f} +- {e['sum_loss_101_end_ci95']:.2f}")
            row.append(f"{100 * e[f'test_accuracy_{horizon}']:.1f}%")
            if late:
                row.append(f"{100 * e[f'test_accuracy_{steps}']:.1f}%")
            lines.append("| " + " | ".join(row) + " |")
    targets = summary.get("targets", {})
    if targets:
        lines += ["", "Targets: " + ", ".join(f"{k} {v}" for k, v in targets.items())]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from . import plots  # noqa: F401  (sets the Agg backend)

    exps = summary["experiments"]
    n = summary["protocol"]["problems"]
    fig, axes = plt.subplots(1, len(exps), figsize=(5 * len(exps), 4), squeeze=False)
    for ax, ex in zip(axes[0], exps.values(), strict=True):
        for name, e in ex["optimizers"].items():
            mean, std = e["mean_loss"], e["std_loss"]
            steps = range(len(mean))
            (line,) = ax.plot(steps, mean, lw=1.5, label=f"{name} ({e['sum_loss']:.1f})")
            half = [1.96 * s / math.sqrt(n) for s in std]
            ax.fill_between(
                steps,
                [m - h for m, h in zip(mean, half, strict=True)],
                [m + h for m, h in zip(mean, half, strict=True)],
                color=line.get_color(),
                alpha=0.15,
                lw=0,
            )
        ax.axvline(TRAIN_STEPS, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(ex["label"])
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"mean loss, {n} test runs (95% band)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
