"""Few-shot benchmark: Meta-Learner LSTM vs MAML, first-order MAML, ProtoNet, fine-tune and nearest neighbour.

    .venv/bin/python benchmarks/fewshot_omniglot.py --data-dir DATA                      # all configurations
    .venv/bin/python benchmarks/fewshot_omniglot.py --configs 5w1s --scale 0.25          # a short run

Omniglot "minimal" background splits (images_background_small1/2, 28x28, inverted),
split by alphabet into meta-train / meta-validation / meta-test classes (the split
is written to the results JSON).  For each configuration (5-way 1-shot, 5-way
5-shot, 20-way 1-shot) every method is trained on the meta-train classes, selected
on a fixed list of validation episodes and tested on the *same* fixed, seeded list
of test episodes (600 by default) with the paper's BN protocol (support running
statistics for the query); mean accuracy with a 95% interval (1.96 s / sqrt(n)).
Meta-training wall time per method is measured on this machine.

``--paired-with`` pairs every method of this run with the methods of an earlier
results JSON on the same test episodes (e.g. a ProtoNet run against the table's
Meta-LSTM rows, without training those again).

When the data directory also holds ``miniimagenet/`` the miniImageNet protocol
(5-way 1-shot and 5-shot) runs too; otherwise it is reported as skipped.

Writes ``benchmarks/results/fewshot_omniglot.json`` and ``.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from l2o.checkpoint import atomic_write_text  # noqa: E402
from l2o.config import to_toml  # noqa: E402
from l2o.data.episodes import EpisodeSampler  # noqa: E402
from l2o.errors import CheckpointError, L2OError  # noqa: E402
from l2o.fewshot import registry  # noqa: E402
from l2o.fewshot.api import load, resolve_device  # noqa: E402
from l2o.fewshot.config import resolve as resolve_fewshot_config  # noqa: E402
from l2o.fewshot.evaluate import (  # noqa: E402
    TEST_SEED,
    VAL_SEED,
    evaluate,
    paired_difference,
)
from l2o.fewshot.metalearner import GRAD_SCALES  # noqa: E402
from l2o.fewshot.pretrain import Pretrainer  # noqa: E402
from l2o.fewshot.registry import flag  # noqa: E402
from l2o.fewshot.setup import (  # noqa: E402
    build_model,
    load_splits,
    model_options,
    training_sampler,
    warm_start_from,
)
from l2o.fewshot.train import META_LR_SCHEDULES, EpisodicTrainer  # noqa: E402

CONFIGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1)}
MINI_CONFIGS = {"5w1s": (5, 1), "5w5s": (5, 5)}


# The methods, their training kinds, settings and default training lengths all come from
# l2o.fewshot.registry (a method's MethodSpec); these read it when called, so a method
# registered after this module was imported is known too.
# Meta-training length per method at --scale 1 (episodes; pre-training minibatches for the
# baselines): MethodSpec.bench_steps, chosen so one configuration trains in well under an
# hour on 2 CPU cores.
def steps_table() -> dict:
    return {s.name: s.bench_steps for s in registry.specs() if s.bench_steps is not None}


def methods() -> tuple:
    """What --methods accepts (and runs by default): the methods the benchmark trains or
    evaluates from another method's run."""
    return tuple(
        s.name for s in registry.specs() if s.bench_steps is not None or s.bench_from is not None
    )


# Suffix of a meta-learner whose learned initialisation starts from the fine-tune run's
# pre-trained body (zero head), e.g. "meta-lstm+pretrained"; its other settings are unchanged.
WARM = "+pretrained"


def meta_learners() -> tuple:
    return registry.warm_startable()


def episodic() -> tuple:
    """Methods trained by the episodic trainer (the meta-learners and ProtoNet)."""
    return registry.episodic()


def option_types() -> dict:
    """Settings --options may change for one method (and optionally one configuration)."""
    return registry.option_types()


OPTION_CHOICES = {"grad_scale": GRAD_SCALES, "meta_lr_schedule": META_LR_SCHEDULES}


