"""Inference artifacts: a trained rule as ``optimizer.safetensors`` + ``config.json``.

    l2o.save(rule, "my_opt/", extra={"trained_on": "quadratic"})
    rule = l2o.load("my_opt/")            # or a run directory, or "pretrained/quadratic"

``load`` accepts an artifact directory, a meta-training run directory (it loads
the run's best artifact, ``best/``), or the name of an optimizer shipped in the
package (``pretrained/quadratic``); given a few-shot model file or a few-shot
training run it returns the few-shot model (:func:`l2o.fewshot.load`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .checkpoint import atomic_write_text, load_state_strict, load_tensors, save_tensors
from .errors import CheckpointError
from .rules import build_learned_rule

WEIGHTS = "optimizer.safetensors"
CONFIG = "config.json"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def save(rule: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``rule``'s meta-parameters and config to ``directory`` (atomically per file)."""
    directory = Path(directory)
    desc = rule.describe()
    config = {"format": "l2o-artifact/1", **desc, "extra": extra or {}}
    save_tensors(directory / WEIGHTS, dict(rule.state_dict()), {"rule": desc["rule"]})
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def resolve(path: str | os.PathLike) -> Path:
    """Find the artifact directory meant by ``path`` (see the module docstring)."""
    p = Path(path)
    candidates = [p, p / "best"]
    s = str(path)
    if s.startswith("pretrained/") or s.startswith("pretrained" + os.sep):
        candidates.append(PRETRAINED_DIR / s.split("/", 1)[1])
    for c in candidates:
        if (c / CONFIG).is_file() and (c / WEIGHTS).is_file():
            return c
    shipped = (
        sorted(d.name for d in PRETRAINED_DIR.iterdir() if (d / CONFIG).is_file())
        if PRETRAINED_DIR.is_dir()
        else []
    )
    raise CheckpointError(
        f"no trained optimizer at {s!r}: expected a directory with {CONFIG} and {WEIGHTS} "
        f"(an artifact, a run directory with best/, or pretrained/NAME with NAME in {shipped})"
    )


def read_config(path: str | os.PathLike) -> dict:
    d = resolve(path)
    try:
        return json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / CONFIG}: invalid JSON ({e})") from None


def _fewshot_model_file(path: str | os.PathLike) -> Path | None:
    """The few-shot model file ``path`` names (a model file or a few-shot run), else None."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors" and p.name != WEIGHTS:
        return p
    if p.is_dir() and not (p / CONFIG).is_file() and not (p / "best" / CONFIG).is_file():
        for name in ("best.safetensors", "final.safetensors"):
            if (p / name).is_file():
                return p / name
    return None


def load(path: str | os.PathLike, **fewshot_options):
    """Load a trained learned rule, or a few-shot model: one entry point for every artifact.

    A rule artifact, a meta-training run or ``pretrained/NAME`` gives the rule (an
    ``nn.Module``; see the module docstring).  A few-shot model file or a few-shot
    training run (``best.safetensors``) gives what :func:`l2o.fewshot.load` gives,
    with ``fewshot_options`` (``method=``, ``device=``) passed on.
    """
    model_file = _fewshot_model_file(path)
    if model_file is not None:
        from .fewshot.api import load as load_fewshot  # few-shot imports this module

        return load_fewshot(model_file, **fewshot_options)
    if fewshot_options:
        raise CheckpointError(
            f"{path}: options {sorted(fewshot_options)} apply to few-shot models, "
            "and this is a learned rule"
        )
    d = resolve(path)
    config = read_config(d)
    if "rule" not in config or "config" not in config:
        raise CheckpointError(f"{d / CONFIG}: missing 'rule' or 'config' entry")
    try:
        rule = build_learned_rule(config["rule"], config["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{d / CONFIG}: cannot build rule: {e}") from None
    tensors, meta = load_tensors(d / WEIGHTS)
    if meta.get("rule") != config["rule"]:
        raise CheckpointError(
            f"{d}: weights are for rule {meta.get('rule')!r} but config says {config['rule']!r}"
        )
    load_state_strict(rule, tensors, d / WEIGHTS)
    rule.eval()
    return rule
