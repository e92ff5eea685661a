"""The configuration of ``l2o fewshot train``: the same TOML + ``--set`` as ``l2o meta-train``.

Resolution order (later wins): :data:`DEFAULTS`, the ``--config`` TOML file,
``--set section.key=value``, then the command-line flags, each a shorthand for one key
(:data:`FLAG_KEYS`: ``--ways 20`` is ``--set episodes.ways=20``).  Keys are typed by
their default; unknown keys are errors.  ``[model]`` holds the learner's width and the
method's own settings: a setting of another method (``model.train_ways`` for MAML) is
an error naming the methods that have it, and a setting left out takes the method's
default for the dataset and configuration (:mod:`l2o.fewshot.registry`).  The resolved
config is saved with the run as ``config.toml``.

    method = "meta-lstm"
    seed = 0
    device = "cpu"
    [data]      dataset = "omniglot", dir = "" ($L2O_DATA), split_seed = 0, rotations = false
    [episodes]  ways = 5, shots = 1, queries = 15
    [model]     filters = 32, and any of inner_steps, inner_lr, second_order, grad_scale,
                train_ways, train_queries, init_from (the method's own)
    [train]     meta_steps = 0 (the method's default), meta_batch = 0 (idem), meta_lr = 0.001,
                meta_lr_schedule = "constant", init_lr_scale = 1.0, clip = -1.0 (idem; 0 = off)
    [val]       every = 500, episodes = 100, bn_mode = "support-running"
"""

from __future__ import annotations

import copy

from ..config import _merge, parse_sets, read_toml
from ..devices import check_form
from ..errors import L2OError
from . import registry

DATASETS = ("omniglot", "miniimagenet")
BN_MODES = ("batch", "support-running")

DEFAULTS: dict = {
    "method": "meta-lstm",
    "seed": 0,
    "device": "cpu",
    "data": {"dataset": "omniglot", "dir": "", "split_seed": 0, "rotations": False},
    "episodes": {"ways": 5, "shots": 1, "queries": 15},
    "model": {"filters": 32},
    "train": {
        "meta_steps": 0,  # 0: the method's default (episodes, or pre-training minibatches)
        "meta_batch": 0,  # 0: the method's default
        "meta_lr": 1e-3,
        "meta_lr_schedule": "constant",
        "init_lr_scale": 1.0,
        "clip": -1.0,  # global meta-gradient norm clip; < 0: the method's default, 0: off
    },
    "val": {"every": 500, "episodes": 100, "bn_mode": "support-running"},
}

#: The settings a method may have in ``[model]`` beside ``filters``, with their types
#: (a method's spec may bring more: ``MethodSpec.option_types``).
MODEL_KEYS = {
    "inner_steps": int,
    "inner_lr": float,
    "second_order": registry.flag,
    "grad_scale": str,
    "train_ways": int,
    "train_queries": int,
    "init_from": str,
}
#: Keys that belong to some methods only (outside ``[model]``), with their defaults.
METHOD_KEYS = {("train", "init_lr_scale"): "init_lr_scale"}
EPISODIC_KEYS = {("train", "meta_batch"), ("train", "meta_lr_schedule"), ("train", "init_lr_scale")}

#: ``l2o fewshot train`` flag -> config key.
FLAG_KEYS = {
    "method": "method",
    "seed": "seed",
    "device": "device",
    "dataset": "data.dataset",
    "data_dir": "data.dir",
    "split_seed": "data.split_seed",
    "rotations": "data.rotations",
    "ways": "episodes.ways",
    "shots": "episodes.shots",
    "queries": "episodes.queries",
    "filters": "model.filters",
    "inner_steps": "model.inner_steps",
    "inner_lr": "model.inner_lr",
    "second_order": "model.second_order",
    "grad_scale": "model.grad_scale",
    "train_ways": "model.train_ways",
    "train_queries": "model.train_queries",
    "init_from": "model.init_from",
    "meta_steps": "train.meta_steps",
    "meta_batch": "train.meta_batch",
    "meta_lr": "train.meta_lr",
    "meta_lr_schedule": "train.meta_lr_schedule",
    "init_lr_scale": "train.init_lr_scale",
    "clip": "train.clip",
    "val_every": "val.every",
    "val_episodes": "val.episodes",
    "bn_mode": "val.bn_mode",
}


def model_key_types() -> dict:
    types = dict(MODEL_KEYS)
    for spec in registry.specs():
        types.update(spec.option_types)
    return types


