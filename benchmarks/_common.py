"""Shared by the benchmark scripts: the machine a result came from, paired differences, and a
base for rules that wrap another rule."""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch


def hardware() -> dict:
    """CPU model, torch threads and versions (recorded beside every timing)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean and 95% interval of per-problem sums a - b (``[steps + 1, n]`` loss matrices).

    Both must come from the same problems (same seeds): pairing removes the spread between
    problems that the two share, which dominates the unpaired intervals.
    """
    d = (a[1:].double().sum(0) - b[1:].double().sum(0)).numpy()
    n = len(d)
    ci = 1.96 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return {"mean": float(d.mean()), "ci95": ci, "n": n}


class RuleWrapper:
    """An update rule that delegates to ``rule``: its name, flags, state and step.

    Subclasses change :meth:`step` (what the rule is fed, or what is recorded of it)."""

    def __init__(self, rule):
        self.rule = rule
        self.name = getattr(rule, "name", "rule")
        self.needs_loss = getattr(rule, "needs_loss", False)
        self.coordinatewise = getattr(rule, "coordinatewise", True)

    def init(self, theta, layout=None):
        return self.rule.init(theta, layout)

    def step(self, theta, grad, loss, state, layout=None):
        return self.rule.step(theta, grad, loss, state, layout)
