"""Matplotlib figures (written as PNG; the Agg backend, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Mean loss per step (log scale) with a 95% band of the mean, one line per optimizer."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = results["problems"]
    for name, entry in results["optimizers"].items():
        mean = entry["mean_loss"]
        std = entry.get("std_loss", [0.0] * len(mean))
        steps = range(len(mean))
        label = f"{name} (sum {entry['sum_loss']:.1f})"
        lr = entry.get("hparams", {}).get("lr")
        if lr is not None:
            label = f"{name} lr={lr:g} (sum {entry['sum_loss']:.1f})"
        (line,) = ax.plot(steps, mean, label=label, lw=1.6)
        half = [1.96 * s / math.sqrt(n) for s in std]
        lo = [max(m - h, m * 1e-3) for m, h in zip(mean, half)]
        hi = [m + h for m, h in zip(mean, half)]
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"mean loss over {n} test problems")
    ax.set_title(
        title or f"{results.get('task_name', '')}: learned vs tuned hand-designed optimizers"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_validation(history_csv: str | Path, path: str | Path) -> Path:
    """Meta-loss per meta-step and validation sum-of-losses (meta-training drifts; validation picks the checkpoint)."""
    import csv

    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    # a warm start's row 0 holds only its validation (no trajectory yet)
    trained = [r for r in rows if r["meta_loss"] not in ("", "nan")]
    steps = [int(r["meta_step"]) for r in trained]
    meta = [float(r["meta_loss"]) for r in trained]
    val = [
        (int(r["meta_step"]), float(r["val_sum_loss"]))
        for r in rows
        if r["val_sum_loss"] not in ("", "nan")
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, meta, lw=0.8, alpha=0.6, label="training trajectory sum of losses")
    if val:
        ax.plot(*zip(*val), "o-", label="validation sum of losses")
    ax.set_yscale("log")
    ax.set_xlabel("meta-step (trajectory)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
