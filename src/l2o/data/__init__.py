"""Dataset readers (standard on-disk formats; never downloaded unless asked)."""

from . import cifar10, mnist
from .episodes import ClassDataset, Episode, EpisodeSampler
from .miniimagenet import load_miniimagenet
from .omniglot import (
    apply_split,
    load_omniglot,
    load_split,
    save_split,
    split_by_alphabet,
    split_by_character,
)

__all__ = [
    "cifar10",
    "mnist",
    "ClassDataset",
    "Episode",
    "EpisodeSampler",
    "apply_split",
    "load_miniimagenet",
    "load_omniglot",
    "load_split",
    "save_split",
    "split_by_alphabet",
    "split_by_character",
]
