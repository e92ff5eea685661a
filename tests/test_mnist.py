"""MNIST data reader, the mnist-mlp task, the rnnprop rule and a tiny meta-training smoke run."""

import gzip
import struct

import pytest
import torch
from torch import nn

from conftest import shared_data_dir
from l2o.config import resolve
from l2o.data import mnist
from l2o.errors import L2OError
from l2o.meta import MetaTrainer
from l2o.meta.unroll import loss_and_grad
from l2o.rules import LEARNED_RULES, RNNprop, RNNpropConfig, build_learned_rule
from l2o.tasks import build_task
from l2o.tasks.mlp import MnistMLP


def write_idx(path, array: torch.Tensor, compress: bool = True) -> None:
    data = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    data += array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture()
def tiny_data(tmp_path):
    """A data directory with 300 train and 60 test 28x28 images (random pixels, labels 0..9)."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for part, n in (("train", 300), ("t10k", 60)):
        write_idx(
            root / "mnist" / f"{part}-images-idx3-ubyte.gz",
            torch.randint(0, 256, (n, 28, 28), generator=g),
        )
        write_idx(
            root / "mnist" / f"{part}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g)
        )
    mnist._CACHE.clear()
    return root


def test_reader_and_splits(tiny_data):
    x, y = mnist.split("train", tiny_data)
    assert x.shape == (250, 784) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and int(y.max()) <= 9
    assert mnist.split("val", tiny_data)[0].shape == (50, 784)
    assert mnist.split("test", tiny_data)[0].shape == (60, 784)
    raw = mnist.read_idx(tiny_data / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert raw.shape == (60,)


def test_raw_idx_files_are_read(tmp_path):
    a = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", a, compress=False)
    assert torch.equal(mnist.read_idx(tmp_path / "x"), a)


@pytest.mark.parametrize("damage", ["truncate", "magic", "gzip"])
def test_corrupt_idx_names_the_file(tiny_data, damage):
    path = tiny_data / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "magic":
        path.write_bytes(gzip.compress(b"\x12\x34" + raw[2:]))
    else:
        path.write_bytes(b"not gzip at all")
    mnist._CACHE.clear()
    with pytest.raises(L2OError, match=str(path)) as info:
        build_task(f"mnist-mlp:data_dir={tiny_data}")
    assert {"truncate": "truncated", "magic": "magic", "gzip": "gzip"}[damage] in str(info.value)


def test_missing_dir_and_missing_setting(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(L2OError, match=str(missing)) as info:
        build_task(f"mnist-mlp:data_dir={missing}")
    assert (
        "--data-dir" in str(info.value)
        and "L2O_DATA" in str(info.value)
        and "--download" in str(info.value)
    )
    monkeypatch.delenv("L2O_DATA", raising=False)
    with pytest.raises(L2OError, match="L2O_DATA"):
        mnist.data_dir(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(L2OError, match="no MNIST IDX files"):
        mnist.find_files(tmp_path / "empty")


def reference_module(task: MnistMLP, problem, theta: torch.Tensor) -> nn.Sequential:
    """An nn.Sequential holding the functional MLP's weights of instance 0."""
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}[task.activation]
    params = problem.layout.unflatten(theta)
    mods = []
    n = len(task.sizes) - 1
    for k, (i, o) in enumerate(zip(task.sizes[:-1], task.sizes[1:], strict=True)):
        lin = nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.copy_(params[f"w{k}"][0].t())
            lin.bias.copy_(params[f"b{k}"][0])
        mods.append(lin)
        if k < n - 1:
            mods.append(act())
    return nn.Sequential(*mods)


@pytest.mark.parametrize(
    "spec",
    [
        "hidden=6,activation=sigmoid",
        "hidden=6,activation=relu",
        "hidden=5,activation=tanh",
        "hidden=4,3,activation=sigmoid",
    ],
)
def test_functional_mlp_matches_nn_module(tiny_data, spec):
    task = build_task(f"mnist-mlp:{spec},batch=16,split=train,data_dir={tiny_data},init_std=0.3")
    problem = task.sample([3, 4])  # two batched instances
    theta = problem.init()
    losses, grad = loss_and_grad(problem, theta, t=5, keep_graph=False)
    assert losses.shape == (2,)
    x, y = problem.batch(5)
    model = reference_module(task, problem, theta)
    ref = nn.functional.cross_entropy(model(x[0]), y[0])
    ref.backward()
    assert torch.allclose(losses[0], ref, atol=1e-6)
    g = problem.layout.unflatten(grad)
    for k, lin in enumerate(m for m in model if isinstance(m, nn.Linear)):
        assert torch.allclose(g[f"w{k}"][0].t(), lin.weight.grad, atol=1e-6)
        assert torch.allclose(g[f"b{k}"][0], lin.bias.grad, atol=1e-6)
    # A batched instance is the same problem as the same seed alone.
    alone = task.sample([4])
    assert torch.allclose(alone.loss(alone.init(), 5)[0], losses[1], atol=1e-6)


