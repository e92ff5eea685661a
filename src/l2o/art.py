"""``l2o art``: stylize a photo with a learned or hand-designed optimizer (Neural Art).

    l2o art --content PHOTO --style PAINTING --optimizer lstm:pretrained/neural-art \\
        --size 128 --steps 128 --out out.png

The objective is the ``neural-art`` task's (:mod:`l2o.tasks.neural_art`) on one content
image.  ``--optimizer`` is ``lstm:PATH`` (a run, artifact or ``pretrained/NAME``), a
classic rule (``adam:lr=0.05``; without ``lr=`` the rule's default), or ``lbfgs``:
``torch.optim.LBFGS`` (strong-Wolfe line search) given ``--steps`` objective
evaluations in all, every evaluation (line-search ones included) counted as a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import L2OError
from .tasks.neural_art import CONTENT_WEIGHT, STYLE_WEIGHT, TV_WEIGHT, NeuralArtProblem


def run_lbfgs(problem: NeuralArtProblem, evals: int, snapshots: Sequence[int] = ()):
    """L-BFGS on each instance alone, ``evals`` objective evaluations each.

    Returns (losses ``[evals + 1, P]``: row k is the best loss among the first k + 1
    evaluations, row 0 the initial one; ``{k: images [P, 3, S, S]}`` best-so-far images).
    """
    P = problem.num_instances
    shape = problem.layout.shapes[0][1:]
    theta0 = problem.init().view(P, *shape)
    cols, snaps = [], {k: [] for k in snapshots}
    for p in range(P):
        sub = problem.task.problem(problem.content[p : p + 1], [0])
        sub.content_feat = problem.content_feat[p : p + 1]
        x = theta0[p : p + 1].clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [x], lr=1.0, max_iter=evals, max_eval=evals, history_size=20,
            tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe",
        )  # fmt: skip
        losses: list[float] = []
        best = {"loss": math.inf, "x": x.detach().clone()}

        def closure(x=x, sub=sub, losses=losses, best=best, opt=opt):
            opt.zero_grad()
            loss = sub.loss(x.view(-1), 0).sum()
            if len(losses) < evals + 1:
                v = float(loss.detach())
                losses.append(v)
                if v < best["loss"]:
                    best["loss"], best["x"] = v, x.detach().clone()
                k = len(losses) - 1
                if k in snaps:
                    snaps[k].append(best["x"][0].clone())
            loss.backward()
            return loss

        while len(losses) < evals + 1:
            n = len(losses)
            opt.step(closure)
            if len(losses) == n:  # converged: no new evaluation
                break
        curve = torch.tensor(losses)
        curve = torch.cummin(curve, 0).values
        if len(curve) < evals + 1:
            curve = torch.cat([curve, curve[-1:].expand(evals + 1 - len(curve))])
        for k in snaps:
            while len(snaps[k]) < p + 1:
                snaps[k].append(best["x"][0].clone())
        cols.append(curve)
    return torch.stack(cols, 1), {k: torch.stack(v) for k, v in snaps.items()}


def run_rule(rule, problem: NeuralArtProblem, steps: int, snapshots: Sequence[int] = ()):
    """``steps`` steps of an update rule (one gradient evaluation each), as :func:`run_lbfgs`."""
    from .meta.unroll import _rule_step_no_grad, loss_and_grad, start

    if isinstance(rule, torch.nn.Module):
        rule.eval()
    traj = start(problem, rule)
    theta, state, losses, grad = traj.theta, traj.state, traj.losses, traj.grad
    rows, snaps = [losses], {}
    shape = (problem.num_instances, *problem.layout.shapes[0][1:])
    if 0 in snapshots:
        snaps[0] = theta.view(shape).clone()
    for t in range(1, steps + 1):
        theta, state = _rule_step_no_grad(rule, theta, grad, losses, state, problem.layout)
        losses, grad = loss_and_grad(problem, theta, t, keep_graph=False)
        losses = losses.detach()
        rows.append(losses)
        if t in snapshots:
            snaps[t] = theta.detach().view(shape).clone()
    return torch.stack(rows), snaps


def build_optimizer(spec: str):
    """``lbfgs`` -> the string ``"lbfgs"``; otherwise an update rule."""
    if spec == "lbfgs":
        return "lbfgs"
    from .artifact import load
    from .evaluate import parse_optimizer
    from .rules import CLASSIC_RULES

    o = parse_optimizer(spec)
    if o.kind == "classic":
        return CLASSIC_RULES[o.rule_name](**o.hparams)
    return load(o.path)


def optimize_images(optimizer, problem: NeuralArtProblem, steps: int, snapshots=()):
    if optimizer == "lbfgs":
        return run_lbfgs(problem, steps, snapshots)
    return run_rule(optimizer, problem, steps, snapshots)


def register(sub) -> None:
    from .cli import EXAMPLES, positive_int

    p = sub.add_parser(
        "art",
        help="stylize a photo (Neural Art) with a learned or hand-designed optimizer",
        description=__doc__.split("\n\n", 2)[2].strip(),
        formatter_class=EXAMPLES,
        epilog="""\
