"""Tasks (optimizees) and the registry behind ``--task name:key=value``."""

from __future__ import annotations

from collections.abc import Callable

from ..specs import build_from_spec
from .base import ParamLayout, Problem, Task
from .cifar import Cifar10CNN
from .family import Family
from .mlp import MnistMLP
from .module import ModuleTask
from .neural_art import NeuralArt
from .quadratic import Quadratic, QuadraticCode
from .simple import Simple

TASKS: dict[str, Callable[..., Task]] = {
    "quadratic": Quadratic,
    "quadratic-code": QuadraticCode,
    "simple": Simple,
    "mnist-mlp": MnistMLP,
    "cifar10-cnn": Cifar10CNN,
    "neural-art": NeuralArt,
    "family": Family,
}


def build_task(spec: str) -> Task:
    """Build a task from ``name`` or ``name:key=value,...`` (e.g. ``quadratic:dim=20``)."""
    return build_from_spec(spec, TASKS, "task")


__all__ = [
    "TASKS",
    "ModuleTask",
    "ParamLayout",
    "Problem",
    "Quadratic",
    "QuadraticCode",
    "Simple",
    "Task",
    "build_task",
]
