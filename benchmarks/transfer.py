"""Benchmark: do learned optimizers transfer to models outside their training family? (issue 18)

    L2O_DATA=/path/to/data OMP_NUM_THREADS=1 python benchmarks/transfer.py
        [--learned general=pretrained/general ...] [--reuse] [--models a,b] [--seeds 1,2,3,4,5]
        [--steps 500] [--threads 1] [--quick]

Runs each model of :mod:`l2o.suite` (8 models, none in the meta-training family) for
``--steps`` steps on seeds 1..5 with

* ``adam`` (torch.optim.Adam, lr 1e-3), ``adamw`` (AdamW, lr 1e-3, weight_decay 0.01),
* ``adam-hd``: Adam lr 1e-3 whose log step size adapts per tensor by a hypergradient rule
  at rate 0.1 (``l2o.rules.AdamHD``, nothing learned: ``mlp-lopt`` with ``hd=0.1`` at
  meta-init, the hand-designed starting point of the hypergradient learned rules),
* ``adam-tuned``: Adam with the lr of the grid 3e-4 .. 3e-2 that gives the lowest final
  training loss on the tuning seed 0 (never an evaluation seed), per model,
* each ``--hand NAME=SPEC``: a hand-designed l2o rule with fixed options (``l2o compare``'s
  spec, e.g. ``adam-hd:hd=0.2``), run through ``LearnedOptimizer``,
* every learned optimizer: ``mnist`` (``pretrained/mnist``) by default, ``general``
  (``pretrained/general``) when it loads, and each ``--learned NAME=PATH`` (PATH: anything
  ``l2o.load`` takes), as ``LearnedOptimizer(model.parameters(), rule=l2o.load(PATH))``.

Per (model, optimizer, seed) it records every step's minibatch loss, the **final
training loss = mean minibatch loss over the last 20 steps**, the held-out loss and
accuracy, wall time and ``diverged`` (a non-finite loss, or final loss > the first
step's loss).  Writes ``benchmarks/results/transfer.json`` (all numbers, the command,
torch version) and ``transfer.png``, prints the table and the issue's targets for each
learned optimizer: (a) final loss below Adam@1e-3's (mean over seeds) on >= 6 of 8
models; (b) geometric mean over models of final loss / adam-tuned's <= 1.5; (c) never
diverges.  ``--reuse`` keeps every (model, optimizer) already in the JSON with the
same steps and seeds and runs only what is missing and the rules named by ``--learned``
(so ``--reuse --learned general=pretrained/general`` runs, or re-runs, just that rule).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TUNE_SEED = 0
LAST = 20  # final training loss: mean minibatch loss over the last LAST steps


def final_loss(curve: list[float]) -> float:
    tail = curve[-LAST:]
    if not tail or not all(math.isfinite(v) for v in tail):
        return math.nan
    return sum(tail) / len(tail)


def run_one(problem, make_opt, seed: int, steps: int) -> dict:
    """Train ``problem``'s model from ``seed`` for ``steps`` steps; curve, final and held-out numbers."""
    import torch

    model = problem.build(seed)
    opt = make_opt(model)
    curve: list[float] = []
    t0 = time.perf_counter()
    bad = False
    for step in range(steps):
        batch = problem.batch(seed, step)
        opt.zero_grad()
        loss = problem.loss(model, batch)
        v = float(loss.detach())
        curve.append(v)
        if not math.isfinite(v):
            bad = True
            break
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    fin = final_loss(curve) if not bad else math.nan
    if bad or not all(bool(torch.isfinite(q.detach()).all()) for q in model.parameters()):
        held = {"loss": math.nan, "accuracy": None}
    else:
        held = problem.evaluate(model)
    diverged = bad or not math.isfinite(fin) or fin > curve[0]
    del torch
    return {
        "seed": seed,
        "curve": curve,
        "final_train_loss": fin,
        "initial_loss": curve[0],
        "heldout_loss": held["loss"],
        "heldout_accuracy": held["accuracy"],
        "seconds": seconds,
        "diverged": bool(diverged),
    }


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def dumps(doc: dict) -> str:
    """JSON with NaN/Inf as null, indented, each list of numbers (a curve) on one line."""
    text = json.dumps(_nan_to_none(doc), indent=1)
    return (
        re.sub(
            r"\[\n\s*([-0-9.eE,\snul]+?)\n\s*\]",
            lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
            text,
        )
        + "\n"
    )


