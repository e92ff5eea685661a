"""Few-shot runs from a resolved config (:mod:`l2o.fewshot.config`): data, model, trainer.

    cfg = l2o.fewshot.config.resolve("omni.toml", ["episodes.ways=20"])
    summary = l2o.fewshot.setup.train(cfg, "runs/omni-20w1s", resume=True)

The data directory is ``data.dir`` or the ``L2O_DATA`` environment variable; Omniglot
is read from ``DIR/omniglot`` (or ``DIR``) and split by alphabet into meta-train /
meta-validation / meta-test classes (recorded in the run's ``split.json``);
miniImageNet from ``DIR/miniimagenet`` (or ``DIR``) with the Ravi split.  Episodic
methods train on :class:`~l2o.fewshot.train.EpisodicTrainer`, the pre-trained baselines
on :class:`~l2o.fewshot.pretrain.Pretrainer`: both the one outer loop
(:mod:`l2o.meta.loop`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

from ..errors import L2OError
from . import registry
from .config import DATASETS

IMAGE = {"omniglot": (1, 28), "miniimagenet": (3, 84)}
#: what data_dir expects to find, for its error message
EXPECTED = {
    "omniglot": "omniglot/images_background_small1.zip and images_background_small2.zip "
    "(or images_background.zip, or those folders)",
    "miniimagenet": "miniimagenet/{train,val,test}.csv with images/ (the Ravi split), class "
    "folders {train,val,test}/<wnid>/*.jpg, or mini-imagenet-cache-<split>.pkl",
}


def default_hparams(method: str, dataset: str, ways: int, shots: int) -> dict:
    """Starting hyperparameters of ``method`` (its :class:`~.registry.MethodSpec`'s ``hparams``)."""
    return registry.get(method).hparams(dataset, ways, shots)


def data_dir(arg: str | None, dataset: str = "omniglot") -> Path:
    """The data directory: ``arg`` (``--data-dir`` / ``data.dir``), else ``$L2O_DATA``."""
    d = arg or os.environ.get("L2O_DATA")
    if not d:
        raise L2OError(
            f"--data-dir: no data directory given (pass --data-dir DIR or set L2O_DATA); "
            f"{dataset} is read from DIR/{EXPECTED.get(dataset, dataset)}"
        )
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


def model_options(cfg: dict) -> SimpleNamespace:
    """The method's options from a resolved config, as :meth:`MethodSpec.build` reads them."""
    m, t = cfg["model"], cfg["train"]
    opts = {k: v for k, v in m.items() if k not in ("filters", "init_from")}
    opts.setdefault("second_order", False)
    opts.setdefault("grad_scale", "batch")
    return SimpleNamespace(
        **opts,
        seed=cfg["seed"],
        filters=m["filters"],
        meta_batch=t["meta_batch"] or None,
        clip=None if t["clip"] < 0 else t["clip"],
    )


def train(cfg: dict, out: str | Path, resume: bool = False, progress: bool | None = None) -> dict:
    """Train the method of ``cfg`` into ``out``; returns the run's summary (also ``summary.json``)."""
    from ..checkpoint import ensure_writable_dir
    from ..config import to_toml
    from ..data.episodes import EpisodeSampler
    from ..devices import resolve_device
    from .evaluate import VAL_SEED

    method, data, ep = cfg["method"], cfg["data"], cfg["episodes"]
    ways, shots, queries = ep["ways"], ep["shots"], ep["queries"]
    device = resolve_device(cfg["device"])
    # before the data is read: option errors (e.g. train_ways < ways) come at once
    model, hp = build_model(method, data["dataset"], ways, shots, model_options(cfg))
    out = ensure_writable_dir(out, "--out")
    root = data_dir(data["dir"] or None, data["dataset"])
    splits = load_splits(data["dataset"], root, data["split_seed"], rotations=data["rotations"])
    init_from = cfg["model"].get("init_from") or None
    if init_from:
        warm_start_from(model, init_from)
    val_sampler = EpisodeSampler(splits["val"], ways, shots, queries, seed=VAL_SEED)
    val_eps = list(val_sampler.episodes(cfg["val"]["episodes"]))
    run_info = {
        "dataset": data["dataset"],
        "split_seed": data["split_seed"],
        "train_rotations": data["rotations"],
        "init_from": init_from,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "seed": cfg["seed"],
    }
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone writes
    if main_rank:
        (out / "split.json").write_text(json.dumps(splits["info"], indent=1) + "\n")
        (out / "config.toml").write_text(to_toml(cfg))
    t, v = cfg["train"], cfg["val"]
    if not registry.get(method).episodic:
        from .pretrain import Pretrainer

        trainer = Pretrainer(
            model, splits["train"], val_eps, out, t["meta_steps"] or 2000, v["every"],
            v["bn_mode"], cfg["seed"], run_info, progress, device,
        )  # fmt: skip
    else:
        from .train import EpisodicTrainer

        sampler = training_sampler(model, splits["train"], shots, queries, cfg["seed"])
        trainer = EpisodicTrainer(
            model, sampler, val_eps, out, t["meta_steps"] or 10000, v["every"], t["meta_lr"],
            hp["clip"], hp["meta_batch"], v["bn_mode"], run_info, progress, device=device,
            meta_lr_schedule=t["meta_lr_schedule"], init_lr_scale=t["init_lr_scale"],
        )  # fmt: skip
    summary = trainer.train(resume=resume)
    summary["val_episodes"] = len(val_eps)
    if main_rank:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
