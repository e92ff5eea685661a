"""The compiled LSTM step (l2o.rules._lstm_native) against the PyTorch kernel."""

from __future__ import annotations

import copy
import pickle
import shutil

import pytest
import torch

from l2o.optim import LearnedOptimizer
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig
from l2o.rules import _lstm_kernels as kernels
from l2o.rules import _lstm_native as native

AVAILABLE = native.mode() != "off" and native.load() is not None
needs_lib = pytest.mark.skipif(
    not AVAILABLE, reason=f"compiled LSTM step not available here: {native.status()}"
)


def lib_for(rule):
    lib = native.load(native.hidden_sizes(rule))
    assert lib is not None, native.status(native.hidden_sizes(rule))
    return lib


def make_rule(seed=0, **kwargs) -> CoordinatewiseLSTM:
    torch.manual_seed(seed)
    cfg = LSTMRuleConfig.from_preset("paper")
    cfg = LSTMRuleConfig(**{**cfg.to_dict(), **kwargs})
    return CoordinatewiseLSTM(cfg)


def random_state(rule, n, seed=1, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen) * scale for k, v in rule.init(torch.zeros(n)).items()
    }


def torch_update(rule, grad, state):
    return kernels.update_no_grad(rule, grad, {k: v.clone() for k, v in state.items()})


def assert_close(a, b, scale=1.0):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6 * scale)


CONFIGS = [
    dict(),  # the paper's 2x20 on log/sign features
    dict(layers=(7,)),
    dict(layers=(16, 32)),
    dict(layers=(5, 3, 1)),
    dict(layers=(20, 20, 20, 20)),
    dict(preprocessing="none"),
    dict(preprocessing="scale", input_scale=30.0),
    dict(p=5.0, output_scale=0.01),
]


@needs_lib
@pytest.mark.parametrize(
    "kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "paper"
)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 1003])
def test_matches_the_torch_kernel(kwargs, n):
    rule = make_rule(**kwargs)
    gen = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=gen) * torch.logspace(-8, 1, n)
    state = random_state(rule, n)
    ref_update, ref_state = torch_update(rule, grad, state)
    update, new_state = native.update(rule, lib_for(rule), grad, state, inplace=False)
    assert_close(update, ref_update, ref_update.abs().max().item())
    for k in ref_state:
        assert_close(new_state[k], ref_state[k])
    # in place: the same numbers, written over the given tensors
    same = {k: v.clone() for k, v in state.items()}
    ptrs = {k: v.data_ptr() for k, v in same.items()}
    update2, out_state = native.update(rule, lib_for(rule), grad, same, inplace=True)
    assert out_state is same and all(v.data_ptr() == ptrs[k] for k, v in same.items())
    torch.testing.assert_close(update2, update, rtol=0, atol=0)
    for k in same:
        torch.testing.assert_close(same[k], new_state[k], rtol=0, atol=0)


@needs_lib
def test_rule_methods_use_it_and_agree():
    rule = make_rule()
    n = 2000
    grad = torch.randn(n) * 1e-3
    state = random_state(rule, n)
    ref_update, ref_state = torch_update(rule, grad, state)
    with torch.no_grad():
        update, new_state = rule.update(grad, state)
    assert_close(update, ref_update, 0.1)
    s2 = {k: v.clone() for k, v in state.items()}
    assert_close(rule.update_(grad, s2), ref_update, 0.1)
    for k in ref_state:
        assert_close(new_state[k], ref_state[k])
        assert_close(s2[k], ref_state[k])


