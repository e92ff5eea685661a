"""The transfer rule ``mlp-lopt`` (l2o.rules.transfer) and the ``family`` task (issue 18)."""

from __future__ import annotations

import math

import pytest
import torch

import l2o
from conftest import shared_data_dir
from l2o.config import resolve
from l2o.errors import L2OError
from l2o.layout import ParamLayout
from l2o.meta.trainer import MetaTrainer
from l2o.optim import LearnedOptimizer
from l2o.rules import Adam, MLPLOpt, build_learned_rule
from l2o.seeds import stream
from l2o.tasks import build_task
from l2o.tasks.base import generator

LAYOUT = ParamLayout(("w", "b"), ((6, 5), (5,)))


def _run(rule, grads, theta, layout=LAYOUT):
    state = rule.init(theta, layout)
    out = []
    for g in grads:
        theta, state = rule.step(theta, g, None, state, layout)
        out.append(theta)
    return out


ALL_EXTRA = "grad-rel+tensor-rel+param-scale"


def _perturbed(hd=0.0, features=""):
    rule = MLPLOpt(layers=(8, 8), hd=hd, features=features)
    with torch.no_grad():
        for p in rule.head.parameters():
            p.normal_(0, 0.5)
    return rule


def test_zero_head_is_adam():
    torch.manual_seed(0)
    theta = torch.randn(35)
    grads = [torch.randn(35) for _ in range(20)]
    ours = _run(MLPLOpt(init_lr=3e-3), grads, theta)
    ref = _run(Adam(lr=3e-3), grads, theta)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# with hypergradient step sizes, and with the optional extra features
@pytest.mark.parametrize("hd,features", [(0.0, ""), (0.2, ""), (0.2, ALL_EXTRA)])
def test_update_invariant_to_gradient_scale(hd, features):
    torch.manual_seed(1)
    rule = _perturbed(hd, features)
    theta = torch.randn(35)
    grads = [torch.randn(35) for _ in range(10)]
    a = _run(rule, grads, theta)
    b = _run(rule, [1000.0 * g for g in grads], theta)
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hd,features", [(0.0, ""), (0.2, ""), (0.0, ALL_EXTRA)])
def test_instances_stay_independent(hd, features):
    torch.manual_seed(2)
    rule = _perturbed(hd, features)
    P = 3
    layout = ParamLayout(("w", "b"), ((P, 4, 2), (P, 2)))
    theta = torch.randn(layout.numel)
    grads = [torch.randn(layout.numel) for _ in range(5)]
    base = _run(rule, grads, theta, layout)[-1]
    # change instance 0 only (its parameters and gradients): instances 1, 2 must not move
    idx0 = layout.instance_index() == 0
    theta2 = torch.where(idx0, theta * 5, theta)
    grads2 = [torch.where(idx0, g * -3 + 1, g) for g in grads]
    other = _run(rule, grads2, theta2, layout)[-1]
    torch.testing.assert_close(other[~idx0], base[~idx0])


def test_extra_features_values():
    # two instances of tensors w (2 coordinates) and b (1): every column by hand
    layout = ParamLayout(("w", "b"), ((2, 2), (2, 1)), 2)
    # flat order: w of instance 0, w of instance 1, b of instance 0, b of instance 1
    theta = torch.tensor([3.0, 4.0, 0.0, 0.0, 2.0, -1.0], dtype=torch.float64)
    grad = torch.tensor([1.0, -2.0, 0.0, 6.0, 2.0, 3.0], dtype=torch.float64)
    rule = MLPLOpt(features=ALL_EXTRA).double()
    x, _, _ = rule.features(theta, grad, rule.init(theta, layout), layout)
    assert x.shape == (6, 11)
    rms_w0, rms_w1 = math.sqrt(2.5), math.sqrt(18.0)
    rms_i0, rms_i1 = math.sqrt((1 + 4 + 4) / 3), math.sqrt((36 + 9) / 3)
    grad_rel = [math.log(1 / rms_w0), math.log(2 / rms_w0), -10.0, math.log(6 / rms_w1), 0.0, 0.0]
    tensor_rel = [math.log(rms_w0 / rms_i0)] * 2 + [math.log(rms_w1 / rms_i1)] * 2
    tensor_rel += [math.log(2 / rms_i0), math.log(3 / rms_i1)]
    param_scale = [math.log(math.sqrt(12.5))] * 2 + [max(math.log(1e-12), -10.0)] * 2
    param_scale += [math.log(2.0), 0.0]
    expected = torch.tensor([grad_rel, tensor_rel, param_scale], dtype=torch.float64).T
    torch.testing.assert_close(x[:, 8:], expected, rtol=1e-9, atol=1e-9)
    # the default rule's features are the first 8 columns, unchanged
    plain = MLPLOpt().double()
    x8, _, _ = plain.features(theta, grad, plain.init(theta, layout), layout)
    torch.testing.assert_close(x[:, :8], x8)


