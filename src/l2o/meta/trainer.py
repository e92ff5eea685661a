"""The outer loop: meta-training a learned rule by truncated BPTT.

One *meta-step* is one trajectory (an "epoch" in the official code): sample
``instances`` fresh problems (new functions, new theta0), zero optimizer state,
then optimize them for ``horizon`` steps in unrolls of ``unroll`` steps with one
Adam update of the meta-parameters per unroll (:mod:`l2o.meta.unroll`).

Problems come from seeds derived from (run seed, trajectory index), so which
problems a run sees does not depend on any RNG state: a run resumed from a
checkpoint replays exactly what an uninterrupted run would have done.  Bit-exact
equality also needs the same floating-point summation order, i.e. the same
torch/BLAS thread count (``OMP_NUM_THREADS=1`` guarantees it; MKL may use fewer
threads than asked on a loaded machine).

Safety rails:
* a non-finite meta-loss or meta-gradient skips the update (counted, logged),
  abandons that trajectory, and ``max_nonfinite`` in a row stop the run with
  :class:`~l2o.errors.NonFiniteError`, leaving the last good checkpoint intact;
* optional global-norm clipping of the meta-gradient and a cosine schedule;
* validation on held-out problems every ``val.every`` meta-steps keeps the best
  rule (meta-training is fast and unstable: DESIGN.md, "Known hazards").

Outputs in ``out_dir``: ``config.toml`` (resolved config), ``metrics.csv`` (one
row per meta-step), ``last.ckpt`` (resumable), ``best/`` and ``final/``
(inference artifacts for :func:`l2o.load`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import artifact, csvlog
from ..checkpoint import ensure_writable_dir, load_state_strict, load_tensors, save_tensors
from ..config import to_toml
from ..errors import CheckpointError, L2OError, NonFiniteError
from ..rules import build_learned_rule
from ..seeds import stream
from ..tasks import build_task
from ..tasks.base import Task
from .unroll import start, unroll

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
# Config keys that may differ when resuming (everything else must match the checkpoint).
RESUMABLE_CHANGES = {("train", "meta_steps")}


def role_task(task: Task, role: str) -> Task:
    """The task's variant for meta-training (``role="train"``) or validation (``"val"``).

    Tasks with data splits (``mnist-mlp``) implement ``for_role`` to pick the split
    that role uses; other tasks are returned unchanged.
    """
    fn = getattr(task, "for_role", None)
    return fn(role) if callable(fn) else task


def build_rule(rule_cfg: dict) -> nn.Module:
    cfg = {k: v for k, v in rule_cfg.items() if k not in ("name", "groups")}
    try:
        if rule_cfg.get("groups"):  # per-tensor rules by name pattern (l2o.rules.grouped)
            from ..rules.grouped import from_groups_json

            return from_groups_json(rule_cfg["groups"], cfg, rule_cfg["name"])
        return build_learned_rule(rule_cfg["name"], cfg)
    except L2OError:
        raise
    except (ValueError, TypeError) as e:
        raise L2OError(f"config section [rule]: {e}") from None


class MetaTrainer:
    """Meta-trains ``rule`` on ``task`` following a resolved config (:mod:`l2o.config`)."""

    def __init__(
        self,
        config: dict,
        out_dir: str | Path | None = None,
        *,
        task: Task | None = None,
        rule: nn.Module | None = None,
        progress: bool | None = None,
        callback: Callable[[MetaTrainer, dict], None] | None = None,
    ):
        self.cfg = config
        base = task if task is not None else build_task(config["task"])
        self.task = role_task(base, "train")
        # Validation problems: val.task if given, else the training task on its validation split.
        val_spec = config["val"].get("task")
        self.val_task = role_task(build_task(val_spec) if val_spec else base, "val")
        torch.manual_seed(config["seed"])
        self.rule = rule if rule is not None else build_rule(config["rule"])
        t = config["train"]
        self.opt = torch.optim.Adam(self.rule.parameters(), lr=t["meta_lr"])
        self.out = Path(out_dir) if out_dir is not None else None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.callback = callback
        self.meta_step = 0
        self.updates = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.best_val = math.inf
        self.best_step = -1
        self.elapsed = 0.0
        self.history: list[dict] = []
        # The cosine schedule's length is fixed when the run starts; extending
        # meta_steps on resume continues at the floor instead of rescaling it.
        self.schedule_meta_steps = t["meta_steps"]
        self.val_seeds = stream("val", config["val"]["problems"])

    # -- schedule ---------------------------------------------------------------
    @property
    def unroll_lengths(self) -> list[int]:
        T, U = self.cfg["train"]["horizon"], self.cfg["train"]["unroll"]
        return [U] * (T // U) + ([T % U] if T % U else [])

    def lr_at(self, update: int) -> float:
        t = self.cfg["train"]
        if t["lr_schedule"] == "constant":
            return t["meta_lr"]
        total = max(1, self.schedule_meta_steps * len(self.unroll_lengths))
        frac = min(1.0, update / total)
        floor = t["min_lr_ratio"]
        return t["meta_lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))

    # -- one meta-step ------------------------------------------------------------
    def trajectory_seeds(self, k: int) -> list[int]:
        return stream("train", self.cfg["train"]["instances"], self.cfg["seed"], k)

    def run_trajectory(self, k: int) -> dict:
        t = self.cfg["train"]
        seeds = self.trajectory_seeds(k)
        chunk = max(1, min(len(seeds), self.task.max_batch))
        groups = [seeds[i : i + chunk] for i in range(0, len(seeds), chunk)]
        trajs = [start(self.task.sample(g), self.rule) for g in groups]
        weights = [len(g) / len(seeds) for g in groups]
        total, final, grad_norm, ok = 0.0, math.nan, math.nan, True
        for length in self.unroll_lengths:
            self.opt.zero_grad(set_to_none=True)
            step_mean = 0.0
            for j, traj in enumerate(trajs):
                meta_loss, losses, trajs[j] = unroll(
                    self.rule,
                    traj,
                    length,
                    second_order=t["second_order"],
                    objective=t["objective"],
                )
                if not torch.isfinite(meta_loss):
                    ok = False
                    break
                (meta_loss * weights[j]).backward()
                step_mean = step_mean + losses.mean(1) * weights[j]
            if ok:
                grads = [p.grad for p in self.rule.parameters() if p.grad is not None]
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                )
                ok = bool(torch.isfinite(norm))
                grad_norm = float(norm)
            if not ok:
                # Skip the update and abandon the trajectory: its theta may be garbage.
                self.opt.zero_grad(set_to_none=True)
                self.skipped += 1
                self.consecutive_nonfinite += 1
                break
            if t["clip_norm"] > 0:
                nn.utils.clip_grad_norm_(self.rule.parameters(), t["clip_norm"])
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.updates)
            self.opt.step()
            self.updates += 1
            self.consecutive_nonfinite = 0
            total += float(step_mean.sum())
            final = float(step_mean[-1])
        return {
            "meta_loss": total if ok else math.nan,
            "final_loss": final if ok else math.nan,
            "grad_norm": grad_norm,
            "lr": self.lr_at(max(0, self.updates - 1)),
        }

    # -- validation -----------------------------------------------------------------
    def validate(self) -> float:
        from ..evaluate import evaluate_rule, sum_loss  # evaluate imports meta.unroll

        steps = self.cfg["val"]["steps"] or self.cfg["train"]["horizon"]
        return sum_loss(evaluate_rule(self.rule, self.val_task, self.val_seeds, steps))

    # -- the loop ----------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict:
        t, v = self.cfg["train"], self.cfg["val"]
        if self.out is not None:
            self._prepare_out(resume)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=t["meta_steps"], initial=self.meta_step, desc="meta-train", unit="traj"
            )
        t_start = time.perf_counter() - self.elapsed
        try:
            while self.meta_step < t["meta_steps"]:
                k = self.meta_step
                row = self.run_trajectory(k)
                self.meta_step += 1
                if self.consecutive_nonfinite >= t["max_nonfinite"]:
                    last = self.out / "last.ckpt" if self.out is not None else None
                    raise NonFiniteError(
                        f"meta-training stopped at meta-step {self.meta_step}: {self.consecutive_nonfinite} "
                        f"consecutive non-finite meta-losses or meta-gradients (train.max_nonfinite="
                        f"{t['max_nonfinite']}); try a smaller train.meta_lr or train.clip_norm > 0"
                        + (f"; last good checkpoint: {last}" if last and last.exists() else "")
                    )
                val = math.nan
                validate_now = v["every"] > 0 and (
                    self.meta_step % v["every"] == 0 or self.meta_step == t["meta_steps"]
                )
                if validate_now:
                    val = self.validate()
                    if val < self.best_val:
                        self.best_val, self.best_step = val, self.meta_step
                        if self.out is not None:
                            self._save_artifact("best", val)
                self.elapsed = time.perf_counter() - t_start
                row.update(
                    meta_step=self.meta_step,
                    val_sum_loss=val,
                    best_val_sum_loss=self.best_val,
                    skipped=self.skipped,
                    wall_time=round(self.elapsed, 3),
                )
                self.history.append(row)
                if self.out is not None:
                    csvlog.append(self.out / "metrics.csv", CSV_FIELDS, row)
                    every = t["checkpoint_every"]
                    if (
                        validate_now
                        or self.meta_step % every == 0
                        or self.meta_step == t["meta_steps"]
                    ):
                        self.save_checkpoint(self.out / "last.ckpt")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        meta_loss=f"{row['meta_loss']:.3g}",
                        best_val=f"{self.best_val:.3g}",
                        skipped=self.skipped,
                    )
                if self.callback is not None:
                    self.callback(self, row)
        finally:
            if bar is not None:
                bar.close()
        if self.out is not None:
            self._save_artifact("final", math.nan)
            if self.best_step < 0:
                # No finite validation (val.every = 0, or every validation diverged):
                # best/ is the final rule, so l2o.load(run) still works.
                if v["every"] > 0:
                    warnings.warn(
                        "no validation was finite; best/ holds the final rule", stacklevel=2
                    )
                self._save_artifact("best", math.nan)
        return {
            "meta_steps": self.meta_step,
            "updates": self.updates,
            "skipped": self.skipped,
            "best_val_sum_loss": self.best_val,
            "best_meta_step": self.best_step,
            "train_seconds": self.elapsed,
        }

    # -- files ---------------------------------------------------------------------------
    def _prepare_out(self, resume: bool) -> None:
        out = ensure_writable_dir(self.out, "--out")
        ckpt = out / "last.ckpt"
        if resume:
            if not ckpt.exists():
                raise CheckpointError(f"--resume: no checkpoint to resume from at {ckpt}")
            self.load_checkpoint(ckpt)
            csvlog.truncate(out / "metrics.csv", CSV_FIELDS, "meta_step", self.meta_step)
        elif ckpt.exists():
            raise L2OError(
                f"--out: {out} already holds a run (last.ckpt); pass --resume to continue it "
                "or choose another directory"
            )
        else:
            for stale in ("best", "final"):  # never let a fresh run load an older run's weights
                if (out / stale).is_dir():
                    shutil.rmtree(out / stale)
            csvlog.start(out / "metrics.csv", CSV_FIELDS)
        (out / "config.toml").write_text(to_toml(self.cfg))

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
        tensors = {f"rule.{k}": v for k, v in self.rule.state_dict().items()}
        osd = self.opt.state_dict()
        for idx, st in osd["state"].items():
            for key, value in st.items():
                tensors[f"optim.{idx}.{key}"] = (
                    value if torch.is_tensor(value) else torch.tensor(value)
                )
        tensors["rng.torch"] = torch.get_rng_state()
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
            for g in osd["param_groups"]
        ]
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
        }
        save_tensors(path, tensors, meta)

    def load_checkpoint(self, path: str | Path) -> None:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "training-checkpoint":
            raise CheckpointError(f"{path}: not a training checkpoint")
        self._check_config(meta["config"], path)
        rule_sd = {k[5:]: v for k, v in tensors.items() if k.startswith("rule.")}
        load_state_strict(self.rule, rule_sd, path)
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        groups = [
            {k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
            for g in meta["param_groups"]
        ]
        try:
            self.opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: meta-optimizer state does not match: {e}") from None
        torch.set_rng_state(tensors["rng.torch"])
        self.meta_step, self.updates, self.skipped = (
            meta["meta_step"],
            meta["updates"],
            meta["skipped"],
        )
        self.consecutive_nonfinite = meta["consecutive_nonfinite"]
        self.best_val = meta["best_val"] if meta["best_val"] is not None else math.inf
        self.best_step, self.elapsed = meta["best_step"], meta["elapsed"]
        self.schedule_meta_steps = meta["schedule_meta_steps"]

    def _check_config(self, saved: dict, path) -> None:
        diffs = []
        current = json.loads(json.dumps(self.cfg))  # tuples -> lists, as stored
        for section in set(saved) | set(current):
            a, b = saved.get(section), current.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                for key in set(a) | set(b):
                    if a.get(key) != b.get(key) and (section, key) not in RESUMABLE_CHANGES:
                        diffs.append(
                            f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}"
                        )
            elif a != b:
                diffs.append(f"{section}: checkpoint {a!r} vs now {b!r}")
        if diffs:
            raise CheckpointError(
                f"{path}: config differs from the checkpoint's: " + "; ".join(sorted(diffs))
            )
