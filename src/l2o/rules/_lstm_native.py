"""Compiled kernels of the coordinatewise LSTM rule (optional; CPU, float32 math).

``_lstm_native.cpp`` holds three entry points, each equal to the PyTorch code it replaces
up to float rounding:

* ``l2o_lstm_step``: the whole no-grad step of :class:`l2o.rules.lstm.CoordinatewiseLSTM`
  for a coordinate (preprocessing, every layer, the head) with the gates in registers;
  float32 or bfloat16 state (:func:`update`);
* ``l2o_lstm_layer_forward``: one layer's forward for meta-training, also writing the
  activated gates its backward reads (:func:`layer_forward`);
* ``l2o_lstm_layer_backward_dz``: the elementwise part of that layer's backward, the gate
  gradients as ``[N, 4H]`` for whole-N GEMMs (:func:`layer_backward_dz`).

It is built on first use with the system C++ compiler (``$CXX``, default ``g++``; ``-O3
-march=native``, no PyTorch headers, about 1 s per set of hidden sizes) into a per-user
cache and called through :mod:`ctypes`.  Where no compiler works, or the configuration is
not covered (CUDA, float64, hidden sizes above 32, more than 4 layers), the PyTorch
kernels of :mod:`l2o.rules._lstm_kernels` run instead.

Settings (environment):

* ``L2O_NATIVE``: ``auto`` (default: use the kernel where it builds), ``0`` (never),
  ``1`` (always; an error when it cannot be built or the configuration is not covered).
* ``L2O_CACHE_DIR``: where the built library goes (default ``$XDG_CACHE_HOME/l2o`` or
  ``~/.cache/l2o``).  The file name hashes the source, compiler, flags and CPU, so one
  cache serves machines with different CPUs.

``status()`` says whether the kernel is in use and, if not, why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_lstm_native.cpp")
ABI_VERSION = 7
FLAGS = [
    "-O3", "-march=native", "-std=c++17", "-fno-math-errno", "-Wno-psabi", "-pthread", "-shared",
    "-fPIC",
]  # fmt: skip
MAX_HIDDEN = 32
MAX_LAYERS = 4
_PREPROCESSING = {"logsign": 0, "none": 1, "scale": 2}
LOG2E = 1.4426950408889634
STATE_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_libs: dict[tuple[int, ...], ctypes.CDLL | None] = {}  # hidden sizes -> library (None: failed)
_errors: dict[tuple[int, ...], str] = {}
# id(w_ih) -> (the layer's weights' values, (packed weights, packed bias)), for the step
# and the training forward alike.  The values are compared at every use (~3k floats for
# 2x20: microseconds), so no in-place change, load_state_dict or reused id can return
# stale weights; kept here, not on the rule, which must stay deep-copyable and picklable.
_layer_packs: dict[int, tuple] = {}


class NativeKernelError(RuntimeError):
    """``L2O_NATIVE=1`` and the compiled kernel cannot be used."""


def mode() -> str:
    value = os.environ.get("L2O_NATIVE", "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes"):
        return "on"
    raise NativeKernelError(f"L2O_NATIVE must be auto, 0 or 1, got {value!r}")


def cache_dir() -> Path:
    if os.environ.get("L2O_CACHE_DIR"):
        return Path(os.environ["L2O_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "l2o"


def _cpu_signature() -> str:
    """The CPU's feature flags (``-march=native`` code may not run on another CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def compiler_version() -> str:
    """``$CXX --version`` (empty when the compiler does not run)."""
    try:
        return subprocess.run(
            [_compiler(), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _sizes(hidden) -> tuple[int, ...]:
    return tuple(sorted(set(int(h) for h in hidden)))


def library_path(hidden=(20,)) -> Path:
    """Where the library for these hidden sizes, built from this source with this
    compiler for this CPU, is cached."""
    sizes = _sizes(hidden)
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), _compiler(), compiler_version() or "unknown",
                 " ".join(FLAGS), platform.machine(),
                 _cpu_signature(), repr(sizes)):  # fmt: skip
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    name = "-".join(str(s) for s in sizes)
    return cache_dir() / f"l2o_lstm_h{name}_{h.hexdigest()[:16]}.so"


