"""Few-shot learning with the Meta-Learner LSTM (Ravi & Larochelle, ICLR 2017) and baselines.

* :mod:`.learner`      functional Conv-4 on a flat parameter vector, BN modes
* :mod:`.metalearner`  the Meta-Learner LSTM method (rule: :class:`l2o.rules.MetaLearnerLSTM`)
* :mod:`.maml`         MAML and first-order MAML
* :mod:`.protonet`     Prototypical Networks (class-mean prototypes on the Conv-4 body)
* :mod:`.baselines`    fine-tune and nearest-neighbour on a pre-trained Conv-4
* :mod:`.train`        episodic meta-training (CSV log, validation, best/resumable checkpoints)
* :mod:`.evaluate`     fixed seeded test episodes, accuracy and 95% interval
* :mod:`.api`          ``load(path).adapt(support_x, support_y).predict(query_x)``
* :mod:`.registry`     every method's :class:`MethodSpec` (how to add a method: its docstring)
* :mod:`.plots`        the forget/input gate figure

Command line: ``l2o fewshot train|eval|gates`` (:mod:`.cli`).
"""

from __future__ import annotations

from .api import Predictor, load, save_model
from .base import Adapted, FewShotMethod
from .baselines import FineTune, NearestNeighbour
from .evaluate import evaluate, summarize
from .learner import BN_MODES, BNStats, Conv4, LearnerConfig
from .maml import MAMLMethod
from .metalearner import MetaLSTMMethod
from .protonet import ProtoNet
from .registry import MethodSpec, register, unregister

__all__ = [
    "BN_MODES",
    "Adapted",
    "BNStats",
    "Conv4",
    "FewShotMethod",
    "FineTune",
    "LearnerConfig",
    "MAMLMethod",
    "MetaLSTMMethod",
    "MethodSpec",
    "NearestNeighbour",
    "Predictor",
    "ProtoNet",
    "evaluate",
    "load",
    "register",
    "save_model",
    "summarize",
    "unregister",
]
