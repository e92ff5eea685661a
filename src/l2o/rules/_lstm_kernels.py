"""Fast kernels for :class:`l2o.rules.lstm.CoordinatewiseLSTM` (pure PyTorch, no compiler).

Both paths compute the math of ``lstm_cell`` (gate order i, f, g, o) over all
coordinates at once, in row blocks of ``BLOCK_ROWS`` coordinates so that a
block's gates and temporaries stay in cache instead of streaming ``N x 4H``
tensors through memory a dozen times.  The loop is over a few dozen *blocks*,
never over coordinates or parameter tensors.

* :func:`update_no_grad` -- evaluation and the ``torch.optim`` adapter: preprocessing,
  every layer and the head per block, in place, into preallocated buffers and
  straight into the new state (or over the old one: ``inplace=True``).  One GEMM
  per layer and block computes all four gates from ``[x | h_prev]``.
* :func:`update_autograd` -- meta-training: one :class:`_LSTMLayer` autograd Function
  per layer (blocked forward, hand-written blocked backward, saving only the
  activated gates and ``c`` besides the inputs); preprocessing and head stay
  ordinary autograd ops.

Three measured choices (2-core AMD EPYC, 1 thread, see benchmarks/throughput.py):

* ``tanh(z) = 2 sigmoid(2 z) - 1``: PyTorch's CPU ``tanh`` (SLEEF) is ~7x slower per
  element than its ``sigmoid``.  The cell-gate rows of the weights and bias are
  doubled (exact in floating point), one sigmoid activates all four gates, and
  ``tanh(c)`` uses the same identity.  Exact in real arithmetic; float32 results
  differ from ``torch.tanh`` by rounding only (~1e-7 absolute).
* gates laid out ``[4, rows, H]`` (gate-major), so each gate is a contiguous slab
  shaped like the state: elementwise ops on ``[rows, 4H]`` column views were up to
  15x slower than on contiguous memory.
* no ``torch.compile`` (no compile time, no C compiler needed at run time).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Rows per block: [4, 16384, 20] float32 gates = 5 MiB.  Measured (no-grad forward,
# 1M coordinates, 1 thread, 2-core AMD EPYC, [rows, 4H] layout): 4k 1.57 s, 16k 1.56 s,
# 64k 2.31 s, one block of N 2.38 s (reference two nn.LSTMCell: 6.5 s).
BLOCK_ROWS = 16384
# Rows per block of the no-grad path (inputs, [rows, 4H] gates and scratch ~2 MiB at
# 4096 x 2x20).  Measured (1M coordinates, 1 thread, Intel Xeon with AVX-512, machine
# shared), time relative to 2048 rows with one GEMM per layer and tanh by sigmoid:
# two GEMMs in layer 2 0.95, + torch.tanh 0.84, + 4096 rows 0.76.
NO_GRAD_BLOCK_ROWS = 4096


def gate_scale(hidden: int, dtype, device) -> Tensor:
    """Per-row factor of the [4H, *] gate weights: 2 on the cell gate g, 1 elsewhere.

    Scaling g's pre-activation by 2 lets one sigmoid serve all gates, with
    tanh(z) = 2 sigmoid(2z) - 1 (PyTorch's CPU tanh is several times slower).
    """
    s = torch.ones(4 * hidden, dtype=dtype, device=device)
    s[2 * hidden : 3 * hidden] = 2.0
    return s


def _prepared(w_ih: Tensor, w_hh: Tensor, bias: Tensor):
    """Per-gate ``[4, in, H]`` transposed weights and ``[4, H]`` bias, g rows doubled."""
    hidden = w_hh.shape[1]
    s = gate_scale(hidden, w_ih.dtype, w_ih.device)
    w_ih_t4 = (w_ih * s[:, None]).view(4, hidden, -1).transpose(1, 2).contiguous()
    w_hh_t4 = (w_hh * s[:, None]).view(4, hidden, hidden).transpose(1, 2).contiguous()
    bias4 = (bias * s).view(4, hidden)
    return w_ih_t4, w_hh_t4, bias4


def _features_into(buf: Tensor, g: Tensor, kind: str, p: float, scale: float) -> Tensor:
    """Preprocess block ``g`` ([b]) into ``buf`` ([F, b], contiguous); returns ``[b, F]`` (a view)."""
    if kind == "logsign":
        log_part, sign_part = buf[0], buf[1]
        tiny = torch.finfo(buf.dtype).tiny
        torch.abs(g, out=log_part)
        log_part.clamp_min_(tiny).log_().div_(p).clamp_min_(-1.0)
        torch.mul(g, math.exp(p), out=sign_part)
        sign_part.clamp_(-1.0, 1.0)
    elif kind == "none":
        buf[0].copy_(g)
    elif kind == "scale":
        torch.mul(g, scale, out=buf[0])
    else:  # pragma: no cover - validated by LSTMRuleConfig
        raise ValueError(kind)
    return buf.t()


def _fused(w_ih: Tensor, w_hh: Tensor, bias: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``[in + H, 4H]`` weights (input rows, then recurrent rows), its recurrent rows
    ``[H, 4H]`` (a view) and the ``[4H]`` bias; the g gate's columns doubled."""
    s = gate_scale(w_hh.shape[1], dtype, w_ih.device)
    w = (torch.cat([w_ih.to(dtype), w_hh.to(dtype)], 1) * s[:, None]).t().contiguous()
    return w, w[w_ih.shape[1] :], bias.to(dtype) * s


@torch.no_grad()
def update_no_grad(
    rule, grad: Tensor, state: dict, block_rows: int | None = None, inplace: bool = False
) -> tuple[Tensor, dict]:
    """Blocked, no-grad ``rule.update(grad, state)``.

    Per row block and layer: one GEMM for all four gates (``[rows, in + H] @ [in + H, 4H]``
    on the first layer's ``[features | h_prev]`` side by side in one buffer; two GEMMs
    into the same gates, from ``x`` and from ``h_prev``, in the next layers), one sigmoid
    over all gates, then the cell in place with ``tanh(c)`` by ``torch.tanh`` (as fast
    as ``sigmoid`` on AVX-512; same values as the autograd path up to float rounding).  ``inplace=False``: the inputs are not modified and a new
    state is returned.  ``inplace=True``: the new state overwrites ``state``'s tensors
    (which may have another float dtype, e.g. bfloat16; the math runs in the rule's
    dtype) and ``state`` is returned: no ``[N, H]`` temporaries, for callers that own
    the state (:class:`l2o.optim.LearnedOptimizer`).
    """
    cfg = rule.config
    dtype = rule.head.weight.dtype
    device = rule.head.weight.device
    n = grad.numel()
    grad = grad.reshape(-1)
    feats = 2 if cfg.preprocessing == "logsign" else 1
    layers = []  # (hidden, input size, fused weights, their recurrent rows, fused bias)
    in_size = feats
    for cell in rule.cells:
        hidden = cell.weight_hh.shape[1]
        layers.append((hidden, in_size, *_fused(cell.weight_ih, cell.weight_hh, cell.bias, dtype)))
        in_size = hidden
    head_w = rule.head.weight.to(dtype).t().contiguous()  # [H_last, 1]
    head_b = rule.head.bias.to(dtype)
    out = torch.empty(n, dtype=dtype, device=device)
    if inplace:
        new_state = state
    else:
        new_state = {}
        for k, (hidden, *_) in enumerate(layers):
            new_state[f"h{k}"] = torch.empty(n, hidden, dtype=dtype, device=device)
            new_state[f"c{k}"] = torch.empty(n, hidden, dtype=dtype, device=device)
    if n == 0:
        return out, new_state
    if block_rows is None:  # on an accelerator: few launches, temporaries still bounded
        block_rows = NO_GRAD_BLOCK_ROWS if device.type == "cpu" else 1 << 18
    rows = max(1, min(block_rows, n))
    max_hidden = max((h for h, *_ in layers), default=1)
    # Inputs of the first layer: [features | h_prev].
    xbuf = torch.empty(rows, feats + (layers[0][0] if layers else 0), dtype=dtype, device=device)
    gbuf = torch.empty(rows, 4 * max_hidden, dtype=dtype, device=device)
    tbuf = torch.empty(rows, max_hidden, dtype=dtype, device=device)
    # Where the state is not in the rule's dtype (bfloat16 state), c and h are computed here.
    cbuf = hbuf = None
    if any(new_state[f"c{k}"].dtype != dtype for k in range(len(layers))):
        cbuf = torch.empty(rows, max_hidden, dtype=dtype, device=device)
        hbuf = torch.empty(rows, max_hidden, dtype=dtype, device=device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        b = e - s
        xin = xbuf[:b]
        x = _features_into(
            xin[:, :feats].t(), grad[s:e].to(dtype), cfg.preprocessing, cfg.p, cfg.input_scale
        )
        for k, (hidden, fan_in, w, w_h, bias) in enumerate(layers):
            gates = gbuf[:b, : 4 * hidden]
            if k == 0:
                xin[:, fan_in:].copy_(state["h0"][s:e])
                torch.addmm(bias, xin, w, out=gates)
            else:  # x = the previous layer's h, contiguous
                torch.addmm(bias, x, w[:fan_in], out=gates)
                gates.addmm_(state[f"h{k}"][s:e].to(dtype), w_h)
            gates.sigmoid_()  # i, f, o = sigmoid; the g columns hold sigmoid(2 z_g)
            i, f, g, o = gates.split(hidden, 1)
            c_new, h_new = new_state[f"c{k}"][s:e], new_state[f"h{k}"][s:e]
            c = c_new if cbuf is None or c_new.dtype == dtype else cbuf[:b, :hidden]
            torch.mul(f, state[f"c{k}"][s:e], out=c)
            c.addcmul_(i, g, value=2.0).sub_(i)  # c = f c_prev + i (2 sigmoid(2 z_g) - 1)
            t = tbuf[:b, :hidden]
            torch.tanh(c, out=t)
            h = h_new if hbuf is None or h_new.dtype == dtype else hbuf[:b, :hidden]
            torch.mul(o, t, out=h)
            if c is not c_new:
                c_new.copy_(c)
            if h is not h_new:
                h_new.copy_(h)
            x = h
        ob = out[s:e].unsqueeze(1)
        torch.addmm(head_b, x, head_w, out=ob)
        ob.mul_(cfg.output_scale)
    return out, new_state


def _block_rows(device, n: int) -> int:
    # Cache blocking pays on CPU; on an accelerator one launch per op is better.
    return BLOCK_ROWS if device.type == "cpu" else n


def _layer_forward_block(x, h_prev, c_prev, w_ih_t4, w_hh_t4, bias4, gates, c, h, t) -> None:
    """One layer on one row block: activated gates (i, f, tanh g, o) into ``gates``
    (``[4, rows, H]``), the new state into ``c`` and ``h``; ``t`` is scratch."""
    b = x.shape[0]
    if gates.is_contiguous():
        # Two batched matmuls instead of eight: fewer parallel regions (OpenMP barriers
        # are costly on a loaded machine); same values as the per-gate loop.
        torch.baddbmm(bias4[:, None, :], x.expand(4, b, x.shape[1]), w_ih_t4, out=gates)
        gates.baddbmm_(h_prev.expand(4, b, h_prev.shape[1]), w_hh_t4)
    else:  # a row block of the [4, N, H] gates of the autograd Function
        for k in range(4):
            torch.addmm(bias4[k], x, w_ih_t4[k], out=gates[k])
            gates[k].addmm_(h_prev, w_hh_t4[k])
    gates.sigmoid_()  # i, f, o = sigmoid; the g slab holds sigmoid(2 z_g)
    i, f, g, o = gates.unbind(0)
    g.mul_(2.0).sub_(1.0)  # = tanh(z_g)
    torch.mul(f, c_prev, out=c)
    c.addcmul_(i, g)
    torch.mul(c, 2.0, out=t)
    t.sigmoid_().mul_(2.0).sub_(1.0)  # = tanh(c)
    torch.mul(o, t, out=h)


class _LSTMLayer(torch.autograd.Function):
    """One LSTM layer over all coordinates: blocked forward, hand-written blocked backward.

    Saves the activated gates ``[4, N, H]`` and ``c`` besides the inputs (which the
    previous step produced anyway) instead of the ~10 intermediates autograd keeps.
    First-order backward (``once_differentiable``): second-order meta-gradients
    differentiate the optimizee's gradient, never this backward.
    """

    @staticmethod
    def forward(ctx, x, h_prev, c_prev, w_ih, w_hh, bias, native=True):
        from . import _lstm_native  # (it imports this module)

        lib = _lstm_native.layer_lib(x, h_prev, c_prev, w_ih) if native else None
        ctx.native_lib = lib
        # gradients of unused outputs (the gates; h or c at the end of an unroll) arrive as
        # None instead of zero-filled [N, H] tensors: the backward treats None as zero
        ctx.set_materialize_grads(False)
        if lib is not None:  # the compiled forward: same values up to float rounding
            h, c, gates = _lstm_native.layer_forward(lib, x, h_prev, c_prev, w_ih, w_hh, bias)
            ctx.save_for_backward(x, h_prev, c_prev, w_ih, w_hh, gates, c)
            ctx.mark_non_differentiable(gates)
            return h, c, gates
        n, hidden = c_prev.shape
        w_ih_t4, w_hh_t4, bias4 = _prepared(w_ih, w_hh, bias)
        gates = x.new_empty(4, n, hidden)
        c = x.new_empty(n, hidden)
        h = x.new_empty(n, hidden)
        rows = max(1, min(_block_rows(x.device, n), n))
        t = x.new_empty(rows, hidden)
        for a in range(0, n, rows):
            e = min(a + rows, n)
            _layer_forward_block(
                x[a:e],
                h_prev[a:e],
                c_prev[a:e],
                w_ih_t4,
                w_hh_t4,
                bias4,
                gates[:, a:e],
                c[a:e],
                h[a:e],
                t[: e - a],
            )
        ctx.save_for_backward(x, h_prev, c_prev, w_ih, w_hh, gates, c)
        ctx.mark_non_differentiable(gates)
        return h, c, gates

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh, dc, _dgates):
        x, h_prev, c_prev, w_ih, w_hh, gates, c = ctx.saved_tensors
        n, hidden = c.shape
        need_x, need_h, need_c, need_wih, need_whh, need_b = ctx.needs_input_grad[:6]
        if ctx.native_lib is not None:  # the forward ran the compiled layer
            from . import _lstm_native

            # the elementwise part compiled (one pass, dz as [N, 4H]), the products as
            # whole-N GEMMs
            dz, dc_prev = _lstm_native.layer_backward_dz(
                ctx.native_lib, dh, dc, gates, c, c_prev, need_c
            )
            return (
                dz @ w_ih if need_x else None,
                dz @ w_hh if need_h else None,
                dc_prev,
                dz.t() @ x if need_wih else None,
                dz.t() @ h_prev if need_whh else None,
                dz.sum(0) if need_b else None,
                None,
            )
        dx = torch.empty_like(x) if need_x else None
        dh_prev = torch.empty_like(h_prev) if need_h else None
        dc_prev = torch.empty_like(c_prev) if need_c else None
        dw_ih = torch.zeros_like(w_ih)
        dw_hh = torch.zeros_like(w_hh)
        db = torch.zeros(4, hidden, dtype=w_ih.dtype, device=w_ih.device)
        zero = c.new_zeros(())
        if dh is None:  # h unused downstream
            dh = zero.expand(n, hidden)
        if dc is None:  # c unused downstream (the last step of an unroll)
            dc = zero.expand(n, hidden)
        one = torch.ones((), dtype=c.dtype, device=c.device)
        rows = max(1, min(_block_rows(c.device, n), n))
        dz_buf = c.new_empty(4, rows, hidden)
        t_buf = c.new_empty(rows, hidden)
        u_buf = c.new_empty(rows, hidden)
        dct_buf = c.new_empty(rows, hidden)
        w_ih4 = w_ih.view(4, hidden, -1)
        w_hh4 = w_hh.view(4, hidden, hidden)
        dw_ih4 = dw_ih.view(4, hidden, -1)
        dw_hh4 = dw_hh.view(4, hidden, hidden)
        for a in range(0, n, rows):
            e = min(a + rows, n)
            b = e - a
            i, f, g, o = gates[:, a:e].unbind(0)
            dz = dz_buf[:, :b]
            dzi, dzf, dzg, dzo = dz.unbind(0)
            t, u, dct = t_buf[:b], u_buf[:b], dct_buf[:b]
            dhb = dh[a:e]
            torch.mul(c[a:e], 2.0, out=t)
            t.sigmoid_().mul_(2.0).sub_(1.0)  # t = tanh(c)
            # dz_o = dh t o (1 - o)
            torch.mul(dhb, t, out=dzo)
            torch.addcmul(o, o, o, value=-1.0, out=u)
            dzo.mul_(u)
            # dct = dc + dh o (1 - t^2)
            torch.addcmul(one, t, t, value=-1.0, out=u)
            u.mul_(o).mul_(dhb)
            torch.add(dc[a:e], u, out=dct)
            # dz_i = dct g i (1 - i);  dz_f = dct c_prev f (1 - f);  dz_g = dct i (1 - g^2)
            torch.addcmul(i, i, i, value=-1.0, out=u)
            torch.mul(dct, g, out=dzi)
            dzi.mul_(u)
            torch.addcmul(f, f, f, value=-1.0, out=u)
            torch.mul(dct, c_prev[a:e], out=dzf)
            dzf.mul_(u)
            torch.addcmul(one, g, g, value=-1.0, out=u)
            torch.mul(dct, i, out=dzg)
            dzg.mul_(u)
            if dc_prev is not None:
                torch.mul(dct, f, out=dc_prev[a:e])
            for k in range(4):
                if dx is not None:
                    if k == 0:
                        torch.mm(dz[k], w_ih4[k], out=dx[a:e])
                    else:
                        dx[a:e].addmm_(dz[k], w_ih4[k])
                if dh_prev is not None:
                    if k == 0:
                        torch.mm(dz[k], w_hh4[k], out=dh_prev[a:e])
                    else:
                        dh_prev[a:e].addmm_(dz[k], w_hh4[k])
                dw_ih4[k].addmm_(dz[k].t(), x[a:e])
                dw_hh4[k].addmm_(dz[k].t(), h_prev[a:e])
            db.add_(dz.sum(1))
        return (
            dx,
            dh_prev,
            dc_prev,
            dw_ih if need_wih else None,
            dw_hh if need_whh else None,
            db.view(-1) if need_b else None,
            None,
        )


def lstm_layer(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor, native: bool = True
) -> tuple[Tensor, Tensor]:
    """``lstm_cell`` for any input features, blocked (:class:`_LSTMLayer`): new ``(h, c)``.

    Differentiable to first order; the cell function of :func:`update_autograd` and of
    :class:`l2o.rules.rnnprop.RNNprop` (whose LSTM reads other features).  ``native``: the
    forward may run the compiled layer of :mod:`l2o.rules._lstm_native` (CPU float32,
    hidden size <= 32, ``L2O_NATIVE`` not 0), and then the backward's elementwise part is
    compiled too; otherwise both are this module's blocked PyTorch code.
    """
    dtype = w_ih.dtype
    h, c, _ = _LSTMLayer.apply(
        x.to(dtype).contiguous(),
        h.to(dtype).contiguous(),
        c.to(dtype).contiguous(),
        w_ih,
        w_hh,
        bias,
        native,
    )
    return h, c


def update_autograd(rule, grad: Tensor, state: dict) -> tuple[Tensor, dict]:
    """Differentiable ``rule.update``: one :class:`_LSTMLayer` per layer, autograd elsewhere
    (the layers' forward and elementwise backward compiled where ``rule.native_kernel`` and
    ``L2O_NATIVE`` allow)."""
    from .lstm import update_with_cells  # lstm imports this module at its top

    if getattr(rule, "native_kernel", True):
        return update_with_cells(rule, grad, state, lstm_layer)
    return update_with_cells(rule, grad, state, functools.partial(lstm_layer, native=False))
