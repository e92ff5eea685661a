"""The paper's MNIST generalization study in one command (L2L section 3.2, Figs. 4-6).

    l2o study mnist --optimizer lstm:pretrained/mnist [--optimizer rnnprop:pretrained/mnist-rnnprop] \\
                    --out runs/study [--problems 100] [--quick] [--data-dir DIR]

Every experiment is an ``l2o compare`` run (:func:`l2o.evaluate.compare`): the
learned optimizers against SGD, NAG, RMSprop and Adam with their learning rates
tuned *for that experiment* on separate problems, all evaluated on the same test
problems (MNIST t10k images, never seen by meta-training):

=====  =================  ======================================================
(a)    ``train``          the training setting: 784-20-10 sigmoid, 100 steps
(b)    ``steps200``       the same network run for 200 steps (trained for 100)
(c)    ``hidden40``       40 hidden units
(d)    ``layers2``        two hidden layers of 20
(e)    ``relu``           20 ReLU units (the paper's failure case)
(f)    ``sweep``          final loss against hidden units (10..80) and layers (1, 2)
=====  =================  ======================================================

Outputs in ``--out``: one directory per experiment with ``results.json``,
``curves.csv`` and ``curves.png`` (as ``l2o compare`` writes them), the sweep's
``sweep/sweep.png`` and ``sweep/sweep.json``, and ``summary.md`` /
``summary.json``: the sum of losses of every optimizer in every experiment
(plus, for 200 steps, the sum over steps 101-200 alone), the best optimizer and
each learned optimizer's ratio to the best tuned baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

BASELINES = ("sgd", "nag", "rmsprop", "adam")
EXPERIMENTS = {
    # key: (label, task spec, steps)
    "train": ("(a) training setting: 20 sigmoid units, 100 steps", "mnist-mlp", 100),
    "steps200": ("(b) 200 steps (trained for 100)", "mnist-mlp", 200),
    "hidden40": ("(c) 40 hidden units", "mnist-mlp:hidden=40", 100),
    "layers2": ("(d) two hidden layers of 20", "mnist-mlp:hidden=20,20", 100),
    "relu": ("(e) ReLU activation", "mnist-mlp:activation=relu", 100),
}
SWEEP_UNITS = (10, 20, 40, 80)
SWEEP_LAYERS = (1, 2)
TRAIN_ARCH = (20, 1)
QUICK = {
    "problems": 6,
    "tune_problems": 4,
    "steps_div": 5,
    "grid": (0.001, 0.01, 0.1, 1.0),
    "units": (10, 20),
    "layers": (1, 2),
}


def register(sub) -> None:
    from .cli import EXAMPLES, positive_int

    p = sub.add_parser(
        "study",
        help="the paper's MNIST generalization study (figures + summary table)",
        description="Run experiments (a)-(f) of the L2L MNIST generalization study.",
        formatter_class=EXAMPLES,
        epilog="""\
examples:
  l2o study mnist --optimizer lstm:pretrained/mnist --data-dir DIR --out runs/study
  l2o study mnist --optimizer lstm:runs/mnist --data-dir DIR --out runs/study --quick \\
      --experiments train,steps200
  l2o study cifar --optimizer lstm:pretrained/cifar --data-dir DIR --out runs/cifar \\
      --experiments cifar10,cifar5,cifar2      # CIFAR-10 binary files in DIR/cifar10/
