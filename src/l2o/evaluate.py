"""Running rules on tasks, tuning baselines, and fair comparisons.

Fairness protocol:

* every optimizer runs on the same test problems (seed stream ``"test"``), hence
  the same initial parameters and the same minibatch at every step;
* hand-designed optimizers get their learning rate from a log-spaced grid, chosen
  by the same metric on *different* problems (seed stream ``"tune"``); a fixed
  ``adam:lr=0.01`` skips the search;
* the metric is the mean loss curve over test problems, its sum over steps
  1..T (``sum_loss``; the initial loss is excluded) and its final value.

A diverged run (non-finite loss) scores +inf in tuning.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .artifact import load, read_config
from .config import VAL_METRICS
from .errors import L2OError
from .meta.unroll import run
from .rules import CLASSIC_RULES, LEARNED_RULES, UpdateRule
from .seeds import stream
from .specs import coerce, parse_options, split_spec
from .tasks.base import Task, on_device

#: default learning-rate grid: 1e-4 .. 10 in half-decades
DEFAULT_LR_GRID = tuple(round(10 ** (k / 2), 10) for k in range(-8, 3))


def evaluate_rule(
    rule: UpdateRule, task: Task, seeds: Sequence[int], steps: int, device: str | None = None
) -> Tensor:
    """Per-instance losses ``[steps + 1, len(seeds)]`` of ``rule`` on the problems ``seeds``.

    With ``device`` the problems run there (a learned rule must already be there); the
    losses come back on the CPU.
    """
    if device is not None:
        task = on_device(task, device)
    was_training = isinstance(rule, nn.Module) and rule.training
    if isinstance(rule, nn.Module):
        rule.eval()
    try:
        chunk = max(1, task.max_batch)  # rules read each instance's own loss
        cols = [
            run(rule, task.sample(list(seeds[i : i + chunk])), steps).cpu()
            for i in range(0, len(seeds), chunk)
        ]
    finally:
        if was_training:
            rule.train()
    return torch.cat(cols, dim=1)


def sum_loss(losses: Tensor) -> float:
    """Mean over instances of sum over steps 1..T (+inf if any instance diverged)."""
    per = losses[1:].sum(0)
    if not torch.isfinite(per).all():
        return math.inf
    return float(per.mean())


def validation_scores(losses: Tensor, metric: str = "sum") -> Tensor:
    """Per-instance validation score of a ``[steps + 1, n]`` loss matrix (lower is better).

    ``"sum"``: the sum over steps 1..T (the paper's meta-objective).  ``"final-log"``: the
    log of the mean loss over the last 5% of the steps (at least one) relative to the loss at
    step 0, floored at a 1000x reduction: a score that does not depend on a problem's loss
    scale (so no single problem dominates the mean over problems) and that measures where a
    run ends, not how fast it starts.  Why the floor: a problem that can be fit exactly
    (loss -> 0) would otherwise drive the mean without bound (log 1e-20 = -46).
    Non-finite: diverged.
    """
    if metric == "sum":
        return losses[1:].sum(0)
    if metric == "final-log":
        tail = max(1, (losses.shape[0] - 1) // 20)
        ratio = losses[-tail:].mean(0) / losses[0]
        return torch.where(torch.isfinite(ratio), ratio.clamp_min(1e-3), ratio).log()
    raise L2OError(f"val.metric must be one of {VAL_METRICS}, got {metric!r}")


def summarize(losses: Tensor) -> dict:
    """Curves and scalars of a ``[steps + 1, n]`` loss matrix (double precision stats)."""
    x = losses.double()
    n = x.shape[1]
    mean = x.mean(1)
    std = x.std(1) if n > 1 else torch.zeros_like(mean)
    sums = x[1:].sum(0)
    return {
        "mean_loss": [float(v) for v in mean],
        "std_loss": [float(v) for v in std],
        "sum_loss": float(mean[1:].sum()),
        "sum_loss_std": float(sums.std()) if n > 1 else 0.0,
        "sum_loss_ci95": float(1.96 * sums.std() / math.sqrt(n)) if n > 1 else 0.0,
        "final_loss_mean": float(mean[-1]),
        "final_loss_std": float(std[-1]),
        "diverged": int((~torch.isfinite(x[-1])).sum()),
    }


@dataclass
class TuneResult:
    lr: float
    scores: dict[float, float] = field(default_factory=dict)


def tune_lr(
    make_rule: Callable[[float], UpdateRule],
    task: Task,
    steps: int,
    problems: int = 20,
    grid: Sequence[float] = DEFAULT_LR_GRID,
) -> TuneResult:
    """Best learning rate on the ``"tune"`` seed stream by ``sum_loss`` (lower is better)."""
    seeds = stream("tune", problems)
    scores = {float(lr): sum_loss(evaluate_rule(make_rule(lr), task, seeds, steps)) for lr in grid}
    finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    if not finite:
        raise L2OError(
            f"tuning: every learning rate in the grid {list(grid)} diverged on {task.name}"
        )
    best = min(finite, key=finite.get)
    if best in (min(grid), max(grid)):
        # The optimum may lie outside the grid: extend it by half-decades on that side.
        factor = 10**0.5 if best == max(grid) else 10**-0.5
        lr = best
        for _ in range(4):
            lr = lr * factor
            s = sum_loss(evaluate_rule(make_rule(lr), task, seeds, steps))
            scores[lr] = s
            if not (math.isfinite(s) and s < finite[best]):
                break
            finite[lr] = s
            best = lr
    return TuneResult(best, scores)


@dataclass
class OptimizerSpec:
    """What ``--optimizer`` names: a classic rule (tuned or fixed) or a learned one."""

    name: str
    kind: str  # "classic" or "learned"
    rule_name: str
    hparams: dict = field(default_factory=dict)
    path: str | None = None


def parse_optimizer(spec: str) -> OptimizerSpec:
    """``adam`` | ``adam:lr=0.01`` | ``lstm:PATH`` (a run dir, artifact or pretrained/NAME)."""

    name, rest = split_spec(spec)
    if name in CLASSIC_RULES:
        cls = CLASSIC_RULES[name]
        params = inspect.signature(cls).parameters
        hp = {}
        for key, raw in parse_options(rest, f"--optimizer {spec!r}").items():
            if key not in params:
                raise L2OError(
                    f"--optimizer {spec!r}: {name} has no option {key!r}; valid: {list(params)}"
                )
            hp[key] = coerce(raw, params[key].default, f"--optimizer {name} option {key}")
        try:
            cls(**{"lr": 1.0, **hp})
        except ValueError as e:
            raise L2OError(f"--optimizer {spec!r}: {e}") from None
        return OptimizerSpec(spec, "classic", name, hp)
    if name in LEARNED_RULES or name == "learned":
        if not rest:
            raise L2OError(
                f"--optimizer {spec!r}: expected {name}:PATH (a run directory, an artifact or pretrained/NAME)"
            )
        return OptimizerSpec(spec, "learned", name, {}, rest)
    known = sorted(CLASSIC_RULES) + [f"{n}:PATH" for n in sorted(LEARNED_RULES)]
    raise L2OError(f"--optimizer: unknown optimizer {name!r}; expected one of {known}")


def compare(
    task: Task,
    optimizers: Sequence[OptimizerSpec],
    steps: int = 100,
    problems: int = 100,
    tune_problems: int = 20,
    grid: Sequence[float] = DEFAULT_LR_GRID,
    rules: dict[str, UpdateRule] | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict:
    """Tune (when needed) and evaluate every optimizer on the same test problems.

    ``rules`` may supply already-built rules by spec name (learned rules loaded by
    the caller).  Returns the ``results.json`` dict.
    """
    test_seeds = stream("test", problems)
    described = getattr(task, "describe", lambda: {"task": task.name})()
    task = on_device(task, device)  # tuning and testing both run there
    out = {
        "task": described,
        "device": str(device),
        "steps": steps,
        "problems": problems,
        "tune_problems": tune_problems,
        "lr_grid": list(grid),
        "seed_streams": {"test": "test", "tune": "tune"},
        "optimizers": {},
    }
    out["task_name"] = task.name
    for spec in optimizers:
        t0 = time.perf_counter()
        entry: dict = {"kind": spec.kind}
        if spec.kind == "classic":
            cls = CLASSIC_RULES[spec.rule_name]
            hp = dict(spec.hparams)
            if "lr" not in hp:
                tuned = tune_lr(
                    lambda lr, cls=cls, hp=hp: cls(lr=lr, **hp), task, steps, tune_problems, grid
                )
                hp["lr"] = tuned.lr
                entry["tuning"] = {
                    "grid_scores": {repr(k): v for k, v in sorted(tuned.scores.items())},
                    "problems": tune_problems,
                    "metric": "sum_loss",
                }
                log(f"  tuned {spec.name}: lr={tuned.lr:g}")
            rule = cls(**hp)
            entry["hparams"] = rule.hparams
        else:
            rule = (rules or {}).get(spec.name) or load(spec.path)
            if torch.device(device).type != "cpu":
                rule = copy.deepcopy(rule).to(device)  # the caller's rule stays where it is
            cfg = read_config(spec.path)
            entry["hparams"] = {"path": spec.path, "rule": cfg.get("rule"), **cfg.get("config", {})}
        losses = evaluate_rule(rule, task, test_seeds, steps)
        entry.update(summarize(losses))
        entry["seconds"] = time.perf_counter() - t0
        out["optimizers"][spec.name] = entry
    return out
