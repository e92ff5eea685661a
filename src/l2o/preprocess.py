"""Gradient (and loss) preprocessing shared by all learned rules.

Andrychowicz et al. (2016, Appendix A) feed the optimizer network

    x  ->  ( log|x| / p ,  sgn(x) )    if |x| >= e^-p
    x  ->  ( -1         ,  e^p * x )   otherwise

so inputs spanning many orders of magnitude land in a range an LSTM can use.
The paper uses p = 10 (with the network output multiplied by 0.1 on MNIST); the
official TensorFlow code uses k = 5 (output x 0.01).  Both are named presets in
:mod:`l2o.rules.lstm`.  We compute the formula in its clamp form,

    ( max(log|x| / p, -1) ,  clip(e^p * x, -1, 1) )

which equals the two-branch formula everywhere (at |x| = e^-p both give
(-1, sgn x)) and is branch-free, so one fused expression handles every
coordinate.  log(0) is avoided by clamping |x| to the smallest normal float.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREPROCESSINGS = ("none", "scale", "logsign")


def log_sign(x: Tensor, p: float) -> Tensor:
    """Appendix-A preprocessing: returns ``x.shape + (2,)`` features (log part, sign part)."""
    tiny = torch.finfo(x.dtype).tiny
    log_part = (torch.log(x.abs().clamp_min(tiny)) / p).clamp_min(-1.0)
    sign_part = (x * math.exp(p)).clamp(-1.0, 1.0)
    return torch.stack((log_part, sign_part), dim=-1)


def num_features(kind: str) -> int:
    """Number of features per scalar produced by preprocessing ``kind``."""
    if kind == "logsign":
        return 2
    if kind in ("none", "scale"):
        return 1
    raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {kind!r}")


def preprocess(x: Tensor, kind: str, p: float = 10.0, scale: float = 1.0) -> Tensor:
    """Map a flat tensor ``[N]`` to features ``[N, F]``.

    Args:
      x: values to preprocess (gradient coordinates, or a loss broadcast to them).
      kind: ``"none"`` (raw value), ``"scale"`` (value times ``scale``) or
        ``"logsign"`` (Appendix A with parameter ``p``).
      p: the log/sign parameter (paper 10, official code 5).
      scale: the constant for ``"scale"``.
    """
    if kind == "logsign":
        return log_sign(x, p)
    if kind == "none":
        return x.unsqueeze(-1)
    if kind == "scale":
        return (x * scale).unsqueeze(-1)
    raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {kind!r}")
