"""Neural Art: image readers, features (random, vgg19 on a generated state dict), the task, l2o art."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data_dir
from l2o.cli import main
from l2o.data import neural_art as data
from l2o.errors import L2OError
from l2o.tasks import build_task
from l2o.tasks.neural_art import VGG19_CONVS, NeuralArt, vgg19_features

_dir = shared_data_dir()
DATA = str(_dir) if _dir else ""
HAS_DATA = bool(DATA) and (Path(DATA) / "neural-art" / "style" / "starry_night.jpg").is_file()
needs_data = pytest.mark.skipif(
    not HAS_DATA, reason="needs $L2O_DATA with neural-art/ and cifar10/ (the data directory)"
)


def png(path: Path, size=(40, 30), seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_read_image_crop_resize_and_errors(tmp_path):
    img = data.read_image(png(tmp_path / "a.png"), 16)
    assert img.shape == (3, 16, 16) and 0 <= img.min() and img.max() <= 1
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(L2OError, match="bad.jpg") as e:
        data.read_image(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(L2OError, match="missing.png"):
        data.read_image(tmp_path / "missing.png")


def vgg_state_dict() -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for idx, _, c_in, c_out in VGG19_CONVS:
        sd[f"features.{idx}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * 0.05
        sd[f"features.{idx}.bias"] = torch.zeros(c_out)
    return sd


def test_vgg19_from_generated_state_dict(tmp_path):
    from safetensors.torch import save_file

    sd = vgg_state_dict()
    save_file(sd, str(tmp_path / "vgg.safetensors"))
    torch.save(sd, tmp_path / "vgg.pth")
    for f in ("vgg.safetensors", "vgg.pth"):
        net = vgg19_features(tmp_path / f)
        out = net(torch.rand(2, 3, 16, 16))
        assert set(out) == {"conv4_2", "conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"}
        assert out["conv5_1"].shape == (2, 512, 1, 1)
    task = NeuralArt(size=16, style=str(png(tmp_path / "s.png")), features=f"vgg19:{tmp_path / f}")
    prob = task.problem(torch.rand(2, 3, 16, 16), [0, 1])
    theta = prob.init().requires_grad_()
    losses = prob.loss(theta, 0)
    assert losses.shape == (2,)
    (g,) = torch.autograd.grad(losses.sum(), theta)
    assert torch.isfinite(g).all()
    with pytest.raises(L2OError, match="multiple of 16"):
        NeuralArt(size=24, style=str(tmp_path / "s.png"), features=f"vgg19:{tmp_path / f}")


def test_vgg19_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(L2OError, match="not found: .*nope.pth"):
        vgg19_features(tmp_path / "nope.pth")
    sd = vgg_state_dict()
    sd["features.21.weight"] = torch.zeros(512, 512, 1, 1)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(
        L2OError,
        match=r"shape.safetensors.*features.21.weight \(conv4_2\).*expected \(512, 512, 3, 3\)",
    ):
        vgg19_features(tmp_path / "shape.safetensors")
    del sd["features.28.bias"]
    sd["features.21.weight"] = torch.zeros(512, 512, 3, 3)
    save_file(sd, str(tmp_path / "names.safetensors"))
    with pytest.raises(L2OError, match="names.safetensors: missing features.28.bias"):
        vgg19_features(tmp_path / "names.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(L2OError, match="junk.pth"):
        vgg19_features(tmp_path / "junk.pth")


def test_random_features_task_sizes_and_instances(tmp_path):
    style = str(png(tmp_path / "s.png", (50, 50)))
    for size in (8, 20):
        with pytest.raises(L2OError, match="multiple of 8"):
            NeuralArt(size=size, style=style)
    with pytest.raises(L2OError, match="init"):
        NeuralArt(size=16, style=style, init="zeros")
    task = NeuralArt(size=16, style=style)
    content = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prob = task.problem(content, [5, 6, 7])
    assert prob.layout.shapes == ((3, 3, 16, 16),) and prob.num_instances == 3
    losses = prob.loss(prob.init(), 0)
    alone = task.problem(content[1:2], [6]).loss(prob.init().view(3, -1)[1], 0)
    assert torch.allclose(losses[1], alone[0], rtol=1e-5, atol=1e-7)
    at_content = task.problem(content, [0, 1, 2])
    assert at_content.init().shape == content.reshape(-1).shape


@needs_data
def test_content_sets_disjoint_and_task_from_spec():
    t = build_task(f"neural-art:size=16,data_dir={DATA}")
    assert t.describe()["split"] == "test"
    train, val = t.for_role("train"), t.for_role("val")
    n = {s: data.content_set(s, 16, DATA).shape[0] for s in data.SPLITS}
    assert n["train"] > n["val"] > 0 and n["test"] >= 20
    p = train.sample([0, 1])
    assert p.loss(p.init(), 0).shape == (2,)
    assert val.effective_split == "val"


@needs_data
def test_l2o_art_cli(tmp_path, capsys):
    photo = png(tmp_path / "p.png", (48, 40))
    for opt in ("adam:lr=0.03", "lbfgs"):
        out = tmp_path / f"{opt.split(':')[0]}.png"
        rc = main(
            ["art", "--content", str(photo), "--style", "starry_night", "--data-dir", DATA,
             "--optimizer", opt, "--size", "16", "--steps", "4", "--out", str(out)]
        )  # fmt: skip
        assert rc == 0 and data.read_image(out).shape == (3, 16, 16)
    assert "wrote" in capsys.readouterr().out
    rc = main(
        ["art", "--content", str(tmp_path / "none.png"), "--style", "starry_night",
         "--data-dir", DATA, "--optimizer", "adam", "--size", "16", "--out", str(out)]
    )  # fmt: skip
    assert rc == 2 and "none.png" in capsys.readouterr().err


@needs_data
def test_benchmark_cache_is_reused_only_under_the_same_protocol(tmp_path, monkeypatch, capsys):
    from conftest import load_benchmark

    bench = load_benchmark("neural_art")
    tiny = {"size": 16, "style": "starry_night", "steps": 3, "what": "tiny"}
    monkeypatch.setattr(bench, "EXPERIMENTS", {"a": tiny})
    monkeypatch.setattr(bench, "SNAPSHOTS", (2,))
    argv = ["--data-dir", DATA, "--experiments", "a", "--optimizers", "adam",
            "--images", "2", "--tune-images", "1", "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    entry = (tmp_path / "a" / "adam.json").read_text()
    assert '"protocol"' in entry and "cached" not in capsys.readouterr().out
    assert bench.main(argv) == 0
    assert "adam: cached" in capsys.readouterr().out
    # another objective (a stale cache from other weights) is recomputed, never reused
    monkeypatch.setattr(bench, "EXPERIMENTS", {"a": {**tiny, "steps": 4}})
    assert bench.main(argv) == 0
    assert "another protocol, recomputing" in capsys.readouterr().out
    losses = json.loads((tmp_path / "a" / "adam.json").read_text())["losses"]
    assert len(losses) == 4 + 1  # the start and 4 steps


def test_benchmark_paired_comparison_against_best_first_order():
    from conftest import load_benchmark

    bench = load_benchmark("neural_art")
    start = [5.0, 9.0, 7.0]  # three images; step 0 is not counted in the sums
    entries = {
        # sum_loss = the mean over images of the per-image sums, as summarize() writes it
        "sgd": {"sum_loss": 8.0, "losses": [start, [2.0, 6.0, 4.0], [2.0, 6.0, 4.0]]},
        "adam": {"sum_loss": 10.0, "losses": [start, [3.0, 7.0, 5.0], [3.0, 7.0, 5.0]]},
        "lstm:x": {"sum_loss": 20 / 3, "losses": [start, [1.0, 6.0, 3.0], [2.0, 5.0, 3.0]]},
    }
    out = bench.paired_against_best(entries)
    assert out["best"] == "sgd" and "sgd" not in out
    lstm = out["lstm:x"]  # per-image sums 3, 11, 6 against sgd's 4, 12, 8
    assert lstm["paired_mean_difference"] == pytest.approx(-4 / 3)
    assert lstm["better_on_images"] == 3 and lstm["images"] == 3
    assert lstm["ratio_of_sums"] == pytest.approx(20 / 24)
    assert out["adam"]["better_on_images"] == 0
