"""CIFAR-10 binary reader, the cifar10-cnn task (shapes, batching, label subsets) and its groups."""

import pytest
import torch

from conftest import shared_data_dir
from l2o.config import resolve
from l2o.data import cifar10
from l2o.errors import L2OError
from l2o.meta.trainer import build_rule
from l2o.rules import SGD
from l2o.rules.grouped import GroupedRule
from l2o.tasks import build_task
from l2o.tasks.cifar import CONV_LABELS, parse_classes


def write_batch(path, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    rec = torch.randint(0, 256, (n, cifar10.RECORD), generator=g, dtype=torch.uint8)
    rec[:, 0] = torch.arange(n) % 10
    path.write_bytes(rec.numpy().tobytes())


@pytest.fixture()
def tiny_data(tmp_path):
    """DIR/cifar10/cifar-10-batches-bin with 12 records in each training file and 20 test ones."""
    base = tmp_path / "data" / "cifar10" / "cifar-10-batches-bin"
    base.mkdir(parents=True)
    for i, name in enumerate(cifar10.TRAIN_FILES):
        write_batch(base / name, 12, seed=i)
    write_batch(base / cifar10.TEST_FILE, 20, seed=9)
    cifar10._CACHE.clear()
    yield tmp_path / "data"
    cifar10._CACHE.clear()


def test_reader_counts_records_and_splits(tiny_data):
    x, y = cifar10.split("train", tiny_data)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and y.dtype == torch.int64
    assert cifar10.split("val", tiny_data)[0].shape == (10, 3, 32, 32)
    tx, ty = cifar10.split("test", tiny_data)
    assert tx.shape == (20, 3, 32, 32) and ty.tolist() == [i % 10 for i in range(20)]
    # the layout of a record: label byte, then R, G, B planes row-major
    raw = (tiny_data / "cifar10" / "cifar-10-batches-bin" / cifar10.TEST_FILE).read_bytes()
    assert tx[1, 2, 0, 1] == raw[cifar10.RECORD + 1 + 2048 + 1] / 255.0
    assert cifar10.class_names(tiny_data)[3] == "cat"


def test_reader_rejects_truncated_and_bad_files(tiny_data, tmp_path, monkeypatch):
    bad = tiny_data / "cifar10" / "cifar-10-batches-bin" / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(L2OError, match="data_batch_3.bin.*not a whole number"):
        cifar10.load(tiny_data)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(L2OError, match="empty.bin"):
        cifar10.read_batch(empty)
    label = tmp_path / "label.bin"
    label.write_bytes(bytes([11]) + bytes(cifar10.RECORD - 1))
    with pytest.raises(L2OError, match="label.bin: record 0 has label 11"):
        cifar10.read_batch(label)
    (tiny_data / "cifar10" / "cifar-10-batches-bin" / cifar10.TEST_FILE).unlink()
    cifar10._CACHE.clear()
    with pytest.raises(L2OError, match="missing.*test_batch.bin"):
        cifar10.load(tiny_data)
    monkeypatch.delenv("L2O_DATA", raising=False)
    with pytest.raises(L2OError, match="no data directory for CIFAR-10"):
        cifar10.data_dir("")


def test_shared_subset_counts():
    data = shared_data_dir()
    if data is None or not (data / "cifar10").is_dir():
        pytest.skip("needs the CIFAR-10 binary files in $L2O_DATA/cifar10 (or ../shared/data)")
    cifar10._CACHE.clear()
    d = cifar10.load(data)
    assert d["train_images"].shape[0] == 5 * 1017 and d["test_images"].shape[0] == 1017
    assert cifar10.split("val", data)[0].shape[0] == 5085 - (5085 * 5) // 6


def test_task_shapes_and_parameter_count(tiny_data):
    task = build_task(f"cifar10-cnn:data_dir={tiny_data}")
    assert task.parameters == 22_682  # the official network's ~22.7k
    problem = task.sample([1, 2])
    lay = problem.layout
    assert lay.instances == 2 and problem.init().numel() == 2 * 22_682
    shapes = dict(zip(lay.names, lay.shapes, strict=True))
    assert shapes["conv0.w"] == (2, 16, 3, 5, 5) and shapes["conv2.w"] == (2, 16, 16, 5, 5)
    assert shapes["fc0.w"] == (2, 256, 32) and shapes["out.w"] == (2, 32, 10)
    loss = problem.loss(problem.init(), 0)
    assert loss.shape == (2,) and torch.allclose(loss, torch.full((2,), 2.3026), atol=0.02)
    small = build_task(f"cifar10-cnn:data_dir={tiny_data},channels=4,hidden=8,batch=16")
    assert small.sample([0]).layout.shapes[0] == (1, 4, 3, 5, 5)


@pytest.mark.parametrize("grouped", [True, False])
def test_batched_instances_equal_one_at_a_time(tiny_data, grouped):
    """Both ways of running P instances (grouped kernels: CUDA's default; one after
    another: CPU's) give each instance's own loss and gradient."""
    task = build_task(f"cifar10-cnn:data_dir={tiny_data},channels=4,hidden=8,batch=16")
    together = task.sample([3, 4, 5])
    together.grouped = grouped
    theta = (together.init() + 0.05 * torch.randn(together.init().shape)).requires_grad_()
    loss = together.loss(theta, 2)
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    parts = [t.reshape(3, -1) for t in together.layout.unflatten(theta.detach()).values()]
    gparts = [t.reshape(3, -1) for t in together.layout.unflatten(grad).values()]
    for p, seed in enumerate((3, 4, 5)):
        alone = task.sample([seed])
        alone.grouped = not grouped
        th = torch.cat([t[p] for t in parts]).requires_grad_()
        assert torch.equal(
            alone.init(),
            torch.cat(
                [
                    t[p]
                    for t in (
                        x.reshape(3, -1)
                        for x in together.layout.unflatten(together.init()).values()
                    )
                ]
            ),
        )
        la = alone.loss(th, 2)
        (ga,) = torch.autograd.grad(la.sum(), th)
        assert torch.allclose(la, loss[p : p + 1], rtol=1e-5, atol=1e-6)
        assert torch.allclose(ga, torch.cat([g[p] for g in gparts]), rtol=1e-4, atol=1e-6)


def test_grouped_labels_assign_conv_weights_to_conv(tiny_data):
    task = build_task(f"cifar10-cnn:data_dir={tiny_data},channels=4,hidden=8,batch=16")
    problem = task.sample([0, 1])
    rule = GroupedRule({"conv": SGD(lr=1.0), "fc": SGD(lr=2.0)}, labels=CONV_LABELS)
    theta = problem.init()
    new, _ = rule.step(
        theta, torch.ones_like(theta), None, rule.init(theta, problem.layout), problem.layout
    )
    steps = {
        n: float((a - b).mean())
        for n, a, b in zip(
            problem.layout.names,
            problem.layout.unflatten(theta).values(),
            problem.layout.unflatten(new).values(),
            strict=True,
        )
    }
    conv = {n for n, s in steps.items() if abs(s - 1.0) < 1e-4}
    assert conv == {"conv0.w", "conv1.w", "conv2.w"}
    assert all(abs(s - 2.0) < 1e-4 for n, s in steps.items() if n not in conv)
    # the task's default rule is that grouping, with one LSTM per label
    default = build_rule(resolve("cifar10-cnn")["rule"])
    assert isinstance(default, GroupedRule) and default.label_names == ["conv", "fc"]
    assert [lb for _, lb in default.labels] == ["conv", "fc"]
    shared = build_rule(resolve("cifar10-cnn", sets=["rule.groups="])["rule"])
    assert not isinstance(shared, GroupedRule)


def test_label_subsets_and_bad_subsets(tiny_data):
    task = build_task(f"cifar10-cnn:data_dir={tiny_data},classes=3,5,channels=4,hidden=8,batch=16")
    assert task.classes == (3, 5) and task.labels.tolist() == [
        0,
        1,
        0,
        1,
    ]  # test labels 3, 5 -> 0, 1
    assert task.sample([0]).layout.shapes[-1] == (1, 2)  # two logits
    assert len(build_task(f"cifar10-cnn:data_dir={tiny_data},classes=0,1,2,3,4").classes) == 5
    for bad, msg in (("3,3", "repeats label 3"), ("3", "at least 2"), ("3,12", "unknown label 12")):
        with pytest.raises(L2OError, match=msg):
            build_task(f"cifar10-cnn:data_dir={tiny_data},classes={bad}")
    assert parse_classes(()) == tuple(range(10))


@pytest.mark.slow  # ~10 s on the shared 2-core machine (the CLI's imports and plots)
def test_compare_cli_on_a_label_subset(tiny_data, tmp_path):
    from l2o.cli import main

    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--task",
            "cifar10-cnn:classes=3,5,channels=4,hidden=8,batch=8",
            "--data-dir",
            str(tiny_data),
            "--optimizer",
            "adam:lr=0.01",
            "--steps",
            "3",
            "--problems",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code in (None, 0) and (out / "results.json").is_file()


def test_study_cifar_smoke(tiny_data, tmp_path, monkeypatch):
    import json

    import l2o.study_cifar as sc

    monkeypatch.setenv("L2O_DATA", str(tiny_data))
    small = ",channels=4,hidden=8,batch=8"
    monkeypatch.setattr(sc, "TRAIN_STEPS", 3)
    monkeypatch.setattr(sc, "GRIDS", {b: (0.01, 0.1) for b in sc.BASELINES})
    monkeypatch.setattr(
        sc,
        "EXPERIMENTS",
        {
            "cifar2": ("CIFAR-2", "cifar10-cnn:classes=0,1" + small),
        },
    )
    out = tmp_path / "study"
    kw = {"problems": 2, "tune_problems": 1, "steps": 5, "baselines": ("adam",)}
    summary = sc.run_study([], out, log=lambda s: None, **kw)
    e = summary["experiments"]["cifar2"]["optimizers"]["adam"]
    assert len(e["mean_loss"]) == 6 and 0 <= e["test_accuracy_3"] <= 1 and "test_accuracy_5" in e
    assert (out / "cifar.png").is_file() and json.loads((out / "cifar.json").read_text())
    again = sc.run_study([], out, log=lambda s: None, **kw)
    assert again["experiments"]["cifar2"]["optimizers"]["adam"]["sum_loss"] == e["sum_loss"]

    md = sc.table(json.loads((out / "cifar.json").read_text()))
    assert "**CIFAR-2**" in md and f"| adam | {e['hparams']['lr']:g} | " in md
    assert "best baseline" in md and f"{e['sum_loss']:.2f} +- " in md

    # More test runs: the tuning (same data, tuning runs and grid) is reused, not redone,
    # and the first two runs are the same problems as before.
    def no_tuning(*a, **k):
        raise AssertionError("tuned again")

    monkeypatch.setattr("l2o.evaluate.tune_lr", no_tuning)
    more = sc.run_study([], out, log=lambda s: None, **{**kw, "problems": 3})
    m = more["experiments"]["cifar2"]["optimizers"]["adam"]
    assert m["hparams"] == e["hparams"] and m["tuning"] == e["tuning"]
    assert m["per_problem_sum_loss"][:2] == pytest.approx(e["per_problem_sum_loss"], rel=1e-6)
    with pytest.raises(AssertionError, match="tuned again"):  # another grid must tune
        monkeypatch.setattr(sc, "GRIDS", {b: (0.02, 0.1) for b in sc.BASELINES})
        sc.run_study([], out, log=lambda s: None, **{**kw, "problems": 3})


def test_two_lstm_artifact_drives_a_torch_cnn_by_parameter_groups(tmp_path):
    import l2o
    from l2o.artifact import PRETRAINED_DIR
    from l2o.optim import LearnedOptimizer

    shipped = PRETRAINED_DIR / "cifar" / "optimizer.safetensors"
    if shipped.is_file():
        rule = l2o.load("pretrained/cifar")
    else:  # the same structure, untrained
        l2o.save(build_rule(resolve("cifar10-cnn")["rule"]), tmp_path / "art")
        rule = l2o.load(tmp_path / "art")
    assert isinstance(rule, GroupedRule) and sorted(rule.groups) == ["conv", "fc"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, padding=2),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    )
    conv_w = [model[0].weight]
    rest = [p for n, p in model.named_parameters() if n != "0.weight"]
    opt = LearnedOptimizer(
        [
            {"params": conv_w, "rule": rule.groups["conv"]},
            {"params": rest, "rule": rule.groups["fc"]},
        ]
    )
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(opt.state_dict()["state"]) == 4 and len(before) == 4
