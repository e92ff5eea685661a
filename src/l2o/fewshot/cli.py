"""``l2o fewshot``: meta-train, evaluate and inspect few-shot models.

    l2o fewshot train --method meta-lstm --dataset omniglot --data-dir DIR --ways 5 --shots 1 --out runs/omni-5w1s
    l2o fewshot eval  --checkpoint runs/omni-5w1s --data-dir DIR --episodes 600 --ways 5 --shots 1 --json out.json
    l2o fewshot gates --checkpoint runs/omni-5w1s --data-dir DIR --out gates.png

Methods: meta-lstm, maml, fomaml, protonet, finetune, nearest-neighbour (and any other
method of :mod:`.registry`).  The data directory
comes from ``--data-dir`` or the ``L2O_DATA`` environment variable; Omniglot is read
from ``DIR/omniglot`` (or ``DIR``) and split by alphabet into meta-train /
meta-validation / meta-test classes (recorded in the run's ``split.json``);
miniImageNet from ``DIR/miniimagenet`` (or ``DIR``) with the Ravi split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import L2OError
from . import registry
from .config import DATASETS, FLAG_KEYS
from .setup import data_dir, load_part

EXAMPLES = argparse.RawDescriptionHelpFormatter
DATA_NOTE = (
    "data are read from --data-dir DIR or $L2O_DATA: Omniglot from DIR/omniglot/"
    "images_background_small{1,2}.zip (or images_background), miniImageNet from "
    "DIR/miniimagenet/"
)


# -- train --------------------------------------------------------------------------------
def add_train(sub, positive_int) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train a few-shot model (or pre-train a baseline)",
        description="Meta-train a few-shot method on N-way K-shot episodes (or pre-train a "
        "baseline). Every flag is a shorthand for a config key (in brackets); --config and "
        "--set take the same keys, as for l2o meta-train.",
        formatter_class=EXAMPLES,
        epilog="examples:\n  l2o fewshot train --method meta-lstm --data-dir DIR --ways 5 --shots 1 "
        "--out runs/omni-5w1s\n  l2o fewshot train --config omni.toml --set episodes.ways=20 "
        "--out runs/omni-20w1s --resume\n\n" + DATA_NOTE,
    )
    key = FLAG_KEYS
    p.add_argument("--config", default=None, help="TOML file with config keys")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="one config key, e.g. --set episodes.ways=20 (repeatable)",
    )  # fmt: skip
    p.add_argument("--method", default=None, choices=registry.names(), help=f"[{key['method']}]")
    p.add_argument("--dataset", default=None, choices=DATASETS, help=f"[{key['dataset']}]")
    p.add_argument(
        "--data-dir", default=None, help="data directory (default: $L2O_DATA) [data.dir]"
    )
    p.add_argument("--ways", type=positive_int, default=None, help="[episodes.ways] (5)")
    p.add_argument("--shots", type=positive_int, default=None, help="[episodes.shots] (1)")
    p.add_argument(
        "--queries",
        type=positive_int,
        default=None,
        help="query images per class [episodes.queries] (15)",
    )
    p.add_argument(
        "--train-ways", type=positive_int, default=None,
        help="protonet: classes per training episode, >= --ways (default 60 on Omniglot, as in "
        "the paper) [model.train_ways]",
    )  # fmt: skip
    p.add_argument(
        "--train-queries", type=positive_int, default=None,
        help="protonet: query images per class of training episodes (default 5 on Omniglot) "
        "[model.train_queries]",
    )  # fmt: skip
    p.add_argument(
        "--inner-steps", type=positive_int, default=None,
        help="inner steps T (default per method) [model.inner_steps]",
    )  # fmt: skip
    p.add_argument(
        "--inner-lr", type=float, default=None, help="MAML inner learning rate [model.inner_lr]"
    )
    p.add_argument(
        "--meta-steps", type=positive_int, default=None,
        help="meta-training episodes (pre-training minibatches for finetune/nearest-neighbour) "
        "[train.meta_steps]",
    )  # fmt: skip
    p.add_argument(
        "--meta-batch",
        type=positive_int,
        default=None,
        help="episodes per meta-update [train.meta_batch]",
    )
    p.add_argument("--meta-lr", type=float, default=None, help="[train.meta_lr] (0.001)")
    p.add_argument(
        "--meta-lr-schedule", default=None, choices=("constant", "cosine"),
        help="constant (the paper) or cosine decay to 0 over --meta-steps [train.meta_lr_schedule]",
    )  # fmt: skip
    p.add_argument(
        "--init-lr-scale", type=float, default=None,
        help="meta-lstm: multiplies the meta-lr of the learned initialisation c_0 alone "
        "(1: the paper; 0: c_0 stays where it started, e.g. at --init-from's body) "
        "[train.init_lr_scale]",
    )  # fmt: skip
    p.add_argument(
        "--clip",
        type=float,
        default=None,
        help="global meta-gradient norm clip (0: off) [train.clip]",
    )
    p.add_argument("--val-every", type=positive_int, default=None, help="[val.every] (500)")
    p.add_argument("--val-episodes", type=positive_int, default=None, help="[val.episodes] (100)")
    p.add_argument("--seed", type=int, default=None, help="[seed] (0)")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of the Omniglot alphabet split [data.split_seed]",
    )
    p.add_argument(
        "--rotations", action="store_true", default=None,
        help="Omniglot: add 90/180/270-degree rotations of the meta-train classes as new classes "
        "[data.rotations]",
    )  # fmt: skip
    p.add_argument(
        "--init-from", default=None, metavar="RUN",
        help="meta-lstm/maml/fomaml: start the learned initialisation from the pre-trained body "
        "of a finetune (or nearest-neighbour) run, with a zero head [model.init_from]",
    )  # fmt: skip
    p.add_argument(
        "--second-order", action="store_true", default=None,
        help="Meta-LSTM: keep the learner's gradient in the graph [model.second_order]",
    )  # fmt: skip
    p.add_argument(
        "--grad-scale", default=None, choices=("batch", "none"),
        help="Meta-LSTM: 'batch' divides the gradient by the support size again (official-code "
        "quirk) [model.grad_scale]",
    )  # fmt: skip
    p.add_argument(
        "--bn-mode", default=None, choices=("batch", "support-running"),
        help="BN mode of validation (meta-training always uses batch statistics) [val.bn_mode]",
    )  # fmt: skip
    p.add_argument("--filters", type=positive_int, default=None, help="[model.filters] (32)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu) [device]")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out exactly (a directory without a checkpoint starts the run)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    for spec in registry.specs():  # flags of methods that bring their own: [model.<name>]
        for flags, kwargs in spec.cli_arguments:
            p.add_argument(*flags, **kwargs)
    p.set_defaults(func=cmd_train)


def method_flags(args) -> dict:
    """The method-specific flags that registered methods added (``cli_arguments``)."""
    out = {}
    for spec in registry.specs():
        for flags, kwargs in spec.cli_arguments:
            dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
            if getattr(args, dest, None) is not None:
                out[dest] = getattr(args, dest)
    return out


def cmd_train(args) -> int:
    from . import setup
    from .config import resolve

    flags = {name: getattr(args, name, None) for name in FLAG_KEYS} | method_flags(args)
    cfg = resolve(args.config, args.set, flags)
    summary = setup.train(
        cfg, args.out, resume=args.resume, progress=False if args.no_progress else None
    )
    print(
        f"trained {summary['method']} in {summary['train_seconds']:.0f} s; best validation accuracy "
        f"{summary['best_val_accuracy']:.2f}% ({summary['val_episodes']} episodes); outputs in {args.out}"
    )
    return 0


# -- eval ---------------------------------------------------------------------------------
def add_eval(sub, positive_int) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a few-shot model on fixed, seeded test episodes",
        description="Evaluate a trained few-shot model on seeded test episodes of the "
        "meta-test classes (95% interval over episodes).",
        formatter_class=EXAMPLES,
        epilog="examples:\n  l2o fewshot eval --checkpoint runs/omni-5w1s --data-dir DIR "
        "--episodes 600 --json eval.json\n  l2o fewshot eval --checkpoint runs/omni-5w1s "
        "--data-dir DIR --ways 20 --shots 1   # another configuration\n\n" + DATA_NOTE,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory, .safetensors model file, or pretrained/NAME (see l2o pretrained)",
    )
    p.add_argument("--data-dir", default=None, help="data directory (default: $L2O_DATA)")
    p.add_argument(
        "--dataset",
        default=None,
        choices=DATASETS,
        help="default: the one the model was trained on",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=registry.names(),
        help="expected method (a finetune checkpoint can be evaluated as nearest-neighbour)",
    )
    p.add_argument("--episodes", type=positive_int, default=600)
    p.add_argument("--ways", type=positive_int, default=None)
    p.add_argument("--shots", type=positive_int, default=None)
    p.add_argument("--queries", type=positive_int, default=15)
    p.add_argument("--inner-steps", type=positive_int, default=None, help="default: as trained")
    p.add_argument("--bn-mode", default="support-running", choices=("batch", "support-running"))
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--json", default=None, help="write the report (with per-episode accuracies) here"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..data.episodes import EpisodeSampler
    from .api import load
    from .evaluate import TEST_SEED, VAL_SEED, evaluate

    pred = load(args.checkpoint, args.method, device=args.device)
    run = pred.meta.get("run", {})
    dataset = args.dataset or run.get("dataset", "omniglot")
    ways = args.ways or run.get("ways", 5)
    shots = args.shots or run.get("shots", 1)
    ds = load_part(
        dataset,
        data_dir(args.data_dir),
        args.split,
        run.get("split_seed", 0),
        pred.model.learner_config.image_size,
    )
    pred.model.learner_for(ways).check_images(ds.images[:1], f"{dataset} images")
    sampler = EpisodeSampler(
        ds, ways, shots, args.queries, seed=TEST_SEED if args.split == "test" else VAL_SEED
    )
    report = evaluate(
        pred.model,
        sampler,
        args.episodes,
        args.bn_mode,
        args.inner_steps,
        show_progress=False if args.no_progress else None,
    )
    report.update(
        {
            "checkpoint": str(pred.path),
            "dataset": dataset,
            "split": args.split,
            "trained": {
                "ways": run.get("ways"),
                "shots": run.get("shots"),
                "inner_steps": pred.model.inner_steps(),
            },
            "checkpoint_selection": pred.meta.get("selection"),
        }
    )
    print(
        f"{report['method']} on {dataset} {args.split}: {ways}-way {shots}-shot, {report['episodes']} episodes, "
        f"{args.queries} queries/class, {report['inner_steps']} inner steps, BN {args.bn_mode}: "
        f"accuracy {report['accuracy']:.2f}% ± {report['ci95']:.2f}"
    )
    if args.json:
        from ..checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


# -- gates --------------------------------------------------------------------------------
def add_gates(sub, positive_int) -> None:
    p = sub.add_parser(
        "gates",
        help="plot the Meta-Learner LSTM's forget/input gates (paper figure 3)",
        formatter_class=EXAMPLES,
        epilog="example:\n  l2o fewshot gates --checkpoint runs/omni-5w1s --data-dir DIR "
        "--out gates.png\n\n" + DATA_NOTE,
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=None, help="data directory (default: $L2O_DATA)")
    p.add_argument("--episodes", type=positive_int, default=20, help="validation episodes to plot")
    p.add_argument("--coordinate", default="mean", choices=("mean", "random"))
    p.add_argument("--out", required=True, help="PNG path")
    p.set_defaults(func=cmd_gates)


def cmd_gates(args) -> int:
    from ..data.episodes import EpisodeSampler
    from .api import load
    from .evaluate import VAL_SEED
    from .plots import collect_gates, plot_gates

    pred = load(args.checkpoint)
    if pred.method != "meta-lstm":
        raise L2OError(f"{pred.path} is a {pred.method} checkpoint; gates exist only for meta-lstm")
    run = pred.meta.get("run", {})
    ds = load_part(
        run.get("dataset", "omniglot"),
        data_dir(args.data_dir),
        "val",
        run.get("split_seed", 0),
        pred.model.learner_config.image_size,
    )
    sampler = EpisodeSampler(
        ds, run.get("ways", 5), run.get("shots", 1), run.get("queries", 15), seed=VAL_SEED
    )
    gates = collect_gates(pred.model, sampler.episodes(args.episodes), coordinate=args.coordinate)
    plot_gates(gates, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(gates) + "\n")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def register(subparsers) -> None:
    from ..cli import _Parser, positive_int

    p = subparsers.add_parser(
        "fewshot",
        help="few-shot learning: Meta-Learner LSTM, MAML, ProtoNet, baselines",
        formatter_class=EXAMPLES,
        epilog="examples:\n  l2o fewshot train --method meta-lstm --data-dir DIR --ways 5 --shots 1 "
        "--out runs/omni-5w1s\n  l2o fewshot eval --checkpoint runs/omni-5w1s --data-dir DIR\n\n"
        + DATA_NOTE,
    )
    sub = p.add_subparsers(dest="fewshot_command", metavar="SUBCOMMAND", parser_class=_Parser)
    sub.required = True
    add_train(sub, positive_int)
    add_eval(sub, positive_int)
    add_gates(sub, positive_int)
