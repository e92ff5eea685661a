"""How far the Meta-LSTM's first-order meta-gradient is from the second-order one.

    .venv/bin/python experiments/metalstm_cosine.py --init-from RUN      # pre-trained start
    .venv/bin/python experiments/metalstm_cosine.py --checkpoint RUN     # a trained meta-lstm run

The paper (and its code) treat the learner's loss and gradient as constants of the
meta-graph; ``second_order`` keeps them in it.  For the same parameters and the same
meta-training episodes (Omniglot, batch-statistics BN as in meta-training), this prints
per parameter group the cosine between the two meta-gradients and their norms, as means
over the episodes.  ``--init-from`` takes a finetune run's body with a zero head (the
``meta-lstm+pretrained`` start, before any meta-training); ``--checkpoint`` a trained
Meta-LSTM.
"""

from __future__ import annotations

import argparse
import json
import sys
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from l2o.data.episodes import EpisodeSampler  # noqa: E402
from l2o.fewshot.api import load  # noqa: E402
from l2o.fewshot.metalearner import MetaLSTMMethod  # noqa: E402
from l2o.fewshot.setup import build_model, load_splits, warm_start_from  # noqa: E402

# Parameter groups of the rule: c_0, the coordinatewise LSTM (layer 1), the gate layer (layer 2).
GROUPS = {
    "c_0 (initialisation)": ("c_init",),
    "LSTM layer 1": ("weight_ih", "weight_hh", "bias"),
    "gates (layer 2)": ("w_f", "w_i", "b_f", "b_i"),
}


def group_grads(model: MetaLSTMMethod, episode, second_order: bool) -> dict:
    model.zero_grad(set_to_none=True)
    model.second_order = second_order
    model.meta_loss(episode)[0].backward()
    params = dict(model.rule.named_parameters())
    return {
        g: torch.cat([params[n].grad.reshape(-1) for n in names]) for g, names in GROUPS.items()
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    start = ap.add_mutually_exclusive_group(required=True)
    start.add_argument("--init-from", help="finetune run: its body, zero head, untrained rule")
    start.add_argument("--checkpoint", help="a trained meta-lstm run")
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=15, help="with --init-from")
    ap.add_argument("--grad-scale", default="batch", help="with --init-from")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.checkpoint:
        model = load(args.checkpoint, "meta-lstm").model
    else:
        # as `l2o fewshot train --method meta-lstm` builds it (other settings: its defaults)
        settings = Namespace(
            inner_steps=args.inner_steps,
            filters=32,
            second_order=False,
            grad_scale=args.grad_scale,
            seed=0,
        )
        model = build_model("meta-lstm", "omniglot", args.ways, args.shots, settings)[0]
        warm_start_from(model, args.init_from)
    model.train()
    splits = load_splits("omniglot", Path(args.data_dir), 0)
    sampler = EpisodeSampler(splits["train"], args.ways, args.shots, 15, seed=1)
    sums = {g: torch.zeros(3, dtype=torch.float64) for g in GROUPS}
    for k in range(args.episodes):
        episode = sampler.episode(k)
        first, second = group_grads(model, episode, False), group_grads(model, episode, True)
        for g in GROUPS:
            cos = torch.nn.functional.cosine_similarity(first[g], second[g], dim=0)
            sums[g] += torch.tensor([cos.item(), first[g].norm().item(), second[g].norm().item()])
    print(
        f"{args.ways}-way {args.shots}-shot, {model.steps} inner steps, grad_scale "
        f"{model.grad_scale}, means over {args.episodes} meta-training episodes:"
    )
    means = {g: (v / args.episodes).tolist() for g, v in sums.items()}
    for g, (cos, n1, n2) in means.items():
        print(f"  {g:22s} cosine {cos:6.3f}  |first order| {n1:9.4f}  |second| {n2:9.4f}")
    if args.json:
        report = {
            "start": args.checkpoint or f"init-from {args.init_from}",
            "ways": args.ways,
            "shots": args.shots,
            "inner_steps": model.steps,
            "grad_scale": model.grad_scale,
            "episodes": args.episodes,
            "groups": {
                g: {"cosine": c, "norm_first_order": n1, "norm_second_order": n2}
                for g, (c, n1, n2) in means.items()
            },
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
