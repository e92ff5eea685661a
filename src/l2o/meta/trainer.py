"""The outer loop of meta-training: one trainer, any meta-optimizer, any estimator.

One *meta-step* is one trajectory (an "epoch" in the official code): sample
``instances`` fresh problems (new functions, new theta0), zero optimizer state,
then optimize them for ``horizon`` steps cut into truncations of ``unroll`` steps,
with one meta-update per truncation.  Where each meta-gradient comes from is the
*gradient estimator*'s business (:mod:`l2o.meta.estimators`: truncated BPTT or
PES, ``train.estimator``); what is done with it is the trainer's, once:

* the meta-optimizer (any ``torch.optim.Optimizer``; Adam at ``train.meta_lr`` by
  default) and its ``lr_scheduler`` (the ``train.lr_schedule`` cosine or constant
  by default, a ``LambdaLR`` over meta-updates) are given to it or built from the
  config;
* a non-finite meta-loss or meta-gradient skips the update (counted, logged),
  abandons that trajectory, and ``max_nonfinite`` in a row stop the run with
  :class:`~l2o.errors.NonFiniteError`, leaving the last good checkpoint intact;
* optional global-norm clipping of the meta-gradient;
* validation on held-out problems every ``val.every`` meta-steps keeps the best
  rule (meta-training is fast and unstable);
* under ``torchrun`` (:mod:`l2o.meta.distributed`) each rank takes its share of
  the instances; meta-gradients, the non-finite flag and the logged losses are
  summed over ranks before anything is decided, validation problems are shared
  out the same way, and rank 0 alone writes.

Problems come from seeds derived from (run seed, trajectory index), so which
problems a run sees does not depend on any RNG state: a run resumed from a
checkpoint replays exactly what an uninterrupted run would have done.  Bit-exact
equality also needs the same floating-point summation order, i.e. the same
torch/BLAS thread count (``OMP_NUM_THREADS=1`` guarantees it).

Outputs in ``out_dir``: ``config.toml`` (resolved config), ``metrics.csv`` (one
row per meta-step), ``last.ckpt`` (resumable), ``best/`` and ``final/``
(inference artifacts for :func:`l2o.load`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import artifact
from ..checkpoint import (
    json_safe,
    load_optimizer,
    load_state_strict,
    load_tensors,
    optimizer_tensors,
    save_tensors,
)
from ..config import DEFAULTS, to_toml
from ..devices import resolve_device
from ..errors import CheckpointError, L2OError
from ..rules import RULE_CONFIGS, build_learned_rule
from ..rules.base import missing_rule_method
from ..seeds import derive_seed, stream
from ..tasks import build_task
from ..tasks.base import Task, on_device
from . import distributed
from .estimators import Estimate, build_estimator
from .loop import OuterLoop
from .updater import MetaUpdater

CSV_FIELDS = [
    "meta_step",
    "meta_loss",
    "final_loss",
    "val_sum_loss",
    "best_val_sum_loss",
    "lr",
    "grad_norm",
    "skipped",
    "wall_time",
]
# Config keys that may differ when resuming (everything else must match the checkpoint):
# the length of the run, and the device (checkpoints are device-free).
RESUMABLE_CHANGES = {("train", "meta_steps"), (None, "device")}


def role_task(task: Task, role: str) -> Task:
    """The task's variant for meta-training (``role="train"``) or validation (``"val"``).

    Tasks with data splits (``mnist-mlp``) implement ``for_role`` to pick the split
    that role uses; other tasks are returned unchanged.
    """
    fn = getattr(task, "for_role", None)
    return fn(role) if callable(fn) else task


def build_rule(rule_cfg: dict) -> nn.Module:
    cfg = {k: v for k, v in rule_cfg.items() if k not in ("name", "groups")}
    name = rule_cfg["name"]
    config_cls = RULE_CONFIGS.get(name)
    if config_cls is not None and not rule_cfg.get("groups"):
        # The [rule] section holds every rule's keys; a rule gets its own (a key the user
        # set for another rule is an error in l2o.config.resolve, never silently dropped).
        known = {f.name for f in dataclasses.fields(config_cls)}
        cfg = {k: v for k, v in cfg.items() if k in known}
    try:
        if rule_cfg.get("groups"):  # per-tensor rules by name pattern (l2o.rules.grouped)
            from ..rules.grouped import from_groups_json

            return from_groups_json(rule_cfg["groups"], cfg, rule_cfg["name"])
        return build_learned_rule(rule_cfg["name"], cfg)
    except L2OError:
        raise
    except (ValueError, TypeError) as e:
        raise L2OError(f"config section [rule]: {e}") from None


def warm_started_rule(rule_cfg: dict, path: str) -> nn.Module:
    """The rule of ``train.init_from``: a copy of the saved rule at ``path`` (its architecture
    and weights; the ``[rule]`` keys are not used), or with ``rule.groups`` a grouped rule
    whose every group starts as such a copy (the CIFAR LSTMs from one trained elsewhere).

    A saved grouped rule is used as it is and must have the configured groups' labels.
    """
    import copy

    from ..artifact import load
    from ..rules.grouped import GroupedRule

    try:
        src = load(path)
    except L2OError as e:
        raise L2OError(f"train.init_from: {e}") from None
    if not isinstance(src, nn.Module) or missing_rule_method(src) is not None:
        raise L2OError(
            f"train.init_from: {path} holds a {type(src).__name__}, not a learned update rule"
        )
    src.train().requires_grad_(True)  # artifacts load in eval mode
    if not rule_cfg.get("groups"):
        return src
    routing = build_rule(rule_cfg)  # the configured labels and patterns
    if isinstance(src, GroupedRule):
        if sorted(src.label_names) != sorted(routing.label_names):
            raise L2OError(
                f"train.init_from: {path} is a grouped rule with labels {src.label_names}; "
                f"rule.groups has {routing.label_names}"
            )
        return src
    rules = {label: copy.deepcopy(src) for label in routing.label_names}
    return GroupedRule(rules, labels=routing.labels)


def lr_factor(train_cfg: dict, update: int, scheduled_updates: int) -> float:
    """The ``train.lr_schedule`` multiplier of ``train.meta_lr`` at meta-update ``update``
    of a schedule ``scheduled_updates`` long."""
    if train_cfg["lr_schedule"] == "constant":
        return 1.0
    total = max(1, scheduled_updates)
    frac = min(1.0, update / total)
    floor = train_cfg["min_lr_ratio"]
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))


class MetaTrainer(OuterLoop):
    """Meta-trains ``rule`` on ``task`` following a resolved config (:mod:`l2o.config`).

    Args:
        config: a resolved config (:func:`l2o.config.resolve`).
        out_dir: run directory (``None``: nothing is written).
        task, rule: built from the config when not given.
        meta_optimizer: a ``torch.optim.Optimizer`` over ``rule.parameters()``, or a
            callable ``params -> Optimizer``; default Adam at ``train.meta_lr``.
        lr_scheduler: an ``lr_scheduler`` of that optimizer, or a callable
            ``optimizer -> scheduler``, stepped once per meta-update; default the
            ``train.lr_schedule`` (constant, or cosine to ``min_lr_ratio``).
        estimator: a gradient estimator (:mod:`l2o.meta.estimators`); default from
            ``train.estimator``.
        device: where the rule and the problems live; default the config's ``device``.

    The loop around the meta-steps (validation, best selection, non-finite policy,
    ``metrics.csv``, ``last.ckpt``, resume) is :class:`~l2o.meta.loop.OuterLoop`'s.
    """

    counter, unit, desc = "meta_step", "traj", "meta-train"
    stale_outputs = ("best", "final")

    def __init__(
        self,
        config: dict,
        out_dir: str | Path | None = None,
        *,
        task: Task | None = None,
        rule: nn.Module | None = None,
        progress: bool | None = None,
        callback: Callable[[MetaTrainer, dict], None] | None = None,
        meta_optimizer=None,
        lr_scheduler=None,
        estimator=None,
        device: str | torch.device | None = None,
    ):
        self.cfg = config
        t = config["train"]
        self.device = resolve_device(device if device is not None else config.get("device", "cpu"))
        self.world = distributed.init_from_env(str(self.device))
        if t["instances"] < self.world.size:
            raise L2OError(
                f"train.instances ({t['instances']}) must be at least the number of processes "
                f"({self.world.size}): each process optimizes its share of the instances"
            )
        base = task if task is not None else build_task(config["task"])
        self.task = role_task(base, "train")
        # Validation problems: val.task if given, else the training task on its validation split.
        val_spec = config["val"].get("task")
        self.val_task = role_task(build_task(val_spec) if val_spec else base, "val")
        # Problems are sampled where the rule runs (the same objects on the CPU).
        self.task, self.val_task = (
            on_device(self.task, self.device),
            on_device(self.val_task, self.device),
        )
        torch.manual_seed(config["seed"])
        if rule is not None:
            self.rule = rule
        elif t.get("init_from"):  # on resume too: last.ckpt then overwrites the weights
            self.rule = warm_started_rule(config["rule"], t["init_from"])
            self.validate_at_start = True  # the kept best is never worse than the start
        else:
            self.rule = build_rule(config["rule"])
        self.rule.to(self.device)  # before the meta-optimizer, so its state lives there too
        self.estimator = (
            estimator
            if estimator is not None
            else build_estimator(
                t["estimator"],
                second_order=t["second_order"],
                objective=t["objective"],
                sigma=t["pes_sigma"],
            )
        )
        if meta_optimizer is None:
            self.opt = torch.optim.Adam(self.rule.parameters(), lr=t["meta_lr"])
        elif isinstance(meta_optimizer, torch.optim.Optimizer):
            self.opt = meta_optimizer
        else:
            self.opt = meta_optimizer(self.rule.parameters())
        # The cosine schedule's length is fixed when the run starts; extending
        # meta_steps on resume continues at the floor instead of rescaling it.
        self.schedule_meta_steps = t["meta_steps"]
        if lr_scheduler is None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.opt,
                lambda u: lr_factor(self.cfg["train"], u, self.scheduled_updates),
            )
        elif isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            self.scheduler = lr_scheduler
        else:
            self.scheduler = lr_scheduler(self.opt)
        self.updater = MetaUpdater(
            list(self.rule.parameters()), self.opt, self.scheduler, t["clip_norm"], self.world
        )
        self.setup_loop(
            total=t["meta_steps"],
            out=out_dir,
            world=self.world,
            csv_fields=CSV_FIELDS,
            val_every=config["val"]["every"],
            checkpoint_every=t["checkpoint_every"],
            max_nonfinite=t["max_nonfinite"],
            progress=progress,
            callback=callback,
        )
        self.updates = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.last_lr = self.current_lr
        self.val_seeds = stream("val", config["val"]["problems"])

    # -- schedule ---------------------------------------------------------------
    def horizon_of(self, k: int) -> int:
        """Trajectory ``k``'s horizon: ``train.horizon``, or with ``train.horizon_min`` > 0 a
        log-uniform draw from [horizon_min, horizon] that depends only on (seed, k)."""
        t = self.cfg["train"]
        T, lo = t["horizon"], t["horizon_min"]
        if lo <= 0 or lo >= T:
            return T
        u = (derive_seed("horizon", self.cfg["seed"], k) % 2**53) / 2**53
        return min(T, max(lo, round(math.exp(math.log(lo) + u * (math.log(T) - math.log(lo))))))

    def unroll_lengths_of(self, k: int) -> list[int]:
        """The truncation lengths of trajectory ``k`` (``train.unroll`` each, the last shorter)."""
        T, U = self.horizon_of(k), self.cfg["train"]["unroll"]
        return [U] * (T // U) + ([T % U] if T % U else [])

    @property
    def scheduled_updates(self) -> int:
        """Meta-updates of the schedule's ``schedule_meta_steps`` trajectories (their horizons
        may differ), so the cosine schedule ends at its floor after the run's last update."""
        n = self.schedule_meta_steps
        cache = self.__dict__.setdefault("_scheduled_updates", {})
        if n not in cache:  # the scheduler asks at every update; a resume may change n
            cache[n] = sum(len(self.unroll_lengths_of(k)) for k in range(n))
        return cache[n]

    @property
    def current_lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    # -- one meta-step ------------------------------------------------------------
    def trajectory_seeds(self, k: int) -> list[int]:
        return stream("train", self.cfg["train"]["instances"], self.cfg["seed"], k)

    def run_trajectory(self, k: int) -> dict:
        seeds = self.trajectory_seeds(k)
        mine = distributed.shard(seeds, self.world)
        worker = self.estimator.init_worker_state(self.rule, self.task, mine, len(seeds), k)
        total, final, grad_norm, ok = 0.0, math.nan, math.nan, True
        for length in self.unroll_lengths_of(k):
            estimate, worker = self.estimator.compute_gradient_estimate(self.rule, worker, length)
            ok, grad_norm, step_mean = self.apply(estimate)
            if not ok:
                # Skip the update and abandon the trajectory: its theta may be garbage.
                break
            total += float(step_mean.sum())
            final = float(step_mean[-1])
        return {
            "meta_loss": total if ok else math.nan,
            "final_loss": final if ok else math.nan,
            "grad_norm": grad_norm,
            "lr": self.last_lr,
        }

    def apply(self, estimate: Estimate) -> tuple[bool, float, Tensor]:
        """One meta-update from ``estimate`` (:class:`~l2o.meta.updater.MetaUpdater`).

        Returns (updated, gradient norm, the summed per-step losses).
        """
        lr = self.current_lr
        ok, norm, losses = self.updater.apply(estimate)
        if ok:
            self.last_lr = lr
        self.updates, self.skipped = self.updater.updates, self.updater.skipped
        self.consecutive_nonfinite = self.updater.consecutive_nonfinite
        return ok, norm, losses

    # -- validation -----------------------------------------------------------------
    def validate(self) -> float:
        """Mean over the validation problems of their ``val.metric`` score (+inf: a run diverged)."""
        from ..evaluate import evaluate_rule, validation_scores  # evaluate imports meta.unroll

        steps = self.cfg["val"]["steps"] or self.cfg["train"]["horizon"]
        mine = distributed.shard(self.val_seeds, self.world)
        losses = evaluate_rule(self.rule, self.val_task, mine, steps)
        per = validation_scores(losses, self.cfg["val"]["metric"]).double()
        sums = torch.stack([torch.nan_to_num(per, nan=0.0, posinf=0.0, neginf=0.0).sum(),
                            (~torch.isfinite(per)).sum().double()])  # fmt: skip
        if self.world.distributed:
            sums = distributed.all_reduce_sum(sums.to(self.device), self.world)
        return math.inf if sums[1] > 0 else float(sums[0]) / len(self.val_seeds)

    # -- the loop (l2o.meta.loop.OuterLoop) ------------------------------------------------------
    def advance(self) -> dict:
        row = self.run_trajectory(self.meta_step)
        self.meta_step += 1
        return row

    def validation(self) -> dict:
        return {"score": self.validate()}

    def row(self, metrics: dict, validation: dict | None) -> dict:
        metrics.update(
            meta_step=self.meta_step,
            val_sum_loss=validation["score"] if validation is not None else math.nan,
            best_val_sum_loss=self.best_val,
            skipped=self.skipped,
            wall_time=round(self.elapsed, 3),
        )
        return metrics

    def postfix(self, metrics: dict) -> dict:
        return {
            "meta_loss": f"{metrics['meta_loss']:.3g}",
            "best_val": f"{self.best_val:.3g}",
            "skipped": self.skipped,
        }

    def nonfinite_message(self) -> str:
        t = self.cfg["train"]
        return (
            f"meta-training stopped at meta-step {self.meta_step}: {self.consecutive_nonfinite} "
            f"consecutive non-finite meta-losses or meta-gradients (train.max_nonfinite="
            f"{t['max_nonfinite']}); try a smaller train.meta_lr or train.clip_norm > 0"
        )

    def save_best(self) -> None:
        self._save_artifact("best", self.best_val)

    def save_final(self) -> None:
        self._save_artifact("final", math.nan)
        if self.best_step < 0:
            # No finite validation (val.every = 0, or every validation diverged):
            # best/ is the final rule, so l2o.load(run) still works.
            if self.val_every > 0:
                warnings.warn("no validation was finite; best/ holds the final rule", stacklevel=3)
            self._save_artifact("best", math.nan)

    def write_run_files(self) -> None:
        (self.out / "config.toml").write_text(to_toml(self.cfg))

    run_files_on_resume = write_run_files

    def summary(self) -> dict:
        return {
            "meta_steps": self.meta_step,
            "updates": self.updates,
            "skipped": self.skipped,
            "best_val_sum_loss": self.best_val,
            "best_meta_step": self.best_step,
            "train_seconds": self.elapsed,
            "processes": self.world.size,
        }

    # The loop's counters under the names this trainer has always had.
    meta_step = property(lambda s: s.position, lambda s, v: setattr(s, "position", v))
    best_val = property(lambda s: s.best_score, lambda s, v: setattr(s, "best_score", v))
    best_step = property(lambda s: s.best_position, lambda s, v: setattr(s, "best_position", v))

    # -- files ---------------------------------------------------------------------------
    def _save_artifact(self, name: str, val: float) -> None:
        artifact.save(
            self.rule,
            self.out / name,
            extra={
                "task": self.cfg["task"],
                "meta_step": self.meta_step,
                "val_sum_loss": val,
                "val_problems": self.cfg["val"]["problems"],
                "seed": self.cfg["seed"],
            },
        )

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the resumable state (rank 0; every rank contributes its RNG state)."""
        rng = distributed.gather_to_main(torch.get_rng_state(), self.world)
        if not self.world.is_main:
            return
        # Device-free: every tensor is written from the CPU.
        tensors = {f"rule.{k}": v.cpu() for k, v in self.rule.state_dict().items()}
        optim, groups = optimizer_tensors(self.opt)
        tensors.update(optim)
        tensors["rng.torch"] = rng[0]
        for r, state in enumerate(rng[1:], start=1):
            tensors[f"rng.torch.{r}"] = state
        meta = {
            "kind": "training-checkpoint",
            "config": self.cfg,
            "meta_step": self.meta_step,
            "updates": self.updates,
            "skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "elapsed": self.elapsed,
            "param_groups": groups,
            "schedule_meta_steps": self.schedule_meta_steps,
            "lr_scheduler": json_safe(self.scheduler.state_dict()),
            "last_lr": self.last_lr,
            "processes": self.world.size,
            "components": self.components(),
        }
        save_tensors(path, tensors, meta)

    def components(self) -> dict:
        """What the config does not say: the classes of the meta-optimizer, scheduler, estimator."""
        return {
            "meta_optimizer": type(self.opt).__name__,
            "lr_scheduler": type(self.scheduler).__name__,
            "estimator": getattr(self.estimator, "name", type(self.estimator).__name__),
        }

    def load_checkpoint(self, path: str | Path) -> None:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "training-checkpoint":
            raise CheckpointError(f"{path}: not a training checkpoint")
        self._check_config(meta["config"], path)
        saved = meta.get("components")
        if saved is not None and saved != self.components():
            diff = [f"{k}: checkpoint {v} vs now {self.components()[k]}"
                    for k, v in saved.items() if self.components().get(k) != v]  # fmt: skip
            raise CheckpointError(f"{path}: the run was trained with another " + "; ".join(diff))
        rule_sd = {k[5:]: v for k, v in tensors.items() if k.startswith("rule.")}
        load_state_strict(self.rule, rule_sd, path)
        load_optimizer(self.opt, tensors, meta["param_groups"], path, self.device)
        rank_rng = f"rng.torch.{self.world.rank}" if self.world.rank else "rng.torch"
        if rank_rng in tensors:
            torch.set_rng_state(tensors[rank_rng])
        self.meta_step, self.updates, self.skipped = (
            meta["meta_step"],
            meta["updates"],
            meta["skipped"],
        )
        self.consecutive_nonfinite = meta["consecutive_nonfinite"]
        self.updater.updates, self.updater.skipped = self.updates, self.skipped
        self.updater.consecutive_nonfinite = self.consecutive_nonfinite
        self.best_val = meta["best_val"] if meta["best_val"] is not None else math.inf
        self.best_step, self.elapsed = meta["best_step"], meta["elapsed"]
        self.schedule_meta_steps = meta["schedule_meta_steps"]
        if "lr_scheduler" in meta:
            self.scheduler.load_state_dict({**self.scheduler.state_dict(), **meta["lr_scheduler"]})
        else:
            # A checkpoint from before the scheduler object: the schedule is a function of
            # the update counter, so put the scheduler where that counter says.
            self.scheduler.last_epoch = self.updates
            for g, base in zip(self.opt.param_groups, self.scheduler.base_lrs, strict=True):
                g["lr"] = base * lr_factor(self.cfg["train"], self.updates, self.scheduled_updates)
        self.last_lr = meta.get("last_lr", self.current_lr)

    def _check_config(self, saved: dict, path) -> None:
        diffs = []
        current = json.loads(json.dumps(self.cfg))  # tuples -> lists, as stored
        defaults = json.loads(json.dumps(DEFAULTS))
        for section in set(saved) | set(current):
            a, b = saved.get(section), current.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                for key in set(a) | set(b):
                    if key not in a and b.get(key) == defaults.get(section, {}).get(key):
                        continue  # a key added after the checkpoint was written, at its default
                    if a.get(key) != b.get(key) and (section, key) not in RESUMABLE_CHANGES:
                        diffs.append(
                            f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}"
                        )
            elif a != b and (None, section) not in RESUMABLE_CHANGES:
                if section not in saved and b == defaults.get(section):
                    continue
                diffs.append(f"{section}: checkpoint {a!r} vs now {b!r}")
        if diffs:
            raise CheckpointError(
                f"{path}: config differs from the checkpoint's: " + "; ".join(sorted(diffs))
            )
