"""Appendix-A preprocessing at and around the e^-p threshold, signs and zeros."""

import math

import pytest
import torch

from l2o.preprocess import log_sign, num_features, preprocess


def reference(x: float, p: float) -> tuple[float, float]:
    """The paper's two-branch formula, written literally."""
    if abs(x) >= math.exp(-p):
        return math.log(abs(x)) / p, math.copysign(1.0, x)
    return -1.0, math.exp(p) * x


@pytest.mark.parametrize("p", [10.0, 5.0])
def test_matches_two_branch_formula(p):
    thr = math.exp(-p)
    values = [
        thr,
        -thr,
        thr * 1.001,
        thr * 0.999,
        -thr * 0.999,
        1.0,
        -1.0,
        3.7,
        -250.0,
        1e-30,
        thr / 2,
    ]
    x = torch.tensor(values, dtype=torch.float64)
    out = log_sign(x, p)
    for v, (a, b) in zip(values, out.tolist()):
        ra, rb = reference(v, p)
        assert a == pytest.approx(ra, abs=1e-9), v
        assert b == pytest.approx(rb, abs=1e-9), v


def test_threshold_exactly_gives_minus_one_and_sign():
    p = 10.0
    x = torch.tensor([math.exp(-p), -math.exp(-p)], dtype=torch.float64)
    out = log_sign(x, p)
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(out[:, 1], torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_zero_gradient_is_finite():
    out = log_sign(torch.zeros(3), 10.0)
    assert torch.equal(out, torch.tensor([[-1.0, 0.0]] * 3))


def test_sign_preserved_and_log_of_one_is_zero():
    out = log_sign(torch.tensor([1.0, -1.0, 0.5, -0.5]), 10.0)
    assert out[0, 0] == 0 and out[1, 0] == 0
    assert torch.equal(torch.sign(out[:, 1]), torch.tensor([1.0, -1.0, 1.0, -1.0]))


def test_feature_counts_and_shapes():
    x = torch.randn(11)
    assert preprocess(x, "logsign").shape == (11, 2) and num_features("logsign") == 2
    assert preprocess(x, "none").shape == (11, 1) and num_features("none") == 1
    torch.testing.assert_close(preprocess(x, "scale", scale=3.0)[:, 0], 3 * x)
    with pytest.raises(ValueError, match="preprocessing"):
        preprocess(x, "weird")
