"""Cost of ``LearnedOptimizer.step()`` on a 1M-parameter model, relative to ``torch.optim.Adam``.

    .venv/bin/python benchmarks/optim_step.py            # writes benchmarks/results/optim_step.json

Time: one process, the optimizers stepped in turn (interleaved repeats, so load
from other processes hits all of them alike); each repeat times
consecutive ``step()`` calls per optimizer (at least ``--steps`` and ``--min-time``
seconds) on the same fixed gradients.  The
ratio is median(step time) / median(torch.optim.Adam step time) of this run
(``ratio_to_torch_adam_paired``: the median of the per-repeat ratios).
``rule only`` times the rule's functional ``step`` on ready-made flat tensors: it
returns a new state each call (the adapter overwrites it in place), so on CPU it also
pays for fresh ``[N, H]`` allocations (page faults: large blocks come from ``mmap``).
``torch.optim.Adam(fused=True)`` is the reference the fused CUDA path is compared with
(``ratio_to_torch_adam_fused``).

Compute floor: the LSTM rule's multiply-adds per coordinate (``rule_flops_per_coordinate``:
2 x 4H x (in + H) per layer plus 2 x H for the head; 9,960 FLOPs for the 2x20 LSTM on
log/sign features; the 160 sigmoids, 40 tanh and ~300 other elementwise operations per
coordinate are not counted) times the number of coordinates, divided by this machine's
single-thread float32 GEMM throughput (``torch.mm`` of two 1024x1024 matrices, measured
in every repeat of the same run, same load).  ``ratio_to_flop_floor`` = the
median over repeats of (LSTM step time / floor of that repeat).  Variants of the LSTM
optimizer: ``chunk_size=65536`` (16 gather/scatter chunks instead of the default 2^20
coordinates, one chunk for this model; 65,536 was the default before), a bfloat16 hidden
state (``state_dtype``), the step through ``torch.compile`` (``compile=True``, the fused
path meant for CUDA; its first step, which compiles, is in the warm-up) and the PyTorch
kernel with the compiled step off (``rule.native_kernel = False``: the "before" of the
compiled step, in the same run);
they are skipped when the code under test lacks the option.  The JSON records whether the
compiled step was in use (``compiled_lstm_step``).

Memory: each optimizer is measured in a fresh child process, after two warm-up
steps.  ``peak B/param`` = the optimizer state held when ``step()`` starts plus
the peak of the tensor storages allocated during ``step()`` and still alive
(counted exactly by a ``TorchDispatchMode`` that sees every op's outputs), per
parameter (a storage counts when an op creates it: outputs that alias an input, such as
in-place ops, ``out=`` and views, are not new memory).  ``state B/param`` is the state alone.  As a cross-check the child
also reports the process-level number: resident set size (``VmRSS``) once the
model and its gradients exist vs. the kernel's peak (``VmHWM``, reset through
``/proc/self/clear_refs``) during the third step; it includes allocator slack
(on CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from l2o.optim import LearnedOptimizer
from l2o.rules import Adam, CoordinatewiseLSTM, LSTMRuleConfig, MLPLOpt

OUT = Path(__file__).resolve().parent / "results" / "optim_step.json"
LSTM = "LearnedOptimizer(lstm 2x20)"
CHUNKED = "LearnedOptimizer(lstm 2x20, chunk_size=65536)"
BF16 = "LearnedOptimizer(lstm 2x20, bfloat16 state)"
# the same rule with the compiled step switched off (rule.native_kernel = False): the
# PyTorch kernel, i.e. "before" the compiled step, in the same run
TORCH_KERNEL = "LearnedOptimizer(lstm 2x20, PyTorch kernel)"
# the step through torch.compile (l2o.rules._lstm_compiled): the fused path for CUDA
COMPILED = "LearnedOptimizer(lstm 2x20, compile=True)"
FUSED_ADAM = "torch.optim.Adam(fused=True)"
# issue 18's transfer rule (l2o.rules.transfer): an MLP 8 -> 32 -> 32 -> 2 per coordinate,
# with per-tensor hypergradient step sizes (hd): pretrained/general-hd's architecture
MLP_LOPT = "LearnedOptimizer(mlp-lopt 2x32, hd)"
# the same without step-size adaptation (the artifact before general-hd): the cost of hd
MLP_LOPT_PLAIN = "LearnedOptimizer(mlp-lopt 2x32)"
# with the three extra scale-free features: pretrained/general's architecture (issue 18); the cost
# of the per-tensor reductions they add (gradient / tensor RMS, tensor / model RMS, log RMS)
FEATURES = "grad-rel+tensor-rel+param-scale"
MLP_LOPT_FEATURES = f"LearnedOptimizer(mlp-lopt 2x32, hd, {FEATURES})"
NAMES = [
    "torch.optim.Adam",
    FUSED_ADAM,
    LSTM,
    TORCH_KERNEL,
    COMPILED,
    CHUNKED,
    BF16,
    "LearnedOptimizer(l2o Adam)",
    MLP_LOPT,
    MLP_LOPT_PLAIN,
    MLP_LOPT_FEATURES,
]
OPTIONS = {
    LSTM: {},
    CHUNKED: {"chunk_size": 65536},
    BF16: {"state_dtype": torch.bfloat16},
    COMPILED: {"compile": True},
}


def lstm_rule() -> CoordinatewiseLSTM:
    torch.manual_seed(1)
    return CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))


def rule_flops_per_coordinate(rule: CoordinatewiseLSTM) -> int:
    """Multiply-adds (x2) of the LSTM's gates and head for one coordinate."""
    flops = 0
    for cell in rule.cells:
        four_h, fan_in = cell.weight_ih.shape
        flops += 2 * four_h * (fan_in + cell.weight_hh.shape[1])
    return flops + 2 * rule.head.in_features