def option_methods() -> dict:
    """Settings that only some methods have (the others would ignore them without a word)."""
    return registry.option_methods()


def type_name(parse) -> str:
    return "true or false" if parse is flag else parse.__name__


def parse_options(text: str) -> dict:
    """``"meta-lstm+pretrained@5w5s:inner_steps=15,grad_scale=none;maml:inner_lr=0.2"`` ->
    ``{("meta-lstm+pretrained", "5w5s"): {...}, ("maml", None): {...}}``."""
    out: dict = {}
    types = option_types()
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        target, sep, settings = entry.partition(":")
        label, _, config = target.partition("@")
        if not sep or not settings:
            raise ValueError(f"{entry!r}: expected METHOD[@CONFIG]:key=value[,key=value]")
        if config and config not in CONFIGS:
            raise ValueError(f"{entry!r}: unknown configuration {config!r}; one of {list(CONFIGS)}")
        opts = {}
        for kv in settings.split(","):
            key, eq, value = kv.partition("=")
            if not eq or key not in types:
                raise ValueError(f"{entry!r}: {kv!r} is not key=value with key in {list(types)}")
            try:
                opts[key] = types[key](value)
            except ValueError as err:
                raise ValueError(
                    f"{entry!r}: {key} expects {type_name(types[key])}, got {value!r}"
                ) from err
            if key in OPTION_CHOICES and value not in OPTION_CHOICES[key]:
                raise ValueError(f"{entry!r}: {key} is one of {OPTION_CHOICES[key]}, got {value!r}")
        out[(label, config or None)] = opts
    return out


#: --options key -> the `l2o fewshot train` config key it is a shorthand for (a method's
#: own settings, e.g. a registered method's, are [model] keys of the same name)
OPTION_KEYS = {
    "steps": "train.meta_steps",
    "meta_batch": "train.meta_batch",
    "meta_lr_schedule": "train.meta_lr_schedule",
    "init_lr_scale": "train.init_lr_scale",
}


def run_configuration(args, method, dataset, ways, shots, queries, steps, opts) -> dict:
    """The resolved few-shot config of one benchmark run."""
    sets = [
        f"method={method}",
        f"seed={args.seed}",
        f"device={args.device}",
        f"data.dataset={dataset}",
        f"data.rotations={bool(args.rotations and dataset == 'omniglot')}",
        f"episodes.ways={ways}",
        f"episodes.shots={shots}",
        f"episodes.queries={queries}",
        f"train.meta_steps={steps}",
        f"val.every={max(1, steps // args.validations) if registry.get(method).episodic else max(1, steps // 4)}",
        f"val.episodes={args.val_episodes}",
    ]
    sets += [f"{OPTION_KEYS.get(k, 'model.' + k)}={v}" for k, v in opts.items() if k != "steps"]
    return resolve_fewshot_config(None, sets)


def options_for(args, label: str, config: str) -> dict:
    return {**args.options.get((label, None), {}), **args.options.get((label, config), {})}


def default_data_dir() -> str | None:
    if os.environ.get("L2O_DATA"):
        return os.environ["L2O_DATA"]
    cand = REPO.parent / "shared" / "data"
    return str(cand) if cand.is_dir() else None


