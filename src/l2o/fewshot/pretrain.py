"""Pre-training of the fine-tune and nearest-neighbour baselines, on the one outer loop.

The Conv-4 is trained as an ordinary classifier over every meta-train class
(:class:`~l2o.fewshot.baselines.Pretraining`, one minibatch per step); every ``val_every``
steps its body is scored by nearest-neighbour accuracy on the fixed validation episodes
and the best body is kept.  At the end the model gets that body (fine-tune then picks its
learning rate and step count on the same episodes) and is written to
``best.safetensors``.  Validation, ``metrics.csv``, ``last.ckpt`` and ``--resume`` are
:class:`~l2o.meta.loop.OuterLoop`'s, as for the meta-trained methods: a killed
pre-training resumes exactly (weights, Adam, the data order's generator, the best body).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..checkpoint import (
    atomic_write_text,
    load_optimizer,
    load_state_strict,
    load_tensors,
    optimizer_tensors,
    save_tensors,
)
from ..errors import CheckpointError
from ..meta import distributed
from ..meta.loop import OuterLoop
from .api import save_model
from .baselines import FineTune, NearestNeighbour, Pretraining, tune_finetune
from .evaluate import run_episodes, summarize

CSV_FIELDS = ["step", "train_loss", "val_nn_accuracy", "val_ci95"]


class Pretrainer(OuterLoop):
    """Pre-trains ``model``'s body on ``train_ds`` for ``steps`` minibatches."""

    counter, unit, desc = "step", "batch", "pre-train"
    maximize = True  # nearest-neighbour validation accuracy

    def __init__(
        self,
        model,
        train_ds,
        val_episodes: list,
        out: str | Path,
        steps: int,
        val_every: int,
        bn_mode: str = "support-running",
        seed: int = 0,
        run_info: dict | None = None,
        progress: bool | None = None,
        device: str | torch.device = "cpu",
    ):
        model.to(device)
        self.model = model
        self.val_episodes = val_episodes
        self.bn_mode = bn_mode
        self.seed = int(seed)
        self.run_info = dict(run_info or {})
        self.run = Pretraining(train_ds, model.learner_config, seed=self.seed, device=device)
        self.nn_model = NearestNeighbour(model.learner_config).to(device)
        self.best_body = self.run.body.clone()
        self.tuning = None
        self.last_loss = math.nan
        # Supervised training of one network: one process (torchrun is for the episodic methods).
        self.setup_loop(
            total=steps,
            out=out,
            world=distributed.World(),
            csv_fields=CSV_FIELDS,
            val_every=val_every,
            max_nonfinite=1,
            progress=progress,
        )

    def nonfinite_in_a_row(self) -> int:
        return 0 if math.isfinite(self.last_loss) else 1  # checked after each step

    def nonfinite_message(self) -> str:
        return f"pre-training loss became {self.last_loss} at step {self.position}"

    # -- the loop (l2o.meta.loop.OuterLoop) ------------------------------------------------------
    def advance(self) -> dict:
        self.last_loss = self.run.step()
        self.position += 1
        return {"loss": self.last_loss}

    def validation(self) -> dict:
        with torch.no_grad():
            self.nn_model.body.copy_(self.run.body)
        s = summarize(run_episodes(self.nn_model, self.val_episodes, self.bn_mode))
        return {"score": s["accuracy"], **s}

    def save_best(self) -> None:
        self.best_body = self.run.body.clone()

    def row(self, metrics: dict, validation: dict | None) -> dict | None:
        if validation is None:
            return None
        return {
            "step": self.position,
            "train_loss": f"{metrics['loss']:.5f}",
            "val_nn_accuracy": f"{validation['accuracy']:.3f}",
            "val_ci95": f"{validation['ci95']:.3f}",
        }

    def postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.3f}", "best_val": f"{self.best_score:.1f}"}

    def save_final(self) -> None:
        with torch.no_grad():
            self.model.body.copy_(self.best_body)
        if isinstance(self.model, FineTune):
            self.tuning = tune_finetune(self.model, self.val_episodes, self.bn_mode)
        selection = {
            "rule": f"pre-training step with the best nearest-neighbour accuracy on "
            f"{len(self.val_episodes)} fixed validation episodes; fine-tune lr/steps chosen on "
            f"the same episodes",
            "episode": self.best_position,
            "val_accuracy": self.best_score,
            "tuning": self.tuning,
        }
        save_model(
            self.model, self.out / "best.safetensors", selection=selection, run=self.run_info
        )

    def write_run_files(self) -> None:
        atomic_write_text(
            self.out / "config.json",
            json.dumps(
                {
                    "method": self.model.method,
                    "config": self.model.config_dict(),
                    "pretrain_steps": self.total,
                    "val_every": self.val_every,
                    "val_episodes": len(self.val_episodes),
                    "val_bn_mode": self.bn_mode,
                    **self.run_info,
                },
                indent=2,
            )
            + "\n",
        )

    def summary(self) -> dict:
        val_acc = self.tuning["chosen"]["val_accuracy"] if self.tuning else self.best_score
        return {
            "method": self.model.method,
            "pretrain_steps": self.position,
            "train_seconds": self.train_seconds,
            "best_val_accuracy": val_acc,
            "best_step": self.best_position,
            "tuning": self.tuning,
        }

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        opt_tensors, groups = optimizer_tensors(self.run.opt)
        tensors = {
            "theta": self.run.theta.detach().cpu(),
            "best_body": self.best_body.cpu(),
            "data.order": self.run.order,
            "data.generator": self.run.gen.get_state(),
            **opt_tensors,
        }
        meta = {
            "kind": "l2o-fewshot-pretrain",
            "method": self.model.method,
            "config": self.model.config_dict(),
            "seed": self.seed,
            "steps": self.total,
            "step": self.position,
            "data_pos": self.run.pos,
            "best_val": self.best_score,
            "best_step": self.best_position,
            "train_seconds": self.train_seconds,
            "param_groups": groups,
        }
        save_tensors(path, tensors, meta)

    def load_checkpoint(self, path: Path) -> None:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "l2o-fewshot-pretrain":
            raise CheckpointError(f"{path}: not a few-shot pre-training checkpoint")
        if meta["method"] != self.model.method or meta["config"] != self.model.config_dict():
            raise CheckpointError(
                f"{path}: was written by a {meta['method']} run with another configuration; "
                "resume with the same options"
            )
        if meta["seed"] != self.seed:
            raise CheckpointError(
                f"{path}: --seed {meta['seed']} differs from this run's {self.seed}"
            )
        theta = self.run.theta
        load_state_strict(_Holder(theta), {"theta": tensors["theta"]}, path)
        self.best_body = tensors["best_body"].to(theta.device)
        self.run.order, self.run.pos = tensors["data.order"], meta["data_pos"]
        self.run.gen.set_state(tensors["data.generator"])
        load_optimizer(self.run.opt, tensors, meta["param_groups"], path, theta.device)
        self.position = meta["step"]
        self.best_score, self.best_position = meta["best_val"], meta["best_step"]
        self.train_seconds = meta["train_seconds"]


class _Holder(torch.nn.Module):
    """One tensor as a module, so :func:`load_state_strict` checks its shape and dtype."""

    def __init__(self, theta):
        super().__init__()
        self.theta = theta
