"""The fast kernels of CoordinatewiseLSTM equal the straightforward implementation.

``_reference_update`` is the plain formulation (``preprocess`` + ``lstm_cell`` +
head); the no-grad path is blocked and in-place, the autograd path a custom
Function with a hand-written backward.  Both use tanh(z) = 2 sigmoid(2z) - 1, so
float32 results agree to rounding (~1e-7 absolute), float64 ones to ~1e-15.
"""

import pytest
import torch
from torch import nn

from l2o.preprocess import preprocess
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig
from l2o.rules import _lstm_kernels as K
from l2o.rules.lstm import _reference_update


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny blocks on a shared 2-core machine: OpenMP barriers dominate; 1 thread keeps this fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOL = {torch.float32: {"rtol": 1e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def make(n, dtype=torch.float32, seed=0, **cfg):
    torch.manual_seed(seed)
    rule = CoordinatewiseLSTM(LSTMRuleConfig(**cfg)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    # Gradients over many decades, zeros included (both log/sign branches).
    grad = torch.randn(n, generator=gen, dtype=dtype) * 10.0 ** torch.randint(
        -9, 2, (n,), generator=gen
    )
    if n > 3:
        grad[:2] = 0.0
    state = {
        k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in rule.init(grad).items()
    }
    return rule, grad, state


def assert_same(a, b, dtype):
    torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 2, 100, 5000])
def test_no_grad_path_equals_reference(n, dtype):
    rule, grad, state = make(n, dtype)
    with torch.no_grad():
        ref, ref_state = _reference_update(rule, grad, state)
        for block in (None, 4096, 999, 1):
            if block == 1 and n > 100:
                continue
            out, new_state = K.update_no_grad(rule, grad, state, block_rows=block)
            assert out.shape == (n,) and out.dtype == dtype
            assert_same(out, ref, dtype)
            assert set(new_state) == {"h0", "c0", "h1", "c1"}
            for k in ref_state:
                assert new_state[k].shape == (n, 20)
                assert_same(new_state[k], ref_state[k], dtype)
        # update() dispatches to the fast path under no_grad; the inputs are untouched.
        before = {k: v.clone() for k, v in state.items()}
        out, _ = rule.update(grad, state)
        assert_same(out, ref, dtype)
        for k in state:
            assert torch.equal(state[k], before[k])


@pytest.mark.parametrize(
    "cfg",
    [
        {"preprocessing": "none", "output_scale": 1.0},
        {"preprocessing": "scale", "input_scale": 3.0, "layers": (7,)},
        {"layers": (), "preprocessing": "none", "output_scale": 1.0},
        {"layers": (5, 8, 3), "p": 5.0, "output_scale": 0.01},
    ],
)
def test_no_grad_path_other_configs(cfg):
    rule, grad, state = make(3000, **cfg)
    with torch.no_grad():
        ref, ref_state = _reference_update(rule, grad, state)
        out, new_state = K.update_no_grad(rule, grad, state, block_rows=1024)
    assert_same(out, ref, torch.float32)
    for k in ref_state:
        assert_same(new_state[k], ref_state[k], torch.float32)


def _two_steps_loss(fn, rule, grad, state):
    """A scalar through two chained updates, touching the output and every state tensor."""
    g = grad.clone().requires_grad_(True)
    s0 = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    u, s1 = fn(rule, g, s0)
    u2, s2 = fn(rule, g * 0.5 + u, s1)
    loss = (
        (u2 * u2.detach().cos()).sum()
        + u.sum()
        + sum((v * v.detach().sin()).sum() for v in s2.values())
    )
    inputs = [*rule.parameters(), g, *s0.values()]
    return loss, torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 37, 2500])
def test_autograd_path_values_and_gradients_equal_reference(n, dtype, monkeypatch):
    monkeypatch.setattr(K, "BLOCK_ROWS", 1000)  # several blocks, the last one partial
    rule, grad, state = make(n, dtype)
    loss_ref, grads_ref = _two_steps_loss(_reference_update, rule, grad, state)
    loss, grads = _two_steps_loss(K.update_autograd, rule, grad, state)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=0.0)
    for a, b in zip(grads, grads_ref, strict=True):
        # Float32 sums over coordinates round differently: compare to the tensor's scale.
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def test_update_dispatches_to_autograd_path_when_training():
    rule, grad, state = make(100)
    out, new_state = rule.update(grad, state)
    assert out.requires_grad and new_state["h1"].requires_grad
    out.sum().backward()
    assert all(p.grad is not None for p in rule.parameters())


