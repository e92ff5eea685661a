"""Throughput of the coordinatewise LSTM rule against a naive two-``nn.LSTMCell`` reference.

    .venv/bin/python benchmarks/throughput.py            # 16k and 1M, 1 thread (~9 min)
    .venv/bin/python benchmarks/throughput.py --sizes 16384 --unroll 20 --out /tmp/t.json

For every size N the script builds our :class:`l2o.rules.CoordinatewiseLSTM`
("paper" preset: log/sign p = 10, two layers of 20 units, output x 0.1) and the
reference a straightforward PyTorch user writes: ``log_sign`` preprocessing, two
``torch.nn.LSTMCell(., 20)`` and an ``nn.Linear(20, 1)`` applied to all N
coordinates as one batch, holding the *same* weights (``bias_ih`` = our bias,
``bias_hh`` = 0).  It first checks that both give the same updates, states and
meta-gradients, then times, interleaved in one run (ours, ref, ref, ours, ... so
machine noise hits both alike):

* forward: one update step of all N coordinates under ``torch.no_grad()``;
* forward+backward: an unroll of U steps on the quadratic f(theta) = 1/2 sum a theta^2
  (theta <- theta + update, meta-loss = sum of the post-update losses, the
  optimizee gradient a * theta detached: the paper's first-order assumption),
  then ``backward()`` to the LSTM weights.  Steps/s counts the U steps.

Ratios are ours / reference (higher is better).  The ``lstm-gac`` row (``--no-gac`` skips
it) times :class:`l2o.rules.LSTMGAC` (the same LSTM, 2 global averaging cells per layer,
one instance of N coordinates) the same way, against our coordinatewise LSTM: the price of
the per-instance averages.  Memory per unrolled step is the
size of the tensors autograd saves for backward during the unroll (collected with
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once), divided
by U.  Results go to ``--out`` (default benchmarks/results/throughput.json).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import hardware
from torch import nn

from l2o.preprocess import log_sign
from l2o.rules import LSTMGAC, CoordinatewiseLSTM, LSTMGACConfig, LSTMRuleConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "throughput.json"


class NaiveLSTMRule(nn.Module):
    """What a straightforward PyTorch user writes: two LSTMCells + Linear on all coordinates."""

    def __init__(self, rule: CoordinatewiseLSTM):
        super().__init__()
        cfg = rule.config
        self.p, self.output_scale = cfg.p, cfg.output_scale
        self.cells = nn.ModuleList()
        in_size = 2
        for hidden in cfg.layers:
            self.cells.append(nn.LSTMCell(in_size, hidden))
            in_size = hidden
        self.head = nn.Linear(in_size, 1)
        with torch.no_grad():
            for ref, ours in zip(self.cells, rule.cells, strict=True):
                ref.weight_ih.copy_(ours.weight_ih)
                ref.weight_hh.copy_(ours.weight_hh)
                ref.bias_ih.copy_(ours.bias)  # our single bias = b_ih + b_hh
                ref.bias_hh.zero_()
            self.head.load_state_dict(rule.head.state_dict())

    def update(self, grad, state):
        x = log_sign(grad, self.p)
        new = {}
        for k, cell in enumerate(self.cells):
            h, c = cell(x, (state[f"h{k}"], state[f"c{k}"]))
            new[f"h{k}"], new[f"c{k}"] = h, c
            x = h
        return self.output_scale * self.head(x).squeeze(-1), new

    def meta_parameters(self):
        return [
            p for cell in self.cells for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih)
        ] + list(self.head.parameters())


def make_problem(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.exp(
        torch.empty(n).uniform_(math.log(1e-3), math.log(10.0), generator=gen)
    )  # curvatures
    theta = torch.randn(n, generator=gen)
    return a, theta


def warm_state(rule: CoordinatewiseLSTM, a, theta, steps: int = 2):
    """A realistic (non-zero) LSTM state: a few steps of the rule on the quadratic."""
    state = rule.init(theta)
    with torch.no_grad():
        for _ in range(steps):
            upd, state = rule.update(a * theta, state)
            theta = theta + upd
    return theta, state


def unroll_meta_loss(update, a, theta, state, length: int):
    """Differentiable unroll of ``length`` steps on f = 1/2 sum a theta^2 (gradients detached)."""
    meta_loss = theta.new_zeros(())
    for _ in range(length):
        grad = (a * theta).detach()
        upd, state = update(grad, state)
        theta = theta + upd
        meta_loss = meta_loss + 0.5 * (a * theta * theta).sum()
    return meta_loss


def saved_bytes_per_step(update, a, theta, state, length: int) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = unroll_meta_loss(update, a, theta, state, length)
    del loss
    return int(sum(seen.values()) / length)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_size(n: int, unroll: int, repeats: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rule = CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))
    ref = NaiveLSTMRule(rule)
    a, theta0 = make_problem(n, seed)
    theta, state = warm_state(rule, a, theta0)
    grad = a * theta

    # 1. Same outputs (forward) and same meta-gradients, before any timing.
    with torch.no_grad():
        u1, s1 = rule.update(grad, state)
        u2, s2 = ref.update(grad, state)
    torch.testing.assert_close(u1, u2, rtol=1e-5, atol=1e-6)
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-5, atol=1e-6)
    m = min(n, 65536)
    ours_params = [
        p for cell in rule.cells for p in (cell.weight_ih, cell.weight_hh, cell.bias)
    ] + list(rule.head.parameters())
    sub_state = {k: v[:m] for k, v in state.items()}
    g1 = torch.autograd.grad(
        unroll_meta_loss(rule.update, a[:m], theta[:m], sub_state, 3), ours_params
    )
    g2 = torch.autograd.grad(
        unroll_meta_loss(ref.update, a[:m], theta[:m], sub_state, 3), ref.meta_parameters()
    )
    for x, y in zip(g1, g2, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)

    # 2. Timings, interleaved.
    def fwd(mod):
        with torch.no_grad():
            mod.update(grad, state)

    def fwd_bwd(mod):
        mod.zero_grad(set_to_none=True)
        unroll_meta_loss(mod.update, a, theta, state, unroll).backward()

    fwd(rule), fwd(ref)  # warm-up (allocator, thread pool)
    times = {"fwd_ours": [], "fwd_ref": [], "fb_ours": [], "fb_ref": []}
    for r in range(repeats):
        order = (("ours", rule), ("ref", ref)) if r % 2 == 0 else (("ref", ref), ("ours", rule))
        for name, mod in order:
            times[f"fwd_{name}"].append(timed(lambda mod=mod: fwd(mod)))
        for name, mod in order:
            times[f"fb_{name}"].append(timed(lambda mod=mod: fwd_bwd(mod)))
    med = {k: statistics.median(v) for k, v in times.items()}

    mem_ours = saved_bytes_per_step(rule.update, a, theta, state, unroll)
    mem_ref = saved_bytes_per_step(ref.update, a, theta, state, unroll)
    return {
        "coordinates": n,
        "forward_ratio": med["fwd_ref"] / med["fwd_ours"],
        "forward_backward_ratio": med["fb_ref"] / med["fb_ours"],
        "forward_steps_per_s": 1.0 / med["fwd_ours"],
        "forward_steps_per_s_reference": 1.0 / med["fwd_ref"],
        "forward_backward_steps_per_s": unroll / med["fb_ours"],
        "forward_backward_steps_per_s_reference": unroll / med["fb_ref"],
        "unroll": unroll,
        "repeats": repeats,
        "memory_per_unrolled_step_bytes": mem_ours,
        "memory_per_unrolled_step_bytes_reference": mem_ref,
        "memory_ratio": mem_ref / mem_ours if mem_ours else None,
    }


def bench_gac(n: int, unroll: int, repeats: int, seed: int = 0) -> dict:
    """LSTM+GAC (paper preset, 2 GACs per layer) against our coordinatewise LSTM."""
    torch.manual_seed(seed)
    lstm = CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))
    gac = LSTMGAC(LSTMGACConfig.from_preset("paper", gac=2))
    gac.load_state_dict(lstm.state_dict())
    a, theta0 = make_problem(n, seed)
    theta, state = warm_state(lstm, a, theta0)
    grad = a * theta

    def fwd(mod):
        with torch.no_grad():
            mod.update(grad, state)

    def fwd_bwd(mod):
        mod.zero_grad(set_to_none=True)
        unroll_meta_loss(mod.update, a, theta, state, unroll).backward()

    fwd(gac), fwd(lstm)
    times = {"fwd_gac": [], "fwd_lstm": [], "fb_gac": [], "fb_lstm": []}
    for r in range(repeats):
        order = (("gac", gac), ("lstm", lstm)) if r % 2 == 0 else (("lstm", lstm), ("gac", gac))
        for name, mod in order:
            times[f"fwd_{name}"].append(timed(lambda mod=mod: fwd(mod)))
        for name, mod in order:
            times[f"fb_{name}"].append(timed(lambda mod=mod: fwd_bwd(mod)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rule": "lstm-gac (paper preset, gac=2 per layer, one instance)",
        "coordinates": n,
        "forward_steps_per_s": 1.0 / med["fwd_gac"],
        "forward_steps_per_s_lstm": 1.0 / med["fwd_lstm"],
        "forward_ratio_to_lstm": med["fwd_lstm"] / med["fwd_gac"],
        "forward_backward_steps_per_s": unroll / med["fb_gac"],
        "forward_backward_steps_per_s_lstm": unroll / med["fb_lstm"],
        "forward_backward_ratio_to_lstm": med["fb_lstm"] / med["fb_gac"],
        "unroll": unroll,
        "repeats": repeats,
        "memory_per_unrolled_step_bytes": saved_bytes_per_step(gac.update, a, theta, state, unroll),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--sizes", default="16384,1048576", help="comma-separated coordinate counts")
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per measurement (median reported)"
    )
    ap.add_argument(
        "--unroll",
        default="20,5",
        help="unroll length per size (comma-separated, last one repeats); default 20,5",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1; 0 = torch's default). On a shared,\n"
        "oversubscribed machine multi-threaded runs are dominated by OpenMP barrier waits.",
    )
    ap.add_argument("--no-gac", action="store_true", help="skip the lstm-gac row")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    unrolls = [int(u) for u in args.unroll.split(",") if u]
    results = {
        "command": " ".join(["python", *sys.argv]),
        "hardware": hardware(),
        "memory_method": "bytes of tensors saved for backward during the unroll "
        "(torch.autograd.graph.saved_tensors_hooks, each storage once) / unroll length",
        "reference": "log_sign(p=10) + 2 x torch.nn.LSTMCell(., 20) + nn.Linear(20, 1), same weights, one batch",
        "sizes": [],
    }
    print(
        f"{'N':>9} {'fwd st/s':>9} {'ref':>9} {'ratio':>6} {'f+b st/s':>9} {'ref':>9} {'ratio':>6} {'MiB/step':>9} {'ref':>8}"
    )
    for idx, n in enumerate(sizes):
        u = unrolls[min(idx, len(unrolls) - 1)]
        row = bench_size(n, u, args.repeats)
        results["sizes"].append(row)
        print(
            f"{n:>9} {row['forward_steps_per_s']:>9.2f} {row['forward_steps_per_s_reference']:>9.2f} "
            f"{row['forward_ratio']:>6.2f} {row['forward_backward_steps_per_s']:>9.2f} "
            f"{row['forward_backward_steps_per_s_reference']:>9.2f} {row['forward_backward_ratio']:>6.2f} "
            f"{row['memory_per_unrolled_step_bytes'] / 2**20:>9.1f} "
            f"{row['memory_per_unrolled_step_bytes_reference'] / 2**20:>8.1f}",
            flush=True,
        )
    if not args.no_gac:
        results["lstm_gac"] = []
        print(
            f"{'lstm-gac N':>10} {'fwd st/s':>9} {'lstm':>9} {'ratio':>6} {'f+b st/s':>9} {'lstm':>9} {'ratio':>6}"
        )
        for idx, n in enumerate(sizes):
            u = unrolls[min(idx, len(unrolls) - 1)]
            row = bench_gac(n, u, args.repeats)
            results["lstm_gac"].append(row)
            print(
                f"{n:>10} {row['forward_steps_per_s']:>9.2f} {row['forward_steps_per_s_lstm']:>9.2f} "
                f"{row['forward_ratio_to_lstm']:>6.2f} {row['forward_backward_steps_per_s']:>9.2f} "
                f"{row['forward_backward_steps_per_s_lstm']:>9.2f} "
                f"{row['forward_backward_ratio_to_lstm']:>6.2f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
