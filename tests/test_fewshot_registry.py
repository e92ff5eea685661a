"""The few-shot registry: a method defined and registered here (nearest class mean on raw
pixels) is accepted by ``l2o fewshot train|eval``, ``l2o.fewshot.load`` and the benchmark's
``--methods`` / ``--options`` parsing without editing any other file.

The train / eval / benchmark round trips need the Omniglot data in ../shared/data (or
$L2O_DATA) and are skipped without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from conftest import load_benchmark, shared_data_dir
from l2o.errors import L2OError
from l2o.fewshot import LearnerConfig, load, registry, save_model
from l2o.fewshot.base import Adapted, FewShotMethod
from l2o.fewshot.registry import MethodSpec

NAME = "pixel-means"


@dataclass
class _MeansAdapted(Adapted):
    means: Tensor  # [ways, pixels]

    def logits(self, x: Tensor) -> Tensor:
        flat = self.query(x).flatten(1)
        dist = (flat.unsqueeze(1) - self.means.unsqueeze(0)).pow(2).sum(-1)
        return -self.theta.exp() * dist


class PixelMeans(FewShotMethod):
    """Nearest class mean on raw pixels; the one meta-parameter is the logits' log-scale."""

    method = NAME

    def __init__(self, learner: LearnerConfig, temperature: float = 1.0):
        super().__init__(learner)
        self.temperature = float(temperature)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.temperature)))

    def adapt(self, support_x, support_y, ways=None, bn_mode="support-running", steps=None,
              training=False):  # fmt: skip
        ways = self.check_episode(support_x, support_y, ways)
        flat = support_x.flatten(1)
        sums = flat.new_zeros(ways, flat.shape[1]).index_add(0, support_y, flat)
        counts = torch.bincount(support_y, minlength=ways).to(flat.dtype).unsqueeze(1)
        return _MeansAdapted(self.learner_for(ways), self.log_scale, None, False, sums / counts)

    def config_dict(self) -> dict:
        return {"learner": self.learner_config.to_dict(), "temperature": self.temperature}


SPEC = MethodSpec(
    name=NAME,
    cls=PixelMeans,
    build=lambda learner, hp, args: PixelMeans(learner, temperature=hp["temperature"]),
    hparams=lambda dataset, ways, shots: {
        "inner_steps": None,
        "clip": None,
        "meta_batch": 1,
        "temperature": 0.01,
    },
    options=("temperature",),
    option_types={"temperature": float},
    cli_arguments=(
        (("--temperature",), {"type": float, "default": None, "help": "pixel-means: scale"}),
    ),
    bench_steps=4,
)


@pytest.fixture
def toy():
    registry.register(SPEC)
    yield SPEC
    registry.unregister(NAME)
    assert NAME not in registry.names()


def run_cli(argv, capsys):
    from l2o.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


def test_builtin_methods_in_order():
    assert registry.names() == (
        "meta-lstm", "maml", "fomaml", "protonet", "finetune", "nearest-neighbour",
    )  # fmt: skip
    assert registry.episodic() == ("meta-lstm", "maml", "fomaml", "protonet")
    assert registry.pretrained() == ("finetune", "nearest-neighbour")
    assert registry.warm_startable() == ("meta-lstm", "maml", "fomaml")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("maml"))
    with pytest.raises(L2OError, match="unknown few-shot method 'nope'"):
        registry.get("nope")


def test_toy_method_is_listed_last_and_unregistered_after(toy):
    assert registry.names()[-1] == NAME and len(registry.names()) == 7
    assert registry.option_methods()["temperature"] == (NAME,)
    assert NAME in registry.option_methods()["meta_batch"]  # an episodic method


def test_toy_save_and_load(toy, tmp_path):
    model = PixelMeans(LearnerConfig(in_channels=1, image_size=16, ways=3), temperature=0.5)
    save_model(model, tmp_path / "m.safetensors")
    pred = load(tmp_path / "m.safetensors", NAME)
    assert pred.method == NAME and pred.model.config_dict() == model.config_dict()
    x = torch.rand(6, 1, 16, 16)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(pred.adapt(x, y).predict(x), y)  # each image is nearest its own class
    with pytest.raises(L2OError, match=f"is a {NAME} checkpoint, not protonet"):
        load(tmp_path / "m.safetensors", "protonet")


