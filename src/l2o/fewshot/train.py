"""Episodic meta-training (Ravi & Larochelle 2017, Algorithm 1; Finn et al. 2017).

One meta-update consumes ``meta_batch`` training episodes (1 for the Meta-Learner
LSTM, as in the paper): the mean query cross-entropy after adaptation is
backpropagated to the meta-parameters, the global gradient norm is clipped
(0.25 in the paper; off for MAML) and Adam takes a step.  Training episode ``i`` is
episode ``i`` of a sampler seeded from the run seed, a pure function of
``(seed, i)``, so a resumed run replays exactly the episodes an uninterrupted run
would have seen.  The meta-learning rate is constant (the paper) or follows a cosine
from ``meta_lr`` to 0 over ``meta_steps`` episodes (``meta_lr_schedule="cosine"``): a
function of the episode counter, so resuming needs no scheduler state.
``init_lr_scale`` multiplies the rate of the learned initialisation alone (the
Meta-LSTM's ``c_I``; 1 is the paper, 0 keeps it where it started).

Every ``val_every`` episodes the model is scored on a fixed list of validation
episodes (the paper's meta-test BN protocol, ``val_bn_mode``); the best is kept.

Outputs in ``out``: ``config.json``, ``metrics.csv`` (one row per validation),
``last.ckpt`` (resumable: meta-parameters, Adam state, counters), ``best.safetensors``
and ``final.safetensors`` (models for :func:`l2o.fewshot.load`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint import (
    atomic_write_text,
    json_safe,
    load_optimizer,
    load_state_strict,
    load_tensors,
    optimizer_tensors,
    save_tensors,
)
from ..errors import CheckpointError, L2OError
from ..meta import distributed
from ..meta.estimators import Episodic
from ..meta.loop import OuterLoop
from ..meta.updater import MetaUpdater
from .api import save_model
from .base import FewShotMethod
from .evaluate import run_episodes, summarize

CSV_FIELDS = [
    "episode",
    "updates",
    "train_loss",
    "train_accuracy",
    "val_accuracy",
    "val_ci95",
    "best_val_accuracy",
    "wall_time",
]


META_LR_SCHEDULES = ("constant", "cosine")


def _separate_init(model: FewShotMethod) -> torch.nn.Parameter | None:
    """The method's learned initialisation when it has other meta-parameters beside it (the
    Meta-LSTM's ``c_I``); None where it has none (baselines) or is nothing else (MAML)."""
    try:
        init = model.initial_params()
    except L2OError:
        return None
    return init if any(p is not init for p in model.parameters()) else None