examples:
  l2o art --content photo.jpg --style painting.jpg --optimizer lstm:pretrained/neural-art \\
      --size 128 --steps 128 --out out.png
  l2o art --content photo.jpg --style starry_night --data-dir DIR --optimizer adam:lr=0.03 --out a.png
  l2o art --content photo.jpg --style painting.jpg --optimizer lbfgs --out b.png

--style NAME (no suffix) is looked up in DIR/neural-art/style/ (--data-dir DIR or $L2O_DATA).
""",
    )
    p.add_argument("--content", required=True, help="content photo (JPEG/PNG)")
    p.add_argument("--style", required=True, help="style painting (JPEG/PNG path or NAME)")
    p.add_argument(
        "--optimizer", default="lstm:pretrained/neural-art", help="(default: %(default)s)"
    )
    p.add_argument(
        "--size", type=positive_int, default=128, help="image side (default: %(default)s)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=128, help="steps / evaluations (default: %(default)s)"
    )
    p.add_argument(
        "--features", default="random", help="random or vgg19:PATH (default: %(default)s)"
    )
    p.add_argument(
        "--content-weight", type=float, default=CONTENT_WEIGHT, help="(default: %(default)s)"
    )
    p.add_argument(
        "--style-weight", type=float, default=STYLE_WEIGHT, help="(default: %(default)s)"
    )
    p.add_argument("--tv-weight", type=float, default=TV_WEIGHT, help="(default: %(default)s)")
    p.add_argument("--init", choices=("noise", "content"), default="noise")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="data directory (style NAMEs)")
    p.add_argument("--out", required=True, help="output image (.png or .jpg)")
    p.set_defaults(func=cmd_art)


def cmd_art(args) -> int:
    from .data import neural_art as data
    from .tasks.neural_art import NeuralArt

    if not str(args.out).lower().endswith((".png", ".jpg", ".jpeg")):
        raise L2OError(f"--out {args.out}: expected a .png or .jpg file name")
    task = NeuralArt(
        size=args.size,
        style=args.style,
        content_weight=args.content_weight,
        style_weight=args.style_weight,
        tv_weight=args.tv_weight,
        features=args.features,
        init=args.init,
        split="test",
        data_dir=args.data_dir or "",
    )
    content = data.read_image(args.content, args.size)[None]
    problem = task.problem(content, [args.seed])
    opt = build_optimizer(args.optimizer)
    losses, snaps = optimize_images(opt, problem, args.steps, [args.steps])
    data.write_image(snaps[args.steps][0], args.out)
    print(
        f"{args.optimizer}: loss {float(losses[0, 0]):.4f} -> {float(losses[-1, 0]):.4f} "
        f"after {args.steps} {'evaluations' if opt == 'lbfgs' else 'steps'}; wrote {args.out}"
    )
    return 0
