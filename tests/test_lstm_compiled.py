"""The LSTM step through ``torch.compile`` (``LearnedOptimizer(compile=True)``).

It is the fused path meant for CUDA; here it runs on CPU (TorchInductor's C++
backend), which checks the same graph: the values equal the other kernels' and the
state is written in place.  Each distinct graph compiles once per process (about 10-20 s).
"""

from __future__ import annotations

import copy

import pytest
import torch

from l2o.optim import LearnedOptimizer
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig


def _compile_works() -> str | None:
    try:
        torch.compile(lambda x: torch.sigmoid(x) * 2.0, dynamic=True)(torch.ones(3))
    except Exception as err:  # noqa: BLE001 - any failure means: no compiler here
        return f"torch.compile does not work here ({type(err).__name__}: {err})"
    return None


_WHY = _compile_works()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def _rule() -> CoordinatewiseLSTM:
    torch.manual_seed(3)
    rule = CoordinatewiseLSTM(LSTMRuleConfig.from_preset("paper"))
    with torch.no_grad():  # a trained-looking rule: the zero head would hide the layers
        for p in rule.parameters():
            p.normal_(0.0, 0.3)
    return rule


def _state(rule, n: int, dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(5)
    return {
        k: (torch.randn(v.shape, generator=gen) * 0.5).to(dtype)
        for k, v in rule.init(torch.zeros(n)).items()
    }


def test_compiled_step_equals_the_kernel_step_and_writes_the_state_in_place():
    rule = _rule()
    n = 3001  # not a multiple of any vector width
    grad = torch.randn(n, generator=torch.Generator().manual_seed(7)) * 10.0 ** torch.linspace(
        -8, 1, n
    )
    grad[:3] = torch.tensor([0.0, -0.0, 1e-30])
    ref_state, comp_state = _state(rule, n), _state(rule, n)
    ptrs = {k: v.data_ptr() for k, v in comp_state.items()}
    ref = rule.update_(grad, ref_state)
    got = rule.update_(grad, comp_state, compiled=True)
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-7)
    for k in ref_state:
        torch.testing.assert_close(comp_state[k], ref_state[k], rtol=2e-5, atol=2e-6)
        assert comp_state[k].data_ptr() == ptrs[k]  # overwritten, not replaced
    # another length: the same compiled graph (dynamic sizes), same agreement
    m = 17
    ref_state, comp_state = _state(rule, m), _state(rule, m)
    torch.testing.assert_close(
        rule.update_(grad[:m], comp_state, compiled=True),
        rule.update_(grad[:m], ref_state),
        rtol=2e-5,
        atol=1e-7,
    )


def test_compiled_step_with_bfloat16_state():
    rule = _rule()
    n = 257
    grad = torch.randn(n, generator=torch.Generator().manual_seed(8)) * 1e-3
    ref_state, comp_state = _state(rule, n, torch.bfloat16), _state(rule, n, torch.bfloat16)
    got = rule.update_(grad, comp_state, compiled=True)
    ref = rule.update_(grad, ref_state)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for k in ref_state:
        assert comp_state[k].dtype == torch.bfloat16
        # both round the same float32 values to bfloat16: equal up to one bf16 ulp
        torch.testing.assert_close(comp_state[k], ref_state[k], rtol=8e-3, atol=1e-5)


def test_learned_optimizer_compile_option_trains_like_the_default():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))]
    models.append(copy.deepcopy(models[0]))
    rule = _rule()
    opts = [
        LearnedOptimizer(models[0].parameters(), rule=rule),
        LearnedOptimizer(models[1].parameters(), rule=rule, compile=True, chunk_size=16),
    ]
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for _ in range(3):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compile_option_is_validated():
    with pytest.raises(ValueError, match="compile must be True or False"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], rule=_rule(), compile="yes")
