"""Checkpoints and artifacts: atomic writes, never unpickling, loud failures."""

import json
import os

import pytest
import torch

import l2o
from l2o.checkpoint import atomic_write_bytes, load_tensors, save_tensors
from l2o.errors import CheckpointError
from l2o.rules import CoordinatewiseLSTM, LSTMRuleConfig


def test_artifact_round_trip(tmp_path):
    rule = CoordinatewiseLSTM(LSTMRuleConfig.from_preset("code", layers=(6, 5)))
    l2o.save(rule, tmp_path / "a", extra={"note": "x"})
    loaded = l2o.load(tmp_path / "a")
    assert loaded.config == rule.config
    for a, b in zip(rule.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["extra"] == {"note": "x"}


def test_shipped_pretrained_quadratic_loads():
    rule = l2o.load("pretrained/quadratic")
    assert isinstance(rule, CoordinatewiseLSTM)


def test_missing_artifact_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no trained optimizer at .*nowhere"):
        l2o.load(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupt_weights_are_detected(tmp_path, damage):
    rule = CoordinatewiseLSTM()
    l2o.save(rule, tmp_path)
    path = tmp_path / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"\x80\x04not a checkpoint at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        l2o.load(tmp_path)


def test_shape_mismatch_is_an_error(tmp_path):
    l2o.save(CoordinatewiseLSTM(LSTMRuleConfig(layers=(20, 20))), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["config"]["layers"] = [10, 20]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="describe different rules"):
        l2o.load(tmp_path)
    # an artifact whose header predates the description: the shapes are what catch it
    tensors, _ = load_tensors(tmp_path / "optimizer.safetensors")
    save_tensors(tmp_path / "optimizer.safetensors", tensors, {"rule": "lstm"})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        l2o.load(tmp_path)


def test_renamed_weights_are_an_error_not_a_silent_random_init(tmp_path):
    # The official code silently fell back to random init on a name mismatch.
    rule = CoordinatewiseLSTM()
    sd = {("renamed." + k if k.startswith("head") else k): v for k, v in rule.state_dict().items()}
    save_tensors(tmp_path / "optimizer.safetensors", sd, {"rule": "lstm"})
    (tmp_path / "config.json").write_text(
        json.dumps({"rule": "lstm", "config": rule.config.to_dict()})
    )
    with pytest.raises(CheckpointError, match="missing .*head.weight"):
        l2o.load(tmp_path)


def test_pickle_is_never_loaded(tmp_path):
    # A torch.save / pickle file in place of the weights is rejected without being executed.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    l2o.save(CoordinatewiseLSTM(), tmp_path)
    (tmp_path / "optimizer.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        l2o.load(tmp_path)
    assert not marker.exists()


def test_atomic_write_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "state.ckpt"
    save_tensors(path, {"w": torch.ones(3)}, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("simulated power loss before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_tensors(path, {"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.ones(3)) and meta["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]  # no temp file left behind


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f"
    atomic_write_bytes(path, b"a" * 1000)
    atomic_write_bytes(path, b"b")
    assert path.read_bytes() == b"b"


def test_training_checkpoint_rejected_as_artifact_and_vice_versa(tmp_path):
    from l2o.config import resolve
    from l2o.meta import MetaTrainer

    cfg = resolve(
        "simple", None, ["train.meta_steps=1", "train.horizon=4", "train.unroll=2", "val.every=0"]
    )
    MetaTrainer(cfg, tmp_path / "run", progress=False).train()
    trainer = MetaTrainer(cfg, None, progress=False)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        trainer.load_checkpoint(tmp_path / "run" / "final" / "optimizer.safetensors")


def test_metadata_tampering_is_detected(tmp_path):
    path = tmp_path / "c.ckpt"
    save_tensors(path, {"w": torch.ones(2)}, {"lr": 0.003})
    data = path.read_bytes().replace(b"0.003", b"0.900")
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum"):
        load_tensors(path)


def test_written_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "c.ckpt", {"w": torch.ones(2)}, {})
    finally:
        os.umask(old)
    assert (tmp_path / "c.ckpt").stat().st_mode & 0o777 == 0o644


def test_one_load_for_rules_and_few_shot_models(tmp_path):
    from l2o.fewshot import LearnerConfig, MAMLMethod, save_model

    rule = l2o.load("pretrained/quadratic")
    assert rule.name == "lstm"
    model = MAMLMethod(LearnerConfig(ways=3, filters=4, image_size=16), inner_steps=1)
    save_model(model, tmp_path / "run" / "best.safetensors")
    for path in (tmp_path / "run", tmp_path / "run" / "best.safetensors"):
        loaded = l2o.load(path, device="cpu")
        assert loaded.model.method == "maml"
        for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b)
    with pytest.raises(l2o.CheckpointError, match="apply to few-shot models"):
        l2o.load("pretrained/quadratic", device="cpu")
