"""Cosine between the first-order (FOMAML) and the true MAML meta-gradient at initialisation.

    .venv/bin/python experiments/fomaml_cosine.py [--data-dir DIR]

One Omniglot 5-way 1-shot training episode (15 queries), one inner step of each
learning rate, the same theta_0 for both; batch-statistics BN (meta-training mode).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from l2o.data.episodes import EpisodeSampler  # noqa: E402
from l2o.fewshot.learner import LearnerConfig  # noqa: E402
from l2o.fewshot.maml import MAMLMethod  # noqa: E402
from l2o.fewshot.setup import load_splits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--lrs", default="0.001,0.1,0.4")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    splits = load_splits("omniglot", Path(args.data_dir), 0)
    episode = EpisodeSampler(splits["train"], 5, 1, 15, seed=1).episode(0)
    learner = LearnerConfig(in_channels=1, image_size=28, ways=5, filters=32, bn_momentum=0.9)
    for lr in (float(v) for v in args.lrs.split(",")):
        grads = []
        for first_order in (False, True):
            model = MAMLMethod(learner, 1, lr, first_order, 0).train()
            model.meta_loss(episode)[0].backward()
            grads.append(model.theta0.grad)
        cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0).item()
        print(
            f"inner lr {lr:g}: cosine {cos:.4f}  |MAML grad| {grads[0].norm():.2f}  "
            f"|FOMAML grad| {grads[1].norm():.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
