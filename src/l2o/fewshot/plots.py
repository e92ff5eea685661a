"""What the meta-learner learned: forget- and input-gate values over the inner steps.

Ravi & Larochelle (2017), figure 3: for each weight layer of the learner (conv1-4 and
the linear head), the gate values over the T inner steps, one line per validation
episode.  We plot each layer's mean gate over its weight coordinates (the official
``visualize_gates.lua`` follows one random weight per layer; ``coordinate="random"``
does that).  A forget gate near 1 is plain gradient descent; slightly below 1 is a
learned weight decay; the input gate is a per-step learning rate (on the gradient
the rule sees, i.e. after the ``grad_scale`` division).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402

WEIGHT_LAYERS = ("conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight", "head.weight")


def collect_gates(
    model, episodes, bn_mode: str = "support-running", coordinate: str = "mean", seed: int = 0
) -> dict:
    """Gate values ``{"forget"|"input": {layer: [episodes][steps]}}`` of a Meta-LSTM model."""
    if model.method != "meta-lstm":
        raise ValueError(f"gate values exist only for the Meta-Learner LSTM, not {model.method}")
    out = {"forget": {}, "input": {}, "steps": model.inner_steps()}
    gen = torch.Generator().manual_seed(seed)
    picks = {}
    for ep in episodes:
        log: list = []
        with torch.no_grad():
            adapted = model.adapt(
                ep.support_x, ep.support_y, len(ep.classes), bn_mode=bn_mode, gate_log=log
            )
        slices = adapted.learner.layout.slices()
        names = [n for n in WEIGHT_LAYERS if n in slices]
        for name in names:
            sl = slices[name]
            if coordinate == "random" and name not in picks:
                picks[name] = sl.start + int(torch.randint(sl.stop - sl.start, (1,), generator=gen))
            for key, idx in (("forget", 0), ("input", 1)):
                vals = [
                    g[idx][picks[name]].item()
                    if coordinate == "random"
                    else g[idx][sl].mean().item()
                    for g in log
                ]
                out[key].setdefault(name, []).append(vals)
    return out


def plot_gates(gates: dict, path: str | Path, title: str | None = None) -> Path:
    layers = list(gates["forget"])
    fig, axes = plt.subplots(2, len(layers), figsize=(3.0 * len(layers), 5.2), squeeze=False)
    for col, name in enumerate(layers):
        for row, key in enumerate(("forget", "input")):
            ax = axes[row][col]
            for vals in gates[key][name]:
                ax.plot(
                    range(1, len(vals) + 1),
                    vals,
                    lw=0.8,
                    alpha=0.5,
                    color="C0" if row == 0 else "C1",
                )
            ax.set_title(f"{name.split('.')[0]}: {key} gate", fontsize=9)
            ax.set_xlabel("inner step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(
        title
        or "Meta-Learner LSTM gate values over the inner steps (one line per validation episode)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