needs MNIST in DIR/mnist/ (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) or $L2O_DATA instead of --data-dir.
""",
    )
    p.add_argument(
        "which", choices=["mnist", "cifar"], help="which study (cifar: l2o.study_cifar, Fig. 7)"
    )
    p.add_argument(
        "--optimizer",
        action="append",
        default=[],
        metavar="SPEC",
        help="learned optimizer(s), e.g. lstm:pretrained/mnist (repeatable; none: tuned baselines only)",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--problems", type=positive_int, default=100, help="test problems per experiment"
    )
    p.add_argument(
        "--tune-problems", type=positive_int, default=20, help="problems for each lr search"
    )
    p.add_argument(
        "--experiments",
        default=",".join([*EXPERIMENTS, "sweep"]),
        help="comma-separated subset of " + ",".join([*EXPERIMENTS, "sweep"]),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few problems, short horizons, a coarse lr grid and a small sweep",
    )
    p.add_argument(
        "--data-dir", default=None, metavar="DIR", help="data directory (default: $L2O_DATA)"
    )
    p.add_argument(
        "--device", default="cpu", metavar="DEV", help="cpu, cuda or cuda:N (default cpu)"
    )
    p.set_defaults(func=cmd_study)


def cmd_study(args) -> int:
    from .cli import apply_data_args, writable_dir
    from .devices import resolve_device

    apply_data_args(args, "cifar10-cnn" if args.which == "cifar" else "mnist-mlp")
    device = str(resolve_device(args.device))  # a bad or absent device fails before any work
    out = writable_dir(args.out)
    if args.which == "cifar":
        from .study_cifar import EXPERIMENTS as CIFAR_EXPERIMENTS
        from .study_cifar import run_study as run_cifar

        chosen = [e.strip() for e in args.experiments.split(",") if e.strip()]
        if set(chosen) - set(CIFAR_EXPERIMENTS):  # the default is MNIST's list: all of cifar
            chosen = list(CIFAR_EXPERIMENTS)
        run_cifar(
            args.optimizer,
            out,
            problems=args.problems,
            tune_problems=args.tune_problems,
            experiments=chosen,
        )
        return 0
    run_study(
        args.optimizer,
        out,
        problems=args.problems,
        tune_problems=args.tune_problems,
        experiments=[e.strip() for e in args.experiments.split(",") if e.strip()],
        quick=args.quick,
        device=device,
    )
    return 0


def weights_digest(rule) -> str:
    """sha256 of a learned rule's meta-parameters (names and values, not the file's bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(rule.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cached(path: Path, stamp: dict, compute, log) -> dict:
    """``compute()``'s result, stored in ``path`` with ``stamp`` and reused while the stamp matches."""
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("stamp") == json.loads(json.dumps(stamp)):
                log(f"  reusing {path}")
                return data["results"]
        except (json.JSONDecodeError, KeyError):
            pass
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stamp": stamp, "results": result}) + "\n")
    return result


def _ratio_note(entry: dict, best_baseline: float) -> float:
    return (
        entry["sum_loss"] / best_baseline
        if best_baseline > 0 and math.isfinite(best_baseline)
        else math.nan
    )


def run_study(
    optimizers: list[str],
    out: Path,
    problems: int = 100,
    tune_problems: int = 20,
    experiments: list[str] | None = None,
    quick: bool = False,
    log=print,
    device: str = "cpu",
) -> dict:
    """Run the study; returns the summary dict (also written to ``out/summary.json``).

    ``device``: where every optimizee and rule runs (results cached on another device
    are not reused: floating-point results differ between devices).
    """
    from .artifact import load
    from .cli import write_results
    from .errors import L2OError
    from .evaluate import DEFAULT_LR_GRID, compare, parse_optimizer
    from .tasks import build_task

    experiments = experiments or [*EXPERIMENTS, "sweep"]
    unknown = [e for e in experiments if e not in EXPERIMENTS and e != "sweep"]
    if unknown:
        raise L2OError(
            f"--experiments: unknown {unknown}; expected some of {[*EXPERIMENTS, 'sweep']}"
        )
    learned = [parse_optimizer(s) for s in optimizers]
    if any(s.kind != "learned" for s in learned):
        raise L2OError(
            "--optimizer: give learned optimizers only (NAME:PATH); SGD, NAG, RMSprop and Adam "
            "are always included and tuned per experiment"
        )
    rules = {s.name: load(s.path) for s in learned}
    specs = learned + [parse_optimizer(b) for b in BASELINES]
    grid = QUICK["grid"] if quick else DEFAULT_LR_GRID
    if quick:
        problems, tune_problems = (
            min(problems, QUICK["problems"]),
            min(tune_problems, QUICK["tune_problems"]),
        )
    cache: dict[tuple[str, int], dict] = {}

    def run(task_spec: str, steps: int, target: Path, title: str) -> dict:
        key = (task_spec, steps)
        if key not in cache:
            t0 = time.perf_counter()
            log(f"[study] {title}: {task_spec}, {steps} steps, {problems} problems")
            task = build_task(task_spec)
            kwargs = dict(
                steps=steps,
                problems=problems,
                tune_problems=tune_problems,
                grid=grid,
                log=log,
                device=device,
            )
            # Results are cached per optimizer in the experiment's directory, keyed by the
            # protocol (and a learned optimizer's weights): tuned baselines do not depend on
            # the learned optimizers, and experiments can be filled by several processes.
            stamp = {
                "task": task.describe(),
                "steps": steps,
                "problems": problems,
                "tune_problems": tune_problems,
                "grid": list(grid),
            }
            if device != "cpu":  # CPU caches keep their stamp of before the option
                stamp["device"] = device
            base = _cached(
                target / "baselines.json",
                {**stamp, "baselines": list(BASELINES)},
                lambda: compare(task, [s for s in specs if s.kind == "classic"], **kwargs),
                log,
            )
            res = dict(base)
            mine = {}
            for s in learned:
                digest = weights_digest(rules[s.name])
                tag = hashlib.sha256(s.name.encode()).hexdigest()[:10]
                out_s = _cached(
                    target / f"learned-{tag}.json",
                    {**stamp, "optimizer": s.name, "weights_sha256": digest},
                    lambda s=s: compare(task, [s], rules=rules, **kwargs),
                    log,
                )
                mine.update(out_s["optimizers"])
            res["optimizers"] = {**mine, **base["optimizers"]}
            res["task_spec"] = task_spec
            res["seconds"] = time.perf_counter() - t0
            cache[key] = res
        res = cache[key]
        target.mkdir(parents=True, exist_ok=True)
        write_results(res, target, title)
        return res

    summary: dict = {
        "problems": problems,
        "tune_problems": tune_problems,
        "quick": quick,
        "learned": [s.name for s in learned],
        "baselines": list(BASELINES),
        "test_data": "MNIST t10k (never seen by meta-training)",
        "experiments": {},
    }
    for name in experiments:
        if name == "sweep":
            continue
        label, spec, steps = EXPERIMENTS[name]
        if quick:
            steps = max(2, steps // QUICK["steps_div"])
        res = run(spec, steps, out / name, label)
        summary["experiments"][name] = _summarize(label, spec, res)
    if "sweep" in experiments:
        summary["sweep"] = _sweep(run, out / "sweep", specs, quick)
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    md = summary_markdown(summary)
    (out / "summary.md").write_text(md)
    log("\n" + md)
    log(
        f"wrote {out}/<experiment>/{{results.json,curves.csv,curves.png}}, {out / 'summary.md'}, {summary_path}"
    )
    return summary


def _summarize(label: str, spec: str, res: dict) -> dict:
    opts = res["optimizers"]
    best_baseline = min(
        (e["sum_loss"] for n, e in opts.items() if e["kind"] == "classic"), default=math.inf
    )
    row = {"label": label, "task_spec": spec, "steps": res["steps"], "optimizers": {}}
    for n, e in opts.items():
        item = {
            "sum_loss": e["sum_loss"],
            "final_loss": e["final_loss_mean"],
            "sum_loss_ci95": e["sum_loss_ci95"],
            "diverged": e["diverged"],
        }
        if "lr" in e.get("hparams", {}):
            item["lr"] = e["hparams"]["lr"]
        if res["steps"] > 100:
            item["sum_loss_101_end"] = float(sum(e["mean_loss"][101:]))
        if e["kind"] == "learned":
            item["ratio_to_best_baseline"] = _ratio_note(e, best_baseline)
        row["optimizers"][n] = item
    row["best"] = min(opts, key=lambda n: opts[n]["sum_loss"])
    row["best_baseline_sum_loss"] = best_baseline
    return row


def _sweep(run, out: Path, specs, quick: bool) -> dict:
    from .plots import plt

    units = QUICK["units"] if quick else SWEEP_UNITS
    layers = QUICK["layers"] if quick else SWEEP_LAYERS
    steps = 100 // QUICK["steps_div"] if quick else 100
    points: dict[str, list] = {s.name: [] for s in specs}
    for n_layers in layers:
        for u in units:
            hidden = ",".join([str(u)] * n_layers)
            spec = "mnist-mlp" if (u, n_layers) == TRAIN_ARCH else f"mnist-mlp:hidden={hidden}"
            res = run(
                spec, steps, out / f"h{u}x{n_layers}", f"(f) sweep: {n_layers} layer(s) of {u}"
            )
            for name, e in res["optimizers"].items():
                points[name].append(
                    {
                        "units": u,
                        "layers": n_layers,
                        "final_loss": e["final_loss_mean"],
                        "sum_loss": e["sum_loss"],
                        "lr": e.get("hparams", {}).get("lr"),
                    }
                )
    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), squeeze=False)
    for ax, n_layers in zip(axes[0], layers, strict=True):
        for name, pts in points.items():
            xs = [p["units"] for p in pts if p["layers"] == n_layers]
            ys = [p["final_loss"] for p in pts if p["layers"] == n_layers]
            ax.plot(xs, ys, marker="o", label=name)
        if n_layers == TRAIN_ARCH[1]:
            ax.axvline(TRAIN_ARCH[0], ls="--", color="k", lw=1, label="training architecture")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(units), [str(u) for u in units])
        ax.set_yscale("log")
        ax.set_xlabel("hidden units per layer")
        ax.set_ylabel(f"final loss (step {steps})")
        ax.set_title(f"{n_layers} hidden layer{'s' if n_layers > 1 else ''} (sigmoid)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    sweep = {
        "units": list(units),
        "layers": list(layers),
        "steps": steps,
        "training_architecture": {"units": TRAIN_ARCH[0], "layers": TRAIN_ARCH[1]},
        "points": points,
    }
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    return sweep


