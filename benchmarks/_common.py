"""Shared by the benchmark scripts: a description of the machine a result came from."""

from __future__ import annotations

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
