"""Meta-training configuration: defaults, per-task defaults, TOML files and ``--set``.

Resolution order (later wins): :data:`DEFAULTS`, the task's entry in
:data:`TASK_DEFAULTS`, the ``--config`` TOML file, ``--set section.key=value``.
Every key is typed by its default; unknown keys and unreadable values are
errors naming the key.  The resolved config is saved beside a run's outputs as
``config.toml`` and inside every checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import tomllib

from .devices import check_form
from .errors import L2OError
from .specs import coerce

VAL_METRICS = ("sum", "final-log")  # l2o.evaluate.validation_scores

DEFAULTS: dict = {
    "task": "quadratic",
    "seed": 0,
    "device": "cpu",  # cpu, cuda or cuda:N (checkpoints are device-free; resume may change it)
    "rule": {
        "name": "lstm",
        "preset": "",  # "paper", "code", "paper-quadratic": applied before the keys below
        "layers": [20, 20],
        "preprocessing": "logsign",
        "p": 10.0,
        "input_scale": 1.0,
        "output_scale": 0.1,
        "zero_head": False,
        # coupled rules (l2o.rules.gac, l2o.rules.ntm): global averaging cells per layer,
        # NTM heads, M0 = memory_init * I, ntm-bfgs's size limit, ntm-lbfgs's window of pairs
        "gac": 2,
        "read_heads": 1,
        "write_heads": 3,
        "memory_init": 1.0,
        "max_coordinates": 2048,
        "window": 30,
        # RNNprop (l2o.rules.rnnprop): its ELU input layer and Adam-style averages
        "input_layer": 20,
        "beta1": 0.95,
        "beta2": 0.95,
        "eps": 1e-8,
        # mlp-lopt (l2o.rules.transfer): Adam's lr at meta-init, bounds of the learned step factor
        # (exp(+-mag)) and of the learned direction term (residual, in Adam's units)
        "init_lr": 0.001,
        "mag": 1.0,
        "residual": 0.1,
        # mlp-lopt's per-block hypergradient step-size adaptation: rate at meta-init (0: off),
        # bound of the adapted log step size, and whether the rate is meta-learned
        "hd": 0.0,
        "hd_bound": 3.0,
        "hd_learned": True,
        # mlp-lopt's optional extra features, joined by "+" (l2o.rules.transfer.EXTRA_FEATURES)
        "features": "",
        # JSON list of {"pattern", "rule", "config"}: a GroupedRule (l2o.rules.grouped); "" = one rule
        "groups": "",
    },
    "train": {
        "meta_steps": 200,  # trajectories
        "horizon": 100,  # T
        # > 0: trajectory k's horizon is drawn log-uniformly from [horizon_min, horizon], a
        # function of (seed, k), so runs of many lengths are met in one meta-training run
        # (issue 18's task family: 100-2,000 steps); 0 = every trajectory runs `horizon`
        "horizon_min": 0,
        "unroll": 20,  # U
        "instances": 128,  # problems optimized together per trajectory
        "meta_lr": 0.003,
        "lr_schedule": "constant",  # or "cosine"
        "min_lr_ratio": 0.1,  # cosine floor as a fraction of meta_lr
        "clip_norm": 0.0,  # global meta-gradient norm clip; 0 = off
        "objective": "sum",  # "sum" (paper) or "log"
        "second_order": False,  # bptt only: keep the optimizee's Hessian terms
        # where meta-gradients come from (l2o.meta.estimators): "bptt" (truncated backprop) or
        # "pes" (persistent evolution strategies, one antithetic pair per instance)
        "estimator": "bptt",
        "pes_sigma": 0.01,  # PES: std of the Gaussian perturbation of the meta-parameters
        "max_nonfinite": 10,  # consecutive non-finite meta-steps before stopping
        "checkpoint_every": 10,  # meta-steps between last.ckpt writes (also at every validation)
        # warm start: a saved rule (run dir or pretrained/NAME) whose architecture and weights
        # replace [rule]; with rule.groups every group starts as a copy of it ("" = off)
        "init_from": "",
    },
    "val": {
        "every": 10,  # trajectories between validations (0 = never)
        "problems": 100,
        "steps": 0,  # 0 = the training horizon
        "task": "",  # task spec of validation problems; "" = the training task (its "val" split if it has one)
        # what selects best/ (l2o.evaluate.validation_scores): "sum" (the paper's sum of loss over
        # steps 1..T) or "final-log" (log of the mean loss over the last 5% of the steps relative
        # to step 0's, floored at 1e-3: scale-free across problems, and where a run ends)
        "metric": "sum",
    },
}

# What differs from DEFAULTS for each task family (the paper's settings).
TASK_DEFAULTS: dict[str, dict] = {
    # The shipped recipe (configs/quadratic.toml). The paper fed raw gradients on
    # quadratics (preset "paper-quadratic"); log/sign inputs with output x0.1 and a
    # clipped meta-gradient reached a better optimizer sooner here (README, Results).
    "quadratic": {
        "rule": {"preprocessing": "logsign", "p": 10.0, "output_scale": 0.1},
        "train": {
            "meta_steps": 800,
            "meta_lr": 0.01,
            "instances": 256,
            "lr_schedule": "cosine",
            "clip_norm": 1.0,
        },
        "val": {"every": 50, "problems": 256},
    },
    "quadratic-code": {
        "rule": {"preprocessing": "none", "output_scale": 1.0},
        "train": {"meta_lr": 0.001, "instances": 1},
        "val": {"problems": 20},
    },
    "mnist-mlp": {
        # The paper's MNIST setting: log/sign p=10, output x0.1, horizon 100, unroll 20.
        # zero_head: the first updates are exactly 0. With the random head (the official init) the
        # LSTM sat at the chance-level plateau (sum 230) for 28+ trajectories on this task; with a
        # zero head it descends from the first trajectory (measured; pretrained/mnist/TRAINING.md).
        "rule": {"preset": "paper", "zero_head": True},
        # The quadratic recipe's meta-optimizer (pretrained/mnist, TRAINING.md): Adam 0.01 decayed
        # by a cosine schedule, meta-gradient clip 1, 400 trajectories. A constant meta-lr drifted
        # (0.01 peaked at trajectory 30; 0.003 reached 54.8 at 130): the decay is what settles it.
        "train": {
            "meta_lr": 0.01,
            "lr_schedule": "cosine",
            "clip_norm": 1.0,
            "instances": 1,
            "meta_steps": 400,
        },
        "val": {"problems": 10, "every": 20},
    },
    "cifar10-cnn": {
        # cifar-multi: one LSTM for the three conv weights, one for everything else
        # (pretrained/cifar/TRAINING.md; --set rule.groups= for one shared LSTM).
        "rule": {
            "preset": "paper",
            "zero_head": True,
            "groups": '[{"pattern": "conv*.w", "label": "conv", "rule": "lstm"}, '
            '{"pattern": "*", "label": "fc", "rule": "lstm"}]',
        },
        "train": {
            "meta_lr": 0.01,
            "lr_schedule": "cosine",
            "clip_norm": 1.0,
            "instances": 1,
            "meta_steps": 200,
        },
        "val": {"problems": 2, "every": 20},
    },
    "neural-art": {
        # L2L's Neural Art: horizon 128 / unroll 32 (recalled), log/sign inputs; output x0.1 and a
        # zero head (the pixels would jump by O(1) otherwise); pretrained/neural-art/TRAINING.md.
        "rule": {"preset": "paper", "zero_head": True},
        "train": {
            "meta_lr": 0.01,
            "lr_schedule": "cosine",
            "clip_norm": 1.0,
            "instances": 2,
            "horizon": 128,
            "unroll": 32,
            "meta_steps": 240,
        },
        "val": {"problems": 8, "every": 20},
    },
    "family": {
        # issue 18: pretrained/general-hd's recipe (its TRAINING.md): mlp-lopt initialised as
        # Adam with per-tensor hypergradient step sizes (rate 0.1, learned), its step factor
        # within e^+-1, each trajectory's horizon drawn from 100-2,000 steps, validation at 500.
        # pretrained/general's recipe (configs/general.toml) changes members, features, bounds
        # and horizons on top of these
        "rule": {"name": "mlp-lopt", "layers": [32, 32], "mag": 1.0, "hd": 0.1},
        "train": {
            "meta_lr": 0.003,
            "lr_schedule": "cosine",
            "clip_norm": 1.0,
            "instances": 4,
            "horizon": 2000,
            "horizon_min": 100,
            "unroll": 25,
            "meta_steps": 24,
        },
        "val": {"problems": 8, "every": 4, "steps": 500},
    },
    "simple": {
        "rule": {"layers": [], "preprocessing": "none", "output_scale": 1.0, "zero_head": True},
        "train": {"meta_lr": 0.01, "instances": 1, "horizon": 100, "unroll": 20},
        "val": {"problems": 1},
    },
}


def _merge(base: dict, override: dict, where: str) -> None:
    for key, value in override.items():
        if key not in base:
            raise L2OError(f"unknown config key {where}{key!r}; valid keys: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise L2OError(f"config key {where}{key} is a section; expected a table")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = _typed(value, base[key], f"{where}{key}")


def _typed(value, default, key: str):
    if isinstance(value, str) and not isinstance(default, str):
        if isinstance(default, list):
            return list(coerce(value, tuple(default) or (0,), key))
        return coerce(value, default, key)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise L2OError(f"config key {key}: expected true/false, got {value!r}")
        return value
    if (
        isinstance(default, float)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ):
        return float(value)
    if isinstance(default, list) and isinstance(value, list | tuple):
        return list(value)
    if type(value) is not type(default):
        raise L2OError(f"config key {key}: expected {type(default).__name__}, got {value!r}")
    return value


def task_name(spec: str) -> str:
    return spec.partition(":")[0].strip()


def read_toml(config_file: str | None) -> dict:
    """The ``--config`` file's tables (``{}`` when none is given)."""
    if not config_file:
        return {}
    path = Path(config_file)
    if not path.is_file():
        raise L2OError(f"--config: file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise L2OError(f"--config {path}: invalid TOML ({e})") from None


def parse_sets(sets: list[str]) -> dict:
    """``["train.meta_lr=0.01", ...]`` as a nested dict of strings (typed when merged)."""
    set_cfg: dict = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise L2OError(f"--set: expected section.key=value, got {item!r}")
        node = set_cfg
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise L2OError(f"--set {item!r}: {part} is a key, not a section")
        node[parts[-1]] = value.strip()
    return set_cfg


def resolve(
    task: str | None = None, config_file: str | None = None, sets: list[str] | None = None
) -> dict:
    """The resolved config dict (see the module docstring for the order)."""
    file_cfg = read_toml(config_file)
    set_cfg = parse_sets(sets or [])
    spec = task or set_cfg.get("task") or file_cfg.get("task") or DEFAULTS["task"]
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, copy.deepcopy(TASK_DEFAULTS.get(task_name(spec), {})), "")
    _merge(cfg, file_cfg, "")
    _merge(cfg, set_cfg, "")
    cfg["task"] = spec
    _apply_preset(cfg, [file_cfg, set_cfg])
    validate(cfg)
    _check_rule_keys(cfg, [file_cfg, set_cfg])
    return cfg