@needs_lib
def test_saturated_gates_stay_finite_and_nan_propagates():
    rule = make_rule(layers=(20, 20))
    with torch.no_grad():  # pre-activations of several hundred: gates at 0 or 1
        for cell in rule.cells:
            cell.weight_ih.mul_(400)
            cell.weight_hh.mul_(400)
    n = 64
    grad = torch.randn(n)
    grad[3] = float("nan")
    grad[5] = float("inf")
    grad[6] = -float("inf")
    grad[7] = 0.0
    state = random_state(rule, n, scale=3.0)
    ref_update, ref_state = torch_update(rule, grad, state)
    update, new_state = native.update(rule, lib_for(rule), grad, state, inplace=False)
    assert torch.equal(update.isnan(), ref_update.isnan())
    assert update.isnan()[3] and update.isfinite().sum() == n - 1
    ok = ref_update.isfinite()
    torch.testing.assert_close(update[ok], ref_update[ok], rtol=1e-4, atol=1e-4)
    for k in ref_state:
        assert torch.equal(new_state[k].isnan(), ref_state[k].isnan())
        fin = ref_state[k].isfinite()
        # pre-activations of ~1e2 carry rounding of ~1e-5 (summation order), which the
        # steep gates pass on: a looser tolerance than elsewhere
        torch.testing.assert_close(new_state[k][fin], ref_state[k][fin], rtol=1e-4, atol=1e-4)


@needs_lib
def test_non_contiguous_state_is_updated_in_place():
    rule = make_rule()
    n = 50
    grad = torch.randn(n)
    state = random_state(rule, n)
    ref_update, ref_state = torch_update(rule, grad, state)
    # [n, H] views with a column stride: the kernel runs on a copy, written back
    wide = {k: torch.zeros(n, 2 * v.shape[1]) for k, v in state.items()}
    views = {k: wide[k][:, ::2] for k in state}
    for k, v in views.items():
        v.copy_(state[k])
    update, out = native.update(rule, lib_for(rule), grad, views, inplace=True)
    assert_close(update, ref_update, 0.1)
    for k in ref_state:
        assert_close(wide[k][:, ::2], ref_state[k])
        assert wide[k][:, 1::2].abs().sum() == 0


@needs_lib
def test_packed_weights_follow_parameter_changes_and_rule_copies():
    rule = make_rule()
    n = 40
    grad = torch.randn(n)
    state = random_state(rule, n)
    before, _ = native.update(rule, lib_for(rule), grad, state, inplace=False)
    with torch.no_grad():  # in place: same tensors, new values (the packing cache's key)
        rule.head.weight.mul_(3.0)
        rule.head.bias.add_(1.0)
        rule.cells[0].weight_hh.mul_(1.5)
        rule.cells[1].bias.add_(0.25)
    after, _ = native.update(rule, lib_for(rule), grad, state, inplace=False)
    ref, _ = torch_update(rule, grad, state)
    assert not torch.allclose(before, after)
    assert_close(after, ref, ref.abs().max().item())
    # the cache lives outside the module: rules stay deep-copyable and picklable
    twin = pickle.loads(pickle.dumps(copy.deepcopy(rule)))
    again, _ = native.update(twin, lib_for(twin), grad, state, inplace=False)
    torch.testing.assert_close(again, after, rtol=0, atol=0)


