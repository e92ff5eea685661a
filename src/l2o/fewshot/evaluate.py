"""Few-shot evaluation: a fixed, seeded list of test episodes shared by every method.

The test episodes of a (data split, ways, shots, queries) are those of
:class:`~l2o.data.episodes.EpisodeSampler` with the seed :data:`TEST_SEED`, which
depends on nothing else (not on the method, the run seed or the checkpoint), so
every method is scored on exactly the same episodes.  Validation uses its own
fixed list (:data:`VAL_SEED`) on the meta-validation classes.

Report (Ravi & Larochelle 2017, section 5 of the reference spec): the mean
per-episode accuracy and the 95% interval 1.96 * s / sqrt(n) with s the sample
(unbiased) standard deviation of per-episode accuracies, both in percent.
"""

from __future__ import annotations

import math
import time

import torch

from ..seeds import derive_seed

TEST_SEED = derive_seed("test", "fewshot") % (2**62)
VAL_SEED = derive_seed("val", "fewshot") % (2**62)


def summarize(accuracies: list[float]) -> dict:
    """Mean accuracy and 95% interval, in percent, of per-episode accuracies in [0, 1]."""
    n = len(accuracies)
    if n == 0:
        raise ValueError("no episodes")
    acc = torch.tensor(accuracies, dtype=torch.float64) * 100.0
    std = acc.std(unbiased=True).item() if n > 1 else 0.0
    return {
        "accuracy": acc.mean().item(),
        "ci95": 1.96 * std / math.sqrt(n),
        "std": std,
        "episodes": n,
    }


def paired_difference(a: dict, b: dict) -> dict:
    """Mean of per-episode accuracy differences ``a - b`` (percent) with its 95% interval.

    Both reports must come from the same episode list (same seed and length): the
    paired interval removes the episode-difficulty variance the two share, so it is
    much narrower than the two marginal intervals together.
    """
    if a.get("episode_seed") != b.get("episode_seed") or a["episodes"] != b["episodes"]:
        raise ValueError("paired difference needs reports on the same episode list")
    diff = [
        x - y for x, y in zip(a["per_episode_accuracy"], b["per_episode_accuracy"], strict=True)
    ]
    s = summarize([d / 100.0 for d in diff])
    return {"difference": s["accuracy"], "ci95": s["ci95"], "episodes": s["episodes"]}


def run_episodes(
    model, episodes, bn_mode: str, steps: int | None = None, progress=None
) -> list[float]:
    """Per-episode query accuracy (in [0, 1]) of ``model`` on ``episodes`` (an iterable)."""
    accs = []
    device = model.device
    for ep in episodes:
        ep = ep.to(device)
        with torch.no_grad():
            adapted = model.adapt(
                ep.support_x, ep.support_y, len(ep.classes), bn_mode=bn_mode, steps=steps
            )
            pred = adapted.logits(ep.query_x).argmax(1)
        accs.append((pred == ep.query_y).float().mean().item())
        if progress is not None:
            progress.update(1)
    return accs


def evaluate(
    model,
    sampler,
    episodes: int,
    bn_mode: str,
    steps: int | None = None,
    show_progress: bool | None = None,
) -> dict:
    """Evaluate on episodes ``0..episodes-1`` of ``sampler``; returns the JSON-ready report."""
    bar = None
    if show_progress or show_progress is None:
        import sys

        if show_progress or sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=episodes, desc=f"eval {model.method}", unit="ep")
    t0 = time.time()
    accs = run_episodes(model, sampler.episodes(episodes), bn_mode, steps, bar)
    if bar is not None:
        bar.close()
    out = summarize(accs)
    inner = steps if steps is not None else model.inner_steps()
    out.update(
        {
            "method": model.method,
            "ways": sampler.ways,
            "shots": sampler.shots,
            "queries": sampler.queries,
            "inner_steps": inner,
            "bn_mode": bn_mode,
            "episode_seed": sampler.seed,
            "eval_seconds": time.time() - t0,
            "per_episode_accuracy": [100.0 * a for a in accs],
        }
    )
    return out