def test_extra_features_bad_option_is_named():
    with pytest.raises(ValueError, match="features must be distinct names"):
        MLPLOpt(features="grad-rel+momentum")
    with pytest.raises(ValueError, match="features must be distinct names"):
        MLPLOpt(features="grad-rel+grad-rel")


def test_family_draws_are_reproducible_and_roles_disjoint():
    fam = build_task("family:datasets=synthetic")
    assert fam.draw(5) == fam.draw(5)
    draws = {str(fam.draw(s)) for s in range(30)}
    assert len(draws) > 20  # the seeds draw different models
    assert {fam.draw(s)["member"] for s in range(30)} == {"mlp", "cnn", "logreg", "autoencoder"}
    p1, p2 = fam.sample([5]), fam.sample([5])
    torch.testing.assert_close(p1.init(), p2.init())
    torch.testing.assert_close(p1.loss(p1.init(), 3), p2.loss(p2.init(), 3))
    train, val = fam.for_role("train"), fam.for_role("val")
    assert (train.role, val.role, fam.role) == ("train", "val", "test")
    assert set(stream("train", 50)).isdisjoint(stream("val", 50))
    assert train.describe_seed(5)["split"] == "train"


def test_family_l2l_mnist_member_is_the_papers_task():
    root = shared_data_dir()
    if root is None or not (root / "mnist").is_dir():
        pytest.skip("MNIST IDX files not found ($L2O_DATA or ../shared/data/mnist)")
    fam = build_task(f"family:members=l2l-mnist,data_dir={root}").for_role("train")
    spec = fam.draw(3)
    assert spec["member"] == "l2l-mnist" and spec["dataset"] == "mnist28"
    assert (spec["hidden"], spec["activation"], spec["batch"]) == ([20], "sigmoid", 128)
    p = fam.sample([3])
    assert p.layout.numel == 784 * 20 + 20 + 20 * 10 + 10
    theta = p.init()
    assert abs(float(theta.std()) - 0.01) < 0.001  # every weight and bias N(0, 0.01^2)
    # near-zero weights: the logits are nearly equal, the loss is about log(10)
    assert abs(float(p.loss(theta, 0)) - 2.3026) < 0.05
    with pytest.raises(L2OError, match="members"):
        build_task("family:members=l2l-cifar")


def test_family_bad_option_is_named():
    with pytest.raises(L2OError, match="members"):
        build_task("family:members=mlp+transformer")
    with pytest.raises(L2OError, match="batches"):
        build_task("family:batches=0")
    for bad in ("0+2", "2+0.5", "0.5", "a+b"):
        with pytest.raises(L2OError, match="init_scales"):
            build_task(f"family:init_scales={bad}")


def test_family_init_scales():
    # the default range draws the same floats as the formula before the option existed
    fam = build_task("family:datasets=synthetic")
    for seed in range(20):
        g = generator(seed * 7 + 3)
        for n in (4, 1, 4, 4):  # member, dataset, batch, activation: Family.draw's picks
            torch.randint(n, (1,), generator=g)
        old = math.exp(math.log(2.0) * (2 * float(torch.rand(1, generator=g)) - 1))
        assert fam.draw(seed)["init_scale"] == old
    scales = [build_task("family:init_scales=0.05+2").draw(s)["init_scale"] for s in range(200)]
    assert 0.05 <= min(scales) < 0.1 and 1.5 < max(scales) <= 2.0
    tiny = build_task("family:datasets=synthetic,members=mlp,init_scales=0.01+0.01")
    assert tiny.draw(4)["init_scale"] == pytest.approx(0.01)
    w = (p := tiny.sample([4])).layout.unflatten(p.init())["fc0.w"]
    assert float(w.std()) == pytest.approx(0.01 / math.sqrt(w.shape[1]), rel=0.2)