def summary_markdown(summary: dict) -> str:
    names = summary["learned"] + summary["baselines"]
    lines = [
        f"MNIST generalization study: sum of mean test loss over the steps ({summary['problems']} test "
        f"problems on MNIST t10k; baselines' lr tuned per experiment on {summary['tune_problems']} "
        "separate problems). Lower is better; **bold** = best.",
        "",
    ]
    lines.append("| experiment | steps | " + " | ".join(names) + " | best |")
    lines.append("|---|---|" + "---|" * len(names) + "---|")
    for row in summary["experiments"].values():
        cells = []
        for n in names:
            e = row["optimizers"].get(n)
            if e is None:
                cells.append("-")
                continue
            text = f"{e['sum_loss']:.1f}"
            if "lr" in e:
                text += f" (lr {e['lr']:g})"
            if "sum_loss_101_end" in e:
                text += f"; steps 101-{row['steps']}: {e['sum_loss_101_end']:.1f}"
            cells.append(f"**{text}**" if n == row["best"] else text)
        lines.append(
            f"| {row['label']} | {row['steps']} | " + " | ".join(cells) + f" | {row['best']} |"
        )
    learned = summary["learned"]
    if learned and summary["experiments"]:
        lines += [
            "",
            "Learned optimizer / best tuned baseline (sum of losses; < 1 means the learned one wins):",
            "",
        ]
        lines.append("| experiment | " + " | ".join(learned) + " |")
        lines.append("|---|" + "---|" * len(learned))
        for row in summary["experiments"].values():
            ratios = [row["optimizers"][n].get("ratio_to_best_baseline", math.nan) for n in learned]
            lines.append(f"| {row['label']} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    if "sweep" in summary:
        sw = summary["sweep"]
        lines += [
            "",
            f"(f) sweep: final loss at step {sw['steps']} (training architecture: "
            f"{TRAIN_ARCH[1]} layer of {TRAIN_ARCH[0]})",
            "",
        ]
        archs = [(p["units"], p["layers"]) for p in next(iter(sw["points"].values()))]
        lines.append("| optimizer | " + " | ".join(f"{u}x{n}" for u, n in archs) + " |")
        lines.append("|---|" + "---|" * len(archs))
        for n, pts in sw["points"].items():
            lines.append(f"| {n} | " + " | ".join(f"{p['final_loss']:.3f}" for p in pts) + " |")
    return "\n".join(lines) + "\n"