class EpisodicTrainer(OuterLoop):
    """Meta-trains ``model`` on ``train_sampler`` episodes, validating on ``val_episodes``.

    ``meta_optimizer`` (a ``torch.optim.Optimizer`` over the model's parameters, or a
    callable ``params -> Optimizer``) and ``lr_scheduler`` (or ``optimizer -> scheduler``,
    stepped once per meta-update) may be given; by default Adam at ``meta_lr`` whose rate
    follows ``meta_lr_schedule`` as a function of the episode counter.  The loop around
    the meta-updates (validation, best selection, non-finite policy, ``metrics.csv``,
    ``last.ckpt``, resume) is :class:`~l2o.meta.loop.OuterLoop`'s.
    """

    counter, unit = "episode", "ep"
    maximize = True  # validation accuracy

    def __init__(
        self,
        model: FewShotMethod,
        train_sampler,
        val_episodes: list,
        out: str | Path,
        meta_steps: int,
        val_every: int = 1000,
        meta_lr: float = 1e-3,
        clip: float | None = 0.25,
        meta_batch: int = 1,
        val_bn_mode: str = "support-running",
        run_info: dict | None = None,
        progress: bool | None = None,
        max_nonfinite: int = 20,
        device: str | torch.device | None = None,
        meta_lr_schedule: str = "constant",
        init_lr_scale: float = 1.0,
        meta_optimizer=None,
        lr_scheduler=None,
        callback=None,
    ):
        if meta_lr_schedule not in META_LR_SCHEDULES:
            raise L2OError(
                f"meta_lr_schedule must be one of {META_LR_SCHEDULES}, got {meta_lr_schedule!r}"
            )
        init_lr_scale = float(init_lr_scale)
        if not (math.isfinite(init_lr_scale) and init_lr_scale >= 0):
            raise L2OError(f"init_lr_scale must be a finite number >= 0, got {init_lr_scale}")
        if init_lr_scale != 1.0 and _separate_init(model) is None:
            raise L2OError(
                f"init_lr_scale: {model.method} has no learned initialisation apart from its "
                f"other meta-parameters (use meta_lr instead)"
            )
        if device is not None:
            model.to(device)  # before Adam is built, so its state lives there too
        self.model = model
        self.sampler = train_sampler
        self.val_episodes = val_episodes
        self.meta_steps = int(meta_steps)
        self.meta_batch = int(meta_batch)
        self.clip = clip
        self.val_bn_mode = val_bn_mode
        self.run_info = dict(run_info or {})
        self.meta_lr = float(meta_lr)
        self.meta_lr_schedule = meta_lr_schedule
        self.init_lr_scale = init_lr_scale
        if meta_optimizer is None:
            self.opt = torch.optim.Adam(self._param_groups(), lr=meta_lr)
        elif isinstance(meta_optimizer, torch.optim.Optimizer):
            self.opt = meta_optimizer
        else:
            self.opt = meta_optimizer(list(model.parameters()))
        # The default rate is set per update from the episode counter (current_meta_lr); a
        # scheduler given here takes that over.
        self.own_schedule = meta_optimizer is None and lr_scheduler is None
        if lr_scheduler is None or isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            self.scheduler = lr_scheduler
        else:
            self.scheduler = lr_scheduler(self.opt)
        self.estimator = Episodic(train_sampler)
        # Under torchrun each rank adapts its share of every meta-batch's episodes; the
        # updater sums the meta-gradients over ranks before the NaN check and clipping.
        world = distributed.init_from_env(str(model.device))
        self.updater = MetaUpdater(
            list(model.parameters()), self.opt, self.scheduler, clip or 0.0, world
        )
        self.setup_loop(
            total=self.meta_steps,
            out=out,
            world=world,
            csv_fields=CSV_FIELDS,
            val_every=val_every,
            max_nonfinite=max_nonfinite,
            progress=progress,
            callback=callback,
        )
        self.desc = f"meta-train {model.method}"
        self.updates = 0
        self.window: list[tuple[float, float]] = []  # training (loss, accuracy) since the last row

    # The loop's counters under the names this trainer has always had.
    episode = property(lambda s: s.position, lambda s, v: setattr(s, "position", v))
    best_val = property(lambda s: s.best_score, lambda s, v: setattr(s, "best_score", v))
    best_episode = property(lambda s: s.best_position, lambda s, v: setattr(s, "best_position", v))

    def _param_groups(self) -> list[dict]:
        # Why a separate rate for c_I: it holds every learner weight (about 30k on Conv-4),
        # the LSTM about 1k, and on 5-shot Omniglot c_I fits the training classes within a
        # few hundred episodes; slowing it alone regularises the initialisation without
        # slowing the update rule.  One group at scale 1, so older checkpoints still resume.
        params = list(self.model.parameters())
        if self.init_lr_scale == 1.0:
            return [{"params": params, "lr_scale": 1.0}]
        init = _separate_init(self.model)
        return [
            {"params": [p for p in params if p is not init], "lr_scale": 1.0},
            {"params": [init], "lr_scale": self.init_lr_scale},
        ]

    # -- one meta-update --------------------------------------------------------------
    def current_meta_lr(self) -> float:
        if self.meta_lr_schedule == "constant":
            return self.meta_lr
        return 0.5 * self.meta_lr * (1.0 + math.cos(math.pi * self.episode / self.meta_steps))

    def meta_update(self) -> tuple[float, float]:
        """One meta-update: the episodic estimate of the next meta-batch, applied by the
        meta-trainer's :class:`~l2o.meta.updater.MetaUpdater` (clip, NaN skip, step).

        Returns the meta-batch's mean query (loss, accuracy); NaN when the update was skipped.
        """
        if self.own_schedule:
            for group in self.opt.param_groups:
                group["lr"] = self.current_meta_lr() * group.get("lr_scale", 1.0)
        n = min(self.meta_batch, self.meta_steps - self.episode)
        mine = distributed.shard(range(self.episode, self.episode + n), self.world)
        worker = self.estimator.init_worker_state(self.model, None, mine, n)
        estimate, _ = self.estimator.compute_gradient_estimate(self.model, worker)
        self.episode += n
        ok, _, logged = self.updater.apply(estimate)
        if not ok:
            return math.nan, math.nan
        self.updates += 1
        if self.world.distributed:  # the logged means, summed over ranks by the updater
            return float(logged[0]), float(logged[1])
        losses, accs = estimate.metrics["losses"], estimate.metrics["accuracies"]
        return sum(losses) / n, sum(accs) / n

    def validate(self) -> dict:
        was = self.model.training
        self.model.eval()
        accs = run_episodes(self.model, self.val_episodes, self.val_bn_mode)
        self.model.train(was)
        return summarize(accs)

    # -- the loop (l2o.meta.loop.OuterLoop) ------------------------------------------------------
    def advance(self) -> dict:
        loss, acc = self.meta_update()
        if math.isfinite(loss):
            self.window.append((loss, acc))
        return {"loss": loss}

    def validation(self) -> dict:
        val = self.validate()
        return {"score": val["accuracy"], **val}

    def row(self, metrics: dict, validation: dict | None) -> dict | None:
        if validation is None:  # one row per validation, with the training means since the last
            return None
        w = self.window
        row = {
            "episode": self.episode,
            "updates": self.updates,
            "train_loss": f"{sum(x[0] for x in w) / max(len(w), 1):.5f}",
            "train_accuracy": f"{100 * sum(x[1] for x in w) / max(len(w), 1):.3f}",
            "val_accuracy": f"{validation['accuracy']:.3f}",
            "val_ci95": f"{validation['ci95']:.3f}",
            "best_val_accuracy": f"{self.best_val:.3f}",
            "wall_time": f"{self.train_seconds:.1f}",
        }
        self.window = []
        return row

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.3f}", "best_val": f"{self.best_val:.1f}"}

    def nonfinite_message(self) -> str:
        return (
            f"{self.max_nonfinite} non-finite meta-updates in a row at episode {self.episode}; "
            f"last good checkpoint kept in {self.out}"
        )

    def save_best(self) -> None:
        save_model(
            self.model, self.out / "best.safetensors", selection=self.selection(), run=self.run_info
        )

    def save_final(self) -> None:
        save_model(
            self.model,
            self.out / "final.safetensors",
            selection={"rule": "final parameters", "episode": self.episode},
            run=self.run_info,
        )

    def selection(self) -> dict:
        return {
            "rule": f"best mean accuracy on {len(self.val_episodes)} fixed validation episodes "
            f"(BN {self.val_bn_mode}), checked every {self.val_every} training episodes",
            "episode": self.best_episode,
            "val_accuracy": self.best_val,
        }

    def summary(self) -> dict:
        return {
            "method": self.model.method,
            "episodes": self.episode,
            "updates": self.updates,
            "train_seconds": self.train_seconds,
            "best_val_accuracy": self.best_val,
            "best_episode": self.best_episode,
        }

    # -- files ----------------------------------------------------------------------------
    def write_run_files(self) -> None:
        atomic_write_text(
            self.out / "config.json",
            json.dumps(
                {
                    "method": self.model.method,
                    "config": self.model.config_dict(),
                    "meta_steps": self.meta_steps,
                    "val_every": self.val_every,
                    "val_episodes": len(self.val_episodes),
                    "meta_batch": self.meta_batch,
                    "meta_lr": self.meta_lr,
                    "meta_lr_schedule": self.meta_lr_schedule,
                    "init_lr_scale": self.init_lr_scale,
                    "clip": self.clip,
                    "val_bn_mode": self.val_bn_mode,
                    **self.run_info,
                },
                indent=2,
            )
            + "\n",
        )

    def save_checkpoint(self, path: Path) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt_tensors, groups = optimizer_tensors(self.opt)
        tensors.update(opt_tensors)
        meta = {
            "kind": "l2o-fewshot-train",
            "method": self.model.method,
            "config": self.model.config_dict(),
            "episode": self.episode,
            "updates": self.updates,
            "best_val": self.best_val,
            "best_episode": self.best_episode,
            "train_seconds": self.train_seconds,
            "meta_batch": self.meta_batch,
            "sampler_seed": self.sampler.seed,
            "meta_lr": self.meta_lr,
            "meta_lr_schedule": self.meta_lr_schedule,
            "init_lr_scale": self.init_lr_scale,
            "meta_steps": self.meta_steps,
            "skipped": self.updater.skipped,
            "consecutive_nonfinite": self.updater.consecutive_nonfinite,
            "components": self.components(),
            "param_groups": groups,
        }
        if self.scheduler is not None:
            meta["lr_scheduler"] = json_safe(self.scheduler.state_dict())
        save_tensors(path, tensors, meta)

    def components(self) -> dict:
        """What the options do not say: the classes of the meta-optimizer and scheduler."""
        return {
            "meta_optimizer": type(self.opt).__name__,
            "lr_scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
        }

    def load_checkpoint(self, path: Path) -> None:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "l2o-fewshot-train":
            raise CheckpointError(f"{path}: not a few-shot training checkpoint")
        if meta["method"] != self.model.method or meta["config"] != self.model.config_dict():
            raise CheckpointError(
                f"{path}: was written by a {meta['method']} run with another configuration; "
                f"resume with the same options"
            )
        if meta["sampler_seed"] != self.sampler.seed or meta["meta_batch"] != self.meta_batch:
            raise CheckpointError(f"{path}: --seed or meta-batch differ from the run being resumed")
        # older checkpoints predate the schedule: constant-rate runs, rate in Adam's groups
        saved = (
            meta.get("meta_lr", meta["param_groups"][0]["lr"]),
            meta.get("meta_lr_schedule", "constant"),
        )
        if saved != (self.meta_lr, self.meta_lr_schedule):
            raise CheckpointError(
                f"{path}: was trained with meta-lr {saved[0]} ({saved[1]}); resume with the same "
                f"--meta-lr and --meta-lr-schedule"
            )
        saved_scale = meta.get("init_lr_scale", 1.0)  # older checkpoints: one rate for all
        if saved_scale != self.init_lr_scale:
            raise CheckpointError(
                f"{path}: was trained with init-lr-scale {saved_scale}; resume with the same "
                f"--init-lr-scale"
            )
        if self.meta_lr_schedule == "cosine" and meta.get("meta_steps") != self.meta_steps:
            raise CheckpointError(
                f"{path}: the cosine meta-lr runs over --meta-steps {meta.get('meta_steps')}; "
                f"resume with the same --meta-steps"
            )
        load_state_strict(
            self.model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path
        )
        saved_components = meta.get("components")  # older checkpoints: the default Adam
        if saved_components is not None and saved_components != self.components():
            raise CheckpointError(
                f"{path}: the run was trained with {saved_components}, this one has "
                f"{self.components()}"
            )
        load_optimizer(self.opt, tensors, meta["param_groups"], path, self.model.device)
        if self.scheduler is not None and "lr_scheduler" in meta:
            self.scheduler.load_state_dict({**self.scheduler.state_dict(), **meta["lr_scheduler"]})
        self.updater.skipped = meta.get("skipped", 0)
        self.updater.consecutive_nonfinite = meta.get("consecutive_nonfinite", 0)
        self.episode, self.updates = meta["episode"], meta["updates"]
        self.best_val, self.best_episode = meta["best_val"], meta["best_episode"]
        self.train_seconds = meta["train_seconds"]
