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

import json
import os
import time
from pathlib import Path

from ..errors import L2OError
from . import registry

DATASETS = ("omniglot", "miniimagenet")
IMAGE = {"omniglot": (1, 28), "miniimagenet": (3, 84)}


def default_hparams(method: str, dataset: str, ways: int, shots: int) -> dict:
    """Starting hyperparameters of ``method`` (its :class:`~.registry.MethodSpec`'s ``hparams``)."""
    return registry.get(method).hparams(dataset, ways, shots)


def data_dir(arg: str | None) -> Path:
    d = arg or os.environ.get("L2O_DATA")
    if not d:
        raise L2OError("--data-dir: no data directory given (pass --data-dir DIR or set L2O_DATA)")
    p = Path(d)
    if not p.is_dir():
        raise L2OError(f"--data-dir: {p} is not a directory")
    return p


def load_splits(
    dataset: str,
    root: Path,
    split_seed: int = 0,
    image_size: int | None = None,
    rotations: bool = False,
) -> dict:
    """``{"train", "val", "test": ClassDataset}`` plus ``"info"`` describing the split.

    ``rotations`` (Omniglot): the meta-train classes get their 90/180/270-degree rotated
    copies as extra classes (x4); validation and test keep the original characters only.
    """
    if dataset == "omniglot":
        from ..data.omniglot import load_omniglot, split_by_alphabet, with_rotations

        base = root / "omniglot" if (root / "omniglot").is_dir() else root
        full = load_omniglot(base, image_size=image_size or 28)
        parts = split_by_alphabet(full, seed=split_seed)
        parts = {k: parts[k] for k in ("train", "val", "test")}
        info = {
            "dataset": "omniglot",
            "split": "by-alphabet",
            "split_seed": split_seed,
            "root": str(base),
            "classes": {k: v.class_names for k, v in parts.items()},
            "train_rotations": bool(rotations),
        }
        if rotations:
            parts["train"] = with_rotations(parts["train"])
        return {**parts, "info": info}
    if rotations:
        raise L2OError("--rotations applies to Omniglot only")
    if dataset == "miniimagenet":
        from ..data.miniimagenet import load_miniimagenet

        base = root / "miniimagenet" if (root / "miniimagenet").is_dir() else root
        parts = {
            k: load_miniimagenet(base, split=k, image_size=image_size or 84)
            for k in ("train", "val", "test")
        }
        info = {"dataset": "miniimagenet", "split": "ravi", "root": str(base)}
        return {**parts, "info": info}
    raise L2OError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def load_part(
    dataset: str, root: Path, part: str, split_seed: int = 0, image_size: int | None = None
):
    return load_splits(dataset, root, split_seed, image_size)[part]


def build_model(method: str, dataset: str, ways: int, shots: int, args) -> tuple:
    from .learner import LearnerConfig

    spec = registry.get(method)
    hp = spec.hparams(dataset, ways, shots)
    if getattr(args, "inner_steps", None):
        hp["inner_steps"] = args.inner_steps
    if getattr(args, "inner_lr", None):
        hp["inner_lr"] = args.inner_lr
    if getattr(args, "meta_batch", None):
        hp["meta_batch"] = args.meta_batch
    if getattr(args, "clip", None) is not None:
        hp["clip"] = args.clip if args.clip > 0 else None
    # the method's own hyperparameters (e.g. protonet's train_ways); inner_lr is taken above
    for key in spec.options:
        if key in hp and key != "inner_lr" and getattr(args, key, None) is not None:
            hp[key] = getattr(args, key)
    channels, size = IMAGE[dataset]
    learner = LearnerConfig(
        in_channels=channels,
        image_size=size,
        ways=ways,
        filters=args.filters,
        bn_momentum=0.9 if shots == 1 else 0.95,
    )
    model = spec.build(learner, hp, args)
    return model, hp