def _check_rule_keys(cfg: dict, layers: list[dict]) -> None:
    """A [rule] key the user set (file or --set) that the chosen rule does not have is an error.

    The section holds the keys of every rule; the task's own defaults (mnist-mlp's LSTM
    preset) are not the user's choice and apply only to the rules that have them.
    """
    import dataclasses

    from .rules import RULE_CONFIGS

    name = cfg["rule"]["name"]
    if cfg["rule"]["groups"] or name not in RULE_CONFIGS:
        return
    known = {f.name for f in dataclasses.fields(RULE_CONFIGS[name])} | {"name", "groups"}
    given = set().union(*(set(layer.get("rule", {})) for layer in layers))
    wrong = sorted(given - known)
    if wrong:
        raise L2OError(
            f"config key rule.{wrong[0]} does not apply to rule {name!r} "
            f"(its keys: {sorted(known & set(DEFAULTS['rule']) - {'name', 'groups'})})"
        )


def _apply_preset(cfg: dict, layers: list[dict]) -> None:
    """A preset sets its rule keys, except keys given in its own layer or a later one.

    Layers are (config file, --set): ``--set rule.preset=code`` overrides the p and
    output_scale written in a config file, while ``--set rule.p=3`` beside a preset
    keeps p = 3.
    """
    from .rules.lstm import PRESETS

    preset = cfg["rule"]["preset"]
    if not preset:
        return
    if preset not in PRESETS:
        raise L2OError(f"rule.preset must be one of {sorted(PRESETS)} or empty, got {preset!r}")
    start = max(
        (i for i, layer in enumerate(layers) if "preset" in layer.get("rule", {})), default=0
    )
    given = set().union(*(set(layer.get("rule", {})) for layer in layers[start:]))
    for key, value in PRESETS[preset].items():
        if key not in given:
            cfg["rule"][key] = value


