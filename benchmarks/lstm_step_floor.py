"""Where the LSTM rule's no-grad step spends its time, against the GEMM FLOP floor.

    .venv/bin/python benchmarks/lstm_step_floor.py   # writes benchmarks/results/lstm_step_floor.json

``benchmarks/optim_step.py`` reports the 2x20 LSTM step at several times its FLOP floor
(multiply-adds per coordinate / this machine's single-thread large-``torch.mm``
throughput).  This script splits the kernel of ``l2o.rules._lstm_kernels.update_no_grad``
into its parts, each timed alone over 1M coordinates in the kernel's own row blocks and
shapes, in one process and one thread, interleaved over repeats (medians):

* ``gemm_layer1``: ``[rows, 2 + 20] @ [22, 80]`` (features and h_prev -> four gates);
* ``gemm_layer2``: ``[rows, 20] @ [20, 80]`` twice (x and h_prev);
* ``sigmoid``: one sigmoid over ``[rows, 80]`` per layer (all four gates);
* ``tanh``: ``tanh(c)`` over ``[rows, 20]`` per layer;
* ``cell``: the cell's other elementwise ops per layer (f*c, +i*g, o*tanh c);
* ``kernel``: the whole ``update_no_grad`` (preprocessing and head included).

It also reports the throughput the skinny GEMMs reach (GFLOP/s) against the large GEMM
that defines the floor: the floor assumes GEMMs of this shape run as fast as a
1024x1024 one (``optim_step.sgemm_gflops``, measured in every repeat) and that the 200
transcendental functions per coordinate are free.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from l2o.rules._lstm_kernels import NO_GRAD_BLOCK_ROWS, update_no_grad

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# the same rule, FLOP count and SGEMM rate as optim_step.py's floor
from optim_step import lstm_rule, rule_flops_per_coordinate, sgemm_gflops  # noqa: E402

OUT = HERE / "results" / "lstm_step_floor.json"
H = 20
FEATS = 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coordinates", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="", help="free text stored in the JSON (machine load)")
    args = ap.parse_args(argv)
    if args.coordinates <= 0 or args.repeats <= 0:
        ap.error("--coordinates and --repeats must be positive")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, rows = args.coordinates, NO_GRAD_BLOCK_ROWS
    blocks = range(0, n, rows)

    x1 = torch.randn(rows, FEATS + H)
    w1 = torch.randn(FEATS + H, 4 * H) * 0.1
    x2, h2 = torch.randn(rows, H), torch.randn(rows, H)
    w2 = torch.randn(H, 4 * H) * 0.1
    bias = torch.randn(4 * H)
    gates = torch.empty(rows, 4 * H)
    c_prev, c, t, h = (torch.randn(rows, H) for _ in range(4))

    def gemm1():
        for _ in blocks:
            torch.addmm(bias, x1, w1, out=gates)

    def gemm2():
        for _ in blocks:
            torch.addmm(bias, x2, w2, out=gates)
            gates.addmm_(h2, w2)

    def sigmoid():
        for _ in blocks:
            gates.sigmoid_()

    def tanh():
        for _ in blocks:
            torch.tanh(c, out=t)

    def cell():
        i, f, g, o = gates.split(H, 1)
        for _ in blocks:
            torch.mul(f, c_prev, out=c)
            c.addcmul_(i, g, value=2.0).sub_(i)
            torch.mul(o, t, out=h)

    rule = lstm_rule()  # 2 x H, log/sign features (FEATS)
    grad = torch.randn(n) * 1e-3
    state = rule.init(torch.zeros(n))

    def kernel():
        update_no_grad(rule, grad, state, inplace=True)

    parts = {"gemm_layer1": gemm1, "gemm_layer2": gemm2, "sigmoid": sigmoid, "tanh": tanh,
             "cell": cell, "kernel": kernel}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in parts}
    gflops: list[float] = []
    for f in parts.values():  # warm-up
        f()
    for _ in range(args.repeats):
        gflops.append(sgemm_gflops("cpu"))
        for name, f in parts.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    sgemm = statistics.median(gflops)
    flops = rule_flops_per_coordinate(rule)
    floor = flops * n / (sgemm * 1e9)
    # the kernel runs each per-layer part once per layer
    per_step = {
        "gemm": med["gemm_layer1"] + med["gemm_layer2"],
        "sigmoid": 2 * med["sigmoid"],
        "tanh": 2 * med["tanh"],
        "cell": 2 * med["cell"],
    }
    doc = {
        "benchmark": "LSTM 2x20 no-grad step split into its parts vs the GEMM FLOP floor",
        "command": "python benchmarks/lstm_step_floor.py"
        + (f" --note {args.note!r}" if args.note else ""),
        "note": args.note,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": 1,
        "coordinates": n,
        "block_rows": rows,
        "repeats": args.repeats,
        "rule_flops_per_coordinate": flops,
        "sgemm_gflops_1024": sgemm,
        "flop_floor_s": floor,
        "median_s": med,
        "per_step_s": per_step,
        "sum_of_parts_s": sum(per_step.values()),
        "kernel_ratio_to_flop_floor": med["kernel"] / floor,
        "gemm_only_ratio_to_flop_floor": per_step["gemm"] / floor,
        "skinny_gemm_gflops": {
            "layer1": 2 * 4 * H * (FEATS + H) * n / med["gemm_layer1"] / 1e9,
            "layer2": 2 * 4 * H * 2 * H * n / med["gemm_layer2"] / 1e9,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"floor {floor:.3f} s (sgemm {sgemm:.0f} GFLOP/s); kernel {med['kernel']:.3f} s = "
          f"{med['kernel'] / floor:.1f}x floor")  # fmt: skip
    for k, v in per_step.items():
        print(f"  {k:8s} {v:.3f} s  ({v / floor:.2f}x floor)")
    print(f"skinny GEMMs: {doc['skinny_gemm_gflops']['layer1']:.0f} / "
          f"{doc['skinny_gemm_gflops']['layer2']:.0f} GFLOP/s; wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
