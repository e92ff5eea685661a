"""Load a trained few-shot model and use it on your own data.

    import l2o.fewshot as fs
    model = fs.load("runs/omni-5w1s")                 # best checkpoint of a run (or a .safetensors file)
    predictor = model.adapt(support_x, support_y)     # images [n, C, H, W] in [0, 1], labels 0..N-1
    labels = predictor.predict(query_x)               # [m] episode-local class indices

Model files are safetensors (tensors + JSON header, never unpickled), written by
:func:`save_model`; the header names the method and its full configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import load_state_strict, load_tensors, save_tensors
from ..devices import resolve_device
from ..errors import CheckpointError, L2OError
from . import registry
from .base import Adapted, FewShotMethod

KIND = "l2o-fewshot"


def save_model(model: FewShotMethod, path: str | Path, **info) -> None:
    """Write ``model`` (meta-parameters + configuration + ``info``) to one safetensors file."""
    meta = {"kind": KIND, "method": model.method, "config": model.config_dict(), **info}
    save_tensors(path, dict(model.state_dict()), meta)


def resolve(path: str | Path) -> Path:
    """A model file, a shipped model (``pretrained/NAME``), or the best (else final) model
    of a run directory."""
    from ..artifact import MODEL, locate

    p = locate(path)
    if p.is_dir() and (p / MODEL).is_file():
        return p / MODEL
    if p.is_dir():
        for name in ("best.safetensors", "final.safetensors"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(
            f"{p}: no best.safetensors or final.safetensors in this run directory"
        )
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def load(path: str | Path, method: str | None = None, device: str | None = None) -> Predictor:
    """Load a few-shot model; ``method`` (optional) must match the checkpoint's.

    ``device`` (e.g. ``"cuda"``) places the model there; support and query images
    given on another device are moved to it.

    A fine-tune checkpoint may be loaded as ``"nearest-neighbour"`` (same pre-trained body;
    in general as any method whose :class:`~.registry.MethodSpec` lists it in ``loads_from``).
    """
    file = resolve(path)
    tensors, meta = load_tensors(file)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{file}: not a few-shot model (kind {meta.get('kind')!r})")
    saved = meta["method"]
    if method is not None and method != saved:
        if method not in registry.names() or saved not in registry.get(method).loads_from:
            raise L2OError(f"{file} is a {saved} checkpoint, not {method}")
    name = method or saved
    cfg = meta["config"]
    if name != saved:  # built from another method's learner (and weights)
        cfg = {"learner": cfg["learner"]}
    model = registry.get(name).load_config(cfg)
    load_state_strict(model, tensors, file)
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    return Predictor(model, meta, file)


class Predictor:
    """A loaded few-shot model: ``adapt`` to a support set, then ``predict`` queries."""

    def __init__(self, model: FewShotMethod, meta: dict, path: Path | None = None):
        self.model = model
        self.meta = meta
        self.path = path

    @property
    def method(self) -> str:
        return self.model.method

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.learner_config
        return (c.in_channels, c.image_size, c.image_size)

    def adapt(
        self,
        support_x: Tensor,
        support_y: Tensor,
        bn_mode: str = "support-running",
        steps: int | None = None,
    ) -> Adapted:
        """Adapt to ``support_x`` ([n, C, H, W] floats in [0, 1]) with labels 0..N-1 (every class present)."""
        device = self.model.device
        support_x = torch.as_tensor(support_x, dtype=torch.float32).to(device)
        support_y = torch.as_tensor(support_y, dtype=torch.int64).to(device)
        if support_x.dim() == 3:
            support_x = support_x.unsqueeze(1)
        if support_y.numel() == 0:
            raise L2OError("the support set is empty")
        ways = int(support_y.max().item()) + 1
        missing = sorted(set(range(ways)) - set(support_y.tolist()))
        if missing:
            raise L2OError(
                f"support labels must be 0..{ways - 1} with every class present; missing {missing}"
            )
        if ways < 2:
            raise L2OError("the support set needs at least 2 classes")
        with torch.no_grad():
            return self.model.adapt(support_x, support_y, ways, bn_mode=bn_mode, steps=steps)

    def __repr__(self) -> str:
        return f"Predictor(method={self.method!r}, image_shape={self.image_shape}, file={str(self.path)!r})"