def sgemm_gflops(device: str, size: int = 1024, reps: int = 5) -> float:
    """float32 GEMM throughput of this machine now (median of ``reps`` products)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    c = torch.empty(size, size, device=device)
    torch.mm(a, b, out=c)
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        ts.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(ts) / 1e9


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    # 784*1024+1024 + 1024*192+192 + 192*10+10 = 1,002,570 parameters
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 192), nn.ReLU(), nn.Linear(192, 10)
    )
    model.to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def make_opt(name: str, model: nn.Module):
    if name == "torch.optim.Adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if name == FUSED_ADAM:
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    if name in OPTIONS:
        return LearnedOptimizer(model.parameters(), rule=lstm_rule(), **OPTIONS[name])
    if name == TORCH_KERNEL:
        rule = lstm_rule()
        if not hasattr(rule, "native_kernel"):
            raise TypeError("no compiled step in the code under test")
        rule.native_kernel = False
        return LearnedOptimizer(model.parameters(), rule=rule)
    if name == "LearnedOptimizer(l2o Adam)":
        return LearnedOptimizer(model.parameters(), rule=Adam(lr=1e-3))
    if name == MLP_LOPT:
        return LearnedOptimizer(model.parameters(), rule=MLPLOpt(hd=0.1))
    if name == MLP_LOPT_PLAIN:
        return LearnedOptimizer(model.parameters(), rule=MLPLOpt())
    if name == MLP_LOPT_FEATURES:
        return LearnedOptimizer(model.parameters(), rule=MLPLOpt(hd=0.1, features=FEATURES))
    raise ValueError(name)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                seen.add(v.untyped_storage().data_ptr())
                total += v.untyped_storage().nbytes()
    return total


def proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _TensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode that are still alive; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [python tensors alive, bytes]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.refs[key]
            self.current -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0:
                continue
            if key in self.refs:
                self.refs[key][0] += 1
            elif key in inputs:  # in place, out= or a view of memory that existed before
                continue
            else:
                self.refs[key] = [1, t.untyped_storage().nbytes()]
                self.current += self.refs[key][1]
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def memory_child(name: str, device: str) -> dict:
    """Runs in a fresh process: peak memory of one optimizer (see the module docstring)."""
    tiny = nn.Linear(2, 2).to(device)
    tiny.weight.grad, tiny.bias.grad = torch.zeros_like(tiny.weight), torch.zeros_like(tiny.bias)
    make_opt(name, tiny).step()  # lazy imports and one-time allocations, out of the baseline
    model = make_model(device)
    n = sum(p.numel() for p in model.parameters())
    gc.collect()
    if device == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
    else:
        base = proc_kb("VmRSS") * 1024
    opt = make_opt(name, model)
    for _ in range(2):
        opt.step()
    gc.collect()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    opt.step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else proc_kb("VmHWM") * 1024
    held = state_bytes(opt)
    process_peak = (peak - base) / n
    if name == COMPILED:
        # torch.compile does not run under a TorchDispatchMode (no compiled frame), so
        # the exact accounting is not possible: the process-level peak stands in.
        return {
            "peak_bytes_per_param": process_peak,
            "peak_method": "process-level (torch.compile does not run under TorchDispatchMode)",
            "state_bytes_per_param": held / n,
            "step_temporaries_bytes_per_param": None,
            ("cuda_peak_bytes_per_param" if device == "cuda" else "rss_peak_bytes_per_param"): (
                process_peak
            ),
        }
    tracker = _TensorMemory()
    with tracker:
        opt.step()
    return {
        "peak_bytes_per_param": (held + tracker.peak) / n,
        "state_bytes_per_param": held / n,
        "step_temporaries_bytes_per_param": tracker.peak / n,
        ("cuda_peak_bytes_per_param" if device == "cuda" else "rss_peak_bytes_per_param"): (
            process_peak
        ),
    }


def native_status() -> dict:
    """Whether the LSTM rows ran the compiled step (l2o.rules._lstm_native), and with what."""
    try:
        from l2o.rules import _lstm_native
    except ImportError:
        return {"status": "not in the code under test"}
    version = _lstm_native.compiler_version()
    return {
        "status": _lstm_native.status(),
        "compiler": _lstm_native._compiler(),
        "compiler_version": version.splitlines()[0] if version else "",
        "flags": _lstm_native.FLAGS,
    }


def supported(name: str) -> bool:
    """False for an option the LearnedOptimizer under test does not have (a 'before' run)."""
    try:
        make_opt(name, nn.Linear(1, 1))
    except TypeError:
        return False
    return True


def rule_only_step(device: str):
    """The LSTM rule on ready flat tensors (no gather/scatter): returns a timing closure."""
    rule = lstm_rule().to(device)
    model = make_model(device)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    holder = {"theta": theta, "state": rule.init(theta)}

    def run():
        with torch.no_grad():
            holder["theta"], holder["state"] = rule.step(
                holder["theta"], grad, None, holder["state"]
            )

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1, help="min steps per optimizer per repeat")
    ap.add_argument(
        "--min-time", type=float, default=0.5, help="min seconds per optimizer per repeat"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. 'machine shared')")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.device)))
        return

    dev = args.device
    names = [name for name in NAMES if supported(name)]
    skipped = [name for name in NAMES if name not in names]
    models = {name: make_model(dev) for name in names}
    n = sum(p.numel() for p in models[names[0]].parameters())
    opts = {name: make_opt(name, models[name]) for name in names}
    runners = {name: opts[name].step for name in names}
    runners["rule only (lstm 2x20, flat tensors)"] = rule_only_step(dev)
    for run in runners.values():  # warm-up: state allocation, first-call costs
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    gflops: list[float] = []
    for _ in range(args.repeats):
        gflops.append(sgemm_gflops(dev))
        for name, run in runners.items():
            # at least --steps steps and --min-time seconds per optimizer per repeat
            sync(dev)
            t0, k = time.perf_counter(), 0
            while k < args.steps or time.perf_counter() - t0 < args.min_time:
                run()
                k += 1
                sync(dev)
            times[name].append((time.perf_counter() - t0) / k)
    ref = statistics.median(times["torch.optim.Adam"])
    flops = rule_flops_per_coordinate(lstm_rule())
    floors = [flops * n / (g * 1e9) for g in gflops]

    memory = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            name,
            "--device",
            dev,
            "--threads",
            str(args.threads),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[name] = json.loads(res.stdout.strip().splitlines()[-1])

    results = {
        "benchmark": "LearnedOptimizer.step() vs torch.optim.Adam.step()",
        "command": "python benchmarks/optim_step.py " + " ".join(sys.argv[1:]),
        "model": "MLP 784-1024-192-10",
        "parameters": n,
        "device": dev,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "repeats": args.repeats,
        "min_steps_per_repeat": args.steps,
        "min_seconds_per_repeat": args.min_time,
        "machine_note": args.note,
        "skipped_variants": skipped,
        "compiled_lstm_step": native_status(),
        "rule_flops_per_coordinate": flops,
        "sgemm_gflops_single_call_per_repeat": gflops,
        "sgemm_gflops": statistics.median(gflops),
        "flop_floor_s": statistics.median(floors),
        "timing": {
            name: {
                "median_step_s": statistics.median(ts),
                "min_step_s": min(ts),
                "ratio_to_torch_adam": statistics.median(ts) / ref,
                # each repeat against torch.optim.Adam of the same repeat (same load), then median
                "ratio_to_torch_adam_paired": statistics.median(
                    t / a for t, a in zip(ts, times["torch.optim.Adam"], strict=True)
                ),
                "ratio_to_torch_adam_fused": statistics.median(ts)
                / statistics.median(times[FUSED_ADAM]),
                "ratio_to_flop_floor": statistics.median(
                    t / f for t, f in zip(ts, floors, strict=True)
                ),
                "per_repeat_s": ts,
            }
            for name, ts in times.items()
        },
        "memory": memory,
        "memory_method": (
            "peak_bytes_per_param = optimizer state held at the start of step() + peak bytes of tensor "
            "storages allocated during step() and alive (TorchDispatchMode accounting), per parameter, "
            "fresh process per optimizer after 2 warm-up steps; rss_peak_bytes_per_param = VmHWM during "
            "the 3rd step (peak reset via /proc/self/clear_refs) - VmRSS with model+grads before the "
            "optimizer existed; cuda_peak_bytes_per_param = torch.cuda.max_memory_allocated - allocated before"
        ),
    }
    results["ratio_to_flop_floor"] = results["timing"][LSTM]["ratio_to_flop_floor"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{n:,} parameters on {dev}, {torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats"
    )
    print(
        f"floor: {flops} FLOPs/coordinate x {n:,} / {results['sgemm_gflops']:.1f} GFLOP/s (sgemm, "
        f"this run) = {results['flop_floor_s'] * 1e3:.1f} ms"
    )
    print(
        f"{'optimizer':48s} {'step ms':>9s} {'x Adam':>8s} {'paired':>8s} {'x floor':>8s} "
        f"{'peak B/param':>13s} {'state B/param':>14s}"
    )
    for name, tm in results["timing"].items():
        mem = memory.get(name, {})
        peak, st = mem.get("peak_bytes_per_param"), mem.get("state_bytes_per_param")
        print(
            f"{name:48s} {tm['median_step_s'] * 1e3:9.2f} {tm['ratio_to_torch_adam']:8.1f} "
            f"{tm['ratio_to_torch_adam_paired']:8.1f} {tm['ratio_to_flop_floor']:8.2f} "
            f"{'' if peak is None else f'{peak:13.0f}'} {'' if st is None else f'{st:14.0f}'}"
        )
    print(f"compiled LSTM step: {results['compiled_lstm_step']['status']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