def test_gradcheck_lstm_layer():
    torch.manual_seed(0)
    n, f, hidden = 9, 3, 4
    args = [
        torch.randn(n, f, dtype=torch.float64),
        torch.randn(n, hidden, dtype=torch.float64),
        torch.randn(n, hidden, dtype=torch.float64),
        torch.randn(4 * hidden, f, dtype=torch.float64),
        torch.randn(4 * hidden, hidden, dtype=torch.float64),
        torch.randn(4 * hidden, dtype=torch.float64),
    ]
    args = [a.requires_grad_(True) for a in args]
    assert torch.autograd.gradcheck(lambda *a: K._LSTMLayer.apply(*a)[:2], args)


def test_fast_kernels_flag_selects_reference():
    rule, grad, state = make(50)
    rule.fast_kernels = False
    with torch.no_grad():
        out, _ = rule.update(grad, state)
        ref, _ = _reference_update(rule, grad, state)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("grad_mode", [False, True])
def test_equals_two_lstmcells_and_linear(grad_mode):
    """Our single bias is b_ih + b_hh of nn.LSTMCell; gate order i, f, g, o."""
    rule, grad, state = make(3000, preprocessing="logsign", p=10.0, output_scale=0.1)
    cells = [nn.LSTMCell(2, 20), nn.LSTMCell(20, 20)]
    head = nn.Linear(20, 1)
    with torch.no_grad():
        for cell, ours in zip(cells, rule.cells, strict=True):
            cell.weight_ih.copy_(ours.weight_ih)
            cell.weight_hh.copy_(ours.weight_hh)
            cell.bias_hh.uniform_(-1, 1)
            cell.bias_ih.copy_(ours.bias - cell.bias_hh)
        head.load_state_dict(rule.head.state_dict())
    with torch.set_grad_enabled(grad_mode):
        x = preprocess(grad, "logsign", 10.0)
        h0, c0 = cells[0](x, (state["h0"], state["c0"]))
        h1, c1 = cells[1](h0, (state["h1"], state["c1"]))
        expected = 0.1 * head(h1).squeeze(-1)
        out, new_state = rule.update(grad, state)
    assert out.requires_grad == grad_mode
    tol = {"rtol": 1e-5, "atol": 2e-6}
    torch.testing.assert_close(out, expected, **tol)
    for k, v in {"h0": h0, "c0": c0, "h1": h1, "c1": c1}.items():
        torch.testing.assert_close(new_state[k], v, **tol)
    if grad_mode:
        out.sum().backward()
        (expected.sum()).backward()
        for cell, ours in zip(cells, rule.cells, strict=True):
            torch.testing.assert_close(
                ours.weight_ih.grad, cell.weight_ih.grad, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                ours.weight_hh.grad, cell.weight_hh.grad, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(ours.bias.grad, cell.bias_ih.grad, rtol=1e-4, atol=1e-5)


def test_state_dict_layout_unchanged():
    rule = CoordinatewiseLSTM()
    assert {k: tuple(v.shape) for k, v in rule.state_dict().items()} == {
        "cells.0.weight_ih": (80, 2),
        "cells.0.weight_hh": (80, 20),
        "cells.0.bias": (80,),
        "cells.1.weight_ih": (80, 20),
        "cells.1.weight_hh": (80, 20),
        "cells.1.bias": (80,),
        "head.weight": (1, 20),
        "head.bias": (1,),
    }


def test_rnnprop_fast_layers_match_reference_and_meta_gradient():
    """RNNprop's blocked LSTM layers equal ``lstm_cell``: update, state and meta-gradient."""
    from l2o.rules.rnnprop import RNNprop

    torch.manual_seed(0)
    rule = RNNprop(zero_head=False)
    n = 3000
    grad = torch.randn(n) * 1e-2
    outs = {}
    for fast in (True, False):
        rule.fast_kernels = fast
        state = rule.init(torch.zeros(n))
        theta = torch.zeros(n)
        for _ in range(3):
            theta, state = rule.step(theta, grad, None, state)
        loss = (theta**2).sum() + state["h1"].square().sum()
        grads = torch.autograd.grad(loss, list(rule.parameters()))
        outs[fast] = (theta.detach(), state["c1"].detach(), grads)
    (ta, ca, ga), (tb, cb, gb) = outs[True], outs[False]
    assert torch.allclose(ta, tb, atol=1e-6) and torch.allclose(ca, cb, atol=1e-6)
    for a, b in zip(ga, gb):
        # absolute tolerance scaled to the gradient (entries up to ~700 here): sums over
        # 3,000 coordinates and 3 steps of float32 products, whose forward (the compiled
        # layer) rounds differently from lstm_cell's
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())
