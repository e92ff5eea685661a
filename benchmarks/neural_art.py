"""Neural Art benchmark (L2L Figs. 8-9): the learned optimizer vs tuned baselines and L-BFGS.

    python benchmarks/neural_art.py --data-dir DIR                       # everything
    python benchmarks/neural_art.py --data-dir DIR --experiments a --optimizers sgd,adam
    python benchmarks/neural_art.py --data-dir DIR --assemble            # figures + JSON only

Experiments (task ``neural-art``, features ``--features``, default ``random``):

* (a) training style (The Starry Night) at 64 x 64, 128 steps;
* (b) the training style at 128 x 128;
* (c) a new style (The Scream) at 128 x 128;
* (d) twice the training horizon (256 steps) at 64 x 64.

Test content images: seeds 0..``--images``-1 of the ``test`` content set, i.e. the crops
of the photos in ``DIR/neural-art/content/`` (5 photos x 5 crops; images meta-training never
saw), each from its own seeded noise start.  SGD / NAG / RMSprop / Adam get their learning
rate tuned per experiment (:func:`l2o.evaluate.tune_lr`, sum of loss over the horizon, grid
extended at its edges) on ``--tune-images`` validation content images (CIFAR-10 ``val``
split, upsampled).  L-BFGS (``torch.optim.LBFGS``, strong Wolfe) gets the same number of
objective evaluations as the others get steps, line-search evaluations included; its
curve is the best loss found after k evaluations.

Each (experiment, optimizer) is cached in ``OUT/EXP/NAME.json`` (losses of every test
image at every step) beside ``NAME_stepK.png`` (test image 0 after K = 8, 32, 128
steps), so runs can be split and resumed; ``--assemble`` (also run at the end) writes
``OUT/EXP_grid.png`` (rows: optimizers, columns: steps), ``OUT/EXP_curves.png`` and
``OUT/../neural_art.json`` (sum of mean loss over the horizon with 95% intervals).
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
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import hardware, paired  # noqa: E402

from l2o.art import build_optimizer, optimize_images  # noqa: E402
from l2o.data import neural_art as data  # noqa: E402
from l2o.evaluate import summarize, tune_lr  # noqa: E402
from l2o.rules import CLASSIC_RULES  # noqa: E402
from l2o.study import weights_digest  # noqa: E402
from l2o.tasks.neural_art import NeuralArt  # noqa: E402

EXPERIMENTS = {
    "a": {"size": 64, "style": "starry_night", "steps": 128, "what": "training style, 64x64"},
    "b": {"size": 128, "style": "starry_night", "steps": 128, "what": "training style, 128x128"},
    "c": {
        "size": 128,
        "style": "the_scream",
        "steps": 128,
        "what": "new style (The Scream), 128x128",
    },
    "d": {"size": 64, "style": "starry_night", "steps": 256, "what": "twice the horizon, 64x64"},
}
GRIDS = {  # half-decade grids; tune_lr extends one at the edge where the best lr sits
    "sgd": (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0),
    "nag": (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0),
    "rmsprop": (0.001, 0.00316, 0.01, 0.0316, 0.1),
    "adam": (0.00316, 0.01, 0.0316, 0.1, 0.316),
}
SNAPSHOTS = (8, 32, 128)
DEFAULT_OPTIMIZERS = "sgd,nag,rmsprop,adam,lbfgs,lstm:pretrained/neural-art"


def safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_").replace("=", "")


def make_task(exp: dict, features: str, data_dir: str, split: str) -> NeuralArt:
    return NeuralArt(
        size=exp["size"], style=exp["style"], features=features, split=split, data_dir=data_dir
    )


def protocol(test: NeuralArt, exp: dict, args) -> dict:
    """What a cached entry must match to be reused (objective, images, tuning, horizon)."""
    return {
        "task": test.describe(),
        "steps": exp["steps"],
        "images": args.images,
        "tune_images": args.tune_images,
        "grids": {k: list(v) for k, v in GRIDS.items()},
    }


def run_one(key, exp, spec, args, out: Path) -> None:
    path = out / key / f"{safe(spec)}.json"
    test = make_task(exp, args.features, args.data_dir, "test")
    stamp = protocol(test, exp, args)
    opt = None
    if spec not in CLASSIC_RULES:
        opt = build_optimizer(spec)
        if isinstance(opt, torch.nn.Module) and any(True for _ in opt.parameters()):
            stamp["weights"] = weights_digest(opt)  # retrained weights under the same name
    if path.exists() and not args.force:
        # Why the stamp: a cache written under other weights or image counts is silently wrong.
        if json.loads(path.read_text()).get("protocol") == stamp:
            print(f"[{key}] {spec}: cached")
            return
        print(f"[{key}] {spec}: cached entry has another protocol, recomputing")
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entry: dict = {"optimizer": spec, "protocol": stamp}
    steps, seeds = exp["steps"], list(range(args.images))
    if spec in CLASSIC_RULES:
        cls = CLASSIC_RULES[spec]
        val = make_task(exp, args.features, args.data_dir, "val")
        tuned = tune_lr(lambda lr: cls(lr=lr), val, steps, args.tune_images, GRIDS[spec])
        entry["lr"] = tuned.lr
        entry["tuning"] = {repr(k): v for k, v in sorted(tuned.scores.items())}
        print(f"[{key}] {spec}: lr {tuned.lr:g} (validation {args.tune_images} images)")
        opt = cls(lr=tuned.lr)
    snaps = [k for k in SNAPSHOTS if k <= steps]
    chunk = test.max_batch
    cols, first = [], None
    for i in range(0, len(seeds), chunk):
        problem = test.sample(seeds[i : i + chunk])
        with torch.enable_grad():
            losses, images = optimize_images(opt, problem, steps, snaps if i == 0 else ())
        cols.append(losses)
        if i == 0:
            first = images
    losses = torch.cat(cols, 1)
    for k, img in (first or {}).items():
        data.write_image(img[0], out / key / f"{safe(spec)}_step{k}.png")
    entry.update(summarize(losses))
    entry["losses"] = losses.tolist()
    entry["seconds"] = time.perf_counter() - t0
    path.write_text(json.dumps(entry))
    print(f"[{key}] {spec}: sum {entry['sum_loss']:.3f} +- {entry['sum_loss_ci95']:.3f} "
          f"({entry['seconds']:.0f} s)")  # fmt: skip


FIRST_ORDER = ("sgd", "nag", "rmsprop", "adam")


def paired_against_best(entries: dict) -> dict:
    """Each other optimizer against the tuned first-order baseline with the lowest sum.

    Every optimizer runs on the same test images from the same noise starts, so the
    per-image difference of the sums of loss is paired: its 95% interval removes the
    between-image spread (photos differ in how low their loss can go) that makes the
    unpaired intervals of the table wide.
    """
    base = [s for s in FIRST_ORDER if s in entries]
    if not base:
        return {}
    best = min(base, key=lambda s: entries[s]["sum_loss"])
    ref = torch.tensor(entries[best]["losses"])
    out = {"best": best}
    for spec, e in entries.items():
        losses = torch.tensor(e["losses"])
        if spec == best or losses.shape != ref.shape:
            continue
        d = paired(losses, ref)
        out[spec] = {
            "ratio_of_sums": e["sum_loss"] / entries[best]["sum_loss"],
            "paired_mean_difference": d["mean"],
            "paired_difference_ci95": d["ci95"],
            "better_on_images": int((losses[1:].sum(0) < ref[1:].sum(0)).sum()),
            "images": d["n"],
        }
    return out


def assemble(args, out: Path, optimizers: list[str]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    result = {
        "features": args.features,
        "test_images": "seeds 0..N-1 of the test content set: crops of the neural-art/content photos",
        "tune_images": f"{args.tune_images} validation images (CIFAR-10 val split, upsampled)",
        "metric": "sum over steps 1..T of the mean loss over test images (95% interval)",
        "hardware": hardware(),
        "experiments": {},
    }
    for key, exp in EXPERIMENTS.items():
        entries = {}
        for spec in optimizers:
            p = out / key / f"{safe(spec)}.json"
            if p.exists():
                entries[spec] = json.loads(p.read_text())
        if not entries:
            continue
        rows = {}
        for spec, e in entries.items():
            rows[spec] = {k: e[k] for k in ("sum_loss", "sum_loss_ci95", "final_loss_mean",
                                             "seconds") if k in e}  # fmt: skip
            rows[spec]["images"] = len(e["losses"][0])
            if "lr" in e:
                rows[spec]["lr"] = e["lr"]
        result["experiments"][key] = {
            **exp,
            "optimizers": rows,
            "against_best_first_order": paired_against_best(entries),
        }
        fig, ax = plt.subplots(figsize=(6, 4))
        for spec, e in entries.items():
            ax.plot(e["mean_loss"], label=spec)
        ax.set_yscale("log")
        ax.set_xlabel("step (objective evaluations for lbfgs)")
        ax.set_ylabel("mean loss over test images")
        ax.set_title(f"({key}) {exp['what']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{key}_curves.png", dpi=100)
        plt.close(fig)
        snaps = [k for k in SNAPSHOTS if k <= exp["steps"]]
        have = [s for s in entries if (out / key / f"{safe(s)}_step{snaps[0]}.png").exists()]
        if have:
            fig, axes = plt.subplots(len(have), len(snaps), figsize=(2 * len(snaps), 2 * len(have)),
                                     squeeze=False)  # fmt: skip
            for r, spec in enumerate(have):
                for c, k in enumerate(snaps):
                    a = axes[r][c]
                    a.imshow(Image.open(out / key / f"{safe(spec)}_step{k}.png"))
                    a.set_xticks([])
                    a.set_yticks([])
                    if r == 0:
                        a.set_title(f"after {k}")
                    if c == 0:
                        a.set_ylabel(spec.split(":")[0], fontsize=8)
            fig.tight_layout()
            fig.savefig(out / f"{key}_grid.png", dpi=100)
            plt.close(fig)
    target = out.parent / "neural_art.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("L2O_DATA", ""))
    ap.add_argument("--experiments", default="a,b,c,d")
    ap.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS)
    ap.add_argument("--images", type=int, default=20, help="test content images (default 20)")
    ap.add_argument("--tune-images", type=int, default=4)
    ap.add_argument("--features", default="random")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "neural_art"))
    ap.add_argument("--assemble", action="store_true", help="only write figures and JSON")
    ap.add_argument("--force", action="store_true", help="recompute cached entries")
    args = ap.parse_args(argv)
    out = Path(args.out)
    optimizers = args.optimizers.split(",")
    if not args.assemble:
        for key in args.experiments.split(","):
            for spec in optimizers:
                run_one(key, EXPERIMENTS[key], spec, args, out)
    assemble(args, out, DEFAULT_OPTIMIZERS.split(",") + [o for o in optimizers
                                                         if o not in DEFAULT_OPTIMIZERS])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
