"""l2o: learned optimizers in PyTorch.

    import l2o
    rule = l2o.load("pretrained/quadratic")           # a trained L2L LSTM optimizer
    task = l2o.tasks.build_task("quadratic")
    losses = l2o.evaluate.evaluate_rule(rule, task, seeds=[1, 2, 3], steps=100)

See the README for the command-line tool and the Python API.
"""

from . import config, evaluate, optim, rules, tasks
from .artifact import load, save
from .errors import CheckpointError, L2OError, NonFiniteError
from .meta import MetaTrainer
from .rules import CoordinatewiseLSTM, LSTMRuleConfig

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CoordinatewiseLSTM",
    "L2OError",
    "LSTMRuleConfig",
    "MetaTrainer",
    "NonFiniteError",
    "config",
    "evaluate",
    "load",
    "optim",
    "rules",
    "save",
    "tasks",
]
