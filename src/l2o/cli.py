"""The ``l2o`` command.

    l2o quickstart                                   # meta-train on quadratics, compare, plot
    l2o meta-train --task quadratic --out runs/quad [--config F.toml] [--set train.meta_lr=0.003]
    l2o compare --task quadratic --optimizer lstm:runs/quad --optimizer adam --out runs/cmp

Every user error (unknown names, bad values, unwritable paths, missing or
corrupt checkpoints) is one line ``l2o: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from .checkpoint import ensure_writable_dir
from .errors import L2OError


def finite_json(value):
    """Non-finite floats become null, so the JSON is standard (jq, JavaScript)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def dumps_json(value) -> str:
    return json.dumps(finite_json(value), indent=2, allow_nan=False) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        print(
            f"l2o: error: {message} (see 'l2o {self.prog.split(' ', 1)[-1] if ' ' in self.prog else ''} --help')".replace(
                "  ", " "
            ),
            file=sys.stderr,
        )
        sys.exit(2)


#: a sub-command's help ends with its examples, kept as written (not re-wrapped)
EXAMPLES = argparse.RawDescriptionHelpFormatter

TOP_EPILOG = """\
examples:
  l2o quickstart                                  # meta-train on quadratics + compare (minutes)
  l2o meta-train --task quadratic --out runs/quad --set train.meta_steps=500
  l2o compare --task quadratic --optimizer lstm:runs/quad --optimizer adam --out runs/cmp
  l2o fewshot train --method protonet --data-dir DIR --ways 5 --shots 1 --out runs/proto
  l2o study mnist --optimizer lstm:pretrained/mnist --data-dir DIR --out runs/study --quick
  l2o pretrained                                  # the shipped optimizers and few-shot models

data sets are read from --data-dir DIR or $L2O_DATA (MNIST: DIR/mnist/*-ubyte.gz,
Omniglot: DIR/omniglot/images_background_small{1,2}.zip); nothing is downloaded
unless you pass --download (MNIST).  'l2o COMMAND --help' for each command.
"""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def writable_dir(path: str) -> Path:
    return ensure_writable_dir(path, "--out")


def add_data_args(p) -> None:
    """``--data-dir`` / ``--download`` for tasks that read data sets (mnist-mlp)."""
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="data directory for data-set tasks (default: $L2O_DATA), e.g. DIR/mnist/*.gz",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download the data set (MNIST, CIFAR-10) into --data-dir / $L2O_DATA first (needs the internet)",
    )


def add_device_arg(p) -> None:
    p.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="cpu, cuda or cuda:N (default cpu; shorthand for the config key device)",
    )


def apply_data_args(args, task_spec: str | None) -> None:
    """Point data-set tasks at ``--data-dir`` (through $L2O_DATA) and download when asked."""
    import os

    if getattr(args, "data_dir", None):
        os.environ["L2O_DATA"] = str(Path(args.data_dir).expanduser())
    if getattr(args, "download", False):
        from .config import task_name
        from .data import cifar10, mnist

        readers = {"mnist-mlp": mnist, "cifar10-cnn": cifar10}
        name = task_name(task_spec or "")
        if name not in readers:
            raise L2OError(
                f"--download: only the {' and '.join(readers)} tasks read a downloadable data set, "
                f"not {task_spec!r}"
            )
        readers[name].download()


# -- meta-train ---------------------------------------------------------------------------
def add_meta_train(sub) -> None:
    p = sub.add_parser(
        "meta-train",
        help="meta-train a learned optimizer on a task family",
        description="Meta-train a coordinatewise LSTM optimizer by truncated BPTT.",
        formatter_class=EXAMPLES,
        epilog="""\
examples:
  l2o meta-train --task quadratic --out runs/quad
  l2o meta-train --task quadratic:dim=20 --out runs/q20 --set train.meta_lr=0.003 --set train.unroll=20
  l2o meta-train --task mnist-mlp --data-dir DIR --out runs/mnist
  l2o meta-train --task quadratic --config configs/quadratic.toml --out runs/quad
  l2o meta-train --task quadratic --out runs/quad --resume      # continue from runs/quad/last.ckpt
then: rule = l2o.load("runs/quad")  (the best checkpoint) or l2o compare --optimizer lstm:runs/quad
""",
    )
    p.add_argument(
        "--task",
        default=None,
        help="task spec, e.g. quadratic or quadratic:dim=20 (default: quadratic)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="run directory (config.toml, metrics.csv, last.ckpt, best/, final/)",
    )
    p.add_argument("--config", default=None, help="TOML file with config overrides")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.meta_lr=0.003 (repeatable)",
    )
    p.add_argument("--meta-steps", type=positive_int, default=None, help="number of trajectories")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RULE",
        help="warm start from a saved rule (run directory or pretrained/NAME): its architecture "
        "and weights, copied into every group of a grouped rule [train.init_from]",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from last.ckpt (a directory without one starts the run)",
    )
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    add_data_args(p)
    p.set_defaults(func=cmd_meta_train)