def _num(x):
    return math.nan if x is None else x


def summarize(runs: list[dict]) -> dict:
    import statistics as st

    fin = [_num(r["final_train_loss"]) for r in runs]
    hl = [_num(r["heldout_loss"]) for r in runs]
    acc = [r["heldout_accuracy"] for r in runs if r["heldout_accuracy"] is not None]

    def ms(v):
        if not v:
            return None, None
        return st.fmean(v), (st.stdev(v) if len(v) > 1 else 0.0)

    out = {}
    out["final_train_loss_mean"], out["final_train_loss_std"] = ms(fin)
    out["heldout_loss_mean"], out["heldout_loss_std"] = ms(hl)
    out["heldout_accuracy_mean"], out["heldout_accuracy_std"] = ms(acc)
    out["diverged"] = sum(bool(r["diverged"]) for r in runs)
    out["seconds"] = sum(r["seconds"] for r in runs)
    return out


def targets(results: dict, learned: str, models: list[str]) -> dict:
    wins, ratios, diverged, missing = 0, [], 0, []
    for m in models:
        e = results.get(m, {})
        if learned not in e or "adam" not in e or "adam-tuned" not in e:
            missing.append(m)
            continue
        mine = _num(e[learned]["summary"]["final_train_loss_mean"])
        adam = _num(e["adam"]["summary"]["final_train_loss_mean"])
        tuned = _num(e["adam-tuned"]["summary"]["final_train_loss_mean"])
        wins += bool(mine < adam)
        ratios.append(mine / tuned if tuned > 0 else math.nan)
        diverged += e[learned]["summary"]["diverged"]
    finite = [r for r in ratios if math.isfinite(r) and r > 0]
    geo = (
        math.exp(sum(math.log(r) for r in finite) / len(finite))
        if finite and len(finite) == len(ratios)
        else math.inf
    )
    n = len(models) - len(missing)
    need = math.ceil(6 * n / 8)
    return {
        "models": n,
        "missing_models": missing,
        "beats_adam_1e-3_on": wins,
        "a_beats_adam_on_6_of_8": wins >= need and n > 0,
        "ratio_to_adam_tuned_per_model": dict(
            zip([m for m in models if m not in missing], ratios, strict=True)
        ),
        "geomean_ratio_to_adam_tuned": geo,
        "b_geomean_le_1.5": geo <= 1.5,
        "diverged_runs": diverged,
        "c_never_diverges": diverged == 0 and n > 0,
        "all_met": wins >= need and geo <= 1.5 and diverged == 0 and n > 0,
    }


