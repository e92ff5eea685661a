"""The transfer suite (l2o.suite) and benchmarks/transfer.py: shapes, determinism, a few steps."""

import json
import math

import pytest
import torch

import l2o
from conftest import load_benchmark, shared_data_dir
from l2o import suite
from l2o.meta.unroll import run as run_rule
from l2o.optim import LearnedOptimizer


def _problem(name):
    # the dataset models on random tensors of the right shapes: no data needed
    return suite.make(name, synthetic=suite.needs_data(name) is not None)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", suite.NAMES)
def test_suite_model_determinism_and_steps(name):
    pr = _problem(name)
    a, b, c = pr.build(1), pr.build(1), pr.build(2)
    assert torch.equal(_params(a), _params(b)) and not torch.equal(_params(a), _params(c))
    x1, y1 = pr.batch(1, 3)
    x2, y2 = pr.batch(1, 3)
    x3, _ = pr.batch(1, 4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.shape[0] == y1.shape[0]
    loss = pr.loss(a, (x1, y1))
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    for opt in (
        torch.optim.Adam(a.parameters(), lr=1e-3),
        LearnedOptimizer(b.parameters(), rule=l2o.load("pretrained/mnist")),
    ):
        model = a if isinstance(opt, torch.optim.Adam) else b
        for step in range(3):
            opt.zero_grad()
            pr.loss(model, pr.batch(1, step)).backward()
            opt.step()
    ev = pr.evaluate(a)
    assert set(ev) == {"loss", "accuracy"} and math.isfinite(ev["loss"])
    assert ev["accuracy"] is None or 0.0 <= ev["accuracy"] <= 1.0
    assert a.training  # evaluate restores train mode


@pytest.mark.parametrize("name,lr", [("transformer-sort", 1e-2), ("resmlp-regress", 3e-3)])
def test_adam_lowers_the_loss(name, lr):
    pr = _problem(name)
    model = pr.build(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = pr.loss(model, pr.batch(0, step))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


def test_real_data_models():
    root = shared_data_dir()
    if root is None or not (root / "mnist").is_dir() or not (root / "cifar10").is_dir():
        pytest.skip(
            "shared MNIST / CIFAR-10 not found (set L2O_DATA or put them in ../shared/data)"
        )
    for name in ("mlp-deep", "resnet-cifar"):
        pr = suite.make(name, data_dir=root)
        x, y = pr.batch(1, 0)
        assert x.shape[1:] == ((784,) if name == "mlp-deep" else (3, 32, 32)) and y.max() <= 9
        ev = pr.evaluate(pr.build(1))
        assert abs(ev["loss"] - math.log(10)) < 0.5


def test_benchmark_writes_json_and_reuses(tmp_path, capsys):
    bench = load_benchmark("transfer")
    common = [
        "--models",
        "resmlp-regress",
        "--seeds",
        "1,2",
        "--steps",
        "25",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(common) == 0
    doc = json.loads((tmp_path / "transfer.json").read_text())
    e = doc["results"]["resmlp-regress"]
    assert set(e) >= {"adam", "adamw", "adam-hd", "adam-tuned", "mnist"}
    run = e["adam"]["runs"][0]
    assert len(run["curve"]) == 25 and run["seed"] == 1
    assert run["final_train_loss"] == pytest.approx(sum(run["curve"][-20:]) / 20)
    assert e["adam-tuned"]["lr"] in bench.LR_GRID
    t = doc["targets"]["mnist"]
    assert {"a_beats_adam_on_6_of_8", "b_geomean_le_1.5", "c_never_diverges"} <= set(t)
    assert (tmp_path / "transfer.png").is_file() and doc["torch"] == torch.__version__
    # a new learned optimizer with --reuse: only it runs, the rest is kept as it was
    args = [*common, "--reuse", "--no-default-learned", "--learned", "quad=pretrained/quadratic"]
    assert bench.main([*args, "--hand", "hd02=adam-hd:hd=0.2"]) == 0
    doc2 = json.loads((tmp_path / "transfer.json").read_text())
    e2 = doc2["results"]["resmlp-regress"]
    assert e2["adam"] == e["adam"] and e2["mnist"] == e["mnist"] and "quad" in e2
    assert doc2["hand"] == {"hd02": "adam-hd:hd=0.2"} and "hd02" not in doc2["targets"]
    assert e2["hd02"]["runs"][0]["curve"] != e2["adam-hd"]["runs"][0]["curve"]
    for bad, why in (("x=lstm:pretrained/quadratic", "hand-designed"), ("x=adam:beta=1", "beta")):
        with pytest.raises(SystemExit):
            bench.main([*common, "--hand", bad])
        assert why in capsys.readouterr().err
    # targets of every learned optimizer run so far (general: the shipped one, when it loads)
    assert set(doc2["targets"]) == {"mnist", "quad"} | ({"general"} & set(doc["targets"]))
    assert len(doc2["commands"]) == 2
    md = bench.markdown(doc2)
    assert "| resmlp-regress |" in md and "| quad |" in md
    few = bench.markdown(doc2, ["quad", "adam"]).splitlines()
    assert few[0] == "| model | quad | adam |" and "| quad |" in few[-1]  # targets: all learned
    with pytest.raises(SystemExit, match="nope"):
        bench.markdown(doc2, ["adam", "nope"])


def test_home_task_scale_wrapper_scales_what_the_rule_sees():
    # benchmarks/home_task_scale.py: the rule is fed c x the gradient; a scale-free rule
    # (adam-hd) takes the same steps for every c, the paper's LSTM (log|g| inputs) does not
    bench = load_benchmark("home_task_scale")
    task = l2o.tasks.Quadratic(dim=6)
    problem = task.sample([3, 4])

    def final(rule):
        return run_rule(rule, problem, 15)[-1]

    adam_hd = [final(bench.ScaledGradient(l2o.rules.AdamHD(lr=0.05), c)) for c in (1.0, 100.0)]
    torch.testing.assert_close(adam_hd[0], adam_hd[1], rtol=1e-5, atol=1e-6)
    lstm = l2o.load("pretrained/quadratic")
    a, b = (final(bench.ScaledGradient(lstm, c)).detach() for c in (1.0, 100.0))
    assert not torch.allclose(a, b, rtol=1e-3)


def test_home_task_steps_recorder_leaves_the_run_unchanged_and_reads_the_bound():
    # benchmarks/home_task_steps.py: the recorder is the rule (same losses), and a rule whose
    # head is saturated upwards steps at exp(log_lr + mag) (the bound the benchmark draws)
    bench = load_benchmark("home_task_steps")
    rule = l2o.rules.MLPLOpt(mag=2.0, init_lr=0.01)
    with torch.no_grad():
        rule.head.bias[1] = 50.0  # tanh(a) = 1 everywhere
    problem = l2o.tasks.Quadratic(dim=6).sample([3])
    recorder = bench.StepSizeRecorder(rule)
    torch.testing.assert_close(run_rule(recorder, problem, 5), run_rule(rule, problem, 5))
    assert len(recorder.medians) == 5
    assert recorder.medians == pytest.approx([0.01 * math.exp(2.0)] * 5, rel=1e-5)