def cmd_meta_train(args) -> int:
    from . import config as cfgmod
    from .meta import MetaTrainer
    from .plots import plot_validation

    sets = list(args.set)
    if args.meta_steps is not None:
        sets.append(f"train.meta_steps={args.meta_steps}")
    if args.seed is not None:
        sets.append(f"seed={args.seed}")
    if args.device is not None:
        sets.append(f"device={args.device}")
    if args.init_from is not None:
        sets.append(f"train.init_from={args.init_from}")
    cfg = cfgmod.resolve(args.task, args.config, sets)
    apply_data_args(args, cfg["task"])
    out = writable_dir(args.out)
    trainer = MetaTrainer(cfg, out, progress=False if args.no_progress else None)
    summary = trainer.train(resume=args.resume)
    plot_validation(out / "metrics.csv", out / "validation.png")
    (out / "summary.json").write_text(dumps_json(summary))
    print(
        f"meta-trained {summary['meta_steps']} trajectories ({summary['updates']} meta-updates, "
        f"{summary['skipped']} skipped) in {summary['train_seconds']:.0f} s; best validation "
        f"sum-of-losses {summary['best_val_sum_loss']:.3f} at meta-step {summary['best_meta_step']}"
    )
    print(f"outputs in {out}: best/ (load with l2o.load), last.ckpt, metrics.csv, validation.png")
    return 0


# -- compare ------------------------------------------------------------------------------------
def add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="compare optimizers fairly (tuned baselines, same problems)",
        description="Run every optimizer on the same test problems; baselines without a "
        "fixed lr get theirs tuned on separate problems.",
        formatter_class=EXAMPLES,
        epilog="""\
examples:
  l2o compare --task quadratic --optimizer lstm:runs/quad --optimizer adam --out runs/cmp
  l2o compare --task mnist-mlp --data-dir DIR --optimizer lstm:pretrained/mnist \\
      --optimizer adam --optimizer adam:lr=0.01 --out runs/mnist-cmp
writes results.json, curves.csv and curves.png in --out.
""",
    )
    p.add_argument("--task", required=True, help="task spec, e.g. quadratic")
    p.add_argument(
        "--optimizer",
        action="append",
        required=True,
        metavar="SPEC",
        help="a hand-designed rule, lr tuned (sgd, nag, rmsprop, adam, adam-hd, clipped-sgd, bfgs, "
        "l-bfgs), one with fixed options (adam:lr=0.01, adam-hd:lr=0.001,hd=0.2) or lstm:PATH "
        "(repeatable)",
    )
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--problems", type=positive_int, default=100, help="test problems")
    p.add_argument(
        "--tune-problems", type=positive_int, default=20, help="problems for the lr search"
    )
    p.add_argument(
        "--out", required=True, help="directory for results.json, curves.csv, curves.png"
    )
    add_data_args(p)
    add_device_arg(p)
    p.set_defaults(func=cmd_compare)


def run_compare(
    task_spec: str,
    optimizer_specs: list[str],
    steps: int,
    problems: int,
    tune_problems: int,
    out: Path,
    title: str | None = None,
    device: str = "cpu",
) -> dict:
    from .artifact import load
    from .devices import check_form, resolve_device
    from .evaluate import compare, parse_optimizer
    from .tasks import build_task

    resolve_device(check_form(device, "--device"))
    task = build_task(task_spec)
    specs = [parse_optimizer(s) for s in optimizer_specs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise L2OError(f"--optimizer: each optimizer may be given once, got {names}")
    rules = {s.name: load(s.path) for s in specs if s.kind == "learned"}  # fail early on bad paths
    results = compare(
        task,
        specs,
        steps=steps,
        problems=problems,
        tune_problems=tune_problems,
        rules=rules,
        device=device,
    )
    results["task_spec"] = task_spec
    write_results(results, out, title)
    print_table(results)
    return results


def write_results(results: dict, out: Path, title: str | None = None) -> None:
    from .checkpoint import atomic_write_text
    from .plots import plot_curves

    atomic_write_text(out / "results.json", dumps_json(results))
    names = list(results["optimizers"])
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + [f"{n} {k}" for n in names for k in ("mean", "std")])
        for t in range(results["steps"] + 1):
            w.writerow(
                [t]
                + [
                    f"{results['optimizers'][n][k][t]:.6g}"
                    for n in names
                    for k in ("mean_loss", "std_loss")
                ]
            )
    plot_curves(results, out / "curves.png", title)


def print_table(results: dict) -> None:
    rows = sorted(results["optimizers"].items(), key=lambda kv: kv[1]["sum_loss"])
    print(
        f"\n{results.get('task_spec', results.get('task_name'))}: {results['problems']} test problems, "
        f"{results['steps']} steps (sum_loss = sum of mean loss over steps 1..{results['steps']})"
    )
    print(f"{'optimizer':<34} {'hparams':<18} {'sum_loss':>10} {'final_loss':>20}")
    for name, e in rows:
        hp = e.get("hparams", {})
        hp_text = f"lr={hp['lr']:g}" if "lr" in hp else "learned"
        final = f"{e['final_loss_mean']:.4g} ± {e['final_loss_std']:.2g}"
        print(f"{name:<34} {hp_text:<18} {e['sum_loss']:>10.2f} {final:>20}")


