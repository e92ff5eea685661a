"""Inference artifacts, one format for learned rules and few-shot models.

    l2o.save(rule, "my_opt/", extra={"trained_on": "quadratic"})   # a directory
    l2o.save(rule, "my_opt.safetensors")                            # or one file
    l2o.save(fewshot_model, "omni.safetensors")
    obj = l2o.load(path)       # whatever was saved

**The format.** An artifact is a safetensors file (the meta-parameters; never
unpickled) whose JSON header describes it completely: ``kind`` (``"l2o-rule"`` or
``"l2o-fewshot"``), the name of the rule or method, its ``config`` (enough to rebuild
it), and its provenance (``extra``; for few-shot models ``selection`` and ``run``).
A directory artifact (what the meta-trainer writes as ``best/`` and ``final/``, and
what ships as ``pretrained/NAME``) is that file named ``optimizer.safetensors`` beside a
readable copy of its description, ``config.json``.  Artifacts written before the
header carried the description (the shipped ones among them) are read through their
``config.json``.

``load`` accepts an artifact file or directory, a meta-training run directory (its
``best/``), a few-shot training run (its ``best.safetensors``) or the name of a shipped
artifact (``pretrained/quadratic``).
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
RULE_KIND = "l2o-rule"
FORMAT = "l2o-artifact/2"


def save(obj: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write a learned rule or a few-shot model (see the module docstring).

    A rule goes to ``path`` as a directory (``optimizer.safetensors`` + ``config.json``),
    or as one file when ``path`` ends in ``.safetensors``; a few-shot model always to one
    file (``extra`` is stored as its ``selection`` / ``run`` entries, or ``extra``).
    """
    path = Path(path)
    from .fewshot.base import FewShotMethod  # few-shot imports this module

    if isinstance(obj, FewShotMethod):
        from .fewshot.api import save_model

        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: a few-shot model is saved as one .safetensors file")
        save_model(obj, path, **(extra or {}))
        return path
    if not callable(getattr(obj, "describe", None)):
        raise CheckpointError(
            f"l2o.save: expected a learned rule (an nn.Module with describe()) or a few-shot "
            f"model, got {type(obj).__name__}"
        )
    desc = obj.describe()
    config = {"format": FORMAT, "kind": RULE_KIND, **desc, "extra": extra or {}}
    if path.suffix == ".safetensors":
        save_tensors(path, dict(obj.state_dict()), config)
        return path
    save_tensors(path / WEIGHTS, dict(obj.state_dict()), config)
    atomic_write_text(path / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


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


MODEL = "model.safetensors"  # a shipped few-shot model's file in its pretrained/ directory
CARD = "card.json"  # what a shipped artifact is for and its headline number (l2o pretrained)


def locate(path: str | os.PathLike) -> Path:
    """``path``, or for ``pretrained/NAME`` the shipped artifact's directory (where it exists)."""
    s = str(path)
    if not Path(path).exists() and (
        s.startswith("pretrained/") or s.startswith("pretrained" + os.sep)
    ):
        shipped_dir = PRETRAINED_DIR / s.split("/", 1)[1]
        if shipped_dir.is_dir():
            return shipped_dir
    return Path(path)


def shipped() -> list[dict]:
    """Every artifact shipped in the package: ``{"name", "kind", "for", "headline", "path"}``."""
    out = []
    for d in sorted(PRETRAINED_DIR.iterdir()) if PRETRAINED_DIR.is_dir() else []:
        if not d.is_dir() or d.name.startswith(("_", ".")):
            continue
        card = {}
        if (d / CARD).is_file():
            try:
                card = json.loads((d / CARD).read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{d / CARD}: invalid JSON ({e})") from None
        kind = card.get("kind") or ("fewshot" if (d / MODEL).is_file() else "rule")
        out.append(
            {
                "name": f"pretrained/{d.name}",
                "kind": kind,
                "for": card.get("for", ""),
                "headline": card.get("headline", "see TRAINING.md"),
                "path": str(d),
            }
        )
    return out


def _artifact_file(path: str | os.PathLike) -> Path | None:
    """The single artifact file ``path`` names (a ``.safetensors`` file, a shipped few-shot
    model's directory or a few-shot run)."""
    p = locate(path)
    if p.is_dir() and (p / MODEL).is_file():
        return p / MODEL
    if p.is_file() and p.suffix == ".safetensors" and p.name != WEIGHTS:
        return p
    rule_dir = any((d / CONFIG).is_file() and (d / WEIGHTS).is_file() for d in (p, p / "best"))
    if p.is_dir() and not rule_dir:  # a few-shot run (its config.json is the run's, not a rule's)
        for name in ("best.safetensors", "final.safetensors"):
            if (p / name).is_file():
                return p / name
    return None


def _build_rule(config: dict, where) -> nn.Module:
    if "rule" not in config or "config" not in config:
        raise CheckpointError(f"{where}: missing 'rule' or 'config' entry")
    try:
        return build_learned_rule(config["rule"], config["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot build rule: {e}") from None


def load(path: str | os.PathLike, **fewshot_options):
    """Load whatever artifact ``path`` names: a learned rule or a few-shot model.

    A rule comes back as an ``nn.Module`` in eval mode; a few-shot model as what
    :func:`l2o.fewshot.load` gives, with ``fewshot_options`` (``method=``, ``device=``)
    passed on.
    """
    file = _artifact_file(path)
    if file is not None:
        tensors, meta = load_tensors(file)
        if meta.get("kind") != RULE_KIND:
            from .fewshot.api import load as load_fewshot  # few-shot imports this module

            return load_fewshot(file, **fewshot_options)
        if fewshot_options:
            raise CheckpointError(
                f"{path}: options {sorted(fewshot_options)} apply to few-shot models, "
                "and this is a learned rule"
            )
        rule = _build_rule(meta, file)
        load_state_strict(rule, tensors, file)
        return rule.eval()
    if fewshot_options:
        raise CheckpointError(
            f"{path}: options {sorted(fewshot_options)} apply to few-shot models, "
            "and this is a learned rule"
        )
    d = resolve(path)
    config = read_config(d)
    rule = _build_rule(config, d / CONFIG)
    tensors, meta = load_tensors(d / WEIGHTS)
    if meta.get("rule") != config["rule"]:
        raise CheckpointError(
            f"{d}: weights are for rule {meta.get('rule')!r} but config says {config['rule']!r}"
        )
    if "config" in meta and meta["config"] != config["config"]:
        raise CheckpointError(f"{d}: {WEIGHTS} and {CONFIG} describe different rules")
    load_state_strict(rule, tensors, d / WEIGHTS)
    rule.eval()
    return rule