def _size_flag(hidden) -> str:
    return "-DL2O_HIDDEN_SIZES=" + ",".join(str(s) for s in _sizes(hidden))


def _build(path: Path, hidden=(20,), flags: list[str] = FLAGS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [_compiler(), *flags, _size_flag(hidden), "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent process sees no half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_I64, _INT, _F32, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
# The kernel's entry points (the argument lists of _lstm_native.cpp's extern "C" functions).
_SIGNATURES = {
    "l2o_lstm_step": [
        _I64, _PTR, _INT, _F32, _F32, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT,
        _PTR, _F32, _F32, _PTR, _INT,
    ],
    "l2o_lstm_layer_forward": [
        _I64, _PTR, _INT, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT,
    ],
    "l2o_lstm_layer_backward_dz": [
        _I64, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT,
    ],
}  # fmt: skip


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.l2o_lstm_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has another ABI version; delete it to rebuild")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int  # 0, or an error code the caller turns into a message
        fn.argtypes = argtypes
    return lib


def load(hidden=(20,)) -> ctypes.CDLL | None:
    """The compiled kernel for these hidden sizes (built on first call), or None with the
    reason in ``status(hidden)``."""
    sizes = _sizes(hidden)
    with _lock:
        if sizes in _libs:
            return _libs[sizes]
        try:
            path = library_path(sizes)
            if not path.exists():
                _build(path, sizes)
            _libs[sizes] = _open(path)
        except Exception as exc:  # no compiler, a failed build, an unloadable file
            _errors[sizes] = f"{type(exc).__name__}: {exc}"
            _libs[sizes] = None
        return _libs[sizes]


def reset() -> None:
    """Forget the loaded libraries and build errors (tests; after changing ``CXX``)."""
    with _lock:
        _libs.clear()
        _errors.clear()


def status(hidden=(20,)) -> str:
    """``"in use"``, ``"disabled (L2O_NATIVE=0)"`` or ``"unavailable: <reason>"``."""
    if mode() == "off":
        return "disabled (L2O_NATIVE=0)"
    if load(hidden) is not None:
        return "in use"
    return f"unavailable: {_errors[_sizes(hidden)]}"


def hidden_sizes(rule) -> tuple[int, ...]:
    return _sizes(cell.weight_hh.shape[1] for cell in rule.cells)


def unsupported(rule, grad: Tensor, state: dict) -> str | None:
    """Why the compiled kernel cannot run this update (None: it can)."""
    cfg = rule.config
    if cfg.preprocessing not in _PREPROCESSING:
        return f"preprocessing {cfg.preprocessing!r}"
    if not 1 <= len(rule.cells) <= MAX_LAYERS:
        return f"{len(rule.cells)} layers (1..{MAX_LAYERS} supported)"
    dtypes = set()
    n = grad.numel()
    for k, cell in enumerate(rule.cells):
        hidden = cell.weight_hh.shape[1]
        if hidden > MAX_HIDDEN:
            return f"hidden size {hidden} (at most {MAX_HIDDEN})"
        for name in (f"h{k}", f"c{k}"):
            v = state.get(name)
            if v is None or v.dtype not in STATE_DTYPES or v.device.type != "cpu":
                return f"state {name} is not a float32 or bfloat16 CPU tensor"
            # (the kernel trusts the shapes: a wrong one would read out of bounds; the
            # PyTorch kernel then runs and reports it)
            if tuple(v.shape) != (n, hidden):
                return f"state {name} has shape {tuple(v.shape)}, expected {(n, hidden)}"
            dtypes.add(v.dtype)
    if len(dtypes) > 1:
        return "the state mixes float32 and bfloat16"
    if rule.head.weight.dtype != torch.float32 or rule.head.weight.device.type != "cpu":
        return "the rule's parameters are not float32 on the CPU"
    if grad.device.type != "cpu":
        return "the gradient is not on the CPU"
    return None


@torch.no_grad()
def _pack_layer(w_ih: Tensor, w_hh: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """One layer's weights in the kernel's layout, cached until they change.

    ``[in + H, NV * 16]``: the fused ``[x | h]`` weights with the 4H gate columns padded to
    whole 16-float vectors, scaled by ``-log2(e)`` (the kernel computes sigmoid(z) as
    1 / (1 + 2^t) from t = -z log2(e)) and by 2 on the g gate (tanh(z) = 2 sigmoid(2z) - 1);
    the bias ``[NV * 16]`` likewise.
    """
    from ._lstm_kernels import _fused  # (that module imports this one)

    key = torch.cat([w_ih.detach().reshape(-1), w_hh.detach().reshape(-1), bias.detach()])
    cached = _layer_packs.get(id(w_ih))
    if cached is not None and torch.equal(cached[0], key):
        return cached[1]
    h = w_hh.shape[1]
    w, _, b = _fused(w_ih.detach(), w_hh.detach(), bias.detach(), torch.float32)
    nv = (4 * h + 15) // 16
    wp = torch.zeros(w.shape[0], nv * 16)
    wp[:, : 4 * h] = w * -LOG2E
    bp = torch.zeros(nv * 16)
    bp[: 4 * h] = b * -LOG2E
    if len(_layer_packs) >= 64:  # bounded: layers of rules no longer in use
        _layer_packs.clear()
    _layer_packs[id(w_ih)] = (key, (wp, bp))
    return wp, bp


def layer_lib(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor) -> ctypes.CDLL | None:
    """The compiled library for a training-forward of this layer, or None (then the
    PyTorch forward runs): CPU float32 tensors, hidden size <= 32, L2O_NATIVE not 0."""
    hidden = h.shape[1] if h.dim() == 2 else 0
    if mode() == "off" or not 1 <= hidden <= MAX_HIDDEN:
        return None
    for t in (x, h, c, w_ih):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None
    # the kernel trusts the shapes; anything else goes to the PyTorch forward, which checks
    n = h.shape[0]
    if x.dim() != 2 or x.shape[0] != n or tuple(c.shape) != (n, hidden):
        return None
    if tuple(w_ih.shape) != (4 * hidden, x.shape[1]):
        return None
    return load((hidden,))


@torch.no_grad()
def layer_forward(
    lib: ctypes.CDLL, x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer over all coordinates: new ``h``, ``c`` ``[N, H]`` and the activated
    gates ``[4, N, H]`` (i, f, tanh(z_g), o), as the forward of
    ``_lstm_kernels._LSTMLayer`` computes them (equal up to float rounding)."""
    n, hidden = c.shape
    wp, bp = _pack_layer(w_ih, w_hh, bias)
    x, h, c = x.contiguous(), h.contiguous(), c.contiguous()
    h_new = torch.empty(n, hidden)
    c_new = torch.empty(n, hidden)
    gates = torch.empty(4, n, hidden)
    if n:
        rc = lib.l2o_lstm_layer_forward(
            n, x.data_ptr(), x.shape[1], hidden, wp.data_ptr(), bp.data_ptr(), h.data_ptr(),
            c.data_ptr(), h_new.data_ptr(), c_new.data_ptr(), gates.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise NativeKernelError(f"l2o_lstm_layer_forward rejected the layer (code {rc})")
    return h_new, c_new, gates


@torch.no_grad()
def layer_backward_dz(
    lib: ctypes.CDLL,
    dh: Tensor | None,
    dc: Tensor | None,
    gates: Tensor,
    c: Tensor,
    c_prev: Tensor,
    need_c_prev: bool,
) -> tuple[Tensor, Tensor | None]:
    """The gate pre-activations' gradients ``[N, 4H]`` (row order of the ``[4H, K]``
    weights) and ``dc_prev`` (or None) of one layer, from the upstream ``dh``, ``dc``
    (None: zero) and what the forward saved: the elementwise part of
    ``_LSTMLayer.backward`` in one pass."""
    n, hidden = c.shape
    dz = torch.empty(n, 4 * hidden)
    dc_prev = torch.empty(n, hidden) if need_c_prev else None
    dh = None if dh is None else dh.to(torch.float32).contiguous()
    dc = None if dc is None else dc.to(torch.float32).contiguous()
    gates, c, c_prev = gates.contiguous(), c.contiguous(), c_prev.contiguous()
    if n:
        lib.l2o_lstm_layer_backward_dz(
            n, hidden, None if dh is None else dh.data_ptr(), None if dc is None else dc.data_ptr(),
            gates.data_ptr(), c.data_ptr(), c_prev.data_ptr(), dz.data_ptr(),
            None if dc_prev is None else dc_prev.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return dz, dc_prev


def _packed(rule) -> tuple:
    """The rule's weights as the step takes them: per layer :func:`_pack_layer`'s (cached),
    the head, and the ctypes arrays of hidden sizes and pointers."""
    weights, biases = zip(*(_pack_layer(c.weight_ih, c.weight_hh, c.bias) for c in rule.cells))
    hidden = [cell.weight_hh.shape[1] for cell in rule.cells]
    P = ctypes.c_void_p * len(hidden)
    return (
        weights,  # (the arrays below point into these: keep them alive with the call)
        biases,
        rule.head.weight.detach().reshape(-1).contiguous(),
        float(rule.head.bias.detach().reshape(())),
        (ctypes.c_int * len(hidden))(*hidden),
        P(*[w.data_ptr() for w in weights]),
        P(*[b.data_ptr() for b in biases]),
    )


@torch.no_grad()
def update(
    rule, lib: ctypes.CDLL, grad: Tensor, state: dict, inplace: bool, threads: int | None = None
) -> tuple[Tensor, dict]:
    """The update for the flat gradient ``grad`` and the new state, as
    ``_lstm_kernels.update_no_grad``: ``inplace=True`` overwrites ``state``'s (float32,
    CPU) tensors and returns ``state``; otherwise new tensors are returned.  ``threads``
    (default ``torch.get_num_threads()``) share the coordinates; the result does not
    depend on it."""
    cfg = rule.config
    n = grad.numel()
    g = grad.reshape(-1).to(torch.float32).contiguous()
    out = torch.empty(n, dtype=torch.float32)
    layers = len(rule.cells)
    names = [(f"h{k}", f"c{k}") for k in range(layers)]
    ins = {
        k: state[k] if state[k].is_contiguous() else state[k].contiguous()
        for kk in names
        for k in kk
    }
    if inplace:
        outs = ins
    else:
        outs = {
            k: torch.empty_like(v, memory_format=torch.contiguous_format) for k, v in ins.items()
        }
    if n == 0:
        return out, (state if inplace else outs)
    packed = _packed(rule)  # held until the call returns: its arrays point into it
    _, _, head_w, head_b, hidden, w_ptrs, b_ptrs = packed
    P = ctypes.c_void_p * layers

    def ptrs(d, i):
        return P(*[d[kk[i]].data_ptr() for kk in names])

    rc = lib.l2o_lstm_step(
        n,
        g.data_ptr(),
        _PREPROCESSING[cfg.preprocessing],
        float(cfg.p),
        float(cfg.input_scale),
        layers,
        hidden,
        w_ptrs,
        b_ptrs,
        ptrs(ins, 0),
        ptrs(ins, 1),
        ptrs(outs, 0),
        ptrs(outs, 1),
        int(state["h0"].dtype == torch.bfloat16),
        head_w.data_ptr(),
        head_b,
        float(cfg.output_scale),
        out.data_ptr(),
        torch.get_num_threads() if threads is None else int(threads),
    )
    if rc != 0:  # unsupported() screens every case the kernel rejects
        raise NativeKernelError(f"l2o_lstm_step rejected the configuration (code {rc})")
    if not inplace:
        return out, outs
    for k, v in ins.items():  # state tensors that were not contiguous: updated via a copy
        if v is not state[k]:
            state[k].copy_(v)
    return out, state