def cmd_compare(args) -> int:
    apply_data_args(args, args.task)
    out = writable_dir(args.out)
    run_compare(
        args.task,
        args.optimizer,
        args.steps,
        args.problems,
        args.tune_problems,
        out,
        device=args.device or "cpu",
    )
    print(f"\nwrote {out / 'results.json'}, {out / 'curves.csv'}, {out / 'curves.png'}")
    return 0


# -- quickstart ---------------------------------------------------------------------------------
# The shipped quadratic recipe, shortened to run in about a minute on 2 cores.
QUICKSTART_SETS = [
    "train.meta_steps=150",
    "train.instances=128",
    "val.every=25",
    "val.problems=128",
]


def add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="meta-train on quadratics and compare with tuned baselines (minutes)",
        description="Meta-train an L2L LSTM on 10-dim random quadratics, then compare it with "
        "SGD, NAG, RMSprop and Adam (each with a tuned learning rate) on the same test problems.",
        formatter_class=EXAMPLES,
        epilog="""\
examples:
  l2o quickstart                                   # writes runs/quickstart/
  l2o quickstart --meta-steps 20 --out /tmp/qs     # a quick smoke run
""",
    )
    p.add_argument(
        "--out", default="runs/quickstart", help="output directory (default: %(default)s)"
    )
    p.add_argument(
        "--meta-steps",
        type=positive_int,
        default=None,
        help=f"meta-training trajectories (default: {QUICKSTART_SETS[0].split('=')[1]})",
    )
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args) -> int:
    from . import config as cfgmod
    from .meta import MetaTrainer
    from .plots import plot_validation

    out = writable_dir(args.out)
    sets = list(QUICKSTART_SETS) + (
        [f"train.meta_steps={args.meta_steps}"] if args.meta_steps else []
    )
    cfg = cfgmod.resolve("quadratic", None, sets)
    run_dir = out / "run"
    if (run_dir / "last.ckpt").exists():
        import shutil

        shutil.rmtree(run_dir)
    print(
        f"[1/2] meta-training an L2L LSTM optimizer on 10-dim random quadratics "
        f"({cfg['train']['meta_steps']} trajectories of {cfg['train']['instances']} functions) -> {run_dir}"
    )
    summary = MetaTrainer(cfg, run_dir).train()
    plot_validation(run_dir / "metrics.csv", run_dir / "validation.png")
    print(
        f"      done in {summary['train_seconds']:.0f} s; best validation sum-of-losses "
        f"{summary['best_val_sum_loss']:.2f} (meta-step {summary['best_meta_step']})"
    )
    print(
        "[2/2] comparing with SGD, NAG, RMSprop and Adam, each with its learning rate tuned on separate problems"
    )
    run_compare(
        "quadratic",
        [f"lstm:{run_dir}", "adam", "rmsprop", "sgd", "nag"],
        100,
        100,
        100,
        out,
        "quadratic: quickstart LSTM vs tuned baselines",
    )
    print(f"\nwrote {out / 'results.json'}, {out / 'curves.csv'}, {out / 'curves.png'}")
    return 0


# -- pretrained ---------------------------------------------------------------------------------
def add_pretrained(sub) -> None:
    p = sub.add_parser(
        "pretrained",
        help="list the trained optimizers and few-shot models shipped with l2o",
        description="List the artifacts shipped in the package: what each is for and its "
        "headline number (each directory's TRAINING.md says how it was made).",
        formatter_class=EXAMPLES,
        epilog="example:\n  l2o pretrained --json\n\nin Python: l2o.load('pretrained/mnist')",
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_pretrained)


def cmd_pretrained(args) -> int:
    from .artifact import shipped

    items = shipped()
    if args.json:
        print(dumps_json(items))
        return 0
    for item in items:
        print(f"{item['name']}  ({item['kind']})")
        if item["for"]:
            print(f"    for: {item['for']}")
        print(f"    {item['headline']}")
    print("load with l2o.load(NAME); few-shot models also with l2o fewshot eval --checkpoint NAME")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="l2o",
        description="Learned optimizers: meta-train, compare, few-shot.",
        formatter_class=EXAMPLES,
        epilog=TOP_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add_quickstart(sub)
    add_meta_train(sub)
    add_compare(sub)
    add_pretrained(sub)
    # Imported, not guarded: a broken sub-command module must fail loudly, not vanish.
    from . import art, study
    from .fewshot import cli as fewshot_cli

    fewshot_cli.register(sub)
    study.register(sub)
    art.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except L2OError as e:
        print(f"l2o: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("l2o: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
