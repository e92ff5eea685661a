"""The outer loop of meta-training, written once for every trainer.

    class MyTrainer(OuterLoop):
        def advance(self) -> dict: ...          # one meta-step; moves self.position on
        def validation(self) -> dict: ...       # {"score": float, ...}
        def save_best(self) / save_final(self)  # inference artifacts
        def save_checkpoint(self, path) / load_checkpoint(self, path)
        def write_run_files(self)               # config of a fresh run
        def row(self, metrics, validation) -> dict | None   # one metrics.csv row

    summary = MyTrainer(...).train(resume=True)

What a meta-step *is* belongs to the subclass: a trajectory of L2L meta-training
(:class:`~l2o.meta.trainer.MetaTrainer`), a meta-batch of few-shot episodes
(:class:`~l2o.fewshot.train.EpisodicTrainer`) or a minibatch of supervised
pre-training (:class:`~l2o.fewshot.pretrain.Pretrainer`).  What happens around it is
this loop's, and nowhere else:

* the run directory: a fresh run refuses a directory that already holds one; ``--resume``
  continues from ``last.ckpt`` exactly, and starts from scratch (one notice) where there is
  no checkpoint yet, because job scripts pass ``--resume`` on every (re)start;
* the non-finite policy: the updater (:class:`~l2o.meta.updater.MetaUpdater`) skips a
  non-finite meta-update; ``max_nonfinite`` skipped in a row stop the run with
  :class:`~l2o.errors.NonFiniteError`, leaving the last good checkpoint intact;
* validation every ``val_every`` units of progress and at the end, the best score kept
  (lower is better, or higher with ``maximize``);
* ``metrics.csv`` (truncated on resume to the checkpoint's position), the progress bar,
  ``last.ckpt`` at every validation and every ``checkpoint_every`` units;
* under ``torchrun`` every rank runs the loop; rank 0 alone writes.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .. import csvlog
from ..checkpoint import ensure_writable_dir
from ..errors import L2OError, NonFiniteError
from . import distributed


class OuterLoop:
    """The loop and its bookkeeping; subclasses say what one meta-step and a validation are."""

    #: the counter's name (the checkpoint's, the CSV's first column) and its progress-bar unit
    counter = "meta_step"
    unit = "step"
    desc = "meta-train"
    #: a better validation score is higher (accuracy) rather than lower (sum of losses)
    maximize = False
    #: directories of an older run that a fresh run must remove (they hold its weights)
    stale_outputs: tuple[str, ...] = ()
    #: validate before the first meta-step of a fresh run (a warm start's starting point)
    validate_at_start = False

    def setup_loop(
        self,
        *,
        total: int,
        out: str | Path | None,
        world: distributed.World,
        csv_fields: list[str],
        val_every: int,
        checkpoint_every: int = 0,
        max_nonfinite: int = 10,
        progress: bool | None = None,
        callback: Callable | None = None,
    ) -> None:
        """The loop's settings and counters (called by the subclass's ``__init__``)."""
        self.total = int(total)
        self.out = Path(out) if out is not None else None
        self.world = world
        self.csv_fields = csv_fields
        self.val_every = int(val_every)
        self.checkpoint_every = int(checkpoint_every)  # 0: at validations (and the end) only
        self.max_nonfinite = int(max_nonfinite)
        self.progress = (sys.stderr.isatty() and world.is_main) if progress is None else progress
        self.callback = callback
        self.position = 0  # units of progress done (meta-steps, episodes, minibatches)
        self.best_score = -math.inf if self.maximize else math.inf
        self.best_position = -1
        self.elapsed = 0.0  # wall-clock seconds of the run, validation included
        self.train_seconds = 0.0  # ... spent in meta-steps alone
        self.history: list[dict] = []

    # -- what subclasses provide -------------------------------------------------------------
    def advance(self) -> dict:
        """One meta-step: move ``self.position`` on, return its metrics."""
        raise NotImplementedError

    def validation(self) -> dict:
        """``{"score": float, ...}`` on the held-out problems or episodes."""
        raise NotImplementedError

    def row(self, metrics: dict, validation: dict | None) -> dict | None:
        """The ``metrics.csv`` row of this meta-step (``None``: no row)."""
        raise NotImplementedError

    def save_best(self) -> None: ...

    def save_final(self) -> None: ...

    def write_run_files(self) -> None:
        """Files of a fresh run (its configuration), written once by rank 0."""

    def run_files_on_resume(self) -> None:
        """Files rewritten when a run resumes (by rank 0)."""

    def save_checkpoint(self, path: Path) -> None:
        raise NotImplementedError

    def load_checkpoint(self, path: Path) -> None:
        raise NotImplementedError

    def nonfinite_in_a_row(self) -> int:
        return self.updater.consecutive_nonfinite

    def nonfinite_message(self) -> str:
        return (
            f"meta-training stopped at {self.counter.replace('_', '-')} {self.position}: "
            f"{self.nonfinite_in_a_row()} consecutive non-finite meta-losses or meta-gradients "
            f"(max_nonfinite={self.max_nonfinite}); try a smaller meta-lr or a gradient clip"
        )

    def summary(self) -> dict:
        raise NotImplementedError

    # -- the loop --------------------------------------------------------------------------------
    def better(self, score: float) -> bool:
        return score > self.best_score if self.maximize else score < self.best_score

    def due(self, before: int, every: int) -> bool:
        """Whether a multiple of ``every`` was crossed between ``before`` and now."""
        return every > 0 and self.position // every > before // every

    def train(self, resume: bool = False) -> dict:
        main = self.world.is_main
        if self.out is not None:
            self.prepare_out(resume)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.position, desc=self.desc, unit=self.unit)
        t_start = time.perf_counter() - self.elapsed
        try:
            if self.position == 0 and self.validate_at_start and self.val_every > 0:
                # A warm start is scored before its first step, so that the kept best is never
                # worse than where the run started.
                val = self.validate_and_keep_best(main)
                self.elapsed = time.perf_counter() - t_start
                row = self.row({}, val)
                if self.out is not None and main and row is not None:
                    csvlog.append(self.out / "metrics.csv", self.csv_fields, row)
            while self.position < self.total:
                before = self.position
                t0 = time.perf_counter()
                metrics = self.advance()
                self.train_seconds += time.perf_counter() - t0
                if self.nonfinite_in_a_row() >= self.max_nonfinite:
                    last = self.out / "last.ckpt" if self.out is not None else None
                    raise NonFiniteError(
                        self.nonfinite_message()
                        + (f"; last good checkpoint: {last}" if last and last.exists() else "")
                    )
                end = self.position >= self.total
                val = None
                if self.due(before, self.val_every) or (end and self.val_every > 0):
                    val = self.validate_and_keep_best(main)
                self.elapsed = time.perf_counter() - t_start
                row = self.row(metrics, val)
                if row is not None:
                    self.history.append(row)
                if self.out is not None:
                    if main and row is not None:
                        csvlog.append(self.out / "metrics.csv", self.csv_fields, row)
                    if val is not None or end or self.due(before, self.checkpoint_every):
                        self.save_checkpoint(self.out / "last.ckpt")
                if bar is not None:
                    bar.update(self.position - before)
                    bar.set_postfix(self.postfix(metrics))
                if self.callback is not None:
                    self.callback(self, row)
        finally:
            if bar is not None:
                bar.close()
        if self.out is not None and main:
            self.save_final()
        distributed.barrier(self.world)
        return self.summary()

    def validate_and_keep_best(self, main: bool) -> dict:
        val = self.validation()
        if self.better(val["score"]):
            self.best_score, self.best_position = val["score"], self.position
            if self.out is not None and main:
                self.save_best()
        return val

    def postfix(self, metrics: dict) -> dict:
        return {"best_val": f"{self.best_score:.4g}"}

    # -- the run directory -----------------------------------------------------------------------
    def prepare_out(self, resume: bool) -> None:
        main = self.world.is_main
        out = ensure_writable_dir(self.out, "--out") if main else self.out
        distributed.barrier(self.world)  # the directory exists before any rank looks in it
        try:
            ckpt = out / "last.ckpt"
            if resume and ckpt.exists():
                self.load_checkpoint(ckpt)
                if main:
                    csvlog.truncate(
                        out / "metrics.csv", self.csv_fields, self.counter, self.position
                    )
                    self.run_files_on_resume()
                return
            if ckpt.exists():
                raise L2OError(
                    f"--out: {out} already holds a run (last.ckpt); pass --resume to continue it "
                    "or choose another directory"
                )
            if not main:
                return
            if resume:
                # Job scripts pass --resume on every (re)start, the first one included.
                print(
                    f"l2o: --resume: no checkpoint in {out} yet; starting the run from scratch",
                    file=sys.stderr,
                )
            for stale in self.stale_outputs:  # never let a fresh run load an older run's weights
                path = out / stale
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            csvlog.start(out / "metrics.csv", self.csv_fields)
            self.write_run_files()
        finally:
            distributed.barrier(self.world)  # every rank starts from the same state