def run_config(dataset, splits, name, ways, shots, args, runs_dir: Path) -> dict:
    queries = 15
    val_eps = list(
        EpisodeSampler(splits["val"], ways, shots, queries, seed=VAL_SEED).episodes(
            args.val_episodes
        )
    )
    test_sampler = EpisodeSampler(splits["test"], ways, shots, queries, seed=TEST_SEED)
    results = {}
    # "+pretrained" variants start from the fine-tune run's body: fine-tune goes first.
    for label in sorted(args.methods, key=lambda m: m.endswith(WARM)):
        if registry.get(label.removesuffix(WARM)).bench_from is not None:
            continue  # e.g. nearest-neighbour: evaluated from the fine-tune checkpoint
        method = label.removesuffix(WARM)
        spec = registry.get(method)
        tag = "-rot" if args.rotations and dataset == "omniglot" else ""
        out = runs_dir / f"{dataset}-{name}{tag}" / label
        opts = options_for(args, label, name)
        steps = opts.get("steps", args.steps.get(label, max(1, int(spec.bench_steps * args.scale))))
        # The run as an `l2o fewshot train` config (l2o.fewshot.config): --options keys are
        # shorthands for its keys, checked and typed there; saved as the run's config.toml.
        cfg = run_configuration(args, method, dataset, ways, shots, queries, steps, opts)
        model, hp = build_model(method, dataset, ways, shots, model_options(cfg))
        init_from = None
        if label.endswith(WARM):
            init_from = out.parent / "finetune"
            warm_start_from(model, init_from)
        run_info = {
            "dataset": dataset,
            "split_seed": 0,
            "train_rotations": bool(args.rotations and dataset == "omniglot"),
            "init_from": str(init_from) if init_from else None,
            "ways": ways,
            "shots": shots,
            "queries": queries,
            "seed": args.seed,
            "options": opts,
        }
        done = args.reuse and (out / "summary.json").exists()
        if done and json.loads((out / "summary.json").read_text()).get("steps", steps) != steps:
            done = False  # a different training length was asked for
        if done and spec.episodic and (out / "config.json").exists():
            # e.g. another meta-lr schedule, which the model's configuration does not show
            if json.loads((out / "config.json").read_text()).get("options", {}) != opts:
                done = False
        if done:
            try:
                saved = load(out, method).model.config_dict()
            except CheckpointError as e:  # e.g. written by an older format: train it again
                print(f"[{dataset} {name}] not reusing {out}: {e}", flush=True)
                done = False
            else:  # fine-tune's lr/steps are tuned after training: compare its learner only
                ours = model.config_dict()
                same = saved["learner"] == ours["learner"] if not spec.episodic else saved == ours
                if not same:
                    print(
                        f"[{dataset} {name}] not reusing {out}: another configuration", flush=True
                    )
                    done = False
        if done:
            summary = json.loads((out / "summary.json").read_text())
        else:
            if out.exists():
                import shutil

                shutil.rmtree(out)
            out.mkdir(parents=True)
            print(
                f"[{dataset} {name}] training {method} ({steps} {'episodes' if spec.episodic else 'batches'})",
                flush=True,
            )
            if not spec.episodic:
                summary = Pretrainer(
                    model,
                    splits["train"],
                    val_eps,
                    out,
                    steps,
                    max(1, steps // 4),
                    "support-running",
                    args.seed,
                    run_info,
                    False,
                    args.device,
                ).train()
            else:
                sampler = training_sampler(model, splits["train"], shots, queries, args.seed)
                trainer = EpisodicTrainer(
                    model,
                    sampler,
                    val_eps,
                    out,
                    steps,
                    max(1, steps // args.validations),
                    1e-3,
                    hp["clip"],
                    hp["meta_batch"],
                    "support-running",
                    run_info,
                    False,
                    device=args.device,
                    meta_lr_schedule=cfg["train"]["meta_lr_schedule"],
                    init_lr_scale=cfg["train"]["init_lr_scale"],
                )
                summary = trainer.train()
            summary["steps"] = steps
            summary["device"] = args.device
            (out / "config.toml").write_text(to_toml(cfg))
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        evals = [(label, method)] + [  # e.g. nearest-neighbour from the fine-tune run
            (s.name, s.name)
            for s in registry.specs()
            if s.bench_from == label and s.name in args.methods
        ]
        for key, as_method in evals:
            pred = load(out, as_method, device=args.device)
            cached = out / f"test-{key}-{args.episodes}.json"
            if done and cached.exists():
                rep = json.loads(cached.read_text())
            else:
                rep = evaluate(
                    pred.model, test_sampler, args.episodes, "support-running", show_progress=False
                )
                cached.write_text(json.dumps(rep) + "\n")
            rep["train_seconds"] = summary["train_seconds"]
            rep["train_steps"] = steps
            rep["train_device"] = summary.get("device", "cpu")
            rep["checkpoint_selection"] = pred.meta.get("selection")
            results[key] = rep
            print(
                f"[{dataset} {name}] {key:<22} {rep['accuracy']:6.2f} ± {rep['ci95']:.2f}  "
                f"(train {summary['train_seconds'] / 60:.1f} min, eval {rep['eval_seconds']:.0f} s)",
                flush=True,
            )
    # Each meta-learner against each baseline on the same episodes (paired 95% interval).
    paired = {}
    for m in results:
        if m.removesuffix(WARM) in episodic():
            for base in registry.pretrained():
                if base in results:
                    paired[f"{m} - {base}"] = paired_difference(results[m], results[base])
    # ... and every method against those of earlier results files (--paired-with).
    for file, earlier in args.paired_with:
        for theirs, rep in earlier.get(dataset, {}).get(name, {}).items():
            if theirs == "paired_differences":
                continue
            for m in results:
                paired[f"{m} - {theirs} ({file})"] = paired_difference(results[m], rep)
    if paired:
        results["paired_differences"] = paired
    return results


def plot(all_results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in all_results.items() if v]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        res = all_results[key]
        names = [n for n in res if n != "paired_differences"]
        ax.bar(
            range(len(names)),
            [res[n]["accuracy"] for n in names],
            yerr=[res[n]["ci95"] for n in names],
            capsize=4,
            color=[f"C{i}" for i in range(len(names))],
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.set_ylabel("test accuracy (%), 95% interval")
        lo = min(res[n]["accuracy"] - res[n]["ci95"] for n in names)
        ax.set_ylim(max(0, lo - 10), 100)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=default_data_dir())
    ap.add_argument("--configs", default="5w1s,5w5s,20w1s")
    ap.add_argument("--methods", default=",".join(methods()))
    ap.add_argument("--episodes", type=int, default=600, help="test episodes")
    ap.add_argument("--val-episodes", type=int, default=50)
    ap.add_argument("--validations", type=int, default=4, help="validations per meta-training run")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply every method's training length"
    )
    ap.add_argument("--steps", default="", help="per-method training length, e.g. maml=3000")
    ap.add_argument(
        "--options",
        default="",
        help="per-method settings chosen on meta-validation, "
        'e.g. "meta-lstm+pretrained@5w5s:inner_steps=15,grad_scale=none;maml:inner_lr=0.2"',
    )
    ap.add_argument(
        "--paired-with",
        action="append",
        default=[],
        metavar="JSON",
        help="an earlier results JSON of this script: pair every method of this run with its "
        "methods on the same test episodes (repeatable)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)"
    )
    ap.add_argument(
        "--reuse", action="store_true", help="reuse finished runs in the runs directory"
    )
    ap.add_argument(
        "--rotations",
        action="store_true",
        help="add 90/180/270-degree rotations of the meta-train classes as new classes (x4)",
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda (wall times are then not this machine's)"
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known, warm, by_option = methods(), meta_learners(), option_methods()
    bad = [
        m
        for m in args.methods
        if m not in known and not (m.endswith(WARM) and m.removesuffix(WARM) in warm)
    ]
    if bad:
        ap.error(
            f"--methods: unknown {bad}; expected some of {known} or {[m + WARM for m in warm]}"
        )
    if any(m.endswith(WARM) for m in args.methods) and "finetune" not in args.methods:
        ap.error(f"--methods: the {WARM} variants start from the finetune run; include finetune")
    args.steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(",") if kv)}
    try:
        args.options = parse_options(args.options)
    except ValueError as e:
        ap.error(f"--options: {e}")
    unknown = sorted({lbl for lbl, _ in args.options} - set(args.methods))
    if unknown:
        ap.error(f"--options: {unknown} not among --methods {args.methods}")
    for (label, _), opts in args.options.items():
        for key in opts:
            if label.removesuffix(WARM) not in by_option.get(key, known):
                ap.error(f"--options: {label} has no setting {key} (only {by_option[key]})")
    try:
        resolve_device(args.device)
    except L2OError as e:
        ap.error(str(e))
    earlier = []
    for file in args.paired_with:
        try:
            doc = json.loads(Path(file).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--paired-with {file}: {e}")
        # checked now, not after hours of training: pairs need the very same test episodes
        for name in args.configs.split(","):
            for m, rep in doc.get("omniglot", {}).get(name, {}).items():
                if m != "paired_differences" and (
                    rep.get("episode_seed") != TEST_SEED or rep.get("episodes") != args.episodes
                ):
                    ap.error(
                        f"--paired-with {file}: {name} {m} was not tested on the "
                        f"{args.episodes} test episodes of this run"
                    )
        earlier.append((Path(file).name, doc))
    args.paired_with = earlier
    torch.set_num_threads(args.threads)
    if not args.data_dir:
        print("no data directory: pass --data-dir or set L2O_DATA", file=sys.stderr)
        return 2
    if not Path(args.data_dir).is_dir():
        print(f"--data-dir {args.data_dir}: no such directory", file=sys.stderr)
        return 2
    root = Path(args.data_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "fewshot_runs"
    t0 = time.time()
    splits = load_splits("omniglot", root, 0, rotations=args.rotations)
    report = {
        "protocol": {
            "dataset": "omniglot minimal background splits (small1 + small2), 28x28, inverted",
            "train_rotations": args.rotations,
            "split": splits["info"],
            "test_episodes": args.episodes,
            "queries": 15,
            "bn_mode": "support-running",
            "val_episodes": args.val_episodes,
            "test_episode_seed": TEST_SEED,
            "scale": args.scale,
            "threads": args.threads,
            "device": args.device,
            "steps": {k: args.steps.get(k, int(v * args.scale)) for k, v in steps_table().items()},
            "options": {f"{m}@{c}" if c else m: o for (m, c), o in args.options.items()},
        },
        "omniglot": {},
        "miniimagenet": {},
    }
    for name in args.configs.split(","):
        ways, shots = CONFIGS[name]
        report["omniglot"][name] = run_config("omniglot", splits, name, ways, shots, args, runs_dir)
        atomic_write_text(out / "fewshot_omniglot.json", json.dumps(report, indent=2) + "\n")
    mini = root / "miniimagenet"
    if mini.is_dir():
        msplits = load_splits("miniimagenet", root)
        for name, (ways, shots) in MINI_CONFIGS.items():
            report["miniimagenet"][name] = run_config(
                "miniimagenet", msplits, name, ways, shots, args, runs_dir
            )
    else:
        report["miniimagenet"] = {"skipped": f"no miniimagenet/ directory under {root}"}
        print(f"miniImageNet: SKIPPED (no miniimagenet/ directory under {root})")
    report["total_seconds"] = time.time() - t0
    atomic_write_text(out / "fewshot_omniglot.json", json.dumps(report, indent=2) + "\n")
    flat = {f"omniglot {k}": v for k, v in report["omniglot"].items()}
    if "skipped" not in report["miniimagenet"]:
        flat.update({f"miniimagenet {k}": v for k, v in report["miniimagenet"].items()})
    plot(flat, out / "fewshot_omniglot.png")
    print(f"\n{'configuration':<18} {'method':<18} {'accuracy':>16} {'train wall time':>16}")
    for key, res in flat.items():
        for m, r in res.items():
            if m == "paired_differences":
                continue
            wall = r["train_seconds"] / 60
            dev = r.get("train_device", "cpu")
            print(
                f"{key:<18} {m:<22} {r['accuracy']:8.2f} ± {r['ci95']:.2f} {wall:13.1f} min ({dev})"
            )
        for pair, d in res.get("paired_differences", {}).items():
            print(f"{key:<18} {pair:<40} paired {d['difference']:+.2f} ± {d['ci95']:.2f}")
    print(f"\nwrote {out / 'fewshot_omniglot.json'} and {out / 'fewshot_omniglot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
