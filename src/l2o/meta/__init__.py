"""Meta-training: the truncated-BPTT unroll engine and the outer trainer."""

from .trainer import MetaTrainer, build_rule
from .unroll import Trajectory, loss_and_grad, run, start, unroll

__all__ = ["MetaTrainer", "Trajectory", "build_rule", "loss_and_grad", "run", "start", "unroll"]
