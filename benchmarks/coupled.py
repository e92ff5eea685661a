"""Benchmark: optimizers whose coordinates talk (L2L section 2.2 and Appendix B).

    python benchmarks/coupled.py                              # quadratics, shipped rules
    python benchmarks/coupled.py --mnist-gac runs/mnist-gac --mnist-ntm runs/mnist-ntm-lbfgs

Quadratics (the protocol of benchmarks/quadratic.py): f(theta) = ||W theta - y||^2,
10-dim, W, y ~ N(0, 1), theta0 = 0; every optimizer on the same 1000 test functions
(seed stream "test"), 100 steps, each step one loss-and-gradient evaluation (BFGS and
L-BFGS included: their line search spends steps, a rejected trial is an evaluation in the
curve and in the sum).  SGD, NAG, RMSprop, Adam, BFGS and L-BFGS get their ``lr`` from
the log grid on 100 separate functions (stream "tune").  Learned: the LSTM
(``pretrained/quadratic``), LSTM+GAC (``pretrained/quadratic-gac``), NTM-BFGS
(``pretrained/quadratic-ntm-bfgs``) and NTM-L-BFGS (``--ntm-lbfgs PATH``; by default the
NTM-BFGS weights run with a window of ``--window`` write pairs).  Reported: sum over
steps 1..100 of the mean loss with a 95% interval, and each optimizer's paired
difference with the LSTM on the same functions (mean and 95% interval).

GAC activations: the shipped LSTM+GAC on 32 test functions, every averaging cell's value
per instance and step, and its correlation (over instances and steps, and across
instances within a step) with log ||g||, log f and the step (what do the shared cells
carry?).

MNIST (with ``--mnist-gac`` / ``--mnist-ntm``): experiment (a) of benchmarks/mnist.py
(784-20-10 sigmoid MLP, 100 runs on t10k, 100 steps) through :func:`l2o.study.run_study`,
with ``pretrained/mnist``; the tuned baselines are taken from
``benchmarks/results/mnist/<experiment>/results.json`` (same protocol and stamp), and so
is ``pretrained/mnist``'s result, unless ``--retune``.  ``--generalization`` adds experiments (b)-(e) for ``--mnist-gac``.

Writes benchmarks/results/coupled.json, coupled_quadratic.png,
coupled_gac_activations.png and benchmarks/results/coupled/mnist/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from _common import hardware, paired  # noqa: E402

from l2o.artifact import load, read_config  # noqa: E402
from l2o.cli import dumps_json  # noqa: E402
from l2o.evaluate import CLASSIC_RULES, compare, evaluate_rule, parse_optimizer  # noqa: E402
from l2o.meta.unroll import loss_and_grad, start  # noqa: E402
from l2o.plots import plot_curves  # noqa: E402
from l2o.rules import NTMLBFGS, NTMLBFGSConfig  # noqa: E402
from l2o.seeds import stream  # noqa: E402
from l2o.tasks import build_task  # noqa: E402

BASELINES = ["adam", "rmsprop", "sgd", "nag", "bfgs", "l-bfgs"]
OUT = ROOT / "benchmarks" / "results"


def ntm_lbfgs_from(path: str, window: int) -> NTMLBFGS:
    """The NTM-BFGS weights of ``path`` as an NTM-L-BFGS keeping ``window`` write pairs."""
    src = load(path)
    cfg = {k: v for k, v in src.config.to_dict().items() if k != "max_coordinates"}
    rule = NTMLBFGS(NTMLBFGSConfig.from_dict({**cfg, "window": window}))
    rule.load_state_dict(src.state_dict())
    return rule


def quadratics(args, report: dict) -> None:
    task = build_task("quadratic")
    learned = {
        "lstm": "pretrained/quadratic",
        "lstm-gac": args.gac,
        "ntm-bfgs": args.ntm_bfgs,
    }
    specs, rules = [], {}
    for name, path in learned.items():
        spec = parse_optimizer(f"{name}:{path}")
        specs.append(spec)
        rules[spec.name] = load(path)
    if args.ntm_lbfgs:
        spec = parse_optimizer(f"ntm-lbfgs:{args.ntm_lbfgs}")
        rules[spec.name] = load(args.ntm_lbfgs)
    else:
        spec = parse_optimizer(f"ntm-lbfgs:{args.ntm_bfgs}")
        spec.name = f"ntm-lbfgs:{args.ntm_bfgs} (window {args.window})"
        rules[spec.name] = ntm_lbfgs_from(args.ntm_bfgs, args.window)
    specs.append(spec)
    specs += [parse_optimizer(b) for b in BASELINES]
    t0 = time.perf_counter()
    res = compare(
        task,
        specs,
        steps=100,
        problems=args.problems,
        tune_problems=args.tune_problems,
        rules=rules,
        log=print,
    )
    res["seconds"] = time.perf_counter() - t0
    # paired differences with the LSTM on the same functions (per-function sums)
    seeds = stream("test", args.problems)
    losses = {}
    for s in specs:
        e = res["optimizers"][s.name]
        if s.kind == "classic":
            rule = CLASSIC_RULES[s.rule_name](**e["hparams"])
        else:
            rule = rules[s.name]
        losses[s.name] = evaluate_rule(rule, task, seeds, 100)
    lstm = specs[0].name
    for name, L in losses.items():
        res["optimizers"][name]["paired_minus_lstm"] = paired(L, losses[lstm])
    report["quadratic"] = res
    plot_curves(
        res,
        OUT / "coupled_quadratic.png",
        f"quadratic, {args.problems} test functions, 100 steps (baselines tuned)",
    )
    r = res["optimizers"]
    s_lstm = r[lstm]["sum_loss"]
    report["quadratic_checks"] = {
        "lstm_sum_loss": s_lstm,
        "gac_sum_loss": r[specs[1].name]["sum_loss"],
        "target_gac_le_lstm": r[specs[1].name]["sum_loss"] <= s_lstm,
        "ntm_bfgs_sum_loss": r[specs[2].name]["sum_loss"],
        "ntm_bfgs_ratio_to_lstm": r[specs[2].name]["sum_loss"] / s_lstm,
        "target_ntm_bfgs_le_0.9_lstm": r[specs[2].name]["sum_loss"] <= 0.9 * s_lstm,
    }
    print(f"\nquadratics ({res['seconds']:.0f} s), {args.problems} functions, 100 steps:")
    print(f"  {'optimizer':<58}{'lr':>10}{'sum':>9}{'+-95%':>8}{'- lstm':>9}{'+-95%':>8}")
    for name, e in sorted(r.items(), key=lambda kv: kv[1]["sum_loss"]):
        lr = e["hparams"].get("lr", "")
        p = e["paired_minus_lstm"]
        print(
            f"  {name:<58}{lr!s:>10.8}{e['sum_loss']:>9.2f}{e['sum_loss_ci95']:>8.2f}"
            f"{p['mean']:>9.2f}{p['ci95']:>8.2f}"
        )


def gac_activations(
    path: str, report: dict, instances: int = 32, steps: int = 100, shown: int = 8
) -> None:
    """Record the averaging cells of the LSTM+GAC along runs on ``instances`` test functions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule = load(path)
    task = build_task("quadratic")
    problem = task.sample(stream("test", instances))
    layout = problem.layout
    first = torch.arange(instances) * layout.instance_numel  # one coordinate per instance
    traj = start(problem, rule)
    theta, state, losses, grad = traj.theta, traj.state, traj.losses, traj.grad
    cells, gnorm, floss = [], [], []
    for t in range(1, steps + 1):
        gnorm.append(grad.view(instances, -1).norm(dim=1).log10())
        floss.append(losses.log10())
        with torch.no_grad():
            theta, state = rule.step(theta, grad, losses, state, layout)
        acts = rule.gac_activations(state)
        cells.append(torch.cat([acts[k][first] for k in sorted(acts)], dim=1))  # [P, cells]
        losses, grad = loss_and_grad(problem, theta, t, keep_graph=False)
        losses, grad = losses.detach(), grad.detach()
    A = torch.stack(cells)  # [steps, P, C]
    G, F = torch.stack(gnorm), torch.stack(floss)  # [steps, P]
    S = torch.arange(steps, dtype=A.dtype)[:, None].expand_as(G)
    names = [f"{k}[{j}]" for k in sorted(rule.gac_activations(state)) for j in range(rule.gac[0])]
    names = names[: A.shape[2]]

    def corr(x, y):
        x, y = x.flatten().double(), y.flatten().double()
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / (x.norm() * y.norm() + 1e-30))

    def within(x):  # the deviation of each instance from the step's mean over instances
        return x - x.mean(1, keepdim=True)

    table = {
        n: {
            "corr_log10_grad_norm": corr(A[:, :, c], G),
            "corr_log10_loss": corr(A[:, :, c], F),
            "corr_step": corr(A[:, :, c], S),
            # across instances at the same step (the common trend over steps removed)
            "corr_log10_grad_norm_within_step": corr(within(A[:, :, c]), within(G)),
            "corr_log10_loss_within_step": corr(within(A[:, :, c]), within(F)),
            "range": [float(A[:, :, c].min()), float(A[:, :, c].max())],
        }
        for c, n in enumerate(names)
    }
    report["gac_activations"] = {"path": path, "instances": instances, "steps": steps, **table}
    C = A.shape[2]
    fig, axes = plt.subplots(1, C + 1, figsize=(3.2 * (C + 1), 3.2))
    for c in range(C):
        ax = axes[c]
        ax.plot(A[:, :shown, c].numpy(), lw=1)
        t = table[names[c]]
        ax.set_title(
            f"GAC {names[c]}\nr(log|g|)={t['corr_log10_grad_norm']:.2f} "
            f"r(log f)={t['corr_log10_loss']:.2f}",
            fontsize=8,
        )
        ax.set_xlabel("step")
    axes[C].plot(G[:, :shown].numpy(), lw=1)
    axes[C].set_title("log10 ||g|| per instance", fontsize=8)
    axes[C].set_xlabel("step")
    fig.suptitle(
        f"LSTM+GAC averaging cells on {shown} of {instances} test quadratics ({path}); "
        f"r: correlation over all {instances} instances and {steps} steps",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(OUT / "coupled_gac_activations.png", dpi=110)
    plt.close(fig)
    print("\nGAC activations (correlation over instances and steps):")
    for n, t in table.items():
        print(
            f"  {n:<8} log|g| {t['corr_log10_grad_norm']:+.2f}  log f {t['corr_log10_loss']:+.2f}"
            f"  step {t['corr_step']:+.2f}  within a step: log|g| "
            f"{t['corr_log10_grad_norm_within_step']:+.2f} log f {t['corr_log10_loss_within_step']:+.2f}"
            f"  range [{t['range'][0]:+.3f}, {t['range'][1]:+.3f}]"
        )


def _seed_from_mnist_benchmark(
    target: Path, experiment: str, problems: int, tune_problems: int, steps: int
) -> None:
    """Write the study's caches (tuned baselines, ``pretrained/mnist``) of ``experiment`` from
    the committed benchmarks/results/mnist/<experiment>/results.json (same protocol)."""
    import hashlib

    from l2o.evaluate import DEFAULT_LR_GRID
    from l2o.study import BASELINES as STUDY_BASELINES
    from l2o.study import weights_digest

    src = OUT / "mnist" / experiment / "results.json"
    if not src.is_file():
        return
    res = json.loads(src.read_text())
    if (res["problems"], res["tune_problems"], res["steps"]) != (problems, tune_problems, steps):
        return
    stamp = {
        "task": res["task"],
        "steps": res["steps"],
        "problems": problems,
        "tune_problems": tune_problems,
        "grid": list(DEFAULT_LR_GRID),
    }
    base = {k: v for k, v in res.items() if k not in ("optimizers", "task_spec", "seconds")}
    target.mkdir(parents=True, exist_ok=True)
    keep = {k: v for k, v in res["optimizers"].items() if v["kind"] == "classic"}
    cache = target / "baselines.json"
    if not cache.is_file():
        full = {**stamp, "baselines": list(STUDY_BASELINES)}
        cache.write_text(json.dumps({"stamp": full, "results": {**base, "optimizers": keep}}))
    lstm = "lstm:pretrained/mnist"
    if lstm in res["optimizers"]:
        tag = hashlib.sha256(lstm.encode()).hexdigest()[:10]
        cache = target / f"learned-{tag}.json"
        if not cache.is_file():
            full = {**stamp, "optimizer": lstm, "weights_sha256": weights_digest(load(lstm[5:]))}
            mine = {lstm: res["optimizers"][lstm]}
            cache.write_text(json.dumps({"stamp": full, "results": {**base, "optimizers": mine}}))
    print(f"  {src.relative_to(ROOT)}: tuned baselines and {lstm} reused (same protocol)")


def mnist(args, report: dict) -> None:
    import os

    if not os.environ.get("L2O_DATA") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["L2O_DATA"] = str(ROOT.parent / "shared" / "data")
    from l2o.study import run_study

    optimizers = ["lstm:pretrained/mnist"]
    if args.mnist_gac:
        optimizers.append(f"lstm-gac:{args.mnist_gac}")
    if args.mnist_ntm:
        optimizers.append(f"ntm-lbfgs:{args.mnist_ntm}")
    from l2o.study import EXPERIMENTS

    out = OUT / "coupled" / "mnist"
    experiments = [e for e in args.experiments.split(",") if e]
    if args.generalization and args.mnist_gac:
        experiments += [e for e in EXPERIMENTS if e not in experiments]
    if not args.retune:
        for e in experiments:
            _seed_from_mnist_benchmark(out / e, e, args.mnist_problems, 20, EXPERIMENTS[e][2])
    t0 = time.perf_counter()
    summary = run_study(optimizers, out, problems=args.mnist_problems, experiments=experiments)
    summary["seconds"] = time.perf_counter() - t0
    for spec in optimizers[1:]:
        path = spec.split(":", 1)[1]
        summary.setdefault("training", {})[spec] = read_config(path).get("extra", {})
    key = "mnist" if experiments == ["train"] else "mnist_" + "_".join(experiments)
    report[key] = summary
    a = summary["experiments"]["train"]["optimizers"]
    if args.mnist_gac:
        gac = a[f"lstm-gac:{args.mnist_gac}"]["sum_loss"]
        report["mnist_checks"] = {
            "gac_sum_loss": gac,
            "lstm_sum_loss": a["lstm:pretrained/mnist"]["sum_loss"],
            "target_gac_le_44.5": gac <= 44.5,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gac", default="pretrained/quadratic-gac")
    ap.add_argument("--ntm-bfgs", default="pretrained/quadratic-ntm-bfgs")
    ap.add_argument("--ntm-lbfgs", default="", help="an ntm-lbfgs run; default: --ntm-bfgs's")
    ap.add_argument("--window", type=int, default=30, help="write pairs kept (default 30)")
    ap.add_argument("--problems", type=int, default=1000)
    ap.add_argument("--tune-problems", type=int, default=100)
    ap.add_argument("--no-quadratic", action="store_true")
    ap.add_argument("--mnist-gac", default="", help="an lstm-gac meta-trained on mnist-mlp")
    ap.add_argument("--mnist-ntm", default="", help="an ntm-lbfgs meta-trained on mnist-mlp")
    ap.add_argument("--mnist-problems", type=int, default=100)
    ap.add_argument("--generalization", action="store_true", help="MNIST (b)-(e) for the GAC")
    ap.add_argument(
        "--experiments", default="train", help="MNIST study experiments (comma-separated)"
    )
    ap.add_argument("--retune", action="store_true", help="re-tune the MNIST baselines")
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "coupled.json"
    command = " ".join(["python", *sys.argv])
    report: dict = {}
    report.update(
        {
            "benchmark": "coupled",
            "hardware": hardware(),
            "protocol": {
                "quadratic": "10-dim, W, y ~ N(0,1), theta0 = 0; 100 steps = 100 evaluations "
                "for every optimizer (BFGS / L-BFGS rejected trials included); lr tuned on "
                f"{args.tune_problems} 'tune' functions; {args.problems} 'test' functions",
                "mnist": "study experiment (a): 784-20-10 sigmoid, batch 128, t10k, 100 steps",
            },
        }
    )
    if not args.no_quadratic:
        quadratics(args, report)
        gac_activations(args.gac, report)
    if args.mnist_gac or args.mnist_ntm:
        mnist(args, report)
    # merged into the file as it is now: the quadratic and MNIST parts may run side by side
    merged = json.loads(path.read_text()) if path.is_file() else {}
    for key in [k for k in report if k == "quadratic" or k.startswith("mnist")]:
        merged.setdefault("commands", {})[key] = command
    merged.update(report)
    path.write_text(dumps_json(merged))
    for key in ("quadratic_checks", "mnist_checks"):
        if key in report:
            print(key, json.dumps(report[key], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