# -- train --------------------------------------------------------------------------------
def add_train(sub, positive_int) -> None:
    p = sub.add_parser("train", help="meta-train a few-shot model (or pre-train a baseline)")
    p.add_argument("--method", required=True, choices=registry.names())
    p.add_argument("--dataset", default="omniglot", choices=DATASETS)
    p.add_argument("--data-dir", default=None, help="data directory (default: $L2O_DATA)")
    p.add_argument("--ways", type=positive_int, default=5)
    p.add_argument("--shots", type=positive_int, default=1)
    p.add_argument("--queries", type=positive_int, default=15, help="query images per class")
    p.add_argument(
        "--train-ways",
        type=positive_int,
        default=None,
        help="protonet: classes per training episode, >= --ways (default 60 on Omniglot, "
        "as in the paper)",
    )
    p.add_argument(
        "--train-queries",
        type=positive_int,
        default=None,
        help="protonet: query images per class of training episodes (default 5 on Omniglot)",
    )
    p.add_argument(
        "--inner-steps", type=positive_int, default=None, help="inner steps T (default per method)"
    )
    p.add_argument("--inner-lr", type=float, default=None, help="MAML inner learning rate")
    p.add_argument(
        "--meta-steps",
        type=positive_int,
        default=None,
        help="meta-training episodes (pre-training minibatches for finetune/nearest-neighbour)",
    )
    p.add_argument("--meta-batch", type=positive_int, default=None, help="episodes per meta-update")
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument(
        "--meta-lr-schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="constant (the paper) or cosine decay to 0 over --meta-steps",
    )
    p.add_argument(
        "--init-lr-scale",
        type=float,
        default=1.0,
        help="meta-lstm: multiplies the meta-lr of the learned initialisation c_0 alone "
        "(1: the paper; 0: c_0 stays where it started, e.g. at --init-from's body)",
    )
    p.add_argument(
        "--clip", type=float, default=None, help="global meta-gradient norm clip (0: off)"
    )
    p.add_argument("--val-every", type=positive_int, default=500)
    p.add_argument("--val-episodes", type=positive_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the Omniglot alphabet split")
    p.add_argument(
        "--rotations",
        action="store_true",
        help="Omniglot: add 90/180/270-degree rotations of the meta-train classes as new classes",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN",
        help="meta-lstm/maml/fomaml: start the learned initialisation from the pre-trained body "
        "of a finetune (or nearest-neighbour) run, with a zero head",
    )
    p.add_argument(
        "--second-order",
        action="store_true",
        help="Meta-LSTM: keep the learner's gradient in the graph",
    )
    p.add_argument(
        "--grad-scale",
        default="batch",
        choices=("batch", "none"),
        help="Meta-LSTM: 'batch' divides the gradient by the support size again (official-code quirk)",
    )
    p.add_argument(
        "--bn-mode",
        default="support-running",
        choices=("batch", "support-running"),
        help="BN mode of validation (meta-training always uses batch statistics)",
    )
    p.add_argument("--filters", type=positive_int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    for spec in registry.specs():  # flags of methods that bring their own
        for flags, kwargs in spec.cli_arguments:
            p.add_argument(*flags, **kwargs)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from ..cli import writable_dir
    from ..data.episodes import EpisodeSampler
    from ..devices import resolve_device
    from .evaluate import VAL_SEED

    check_method_options(args)
    device = resolve_device(args.device)
    # before the data is read: option errors (e.g. --train-ways < --ways) come at once
    model, hp = build_model(args.method, args.dataset, args.ways, args.shots, args)
    out = writable_dir(args.out)
    root = data_dir(args.data_dir)
    splits = load_splits(args.dataset, root, args.split_seed, rotations=args.rotations)
    if args.init_from:
        if not registry.get(args.method).warm_start:
            names = registry.applies_to(registry.warm_startable())
            raise L2OError(f"--init-from applies to {names}, not {args.method}")
        warm_start_from(model, args.init_from)
    val_sampler = EpisodeSampler(splits["val"], args.ways, args.shots, args.queries, seed=VAL_SEED)
    val_eps = list(val_sampler.episodes(args.val_episodes))
    run_info = {
        "dataset": args.dataset,
        "split_seed": args.split_seed,
        "train_rotations": args.rotations,
        "init_from": args.init_from,
        "ways": args.ways,
        "shots": args.shots,
        "queries": args.queries,
        "seed": args.seed,
    }
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone writes
    if main_rank:
        (out / "split.json").write_text(json.dumps(splits["info"], indent=1) + "\n")
    progress = False if args.no_progress else None
    if not registry.get(args.method).episodic:
        if args.resume:
            raise L2OError(
                "--resume: baseline pre-training is not resumable; run it again (it takes minutes)"
            )
        summary = train_baseline(
            model,
            splits["train"],
            val_eps,
            out,
            args.meta_steps or 2000,
            args.val_every,
            args.bn_mode,
            args.seed,
            run_info,
            progress,
            device,
        )
    else:
        from .train import EpisodicTrainer

        train_sampler = training_sampler(
            model, splits["train"], args.shots, args.queries, args.seed
        )
        trainer = EpisodicTrainer(
            model,
            train_sampler,
            val_eps,
            out,
            args.meta_steps or 10000,
            args.val_every,
            args.meta_lr,
            hp["clip"],
            hp["meta_batch"],
            args.bn_mode,
            run_info,
            progress,
            device=device,
            meta_lr_schedule=args.meta_lr_schedule,
            init_lr_scale=args.init_lr_scale,
        )
        summary = trainer.train(resume=args.resume)
    if main_rank:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"trained {summary['method']} in {summary['train_seconds']:.0f} s; best validation accuracy "
        f"{summary['best_val_accuracy']:.2f}% ({len(val_eps)} episodes); outputs in {out}"
    )
    return 0


# ``l2o fewshot train`` flags that only some methods have, with their "not given" value:
# giving one to another method is an error (the others are ignored where they do not apply).
CHECKED_OPTIONS = {"init_lr_scale": 1.0, "train_ways": None, "train_queries": None}


def check_method_options(args) -> None:
    """``--X applies to M, not METHOD`` for a method-specific flag given to another method."""
    checked = dict(CHECKED_OPTIONS)
    for spec in registry.specs():
        for flags, kwargs in spec.cli_arguments:
            dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
            checked.setdefault(dest, kwargs.get("default"))
    spec = registry.get(args.method)
    for opt, unset in checked.items():
        if getattr(args, opt, unset) != unset and opt not in spec.options:
            owners = tuple(s.name for s in registry.specs() if opt in s.options)
            raise L2OError(
                f"--{opt.replace('_', '-')} applies to {registry.applies_to(owners)}, "
                f"not {args.method}"
            )


def training_sampler(model, train_ds, shots: int, queries: int, seed: int):
    """The meta-training episodes of ``model`` (its training ways and queries) from run ``seed``."""
    from ..data.episodes import EpisodeSampler
    from ..seeds import derive_seed

    ways, train_queries = model.training_episodes(queries)
    n = train_ds.num_classes()
    if ways > n:
        opt = "--ways" if ways == model.learner_config.ways else "--train-ways"
        raise L2OError(f"{opt} {ways} is more than the {n} meta-train classes; pass {opt} <= {n}")
    return EpisodeSampler(
        train_ds,
        ways,
        shots,
        train_queries,
        seed=derive_seed("train", "fewshot", seed) % (2**62),
    )


def warm_start_from(model, run: str | Path) -> None:
    """``model.warm_start`` with the pre-trained body of a finetune / nearest-neighbour run."""
    from .api import load

    pred = load(run)
    if pred.method not in registry.pretrained():
        raise L2OError(
            f"--init-from {run}: expected a {' or '.join(registry.pretrained())} run, "
            f"got {pred.method}"
        )
    keys = ("in_channels", "image_size", "filters", "blocks")
    theirs, ours = pred.model.learner_config.to_dict(), model.learner_config.to_dict()
    if any(theirs[k] != ours[k] for k in keys):
        raise L2OError(
            f"--init-from {run}: its learner { ({k: theirs[k] for k in keys}) } differs from "
            f"this one { ({k: ours[k] for k in keys}) }"
        )
    model.warm_start(pred.model.body.detach())


def train_baseline(
    model,
    train_ds,
    val_eps,
    out: Path,
    steps: int,
    val_every: int,
    bn_mode: str,
    seed: int,
    run_info: dict,
    progress,
    device="cpu",
) -> dict:
    """Pre-train the Conv-4 on all meta-train classes; keep the body with the best NN validation accuracy."""
    import sys

    import torch

    from .api import save_model
    from .baselines import FineTune, NearestNeighbour, pretrain, tune_finetune
    from .evaluate import run_episodes, summarize

    model.to(device)
    nn_model = NearestNeighbour(model.learner_config).to(device)
    best = {"acc": -1.0, "step": 0, "body": None}
    bar = None
    if progress or (progress is None and sys.stderr.isatty()):
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="pre-train", unit="batch")
    (out / "metrics.csv").write_text("step,train_loss,val_nn_accuracy,val_ci95\n")

    def callback(step, body, loss):
        if bar is not None:
            bar.update(1)
        if step % val_every == 0 or step == steps:
            with torch.no_grad():
                nn_model.body.copy_(body)
            s = summarize(run_episodes(nn_model, val_eps, bn_mode))
            if s["accuracy"] > best["acc"]:
                best.update(acc=s["accuracy"], step=step, body=body.clone())
            with open(out / "metrics.csv", "a") as f:
                f.write(f"{step},{loss:.5f},{s['accuracy']:.3f},{s['ci95']:.3f}\n")

    t0 = time.time()
    pretrain(train_ds, model.learner_config, steps, seed=seed, callback=callback, device=device)
    if bar is not None:
        bar.close()
    with torch.no_grad():
        model.body.copy_(best["body"])
    tuning = None
    if isinstance(model, FineTune):
        tuning = tune_finetune(model, val_eps, bn_mode)
    seconds = time.time() - t0
    selection = {
        "rule": f"pre-training step with the best nearest-neighbour accuracy on {len(val_eps)} fixed "
        f"validation episodes; fine-tune lr/steps chosen on the same episodes",
        "episode": best["step"],
        "val_accuracy": best["acc"],
        "tuning": tuning,
    }
    save_model(model, out / "best.safetensors", selection=selection, run=run_info)
    val_acc = tuning["chosen"]["val_accuracy"] if tuning else best["acc"]
    return {
        "method": model.method,
        "pretrain_steps": steps,
        "train_seconds": seconds,
        "best_val_accuracy": val_acc,
        "best_step": best["step"],
        "tuning": tuning,
    }


# -- eval ---------------------------------------------------------------------------------
def add_eval(sub, positive_int) -> None:
    p = sub.add_parser("eval", help="evaluate a few-shot model on fixed, seeded test episodes")
    p.add_argument("--checkpoint", required=True, help="run directory or .safetensors model file")
    p.add_argument("--data-dir", default=None)
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
        "gates", help="plot the Meta-Learner LSTM's forget/input gates (paper figure 3)"
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=None)
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
        "fewshot", help="few-shot learning: Meta-Learner LSTM, MAML, ProtoNet, baselines"
    )
    sub = p.add_subparsers(dest="fewshot_command", metavar="SUBCOMMAND", parser_class=_Parser)
    sub.required = True
    add_train(sub, positive_int)
    add_eval(sub, positive_int)
    add_gates(sub, positive_int)