@pytest.mark.parametrize("hd", [0.0, 0.1])
def test_family_meta_trains(tmp_path, hd):
    sets = [
        f"rule.hd={hd}",
        "rule.layers=[4]",
        "train.meta_steps=2",
        "train.horizon=6",
        "train.horizon_min=0",
        "train.unroll=3",
    ]
    sets += ["train.instances=2", "val.problems=1", "val.every=1", "val.steps=6"]
    cfg = resolve("family:datasets=synthetic", None, sets)
    assert cfg["rule"]["name"] == "mlp-lopt"
    MetaTrainer(cfg, tmp_path, progress=False).train()
    rule = l2o.load(tmp_path / "best")
    assert isinstance(rule, MLPLOpt) and rule.config.hd == hd
    if hd:  # the rate is meta-learned: it moved from its initial value
        assert float(rule.log_hd.detach()) != pytest.approx(math.log(hd), abs=1e-7)


def test_artifact_round_trip_and_torch_optim(tmp_path):
    rule = _perturbed()
    l2o.save(rule, tmp_path / "r")
    back = l2o.load(tmp_path / "r")
    assert isinstance(back, MLPLOpt) and back.config == rule.config
    theta = torch.randn(35)
    grads = [torch.randn(35) for _ in range(3)]
    torch.testing.assert_close(_run(rule, grads, theta)[-1], _run(back, grads, theta)[-1])
    assert isinstance(build_learned_rule("mlp-lopt", {"layers": [4]}), MLPLOpt)

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    opt = LearnedOptimizer(model.parameters(), rule=MLPLOpt(init_lr=1e-2))
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first


def test_no_grad_blocked_mlp_matches_autograd_path():
    """Without autograd the MLP runs over row blocks; same update as the one-block path."""
    from l2o.rules import transfer

    rule = MLPLOpt(layers=(8,)).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    n = 3 * transfer.MLP_BLOCK_ROWS + 17  # several full blocks and a partial one
    theta = torch.randn(n, generator=g, dtype=torch.float64)
    grad = torch.randn(n, generator=g, dtype=torch.float64)
    state = rule.init(theta)
    with torch.no_grad():
        blocked, _ = rule.step(theta, grad, None, state)
    with torch.enable_grad():
        whole, _ = rule.step(theta, grad, None, state)
    torch.testing.assert_close(blocked, whole.detach(), rtol=1e-12, atol=1e-14)