def _nest(flat: dict[str, object]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def resolve(
    config_file: str | None = None, sets: list[str] | None = None, flags: dict | None = None
) -> dict:
    """The resolved few-shot config; ``flags`` maps :data:`FLAG_KEYS` names to given values."""
    file_cfg = read_toml(config_file)
    # A flag is its key (FLAG_KEYS; a method's own flags are [model] keys of the same name);
    # where each key came from is kept, so an error names what the user typed.
    given_flags = {k: v for k, v in (flags or {}).items() if v is not None}
    flag_cfg = _nest({FLAG_KEYS.get(k, f"model.{k}"): v for k, v in given_flags.items()})
    origin = {FLAG_KEYS.get(k, f"model.{k}"): "--" + k.replace("_", "-") for k in given_flags}
    layers = [file_cfg, parse_sets(sets or []), flag_cfg]
    cfg = copy.deepcopy(DEFAULTS)
    given: set[str] = set()
    model: dict = {}
    for layer in layers:
        layer = copy.deepcopy(layer)
        model.update(layer.pop("model", {}) or {})
        _merge(cfg, layer, "")
        given |= {f"{s}.{k}" for s, v in layer.items() if isinstance(v, dict) for k in v}
    method = cfg["method"]
    if method not in registry.names():
        raise L2OError(f"method must be one of {', '.join(registry.names())}, got {method!r}")
    spec = registry.get(method)
    types = model_key_types()
    for key, value in model.items():
        name = origin.get(f"model.{key}", f"model.{key}")
        if key == "filters":
            cfg["model"]["filters"] = _typed(value, int, name)
            continue
        if key not in types:
            raise L2OError(
                f"unknown config key model.{key!r}; valid keys: {sorted(['filters', *types])}"
            )
        if key not in spec.all_options() and key != "init_from":
            _not_for(name, key, method)
        cfg["model"][key] = _typed(value, types[key], name)
    for (section, key), option in METHOD_KEYS.items():
        # at its default the key says nothing (a saved config.toml lists every key)
        changed = cfg[section][key] != DEFAULTS[section][key]
        if f"{section}.{key}" in given and changed and option not in spec.options:
            _not_for(origin.get(f"{section}.{key}", f"{section}.{key}"), option, method)
    if not spec.episodic:
        for section, key in sorted(EPISODIC_KEYS):
            changed = cfg[section][key] != DEFAULTS[section][key]
            if f"{section}.{key}" in given and changed and (section, key) not in METHOD_KEYS:
                name = origin.get(f"{section}.{key}", f"{section}.{key}")
                raise L2OError(f"{name} applies to the meta-trained methods, not {method}")
    if "init_from" in cfg["model"] and not spec.warm_start:
        names = registry.applies_to(registry.warm_startable())
        raise L2OError(f"--init-from applies to {names}, not {method}")
    validate(cfg)
    return cfg


def _not_for(name: str, option: str, method: str) -> None:
    owners = tuple(s.name for s in registry.specs() if option in s.options)
    raise L2OError(f"{name} applies to {registry.applies_to(owners)}, not {method}")


def _typed(value, kind, name: str):
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise L2OError(
                f"{name}: cannot read {value!r} as {getattr(kind, '__name__', kind)}"
            ) from None
    if kind is registry.flag:
        if not isinstance(value, bool):
            raise L2OError(f"{name}: expected true/false, got {value!r}")
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise L2OError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def validate(cfg: dict) -> None:
    check_form(cfg["device"], "device")
    if cfg["data"]["dataset"] not in DATASETS:
        raise L2OError(
            f"data.dataset must be one of {', '.join(DATASETS)}, got {cfg['data']['dataset']!r}"
        )
    if cfg["data"]["rotations"] and cfg["data"]["dataset"] != "omniglot":
        raise L2OError("--rotations applies to Omniglot only")
    for section, key in (("episodes", "ways"), ("episodes", "shots"), ("episodes", "queries"),
                         ("val", "every"), ("val", "episodes"), ("model", "filters")):  # fmt: skip
        if cfg[section][key] <= 0:
            raise L2OError(f"{section}.{key} must be a positive integer, got {cfg[section][key]}")
    for key in ("meta_steps", "meta_batch"):
        if cfg["train"][key] < 0:
            raise L2OError(f"train.{key} must be a positive integer (0: the method's default)")
    if not cfg["train"]["meta_lr"] > 0:
        raise L2OError(f"train.meta_lr must be > 0, got {cfg['train']['meta_lr']}")
    if cfg["train"]["meta_lr_schedule"] not in ("constant", "cosine"):
        raise L2OError(
            f"train.meta_lr_schedule must be 'constant' or 'cosine', got {cfg['train']['meta_lr_schedule']!r}"
        )
    if cfg["val"]["bn_mode"] not in BN_MODES:
        raise L2OError(f"val.bn_mode must be one of {BN_MODES}, got {cfg['val']['bn_mode']!r}")
    model = cfg["model"]
    for key in ("inner_steps", "train_ways", "train_queries"):
        if key in model and model[key] <= 0:
            raise L2OError(f"model.{key} must be a positive integer, got {model[key]}")
    if "grad_scale" in model and model["grad_scale"] not in ("batch", "none"):
        raise L2OError(f"model.grad_scale must be 'batch' or 'none', got {model['grad_scale']!r}")