def markdown(doc: dict, columns: list[str] | None = None) -> str:
    """The docs page's tables (final training loss, held-out loss / accuracy, targets) of a JSON.

    ``columns``: the optimizers of the two loss tables, in this order (default: all); the
    targets table always lists every learned optimizer.
    """
    res, info = doc["results"], doc.get("models", {})
    models = [m for m in info if m in res] + [m for m in res if m not in info]
    names: list[str] = []
    for m in models:
        names += [n for n in res[m] if n not in names]
    if columns:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise SystemExit(f"--columns: {unknown} not in the JSON (it has {names})")
        names = list(columns)

    def table(header: list[str], cell) -> list[str]:
        """One row per model, one column per optimizer; ``cell(model, name, entry)``."""
        rows = ["| model | " + " | ".join(header) + " |", "|---|" + "---:|" * len(names)]
        for m in models:
            cells = [cell(m, n, res[m][n]) if n in res[m] else "-" for n in names]
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
        return rows

    def final_loss(m: str, n: str, e: dict) -> str:
        s = e["summary"]
        v, sd = _num(s["final_train_loss_mean"]), _num(s["final_train_loss_std"])
        best = min(
            _num(x["summary"]["final_train_loss_mean"]) for k, x in res[m].items() if k in names
        )
        c = f"**{v:.4f} ± {sd:.4f}**" if v == best else f"{v:.4f} ± {sd:.4f}"
        if n == "adam-tuned":
            c += f" ({e['lr']:g})"
        return c + (f" ({s['diverged']} div.)" if s["diverged"] else "")

    def heldout(m: str, n: str, e: dict) -> str:
        s = e["summary"]
        acc = s["heldout_accuracy_mean"]
        return f"{_num(s['heldout_loss_mean']):.3f}" + (
            f" / {100 * acc:.1f}%" if acc is not None else ""
        )

    header = [n if n != "adam-tuned" else "adam-tuned (lr)" for n in names]
    lines = table(header, final_loss) + [""] + table(names, heldout)
    lines += [
        "",
        "| learned | (a) beats adam@1e-3 | (b) geomean final / adam-tuned | (c) diverged runs | all met |",
        "|---|---|---|---|---|",
    ]
    for k, t in doc.get("targets", {}).items():
        lines.append(
            f"| {k} | {t['beats_adam_1e-3_on']}/{t['models']} ({t['a_beats_adam_on_6_of_8']}) | "
            f"{_num(t['geomean_ratio_to_adam_tuned']):.3f} ({t['b_geomean_le_1.5']}) | "
            f"{t['diverged_runs']} ({t['c_never_diverges']}) | {t['all_met']} |"
        )
    return "\n".join(lines)


# the optimizers drawn in the figure; the rest are in the JSON and the tables
PLOTTED = ("adam", "adamw", "adam-hd", "adam-tuned", "mnist", "general")


