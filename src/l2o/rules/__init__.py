"""Update rules: hand-designed (SGD, NAG, RMSprop, Adam, ...) and learned (nn.Modules).

``LEARNED_RULES`` maps a rule name to a factory ``config dict -> nn.Module``; new
learned rules register here so artifacts (:mod:`l2o.artifact`) can rebuild them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import State, UpdateRule, is_learned
from .bfgs import BFGS, LBFGS
from .classic import CLASSIC_RULES, NAG, SGD, Adam, ClippedSGD, RMSprop
from .gac import LSTMGAC, LSTMGACConfig
from .grouped import GroupedRule
from .lstm import PRESETS, CoordinatewiseLSTM, LSTMRuleConfig
from .metalearner import MetaLearnerConfig, MetaLearnerLSTM
from .ntm import NTMBFGS, NTMLBFGS, NTMBFGSConfig, NTMLBFGSConfig
from .rnnprop import RNNprop, RNNpropConfig
from .transfer import AdamHD, MLPLOpt, MLPLOptConfig

# Hand-designed rules that couple coordinates (l2o.rules.bfgs; Adam with per-tensor
# hypergradient step sizes, l2o.rules.transfer): compare tunes their lr too.
CLASSIC_RULES.update({"bfgs": BFGS, "l-bfgs": LBFGS, "adam-hd": AdamHD})

LEARNED_RULES: dict[str, Callable[[dict], nn.Module]] = {
    "lstm": lambda cfg: CoordinatewiseLSTM(LSTMRuleConfig.from_dict(cfg)),
    "grouped": GroupedRule.from_config,
    "meta-lstm": lambda cfg: MetaLearnerLSTM(MetaLearnerConfig.from_dict(cfg)),
    "rnnprop": lambda cfg: RNNprop(RNNpropConfig.from_dict(cfg)),
    "lstm-gac": lambda cfg: LSTMGAC(LSTMGACConfig.from_dict(cfg)),
    "ntm-bfgs": lambda cfg: NTMBFGS(NTMBFGSConfig.from_dict(cfg)),
    "ntm-lbfgs": lambda cfg: NTMLBFGS(NTMLBFGSConfig.from_dict(cfg)),
    "mlp-lopt": lambda cfg: MLPLOpt(MLPLOptConfig.from_dict(cfg)),
}


#: the config dataclass of each single learned rule (which keys its config may hold)
RULE_CONFIGS = {
    "lstm": LSTMRuleConfig,
    "meta-lstm": MetaLearnerConfig,
    "rnnprop": RNNpropConfig,
    "lstm-gac": LSTMGACConfig,
    "ntm-bfgs": NTMBFGSConfig,
    "ntm-lbfgs": NTMLBFGSConfig,
    "mlp-lopt": MLPLOptConfig,
}


def build_learned_rule(name: str, config: dict) -> nn.Module:
    """Rebuild a learned rule from its name and config dict (as stored in artifacts)."""
    if name not in LEARNED_RULES:
        raise ValueError(f"unknown learned rule {name!r}; known: {sorted(LEARNED_RULES)}")
    return LEARNED_RULES[name](dict(config))


__all__ = [
    "BFGS",
    "CLASSIC_RULES",
    "LBFGS",
    "LSTMGAC",
    "LSTMGACConfig",
    "NTMBFGS",
    "NTMLBFGS",
    "NTMBFGSConfig",
    "NTMLBFGSConfig",
    "LEARNED_RULES",
    "NAG",
    "PRESETS",
    "RULE_CONFIGS",
    "SGD",
    "Adam",
    "AdamHD",
    "ClippedSGD",
    "CoordinatewiseLSTM",
    "GroupedRule",
    "LSTMRuleConfig",
    "MetaLearnerConfig",
    "MetaLearnerLSTM",
    "MLPLOpt",
    "MLPLOptConfig",
    "RMSprop",
    "State",
    "UpdateRule",
    "build_learned_rule",
    "is_learned",
]