def test_minibatches_deterministic_per_seed_and_step(tiny_data):
    task = build_task(f"mnist-mlp:data_dir={tiny_data},batch=32")
    p1, p2 = task.sample([7]), task.sample([7])
    x1, y1 = p1.batch(3)
    x2, y2 = p2.batch(3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(p1.batch(4)[0], x1)
    assert not torch.equal(task.sample([8]).batch(3)[0], x1)
    assert torch.equal(p1.init(), p2.init())
    assert task.effective_split == "test"
    assert (
        task.for_role("train").effective_split == "train"
        and task.for_role("val").effective_split == "val"
    )
    assert (
        build_task(f"mnist-mlp:data_dir={tiny_data},split=val").for_role("train").effective_split
        == "val"
    )


def test_rnnprop_rule_shapes_and_registry():
    rule = build_learned_rule(
        "rnnprop", {"preset": "paper", "layers": [8, 8], "p": 10.0, "output_scale": 0.1}
    )
    assert "rnnprop" in LEARNED_RULES and isinstance(rule, RNNprop)
    theta = torch.randn(37)
    state = rule.init(theta)
    assert state["h0"].shape == (37, 8) and state["m"].shape == (37,)
    new, state2 = rule.step(theta, torch.randn(37), None, state)
    assert new.shape == theta.shape and float(state2["step"]) == 1
    assert (new - theta).abs().max() <= 0.1 + 1e-6  # bounded by output_scale
    new.sum().backward()
    assert all(p.grad is not None for p in rule.parameters())
    # Scale-invariant inputs: scaling the gradient leaves the update unchanged.
    g = torch.randn(37)
    a, _ = rule.step(theta, g, None, rule.init(theta))
    b, _ = rule.step(theta, 1000 * g, None, rule.init(theta))
    assert torch.allclose(a, b, atol=1e-5)
    again = RNNprop(RNNpropConfig.from_dict(rule.describe()["config"]))
    assert again.config == rule.config


@pytest.mark.parametrize("rule_name", ["lstm", "rnnprop"])
def test_meta_train_smoke_on_tiny_data(tiny_data, tmp_path, rule_name):
    cfg = resolve(
        f"mnist-mlp:hidden=4,batch=8,data_dir={tiny_data}",
        None,
        [
            "train.meta_steps=2",
            "train.horizon=4",
            "train.unroll=2",
            "val.every=1",
            "val.problems=2",
            "rule.layers=4,4",
            f"rule.name={rule_name}",
        ],
    )
    assert cfg["rule"]["preprocessing"] == "logsign" and cfg["rule"]["p"] == 10.0
    trainer = MetaTrainer(cfg, tmp_path / "run", progress=False)
    assert trainer.task.effective_split == "train" and trainer.val_task.effective_split == "val"
    summary = trainer.train()
    assert summary["meta_steps"] == 2 and summary["updates"] == 4
    assert (tmp_path / "run" / "best" / "optimizer.safetensors").is_file()


def test_shared_mnist_if_present():
    root = shared_data_dir()
    if root is None or not (
        (root / "mnist").is_dir() or (root / "train-images-idx3-ubyte.gz").is_file()
    ):
        pytest.skip("shared MNIST not found (set L2O_DATA or put it in ../shared/data/mnist)")
    x, y = mnist.split("test", root)
    assert x.shape == (10_000, 784) and y.shape == (10_000,)
    task = build_task(f"mnist-mlp:data_dir={root}")
    p = task.sample([0])
    assert abs(float(p.loss(p.init(), 0)[0]) - 2.3026) < 0.05  # ln 10 at the N(0, 0.01^2) init