def plot(results: dict, models: list[str], path: Path, names=PLOTTED) -> None:
    """Training curves of the optimizers in ``names`` (beyond ~8 lines a panel is unreadable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = 4
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, models, strict=False):
        for name, e in results.get(m, {}).items():
            if name not in names:
                continue
            curves = [r["curve"] for r in e["runs"]]
            n = min(len(c) for c in curves)
            a = np.array([[_num(v) for v in c[:n]] for c in curves], dtype=float)
            k = 10  # smooth minibatch noise: running mean over 10 steps
            if n >= k:
                a = np.stack([np.convolve(r, np.ones(k) / k, mode="valid") for r in a])
            x = np.arange(a.shape[1]) + (k - 1 if n >= k else 0)
            mean = np.nanmean(a, 0)
            lo, hi = np.nanmin(a, 0), np.nanmax(a, 0)
            label = name if name != "adam-tuned" else f"adam-tuned ({e['lr']:g})"
            (line,) = ax.plot(x, mean, label=label, lw=1.2)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    fig.suptitle("training loss (10-step running mean; band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--learned", action="append", default=[], metavar="NAME=PATH",
                    help="a learned optimizer to run (repeatable); PATH is anything l2o.load takes")  # fmt: skip
    ap.add_argument("--hand", action="append", default=[], metavar="NAME=SPEC",
                    help="a hand-designed l2o rule with fixed options (repeatable), e.g. hd02=adam-hd:hd=0.2 (lr: the rule's default unless given)")  # fmt: skip
    ap.add_argument("--no-default-learned", action="store_true",
                    help="do not add mnist (and general when it loads) to the learned optimizers")  # fmt: skip
    ap.add_argument("--models", default=None, help="comma-separated subset of the suite")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true",
                    help="keep (model, optimizer) results already in the output JSON (same steps/seeds)")  # fmt: skip
    ap.add_argument("--only", default=None,
                    help="comma-separated optimizers to run (the others are kept with --reuse)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 models, 2 seeds, 30 steps")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="transfer", help="output file stem")
    ap.add_argument("--markdown", action="store_true",
                    help="run nothing: print the docs page's tables of the existing JSON and redraw its figure")  # fmt: skip
    ap.add_argument("--columns", default=None,
                    help="with --markdown: comma-separated optimizers of the loss tables (default: all)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.markdown:
        doc = json.loads((Path(args.out) / f"{args.name}.json").read_text())
        print(markdown(doc, args.columns.split(",") if args.columns else None))
        # the figure is redrawn from the JSON too (it shows PLOTTED only)
        plot(doc["results"], list(doc["results"]), Path(args.out) / f"{args.name}.png")
        return 0

    if not os.environ.get("L2O_DATA") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["L2O_DATA"] = str(REPO.parent / "shared" / "data")
    import torch
    from _common import hardware

    import l2o
    from l2o import suite
    from l2o.errors import L2OError
    from l2o.evaluate import parse_optimizer
    from l2o.optim import LearnedOptimizer
    from l2o.rules import CLASSIC_RULES, AdamHD

    torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else list(suite.NAMES)
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.steps
    if args.quick:
        models = args.models.split(",") if args.models else ["resmlp-regress", "transformer-sort"]
        seeds, steps = seeds[:2], min(steps, 30)
        if args.name == "transfer":
            args.name = "transfer_quick"

    learned_specs: dict[str, str] = {}
    explicit: set[str] = set()
    if not args.no_default_learned:
        learned_specs["mnist"] = "pretrained/mnist"
        try:
            l2o.load("pretrained/general")
            learned_specs["general"] = "pretrained/general"
        except Exception as exc:  # not shipped yet
            print(f"pretrained/general not loaded ({type(exc).__name__}); not run")
    for item in args.learned:
        if "=" not in item:
            ap.error(f"--learned takes NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        learned_specs[k] = v
        explicit.add(k)
    rules = {k: l2o.load(v) for k, v in learned_specs.items()}

    def make_learned(rule):
        return lambda m: LearnedOptimizer(m.parameters(), rule=rule)

    fixed = {
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01),
        "adam-hd": make_learned(AdamHD(lr=1e-3, hd=0.1)),
    }
    hand = {}
    for item in args.hand:
        if "=" not in item:
            ap.error(f"--hand takes NAME=SPEC, got {item!r}")
        k, v = item.split("=", 1)
        try:
            spec = parse_optimizer(v)
        except L2OError as e:
            ap.error(f"--hand {item!r}: {e}")
        if spec.kind != "classic":
            ap.error(f"--hand {item!r}: a hand-designed rule is expected; use --learned for {v!r}")
        if k in fixed or k in rules or k == "adam-tuned":
            ap.error(f"--hand {item!r}: the name {k!r} is taken")
        fixed[k] = make_learned(CLASSIC_RULES[spec.rule_name](**spec.hparams))
        hand[k] = v
        explicit.add(k)
    order = ["adam", "adamw", "adam-hd", "adam-tuned", *hand, *rules]
    only = set(args.only.split(",")) if args.only else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"{args.name}.json"
    old, commands, info = {}, [], {}
    if args.reuse and jpath.is_file():
        prev = json.loads(jpath.read_text())
        if prev["protocol"]["steps"] == steps and prev["protocol"]["seeds"] == seeds:
            old = prev["results"]
            commands = prev.get("commands", [prev.get("command")])
            info = dict(prev.get("models", {}))
            learned_specs = {**prev.get("learned", {}), **learned_specs}
            hand = {**prev.get("hand", {}), **hand}
        else:
            print("--reuse: the JSON has other steps/seeds; running everything")
    results: dict = {m: dict(old.get(m, {})) for m in old}
    t_all = time.perf_counter()

    def save():
        present = [m for m in models if m in results] + [m for m in results if m not in models]
        command = "python benchmarks/transfer.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        doc = {
            "benchmark": "transfer",
            "command": command,
            "commands": [*commands, command],
            "protocol": {
                "steps": steps,
                "seeds": seeds,
                "tune_seed": TUNE_SEED,
                "lr_grid": list(LR_GRID),
                "final_train_loss": f"mean minibatch loss over the last {LAST} steps",
                "diverged": "non-finite loss, or final training loss > the first step's loss",
                "threads": args.threads,
            },
            "learned": learned_specs,
            "hand": hand,  # --hand NAME=SPEC: hand-designed l2o rules with fixed options
            "models": info,
            "results": results,
            "targets": {k: targets(results, k, [m for m in present]) for k in learned_specs},
            "machine": hardware(),
            "torch": torch.__version__,
            "seconds_this_run": time.perf_counter() - t_all,
        }
        jpath.write_text(dumps(doc))
        return doc

    for m in models:
        problem = suite.make(m)
        info[m] = {
            "description": problem.description,
            "data": problem.data,
            "params": suite.n_params(problem.build(0)),
        }
        results.setdefault(m, {})
        for name in order:
            if only is not None and name not in only:
                continue
            # --reuse keeps what the JSON has, except rules named by this run's --learned
            if name in old.get(m, {}) and name not in explicit:
                continue
            t0 = time.perf_counter()
            entry: dict = {}
            if name == "adam-tuned":
                tune = {}
                for lr in LR_GRID:
                    r = run_one(problem, lambda mod, lr=lr: torch.optim.Adam(mod.parameters(), lr=lr),
                                TUNE_SEED, steps)  # fmt: skip
                    tune[f"{lr:g}"] = r["final_train_loss"]
                best = min(LR_GRID, key=lambda lr: _num(tune[f"{lr:g}"]) if tune[f"{lr:g}"] is not None
                           and math.isfinite(tune[f"{lr:g}"]) else math.inf)  # fmt: skip
                entry["tuning"] = {"seed": TUNE_SEED, "final_train_loss_by_lr": tune}
                entry["lr"] = best
                make_opt = lambda mod, lr=best: torch.optim.Adam(mod.parameters(), lr=lr)  # noqa: E731
            elif name in fixed:
                make_opt = fixed[name]
            else:
                make_opt = make_learned(rules[name])
                entry["artifact"] = learned_specs[name]
            runs = [run_one(problem, make_opt, s, steps) for s in seeds]
            entry["runs"] = runs
            entry["summary"] = summarize(runs)
            results[m][name] = entry
            s = entry["summary"]
            print(
                f"{m:17s} {name:11s} final {s['final_train_loss_mean']:.4f} ± {s['final_train_loss_std']:.4f}"
                f"  held-out {s['heldout_loss_mean']:.4f}  diverged {s['diverged']}"
                f"  ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            save()

    doc = save()
    present = [m for m in models if m in results]
    plot(results, present, out / f"{args.name}.png")
    names = [n for n in order if any(n in results[m] for m in present)]
    print()
    print("final training loss (mean over seeds of the mean minibatch loss over the last 20 steps)")
    print(f"{'model':17s} " + " ".join(f"{n:>11s}" for n in names))
    for m in present:
        row = []
        for n in names:
            e = results[m].get(n)
            v = e["summary"]["final_train_loss_mean"] if e else None
            d = e["summary"]["diverged"] if e else 0
            row.append(f"{_num(v):11.4f}" if not d else f"{_num(v):9.4f}D{d}")
        print(f"{m:17s} " + " ".join(row))
    print("\nheld-out loss / accuracy")
    for m in present:
        row = []
        for n in names:
            e = results[m].get(n)
            if not e:
                row.append(f"{'-':>15s}")
                continue
            s = e["summary"]
            acc = s["heldout_accuracy_mean"]
            row.append(
                f"{_num(s['heldout_loss_mean']):7.3f}/"
                + (f"{acc:6.3f}" if acc is not None else "     -")
            )
        print(f"{m:17s} " + " ".join(row))
    print("\ntargets:")
    for k, t in doc["targets"].items():
        print(
            f"  {k}: (a) beats adam@1e-3 on {t['beats_adam_1e-3_on']}/{t['models']} -> "
            f"{t['a_beats_adam_on_6_of_8']}; (b) geomean ratio to adam-tuned "
            f"{_num(t['geomean_ratio_to_adam_tuned']):.3f} -> {t['b_geomean_le_1.5']}; "
            f"(c) diverged runs {t['diverged_runs']} -> {t['c_never_diverges']}"
        )
    print(f"wrote {jpath} and {out / (args.name + '.png')} in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
