"""Where the compiled LSTM step spends its time, against the GEMM FLOP floor.

    .venv/bin/python benchmarks/lstm_native_parts.py   # writes benchmarks/results/lstm_native_parts.json

The compiled no-grad step of the 2x20 LSTM rule (``l2o.rules._lstm_native``) is built
from its one source in four variants, each with a part replaced by a cheap stand-in
(one multiply-add per vector) through the source's ``L2O_PROFILE_*`` macros:

* ``full``: the step as shipped;
* ``cheap_tanh``: ``tanh(c)`` of the cell replaced (the gate sigmoids stay);
* ``cheap_sigmoids``: the gate sigmoids and ``tanh(c)`` replaced;
* ``gemm_only``: as ``cheap_sigmoids`` and no cell at all (the gates are summed into the
  next layer's input): the gate GEMMs, preprocessing, head and loop overhead.

The variants run on the same 1M coordinates in one process and one thread, interleaved
over repeats with the SGEMM rate that defines the floor (``optim_step.sgemm_gflops``);
the differences between variants are the parts' costs (medians).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from l2o.rules import _lstm_native as native

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from optim_step import lstm_rule, rule_flops_per_coordinate, sgemm_gflops  # noqa: E402

OUT = HERE / "results" / "lstm_native_parts.json"
VARIANTS = {
    "full": [],
    "cheap_tanh": ["-DL2O_PROFILE_CHEAP_TANH"],
    "cheap_sigmoids": ["-DL2O_PROFILE_CHEAP_TANH", "-DL2O_PROFILE_CHEAP_GATES"],
    "gemm_only": [
        "-DL2O_PROFILE_CHEAP_TANH",
        "-DL2O_PROFILE_CHEAP_GATES",
        "-DL2O_PROFILE_NO_CELL",
    ],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coordinates", type=int, default=1 << 20)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="", help="free text stored in the JSON (machine load)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rule = lstm_rule()
    hidden = native.hidden_sizes(rule)
    libs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in VARIANTS.items():
            path = Path(tmp) / f"{name}.so"
            native._build(path, hidden, [*native.FLAGS, *flags])
            libs[name] = native._open(path)
        n = args.coordinates
        grad = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-3
        state = rule.init(grad)
        for lib in libs.values():  # warm-up, and a realistic state
            for _ in range(3):
                native.update(rule, lib, grad, state, inplace=True, threads=1)
        times = {name: [] for name in libs}
        gflops = []
        for _ in range(args.repeats):
            gflops.append(sgemm_gflops("cpu"))
            for name, lib in libs.items():
                t0 = time.perf_counter()
                native.update(rule, lib, grad, state, inplace=True, threads=1)
                times[name].append(time.perf_counter() - t0)
    flops = rule_flops_per_coordinate(rule)
    floors = [flops * n / (g * 1e9) for g in gflops]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor = statistics.median(floors)
    parts = {
        "gemm_preprocessing_head": med["gemm_only"],
        "cell_without_tanh": med["cheap_sigmoids"] - med["gemm_only"],
        "gate_sigmoids": med["cheap_tanh"] - med["cheap_sigmoids"],
        "tanh_c": med["full"] - med["cheap_tanh"],
    }
    results = {
        "benchmark": "parts of the compiled LSTM step (2x20, no grad, one thread)",
        "command": "python benchmarks/lstm_native_parts.py " + " ".join(sys.argv[1:]),
        "coordinates": n,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "compiler_flags": native.FLAGS,
        "machine_note": args.note,
        "rule_flops_per_coordinate": flops,
        "sgemm_gflops": statistics.median(gflops),
        "flop_floor_s": floor,
        "variants": {
            name: {
                "median_s": med[name],
                "ratio_to_flop_floor": statistics.median(
                    t / f for t, f in zip(ts, floors, strict=True)
                ),
                "per_repeat_s": ts,
            }
            for name, ts in times.items()
        },
        "parts_s": parts,
        "parts_ratio_to_floor": {k: v / floor for k, v in parts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{n:,} coordinates, floor {floor * 1e3:.1f} ms ({results['sgemm_gflops']:.0f} GFLOP/s)")
    for name in libs:
        v = results["variants"][name]
        print(f"{name:16s} {v['median_s'] * 1e3:8.1f} ms  {v['ratio_to_flop_floor']:.2f}x floor")
    for k, v in parts.items():
        print(f"  {k:26s} {v * 1e3:8.1f} ms  {v / floor:.2f}x floor")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