def validate(cfg: dict) -> None:
    t, v = cfg["train"], cfg["val"]
    for key in (
        "meta_steps",
        "horizon",
        "unroll",
        "instances",
        "max_nonfinite",
        "checkpoint_every",
    ):
        if t[key] <= 0:
            raise L2OError(f"train.{key} must be a positive integer, got {t[key]}")
    if t["unroll"] > t["horizon"]:
        raise L2OError(
            f"train.unroll ({t['unroll']}) must not exceed train.horizon ({t['horizon']})"
        )
    if not t["meta_lr"] > 0:
        raise L2OError(f"train.meta_lr must be > 0, got {t['meta_lr']}")
    if t["lr_schedule"] not in ("constant", "cosine"):
        raise L2OError(
            f"train.lr_schedule must be 'constant' or 'cosine', got {t['lr_schedule']!r}"
        )
    if t["estimator"] not in ("bptt", "pes"):
        raise L2OError(f"train.estimator must be 'bptt' or 'pes', got {t['estimator']!r}")
    if t["estimator"] == "pes" and t["second_order"]:
        raise L2OError("train.second_order applies to train.estimator=bptt, not pes")
    if not (math.isfinite(t["pes_sigma"]) and t["pes_sigma"] > 0):
        raise L2OError(f"train.pes_sigma must be a positive number, got {t['pes_sigma']}")
    check_form(cfg["device"], "device")
    if t["objective"] not in ("sum", "log"):
        raise L2OError(f"train.objective must be 'sum' or 'log', got {t['objective']!r}")
    if not (math.isfinite(t["clip_norm"]) and t["clip_norm"] >= 0):
        raise L2OError(
            f"train.clip_norm must be a finite number >= 0 (0 = off), got {t['clip_norm']}"
        )
    if not 0 <= t["horizon_min"] <= t["horizon"]:
        raise L2OError(
            f"train.horizon_min must be between 0 (off) and train.horizon ({t['horizon']}), "
            f"got {t['horizon_min']}"
        )
    if not 0.0 <= t["min_lr_ratio"] <= 1.0:
        raise L2OError(f"train.min_lr_ratio must be in [0, 1], got {t['min_lr_ratio']}")
    for key in ("every", "steps"):
        if v[key] < 0:
            raise L2OError(f"val.{key} must be >= 0, got {v[key]}")
    if v["metric"] not in VAL_METRICS:
        raise L2OError(f"val.metric must be one of {VAL_METRICS}, got {v['metric']!r}")
    if v["problems"] <= 0:
        raise L2OError(f"val.problems must be a positive integer, got {v['problems']}")


def to_toml(cfg: dict) -> str:
    """Serialize a resolved config (scalars, lists, one level of tables) as TOML."""

    def fmt(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(str(v))  # JSON string escapes are valid TOML basic strings

    lines = [f"{k} = {fmt(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {fmt(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
