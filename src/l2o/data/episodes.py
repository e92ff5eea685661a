"""Class-grouped image data sets and reproducible N-way K-shot episode sampling.

An *episode* (Ravi & Larochelle 2017, Vinyals et al. 2016) draws ``ways`` distinct
classes, then for each class shuffles its images and takes the first ``shots`` as the
support set and the next ``queries`` as the query set (disjoint, the official
protocol). Labels are episode-local, ``0..ways-1``, in a random class order.

Episode ``i`` of an :class:`EpisodeSampler` is a pure function of ``(seed, i)``: it
uses its own :class:`torch.Generator` seeded from a hash of the pair and never touches
the global RNG, so a fixed list of test episodes can be regenerated in any order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from l2o.errors import L2OError

__all__ = ["ClassDataset", "Episode", "EpisodeSampler", "episode_seed"]


@dataclass
class ClassDataset:
    """Images grouped by class, all in memory.

    Attributes:
        images: float32 ``[num_images, C, H, W]`` with values in ``[0, 1]``.
        labels: int64 ``[num_images]``, class index ``0..num_classes-1``.
        class_names: one name per class, e.g. ``"Greek/character01"`` or ``"n01532829"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    _index: list[torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise L2OError(
                f"ClassDataset images must be [N, C, H, W], got shape {tuple(self.images.shape)}"
            )
        labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if labels.dim() != 1 or labels.shape[0] != self.images.shape[0]:
            raise L2OError(
                f"ClassDataset labels must be [N] with N = {self.images.shape[0]} images, "
                f"got shape {tuple(labels.shape)}"
            )
        self.labels = labels
        self.class_names = list(self.class_names)
        k = len(self.class_names)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise L2OError(
                f"ClassDataset labels must lie in 0..{k - 1} for {k} class names, "
                f"got range {int(labels.min())}..{int(labels.max())}"
            )
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=k).tolist()
        self._index = list(torch.split(order, counts))

    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def indices_of(self, c: int) -> torch.Tensor:
        """Image indices of class ``c`` (int64, ascending; precomputed)."""
        if not 0 <= c < self.num_classes():
            raise L2OError(f"class index {c} out of range 0..{self.num_classes() - 1}")
        return self._index[c]

    def class_counts(self) -> list[int]:
        """Number of images of each class."""
        return [int(ix.numel()) for ix in self._index]

    def subset(self, classes: Sequence[int]) -> ClassDataset:
        """The images of ``classes``, relabelled ``0..k-1`` in the order given."""
        classes = [int(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise L2OError(f"subset classes must be distinct, got {classes}")
        parts = [self.indices_of(c) for c in classes]
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        new_labels = (
            torch.cat([torch.full((p.numel(),), j, dtype=torch.int64) for j, p in enumerate(parts)])
            if parts
            else torch.zeros(0, dtype=torch.int64)
        )
        return ClassDataset(
            images=self.images[idx],
            labels=new_labels,
            class_names=[self.class_names[c] for c in classes],
        )


@dataclass
class Episode:
    """One N-way K-shot episode.

    Support and query are class-major: rows ``j*shots .. (j+1)*shots-1`` of the support
    set (and ``j*queries ..`` of the query set) belong to episode label ``j``, whose
    dataset class is ``classes[j]``.
    """

    support_x: torch.Tensor  # [ways*shots, C, H, W]
    support_y: torch.Tensor  # [ways*shots] int64, episode-local labels 0..ways-1
    query_x: torch.Tensor  # [ways*queries, C, H, W]
    query_y: torch.Tensor  # [ways*queries] int64
    classes: list[int]  # dataset class indices, in label order

    def to(self, device) -> Episode:
        """This episode with its tensors on ``device`` (``Tensor.to`` copies only when needed)."""
        return Episode(
            self.support_x.to(device),
            self.support_y.to(device),
            self.query_x.to(device),
            self.query_y.to(device),
            self.classes,
        )


def episode_seed(seed: int, i: int) -> int:
    """A 63-bit generator seed that is a pure function of ``(seed, i)``."""
    digest = hashlib.sha256(f"l2o-episode:{int(seed)}:{int(i)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpisodeSampler:
    """Reproducible, random-access N-way K-shot episodes over a :class:`ClassDataset`."""

    def __init__(
        self,
        dataset: ClassDataset,
        ways: int,
        shots: int,
        queries: int = 15,
        seed: int = 0,
    ) -> None:
        if ways < 1 or shots < 1 or queries < 0:
            raise L2OError(
                f"episodes need ways >= 1, shots >= 1 and queries >= 0, "
                f"got ways={ways}, shots={shots}, queries={queries}"
            )
        n = dataset.num_classes()
        if ways > n:
            raise L2OError(f"ways={ways} is more than the {n} classes in the data set")
        counts = dataset.class_counts()
        smallest = min(counts)
        if shots + queries > smallest:
            worst = dataset.class_names[counts.index(smallest)]
            raise L2OError(
                f"shots + queries = {shots} + {queries} = {shots + queries} is more than "
                f"the {smallest} images of the smallest class ({worst!r})"
            )
        self.dataset = dataset
        self.ways = int(ways)
        self.shots = int(shots)
        self.queries = int(queries)
        self.seed = int(seed)

    def episode(self, i: int) -> Episode:
        """Episode ``i``: a pure function of ``(seed, i)``."""
        if i < 0:
            raise L2OError(f"episode index must be >= 0, got {i}")
        g = torch.Generator().manual_seed(episode_seed(self.seed, i))
        ds = self.dataset
        classes = torch.randperm(ds.num_classes(), generator=g)[: self.ways].tolist()
        sup, qry = [], []
        for c in classes:
            ix = ds.indices_of(c)
            perm = ix[torch.randperm(ix.numel(), generator=g)]
            sup.append(perm[: self.shots])
            qry.append(perm[self.shots : self.shots + self.queries])
        sup_ix = torch.cat(sup)
        qry_ix = torch.cat(qry)
        labels = torch.arange(self.ways, dtype=torch.int64)
        return Episode(
            support_x=ds.images[sup_ix],
            support_y=labels.repeat_interleave(self.shots),
            query_x=ds.images[qry_ix],
            query_y=labels.repeat_interleave(self.queries),
            classes=[int(c) for c in classes],
        )

    def episodes(self, n: int, start: int = 0) -> Iterator[Episode]:
        """Episodes ``start .. start+n-1``, in order."""
        for k in range(n):
            yield self.episode(start + k)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"seed={self.seed}, classes={self.dataset.num_classes()})"
        )