@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("protonet", ["--temperature", "2"], f"--temperature applies to {NAME}, not protonet"),
        (NAME, ["--train-ways", "20"], f"--train-ways applies to protonet, not {NAME}"),
        (NAME, ["--init-lr-scale", "0"], f"--init-lr-scale applies to meta-lstm, not {NAME}"),
    ],
)
def test_toy_cli_option_checks(toy, tmp_path, capsys, method, extra, message):
    argv = ["fewshot", "train", "--method", method, "--out", str(tmp_path / "r"), *extra]
    rc, cap = run_cli(argv, capsys)
    assert rc == 2 and message in cap.err


def test_unregistered_method_is_not_a_choice(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fewshot", "train", "--method", NAME, "--out", str(tmp_path / "r")], capsys)
    assert "invalid choice" in capsys.readouterr().err


def test_toy_benchmark_options(toy, capsys):
    bench = load_benchmark("fewshot_omniglot")
    assert NAME in bench.methods() and bench.steps_table()[NAME] == 4
    opts = bench.parse_options(f"{NAME}@5w1s:temperature=0.5,meta_batch=2,steps=3")
    assert opts == {(NAME, "5w1s"): {"temperature": 0.5, "meta_batch": 2, "steps": 3}}
    with pytest.raises(SystemExit):
        bench.main(["--methods", "maml", "--options", "maml:temperature=1"])
    assert f"maml has no setting temperature (only ('{NAME}',))" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--methods", NAME, "--options", f"{NAME}:train_ways=10"])
    assert f"{NAME} has no setting train_ways (only ('protonet',))" in capsys.readouterr().err
    # the method list is accepted: the run stops at the (missing) data directory
    rc = bench.main(["--methods", f"{NAME},finetune", "--data-dir", "/nonexistent"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


DATA = shared_data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not (DATA / "omniglot").is_dir(),
    reason="Omniglot not found: set L2O_DATA or put omniglot/ in ../shared/data",
)


@needs_data
def test_toy_cli_train_load_eval(toy, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["fewshot", "train", "--method", NAME, "--data-dir", str(DATA), "--temperature", "0.02",
            "--meta-steps", "2", "--val-every", "2", "--val-episodes", "2", "--no-progress",
            "--out", str(out)]  # fmt: skip
    rc, cap = run_cli(argv, capsys)
    assert rc == 0, cap.err
    assert f"trained {NAME}" in cap.out
    pred = load(out)
    assert pred.method == NAME and pred.model.temperature == 0.02
    assert pred.model.log_scale.item() != math.log(0.02)  # Adam moved it
    report = tmp_path / "eval.json"
    argv = ["fewshot", "eval", "--checkpoint", str(out), "--method", NAME, "--data-dir", str(DATA),
            "--episodes", "3", "--no-progress", "--json", str(report)]  # fmt: skip
    rc, cap = run_cli(argv, capsys)
    assert rc == 0, cap.err
    rep = json.loads(report.read_text())
    assert rep["method"] == NAME and rep["episodes"] == 3 and 0.0 <= rep["accuracy"] <= 100.0


@needs_data
def test_toy_benchmark_run(toy, tmp_path, capsys):
    bench = load_benchmark("fewshot_omniglot")
    rc = bench.main(["--data-dir", str(DATA), "--methods", NAME, "--configs", "5w1s",
                     "--episodes", "3", "--val-episodes", "2", "--validations", "1",
                     "--options", f"{NAME}:temperature=0.05", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "fewshot_omniglot.json").read_text())
    rep = doc["omniglot"]["5w1s"][NAME]
    assert rep["episodes"] == 3 and rep["train_steps"] == 4
    assert doc["protocol"]["steps"][NAME] == 4
    saved = load(tmp_path / "fewshot_runs" / "omniglot-5w1s" / NAME)
    assert saved.model.temperature == 0.05
    # the run's options were resolved as an `l2o fewshot train` config, saved beside it
    from l2o.fewshot.config import resolve

    cfg = resolve(str(tmp_path / "fewshot_runs" / "omniglot-5w1s" / NAME / "config.toml"))
    assert cfg["method"] == NAME and cfg["model"]["temperature"] == 0.05
    assert cfg["train"]["meta_steps"] == 4 and cfg["episodes"]["ways"] == 5