@needs_lib
def test_learned_optimizer_trains_the_same_with_either_kernel(monkeypatch):
    def run(setting):
        monkeypatch.setenv("L2O_NATIVE", setting)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 1)
        )
        rule = make_rule(seed=3)
        opt = LearnedOptimizer(model.parameters(), rule=rule, chunk_size=100)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    loss_native, p_native = run("1")
    loss_torch, p_torch = run("0")
    assert loss_native[-1] < loss_native[0]
    torch.testing.assert_close(loss_native, loss_torch, rtol=1e-4, atol=1e-6)
    for a, b in zip(p_native, p_torch, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_setting_is_validated(monkeypatch):
    monkeypatch.setenv("L2O_NATIVE", "maybe")
    with pytest.raises(native.NativeKernelError, match="L2O_NATIVE must be auto, 0 or 1"):
        native.mode()


def test_off_uses_the_torch_kernel(monkeypatch):
    rule = make_rule()
    rule.native_kernel = False  # per rule
    assert rule._native_kernel(torch.zeros(3), rule.init(torch.zeros(3))) is None
    monkeypatch.setenv("L2O_NATIVE", "0")
    rule = make_rule()
    assert rule._native_kernel(torch.zeros(3), rule.init(torch.zeros(3))) is None
    assert native.status() == "disabled (L2O_NATIVE=0)"


def test_unsupported_configurations_fall_back_or_fail_loudly(monkeypatch):
    big = make_rule(layers=(40,))
    grad = torch.randn(10)
    state = big.init(grad)
    assert "hidden size 40" in native.unsupported(big, grad, state)
    monkeypatch.setenv("L2O_NATIVE", "auto")
    assert big._native_kernel(grad, state) is None  # auto: the PyTorch kernel runs
    with torch.no_grad():
        update, _ = big.update(grad, state)
    assert update.shape == (10,)
    monkeypatch.setenv("L2O_NATIVE", "1")
    with pytest.raises(native.NativeKernelError, match="hidden size 40"):
        big.update_(grad, state)
    double = make_rule().double()
    assert "float32" in native.unsupported(double, grad.double(), double.init(grad.double()))
    half = {k: v.half() for k, v in make_rule().init(grad).items()}
    assert "state h0" in native.unsupported(make_rule(), grad, half)
    mixed = {k: (v.bfloat16() if k == "c1" else v) for k, v in make_rule().init(grad).items()}
    assert "mixes" in native.unsupported(make_rule(), grad, mixed)


def test_a_failed_build_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("L2O_NATIVE", "auto")
    native.reset()
    try:
        assert native.load() is None
        assert native.status().startswith("unavailable: ")
        assert "no-such-compiler" in native.status()
        assert native.load((20,)) is None  # the failure is remembered, not retried
        rule = make_rule()
        grad = torch.randn(30)
        state = random_state(rule, 30)
        ref, _ = torch_update(rule, grad, state)
        with torch.no_grad():
            update, _ = rule.update(grad, state)
        torch.testing.assert_close(update, ref, rtol=0, atol=0)  # the PyTorch kernel ran
        monkeypatch.setenv("L2O_NATIVE", "1")
        with pytest.raises(native.NativeKernelError, match="cannot run: unavailable"):
            rule.update_(grad, state)
        assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    finally:
        monkeypatch.undo()
        native.reset()


@needs_lib
def test_build_goes_to_the_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("L2O_CACHE_DIR", str(tmp_path))
    native.reset()
    try:
        path = native.library_path((20, 20))
        assert path.parent == tmp_path and path.name.startswith("l2o_lstm_h20_")
        assert native.library_path((7, 3)).name.startswith("l2o_lstm_h3-7_")
        assert native.load((20, 20)) is not None
        assert [p.name for p in tmp_path.iterdir()] == [path.name]
        # a library built for other sizes rejects a size it lacks (the caller checks)
        other = native._open(path)
        rule = make_rule(layers=(7,))
        with pytest.raises(native.NativeKernelError, match="code 4"):
            native.update(rule, other, torch.randn(5), rule.init(torch.zeros(5)), inplace=False)
    finally:
        monkeypatch.undo()
        native.reset()


@needs_lib
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_the_portable_code_path_matches(tmp_path, march):
    """The kernel's code for CPUs without AVX-512 (AVX2 or plain SSE2 here): exponent by
    integer arithmetic, division, scalar log, memcpy loads of partial rows."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    flags = [f if f != "-march=native" else f"-march={march}" for f in native.FLAGS]
    path = tmp_path / "portable.so"
    native._build(path, (20, 7, 3), flags)
    lib = native._open(path)
    for kwargs in (dict(), dict(layers=(7, 3)), dict(preprocessing="none")):
        rule = make_rule(**kwargs)
        n = 37
        grad = torch.randn(n) * torch.logspace(-8, 1, n)
        grad[4] = float("nan")
        state = random_state(rule, n)
        ref_update, ref_state = torch_update(rule, grad, state)
        update, new_state = native.update(rule, lib, grad, state, inplace=False)
        assert torch.equal(update.isnan(), ref_update.isnan())
        ok = ~ref_update.isnan()
        assert_close(update[ok], ref_update[ok], ref_update[ok].abs().max().item())
        for k in ref_state:
            ok = ~ref_state[k].isnan()
            assert_close(new_state[k][ok], ref_state[k][ok])
    # bfloat16 state: the integer round-to-nearest-even path
    rule = make_rule()
    state = {k: v.bfloat16() for k, v in random_state(rule, 37).items()}
    grad = torch.randn(37)
    ref_update, ref_state = kernels.update_no_grad(
        rule, grad, {k: v.clone() for k, v in state.items()}, inplace=True
    )
    update, new_state = native.update(rule, lib, grad, state, inplace=False)
    assert_close(update, ref_update, ref_update.abs().max().item())
    for k in ref_state:
        a, b = new_state[k].float(), ref_state[k].float()
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
        assert (a != b).float().mean() < 0.02


@needs_lib
def test_threads_split_the_coordinates_bit_identically():
    rule = make_rule()
    n = 3 * 131072 + 37  # three threads' worth, and a ragged end
    grad = torch.randn(n) * 1e-2
    state = random_state(rule, n)
    one, s1 = native.update(rule, lib_for(rule), grad, state, inplace=False, threads=1)
    three, s3 = native.update(rule, lib_for(rule), grad, state, inplace=False, threads=3)
    many, _ = native.update(rule, lib_for(rule), grad, state, inplace=False, threads=64)
    assert torch.equal(one, three) and torch.equal(one, many)
    assert all(torch.equal(s1[k], s3[k]) for k in s1)
    ref, _ = torch_update(rule, grad, state)
    assert_close(one, ref, ref.abs().max().item())


@needs_lib
@pytest.mark.parametrize("layers", [(20, 20), (7,), (16, 32)])
def test_bfloat16_state_matches_the_torch_kernel(layers):
    """bfloat16 state (LearnedOptimizer(state_dtype=torch.bfloat16)): read as float, math
    in float, the new state rounded to nearest even, as the PyTorch kernel does."""
    rule = make_rule(layers=layers)
    n = 203
    grad = torch.randn(n) * torch.logspace(-6, 0, n)
    grad[5] = float("nan")
    state = {k: v.bfloat16() for k, v in random_state(rule, n).items()}
    ref_update, ref_state = kernels.update_no_grad(
        rule, grad, {k: v.clone() for k, v in state.items()}, inplace=True
    )
    update, new_state = native.update(rule, lib_for(rule), grad, state, inplace=False)
    assert all(v.dtype == torch.bfloat16 for v in new_state.values())
    assert torch.equal(update.isnan(), ref_update.isnan())
    ok = ~ref_update.isnan()
    assert_close(update[ok], ref_update[ok], ref_update[ok].abs().max().item())
    for k in ref_state:
        a, b = new_state[k].float(), ref_state[k].float()
        assert torch.equal(a.isnan(), b.isnan())
        ok = ~b.isnan()
        # one bfloat16 ulp (2^-8 relative) where float rounding lands on the other side
        torch.testing.assert_close(a[ok], b[ok], rtol=2**-7, atol=1e-6)
        assert (a[ok] != b[ok]).float().mean() < 0.01
    same = {k: v.clone() for k, v in state.items()}
    native.update(rule, lib_for(rule), grad, same, inplace=True)
    assert all(
        torch.equal(same[k].float().nan_to_num(), new_state[k].float().nan_to_num()) for k in same
    )


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
@pytest.mark.parametrize("march", ["native", "x86-64"])
def test_clang_builds_it_too(tmp_path, monkeypatch, march):
    """CXX=clang++ (macOS's default compiler; its shuffle builtin differs from GCC's)."""
    import platform

    if march != "native" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    monkeypatch.setenv("CXX", "clang++")
    flags = [f if f != "-march=native" else f"-march={march}" for f in native.FLAGS]
    path = tmp_path / "clang.so"
    native._build(path, (20, 7), flags)
    lib = native._open(path)
    for kwargs in (dict(), dict(layers=(7,))):
        rule = make_rule(**kwargs)
        grad = torch.randn(41) * torch.logspace(-8, 1, 41)
        state = random_state(rule, 41)
        ref_update, ref_state = torch_update(rule, grad, state)
        update, new_state = native.update(rule, lib, grad, state, inplace=False)
        assert_close(update, ref_update, ref_update.abs().max().item())
        for k in ref_state:
            assert_close(new_state[k], ref_state[k])


@needs_lib
@pytest.mark.parametrize("layers", [(20, 20), (7,), (16, 32)])
def test_training_forward_gives_the_same_values_and_gradients(layers):
    """Meta-training's _lstm_kernels._LSTMLayer: the compiled forward (which saves the
    gates) and the compiled elementwise backward give the PyTorch kernel's and lstm_cell's
    values and gradients, with and without gradients flowing into the new state."""
    from l2o.rules.lstm import _reference_update

    rule = make_rule(layers=layers)
    n = 1003
    grad = torch.randn(n) * torch.logspace(-6, 0, n)
    state = random_state(rule, n)
    weights = torch.linspace(-1, 1, n)

    def run(fn, with_state=True):
        rule.zero_grad()
        update, new_state = fn()
        loss = (update * weights).sum()
        if with_state:  # else the new c (and h of the last layer) get no gradient: None
            loss = loss + sum((v * 0.1).sum() for v in new_state.values())
        loss.backward()
        return update.detach(), [p.grad.clone() for p in rule.parameters()]

    h0 = torch.zeros(1, layers[0])
    assert native.layer_lib(torch.zeros(1, 2), h0, h0, rule.cells[0].weight_ih) is not None
    for with_state in (True, False):
        rule.native_kernel = True
        compiled = run(lambda: rule.update(grad, state), with_state)
        rule.native_kernel = False
        torch_kernel = run(lambda: rule.update(grad, state), with_state)
        reference = run(lambda: _reference_update(rule, grad, state), with_state)
        for other in (torch_kernel, reference):
            assert_close(compiled[0], other[0], other[0].abs().max().item())
            for a, b in zip(compiled[1], other[1], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@needs_lib
def test_training_forward_threads_are_bit_identical():
    n = 2 * 131072 + 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen)
    h, c = torch.randn(n, 20, generator=gen), torch.randn(n, 20, generator=gen)
    cell = make_rule().cells[0]
    lib = native.layer_lib(x, h, c, cell.weight_ih)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.layer_forward(lib, x, h, c, cell.weight_ih, cell.weight_hh, cell.bias)
        torch.set_num_threads(2)
        two = native.layer_forward(lib, x, h, c, cell.weight_ih, cell.weight_hh, cell.bias)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


def test_a_wrong_state_shape_never_reaches_the_compiled_step():
    """The kernel trusts shapes; a mismatched state goes to the PyTorch kernel, which raises
    (instead of the compiled step reading out of bounds)."""
    rule = make_rule()
    grad = torch.randn(10)
    state = rule.init(torch.zeros(10))
    state["c1"] = torch.zeros(9, 20)
    assert "state c1 has shape (9, 20), expected (10, 20)" in native.unsupported(rule, grad, state)
    with pytest.raises(RuntimeError):
        rule.update_(grad, state)
    x, h, c = torch.zeros(5, 2), torch.zeros(5, 20), torch.zeros(4, 20)
    assert native.layer_lib(x, h, c, torch.zeros(80, 2)) is None
    assert native.layer_lib(x, h, h, torch.zeros(80, 3)) is None
