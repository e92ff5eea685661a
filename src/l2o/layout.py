"""Where one tensor and one problem instance end inside a flat parameter vector.

Every update rule works on one flat vector holding all coordinates of all
parameter tensors (so one batch covers every coordinate, with no Python loop
over tensors).  The :class:`ParamLayout` says what that vector is made of:

* ``names`` / ``shapes``: the tensors packed, in order, into the vector;
* ``instances``: how many *independent* problems are optimized together
  (``P``).  When ``P > 1``, axis 0 of every tensor is the instance axis, so
  instance ``p`` owns row ``p`` of every tensor (the batched quadratics and
  MLPs of a meta-training trajectory).

Coordinatewise rules (the L2L LSTM, Adam) never need it.  A rule that couples
coordinates (a global average, a gradient norm, a memory) must do so *per
instance*, or it would mix the independent problems of a meta-batch:
:meth:`ParamLayout.instance_index` gives the instance of every coordinate, and
:func:`instance_sum` / :func:`instance_mean` / :func:`broadcast` are the
reductions such a rule is written with.  A layout is hashable (rules cache
per-layout plans by it) and cheap to build.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the tensors packed, in order, into one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    #: independent problem instances; when > 1, axis 0 of every tensor is the instance axis
    instances: int = 1

    def __post_init__(self):
        if len(self.names) != len(self.shapes):
            raise ValueError(f"layout: {len(self.names)} names but {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"layout: tensor names must be unique, got {list(self.names)}")
        if self.instances < 1:
            raise ValueError(f"layout: instances must be >= 1, got {self.instances}")
        if self.instances > 1:
            for n, s in zip(self.names, self.shapes, strict=True):
                if not s or s[0] != self.instances:
                    raise ValueError(
                        f"layout: tensor {n!r} has shape {s}; with {self.instances} instances "
                        "every tensor needs the instance axis first"
                    )

    @classmethod
    def from_tensors(cls, named: dict[str, Tensor], instances: int = 1) -> ParamLayout:
        return cls(tuple(named), tuple(tuple(t.shape) for t in named.values()), instances)

    @classmethod
    def flat(cls, numel: int, name: str = "theta") -> ParamLayout:
        """One tensor of ``numel`` coordinates, one instance (what a bare flat vector means)."""
        return cls((name,), ((int(numel),),))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def instance_numel(self) -> int:
        """Coordinates of one instance."""
        return self.numel // self.instances

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Named views into ``flat`` (differentiable, no copy)."""
        parts = torch.split(flat, self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, size in zip(self.names, self.sizes):
            out[n] = slice(start, start + size)
            start += size
        return out

    def subset(self, names: Sequence[str]) -> ParamLayout:
        """The layout of some of the tensors (kept in this layout's order)."""
        keep = set(names)
        unknown = keep - set(self.names)
        if unknown:
            raise ValueError(f"layout: no tensors named {sorted(unknown)}")
        pairs = [(n, s) for n, s in zip(self.names, self.shapes) if n in keep]
        return ParamLayout(tuple(n for n, _ in pairs), tuple(s for _, s in pairs), self.instances)

    def instance_index(self, device: torch.device | str = "cpu") -> Tensor:
        """The instance (``0..P-1``) of every coordinate: a ``LongTensor [numel]``."""
        return _instance_index(self, torch.device(device))

    def tensor_index(self, device: torch.device | str = "cpu") -> Tensor:
        """The tensor (index into ``names``) of every coordinate: a ``LongTensor [numel]``."""
        return _tensor_index(self, torch.device(device))


@functools.lru_cache(maxsize=64)
def _instance_index(layout: ParamLayout, device: torch.device) -> Tensor:
    P = layout.instances
    parts = [torch.arange(P, device=device).repeat_interleave(size // P) for size in layout.sizes]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _tensor_index(layout: ParamLayout, device: torch.device) -> Tensor:
    sizes = torch.tensor(layout.sizes, device=device)
    return torch.arange(len(layout.sizes), device=device).repeat_interleave(sizes)


def layout_for(theta: Tensor, layout: ParamLayout | None) -> ParamLayout:
    """``layout``, or the one-instance layout of a bare flat vector; checks the size."""
    if layout is None:
        return ParamLayout.flat(theta.numel())
    if layout.numel != theta.numel():
        raise ValueError(
            f"layout has {layout.numel} coordinates but the parameter vector has {theta.numel()}"
        )
    return layout


def instance_sum(x: Tensor, layout: ParamLayout) -> Tensor:
    """Sum of ``x`` (``[N]`` or ``[N, k]``) over the coordinates of each instance: ``[P, ...]``."""
    if layout.instances == 1:
        return x.sum(0, keepdim=True)
    idx = layout.instance_index(x.device)
    out = x.new_zeros((layout.instances, *x.shape[1:]))
    return out.index_add(0, idx, x)  # out-of-place: differentiable


def instance_mean(x: Tensor, layout: ParamLayout) -> Tensor:
    """Mean of ``x`` over the coordinates of each instance: ``[P, ...]``."""
    return instance_sum(x, layout) / layout.instance_numel


def broadcast(v: Tensor, layout: ParamLayout) -> Tensor:
    """Per-instance values ``[P, ...]`` (or one value ``[1, ...]`` / a scalar) to every coordinate."""
    if v.dim() == 0 or v.shape[0] == 1:
        v = v.reshape(1, *v.shape[1:]) if v.dim() else v.reshape(1)
        return v.expand(layout.numel, *v.shape[1:])
    if v.shape[0] != layout.instances:
        raise ValueError(
            f"expected one value per instance ({layout.instances}), got shape {tuple(v.shape)}"
        )
    if layout.instances == 1:
        return v.expand(layout.numel, *v.shape[1:])
    return v.index_select(0, layout.instance_index(v.device))
