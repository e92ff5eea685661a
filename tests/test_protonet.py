"""Prototypical Networks: prototype/distance maths, meta-gradient, CLI train/eval, errors.

The maths and gradient tests use tiny generated images; the CLI round trip needs the
Omniglot data in ../shared/data (or $L2O_DATA) and is skipped without it.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import shared_data_dir
from l2o.data.episodes import ClassDataset, EpisodeSampler
from l2o.errors import L2OError
from l2o.fewshot import BNStats, Conv4, LearnerConfig, ProtoNet, load, save_model
from l2o.fewshot.protonet import prototypes, squared_distances

SIZE = 16


def tiny(ways: int = 3, train_ways: int | None = None) -> ProtoNet:
    cfg = LearnerConfig(in_channels=1, image_size=SIZE, ways=ways, filters=4)
    return ProtoNet(cfg, train_ways=train_ways)


def noise_data(classes: int = 6, per_class: int = 4) -> ClassDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(classes * per_class, 1, SIZE, SIZE, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return ClassDataset(images, labels, [f"c{c}" for c in range(classes)])


def test_prototypes_and_distances_by_hand():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = prototypes(feats, labels, 2)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.5, 2.0]]))
    q = torch.tensor([[1.0, 1.0], [0.5, 2.0]])
    # (1-1)^2 + (1-0)^2 = 1, (1-0.5)^2 + (1-2)^2 = 1.25, (0.5-1)^2 + (2-0)^2 = 4.25, and a
    # query on a prototype is exactly 0
    assert torch.equal(squared_distances(q, protos), torch.tensor([[1.0, 1.25], [4.25, 0.0]]))


@pytest.mark.parametrize("bn_mode", ["batch", "support-running"])
def test_adapt_logits_are_negative_squared_distances(bn_mode):
    model = tiny()
    g = torch.Generator().manual_seed(1)
    sx, qx = torch.rand(6, 1, SIZE, SIZE, generator=g), torch.rand(4, 1, SIZE, SIZE, generator=g)
    sy = torch.tensor([2, 0, 1, 0, 2, 1])
    with torch.no_grad():
        logits = model.adapt(sx, sy, 3, bn_mode=bn_mode).logits(qx)
        conv = Conv4(model.learner_config)
        theta = torch.cat([model.body, torch.zeros(Conv4.head_numel(conv.config))])
        fs = conv.features(theta, sx)  # the support batch's own statistics
        if bn_mode == "batch":
            fq = conv.features(theta, qx)
        else:  # the query normalised with the support batch's statistics
            stats = BNStats.fresh(conv.config)
            conv.features(theta, sx, stats)
            fq = conv.features(theta, qx, stats, use_running=True)
    for j in range(4):
        for k in range(3):
            proto = fs[sy == k].mean(0)
            assert logits[j, k].item() == pytest.approx(-((fq[j] - proto) ** 2).sum().item(), 1e-4)


def test_meta_loss_gradient_reaches_every_body_layer():
    model = tiny(ways=3, train_ways=5)
    assert model.training_episodes(15) == (5, 15)
    episode = EpisodeSampler(noise_data(), 5, 1, 2, seed=3).episode(0)
    loss, acc = model.meta_loss(episode)
    loss.backward()
    grad = model.body.grad
    assert torch.isfinite(loss) and 0.0 <= acc <= 1.0 and torch.isfinite(grad).all()
    layout = Conv4(model.learner_config).layout
    parts = layout.unflatten(torch.cat([grad, torch.zeros(Conv4.head_numel(model.learner_config))]))
    for k in range(1, 5):
        assert parts[f"conv{k}.weight"].abs().sum() > 0, f"no gradient in conv{k}"


def test_save_load_round_trip_and_config(tmp_path):
    model = tiny(ways=3, train_ways=6)
    save_model(model, tmp_path / "p.safetensors")
    pred = load(tmp_path / "p.safetensors", "protonet")
    assert pred.method == "protonet" and pred.model.config_dict() == model.config_dict()
    assert torch.equal(pred.model.body, model.body)
    ds = noise_data()
    adapted = pred.adapt(ds.images[[0, 4, 8, 12]], torch.tensor([0, 1, 2, 3]))
    assert adapted.predict(ds.images[[1, 5]]).shape == (2,)  # 4 ways from a 3-way model
    with pytest.raises(L2OError, match="--train-ways must be at least --ways \\(3\\), got 2"):
        tiny(ways=3, train_ways=2)


def run_cli(argv, capsys):
    from l2o.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train-ways", "3"], "l2o: error: --train-ways must be at least --ways (5), got 3"),
        (["--method", "maml", "--train-ways", "20"], "--train-ways applies to protonet, not maml"),
    ],
)
def test_cli_option_errors_without_data(tmp_path, capsys, extra, message):
    argv = ["fewshot", "train", "--method", "protonet", "--out", str(tmp_path / "r"), *extra]
    rc, cap = run_cli(argv, capsys)
    assert rc == 2 and message in cap.err and len(cap.err.strip().splitlines()) == 1
    assert cap.err.startswith("l2o: error: ")


DATA = shared_data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "omniglot").is_dir(),
    reason="Omniglot not found: set L2O_DATA or put omniglot/ in ../shared/data",
)


@needs_data
def test_cli_train_ways_above_the_meta_train_classes(tmp_path, capsys):
    argv = ["fewshot", "train", "--method", "protonet", "--data-dir", str(DATA),
            "--train-ways", "500", "--out", str(tmp_path / "r")]  # fmt: skip
    rc, cap = run_cli(argv, capsys)
    assert rc == 2 and len(cap.err.strip().splitlines()) == 1
    assert cap.err.startswith(
        "l2o: error: --train-ways 500 is more than the 145 meta-train classes"
    )


@needs_data
def test_cli_train_then_load_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fewshot", "train", "--method", "protonet", "--data-dir", str(DATA),
            "--filters", "8", "--meta-steps", "3", "--val-every", "3", "--val-episodes", "3",
            "--train-ways", "10", "--train-queries", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    rc, cap = run_cli(argv, capsys)
    assert rc == 0, cap.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["train_ways"] == 10 and cfg["config"]["train_queries"] == 2
    assert cfg["method"] == "protonet" and cfg["ways"] == 5
    pred = load(out)
    assert pred.method == "protonet" and pred.meta["selection"]["episode"] == 3
    report = tmp_path / "eval.json"
    argv = ["fewshot", "eval", "--checkpoint", str(out), "--data-dir", str(DATA),
            "--episodes", "4", "--no-progress", "--json", str(report)]  # fmt: skip
    rc, cap = run_cli(argv, capsys)
    assert rc == 0, cap.err
    rep = json.loads(report.read_text())
    assert rep["method"] == "protonet" and rep["episodes"] == 4 and rep["ways"] == 5
    assert 0.0 <= rep["accuracy"] <= 100.0 and "protonet on omniglot test" in cap.out


# -- the benchmark --------------------------------------------------------------------------------
def test_benchmark_protonet_options_and_paired_with_checks(tmp_path, capsys):
    from conftest import load_benchmark

    bench = load_benchmark("fewshot_omniglot")
    opts = bench.parse_options("protonet@5w5s:train_ways=30,train_queries=5,steps=900")
    assert opts == {("protonet", "5w5s"): {"train_ways": 30, "train_queries": 5, "steps": 900}}
    with pytest.raises(SystemExit):
        bench.main(["--methods", "maml", "--options", "maml:train_ways=30"])
    assert "maml has no setting train_ways" in capsys.readouterr().err
    # an earlier results file tested on other episodes cannot be paired with this run
    other = {"omniglot": {"5w1s": {"maml": {"episode_seed": 1, "episodes": 600}}}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        bench.main(["--methods", "protonet", "--configs", "5w1s",
                    "--paired-with", str(tmp_path / "other.json")])  # fmt: skip
    assert "5w1s maml was not tested on the 600 test episodes" in capsys.readouterr().err