def _adam_hd_reference(theta, grads, layout, lr, hd, bound):
    """Adam with a multiplicative hypergradient lr per (tensor, instance), written out."""
    P = layout.instances
    blocks = [(sl, size // P) for sl, size in zip(layout.slices().values(), layout.sizes)]
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    s = [[0.0] * P for _ in blocks]
    prev = torch.zeros_like(theta)
    out = []
    for t, g in enumerate(grads, 1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        d = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        step = torch.zeros_like(theta)
        for b, (sl, n) in enumerate(blocks):
            for i in range(P):
                gi, ui = g[sl][i * n : (i + 1) * n], prev[sl][i * n : (i + 1) * n]
                cos = 0.0 if ui.norm() == 0 else float(gi @ ui / (gi.norm() * ui.norm()))
                s[b][i] = min(bound, max(-bound, s[b][i] + hd * cos))
                step[sl][i * n : (i + 1) * n] = lr * math.exp(s[b][i]) * d[sl][i * n : (i + 1) * n]
        theta = theta - step
        prev = step
        out.append(theta)
    return out


def _drifting_case(seed: int):
    """Two instances of a (w, b) model and 20 gradients that agree for 12 steps, then flip:
    the hypergradient step size moves both ways (float64)."""
    torch.manual_seed(seed)
    layout = ParamLayout(("w", "b"), ((2, 6, 5), (2, 5)))
    theta = torch.randn(layout.numel, dtype=torch.float64)
    base = torch.randn(layout.numel, dtype=torch.float64)
    grads = [base * (1 if k < 12 else -1) + 0.3 * torch.randn_like(base) for k in range(20)]
    return layout, theta, grads


def test_zero_head_with_hd_is_adam_with_hypergradient_lr():
    layout, theta, grads = _drifting_case(4)
    rule = MLPLOpt(init_lr=3e-3, hd=0.3, hd_bound=0.5).double()
    ours = _run(rule, grads, theta, layout)
    ref = _adam_hd_reference(theta, grads, layout, 3e-3, 0.3, 0.5)
    for a, b in zip(ours, ref, strict=True):  # log_lr, log_hd were float32 before .double()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    state = rule.init(theta, layout)
    for g in grads[:12]:
        theta, state = rule.step(theta, g, None, state, layout)
    assert float(state["s"].detach().max()) == pytest.approx(
        0.5
    )  # agreeing gradients: up to the bound


def test_hd_rate_is_a_meta_parameter_or_fixed(tmp_path):
    learned, fixed = MLPLOpt(hd=0.1), MLPLOpt(hd=0.1, hd_learned=False)
    assert "log_hd" in dict(learned.named_parameters())
    assert "log_hd" not in dict(fixed.named_parameters()) and "log_hd" in dict(
        fixed.named_buffers()
    )
    assert "log_hd" not in dict(MLPLOpt().named_parameters())  # hd = 0: no adaptation at all
    with torch.no_grad():
        learned.log_hd.fill_(-1.5)
    l2o.save(learned, tmp_path / "r")
    back = l2o.load(tmp_path / "r")
    assert back.config == learned.config and float(back.log_hd.detach()) == -1.5
    with pytest.raises(ValueError, match="hd must be >= 0"):
        MLPLOpt(hd=-0.1)
    with pytest.raises(ValueError, match="hd_bound"):
        MLPLOpt(hd=0.1, hd_bound=0.0)


def test_hd_rule_in_learned_optimizer_matches_the_functional_step():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    rule = MLPLOpt(layers=(4,), init_lr=1e-2, hd=0.2).double()
    model = model.double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    named = dict(model.named_parameters())
    layout = ParamLayout.from_tensors(named)
    theta = layout.flatten([p.detach().clone() for p in named.values()])
    state = rule.init(theta, layout)
    opt = LearnedOptimizer(model.parameters(), rule=rule)
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad = layout.flatten([p.grad for p in named.values()])
        theta, state = rule.step(theta, grad, None, state, layout)
        opt.step()
    got = layout.flatten([p.detach() for p in named.values()])
    torch.testing.assert_close(got, theta, rtol=1e-10, atol=1e-12)


def test_adam_hd_is_mlp_lopt_at_meta_init_without_the_mlp():
    from l2o.evaluate import parse_optimizer
    from l2o.rules import CLASSIC_RULES, AdamHD

    layout, theta, grads = _drifting_case(7)
    ours = _run(AdamHD(lr=3e-3, hd=0.3, hd_bound=0.5), grads, theta, layout)
    ref = _adam_hd_reference(theta, grads, layout, 3e-3, 0.3, 0.5)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    lopt = MLPLOpt(init_lr=3e-3, hd=0.3, hd_bound=0.5, hd_learned=False).double()
    for a, b in zip(ours, _run(lopt, grads, theta, layout), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # log_lr was float32
    assert CLASSIC_RULES["adam-hd"] is AdamHD
    spec = parse_optimizer("adam-hd:lr=0.01,hd=0.2")
    assert (spec.kind, spec.hparams) == ("classic", {"lr": 0.01, "hd": 0.2})
    with pytest.raises(L2OError, match="hd must be >= 0"):
        parse_optimizer("adam-hd:hd=-1")
    with pytest.raises(L2OError, match="no option 'beta'"):
        parse_optimizer("adam-hd:beta=0.1")


def test_tensor_place_features():
    # tensor-pos: -1 .. +1 over the tensors in order; vector: 1-D tensors (instance axis aside)
    layout = ParamLayout(("w0", "b0", "w1", "b1"), ((2, 3, 2), (2, 3), (2, 1, 3), (2, 1)), 2)
    rule = MLPLOpt(features="tensor-pos+vector")
    theta = torch.randn(layout.numel)
    x, _, _ = rule.features(theta, torch.randn(layout.numel), rule.init(theta, layout), layout)
    pos, vec = x[:, -2], x[:, -1]
    sizes = layout.sizes
    want_pos = torch.cat([torch.full((n,), v) for n, v in zip(sizes, (-1, -1 / 3, 1 / 3, 1))])
    want_vec = torch.cat([torch.full((n,), v) for n, v in zip(sizes, (0.0, 1.0, 0.0, 1.0))])
    torch.testing.assert_close(pos, want_pos)
    torch.testing.assert_close(vec, want_vec)
    one = ParamLayout.flat(5)
    x1, _, _ = rule.features(torch.randn(5), torch.randn(5), rule.init(torch.randn(5), one), one)
    torch.testing.assert_close(x1[:, -2:], torch.tensor([[0.0, 1.0]] * 5))
