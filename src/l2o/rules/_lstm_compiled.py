"""The coordinatewise LSTM's optimizer step through ``torch.compile``.

The fused path for accelerators (and an option on CPU): the whole no-grad step --
preprocessing, every layer, the head and the in-place state write -- is one function
that TorchInductor compiles.  On CUDA, Inductor keeps the gate GEMMs as library calls
and generates Triton kernels for the elementwise work between them, where the PyTorch
kernel launches one kernel per op, each a round trip of an ``[N, 4H]`` tensor through
memory (not yet measured on a GPU: none was available when this was written).  On CPU
it generates C++ loops around the GEMMs and is much slower than the compiled C++ step
of :mod:`l2o.rules._lstm_native` (docs/optim.md), so it is opt-in.

Why a separate function of plain tensors instead of compiling ``rule.update_``:
Dynamo guards on the objects a compiled function touches, so a function of the rule
module would recompile for every rule object (``LearnedOptimizer`` makes private copies
per device), and the blocked kernels' ``out=`` buffers and Python loop over row blocks
are what the compiler replaces.  Sizes are dynamic (one compilation serves every chunk
length); the configuration (preprocessing, number of layers) is a guard, so changing
it recompiles.

The first call compiles (tens of seconds on CPU); later calls with the same layer
structure reuse it.  Requires a working ``torch.compile`` (on CPU a C++ compiler; on
CUDA, Triton, which CUDA builds of PyTorch ship).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..preprocess import preprocess
from . import lstm as _lstm  # (that module imports this one; used at call time only)

_compiled_step = None


def _step_(
    grad: Tensor,
    hs: list[Tensor],
    cs: list[Tensor],
    weights: list[tuple[Tensor, Tensor, Tensor]],
    head_w: Tensor,
    head_b: Tensor,
    kind: str,
    p: float,
    scale: float,
    output_scale: float,
) -> Tensor:
    """One LSTM step for every coordinate; overwrites ``hs`` and ``cs``; returns the update.

    ``weights[k] = (w_ih, w_hh, bias)`` of layer k as in ``nn.LSTMCell`` (gate order
    i, f, g, o).  The state may be stored in another float dtype (bfloat16): it is read
    into the weights' dtype and the new state cast back on the write.
    """
    dtype = head_w.dtype
    x = preprocess(grad.to(dtype), kind, p, scale)
    for k, (w_ih, w_hh, bias) in enumerate(weights):
        h, c = _lstm.lstm_cell(x, hs[k].to(dtype), cs[k].to(dtype), w_ih, w_hh, bias)
        # In place inside the compiled graph: Inductor writes the new state straight
        # into the caller's tensors (no [N, H] temporaries kept beyond the kernel).
        cs[k].copy_(c)
        hs[k].copy_(h)
        x = h
    return (x @ head_w.t() + head_b).squeeze(1) * output_scale


def update_(rule, grad: Tensor, state: dict) -> Tensor:
    """``rule.update_(grad, state)`` (in place, no autograd) through ``torch.compile``."""
    global _compiled_step
    if _compiled_step is None:
        # dynamic=True: the chunk length changes between calls; one graph covers them.
        _compiled_step = torch.compile(_step_, dynamic=True, fullgraph=True)
    cfg = rule.config
    n_layers = len(rule.cells)
    weights = [(c.weight_ih, c.weight_hh, c.bias) for c in rule.cells]
    with torch.no_grad():
        try:
            return _compiled_step(
                grad.reshape(-1),
                [state[f"h{k}"] for k in range(n_layers)],
                [state[f"c{k}"] for k in range(n_layers)],
                weights,
                rule.head.weight,
                rule.head.bias,
                cfg.preprocessing,
                float(cfg.p),
                float(cfg.input_scale),
                float(cfg.output_scale),
            )
        except Exception as err:  # noqa: BLE001 - dynamo, inductor or a compiler: re-raised with the fix
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RuntimeError(
                "LearnedOptimizer(compile=True) / update_(compiled=True): torch.compile of the "
                f"LSTM step failed ({type(err).__name__}: {first}); use compile=False (the "
                "default kernels need no compiler)"
            ) from err
