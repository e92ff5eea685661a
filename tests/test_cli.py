"""The command line: the promised one-line errors (exit 2, no traceback) and the happy paths."""

import json

import pytest
import torch

from l2o.cli import main


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["compare", "--task", "nope", "--optimizer", "adam", "--out", "{tmp}"],
            "unknown task 'nope'",
        ),
        (
            ["compare", "--task", "quadratic", "--optimizer", "adamw", "--out", "{tmp}"],
            "unknown optimizer 'adamw'",
        ),
        (
            ["compare", "--task", "quadratic", "--optimizer", "adam:lr=-1", "--out", "{tmp}"],
            "lr must be a positive",
        ),
        (
            ["compare", "--task", "quadratic", "--optimizer", "adam:beta=3", "--out", "{tmp}"],
            "no option 'beta'",
        ),
        (
            ["compare", "--task", "quadratic:dim=zero", "--optimizer", "adam", "--out", "{tmp}"],
            "cannot read 'zero' as int",
        ),
        (
            [
                "compare",
                "--task",
                "quadratic",
                "--optimizer",
                "adam",
                "--steps",
                "0",
                "--out",
                "{tmp}",
            ],
            "argument --steps: expected a positive integer",
        ),
        (
            [
                "compare",
                "--task",
                "quadratic",
                "--optimizer",
                "adam",
                "--problems",
                "-3",
                "--out",
                "{tmp}",
            ],
            "argument --problems",
        ),
        (
            [
                "compare",
                "--task",
                "quadratic",
                "--optimizer",
                "lstm:{tmp}/missing",
                "--out",
                "{tmp}",
            ],
            "no trained optimizer at",
        ),
        (
            ["compare", "--task", "quadratic", "--optimizer", "lstm", "--out", "{tmp}"],
            "expected lstm:PATH",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--set", "train.bogus=1"],
            "unknown config key train.'bogus'",
        ),
        (
            [
                "meta-train",
                "--task",
                "quadratic",
                "--out",
                "{tmp}/r",
                "--set",
                "train.meta_lr=fast",
            ],
            "cannot read 'fast' as float",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--set", "novalue"],
            "expected section.key=value",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--meta-steps", "0"],
            "argument --meta-steps",
        ),
        (
            [
                "meta-train",
                "--task",
                "quadratic",
                "--out",
                "{tmp}/r",
                "--set",
                "train.estimator=sgd",
            ],
            "train.estimator must be 'bptt' or 'pes'",
        ),
        (
            [
                "meta-train",
                "--task",
                "quadratic",
                "--out",
                "{tmp}/r",
                "--set",
                "rule.name=rnnprop",
                "--set",
                "rule.p=3",
            ],
            "config key rule.p does not apply to rule 'rnnprop'",
        ),  # fmt: skip
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--device", "tpu"],
            "device must be cpu, cuda or cuda:N",
        ),
        (
            [
                "compare",
                "--task",
                "quadratic",
                "--optimizer",
                "adam",
                "--out",
                "{tmp}/c",
                "--device",
                "gpu",
            ],
            "device must be cpu, cuda or cuda:N",
        ),
        (
            [
                "meta-train",
                "--task",
                "quadratic",
                "--out",
                "{tmp}/r",
                "--config",
                "{tmp}/none.toml",
            ],
            "--config: file not found",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "/proc/l2o-cannot-write"],
            "cannot write to output directory",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--set", "train.unroll=500"],
            "must not exceed train.horizon",
        ),
        (
            [
                "meta-train",
                "--task",
                "quadratic",
                "--out",
                "{tmp}/r",
                "--set",
                "rule.preprocessing=bogus",
            ],
            "config section [rule]",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--set", "rule.name=nope"],
            "unknown learned rule 'nope'",
        ),
        (
            [
                "meta-train",
                "--task",
                "quadratic",
                "--out",
                "{tmp}/r",
                "--set",
                "train.min_lr_ratio=-1",
            ],
            "train.min_lr_ratio",
        ),
        (
            ["meta-train", "--task", "quadratic", "--out", "{tmp}/r", "--set", "rule.layers=a,b"],
            "comma-separated numbers",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_error(capsys, tmp_path, argv, expected):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("l2o: error:")
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_meta_train_then_compare(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "meta-train",
        "--task",
        "quadratic",
        "--out",
        str(run),
        "--meta-steps",
        "2",
        "--set",
        "train.instances=4",
        "--set",
        "val.problems=4",
        "--set",
        "val.every=1",
        "--set",
        "train.horizon=10",
        "--set",
        "train.unroll=5",
        "--no-progress",
    )
    assert code == 0, err
    assert (run / "best" / "config.json").exists() and (run / "validation.png").exists()
    cmp = tmp_path / "cmp"
    code, out, err = run_cli(
        capsys,
        "compare",
        "--task",
        "quadratic",
        "--optimizer",
        f"lstm:{run}",
        "--optimizer",
        "adam",
        "--optimizer",
        "sgd:lr=0.01",
        "--steps",
        "10",
        "--problems",
        "5",
        "--tune-problems",
        "3",
        "--out",
        str(cmp),
    )
    assert code == 0, err

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    results = json.loads((cmp / "results.json").read_text(), parse_constant=no_constants)
    assert results["steps"] == 10 and results["problems"] == 5
    for name, entry in results["optimizers"].items():
        assert len(entry["mean_loss"]) == 11, name
        assert entry["sum_loss"] == pytest.approx(sum(entry["mean_loss"][1:]), rel=1e-9)
        assert {"hparams", "final_loss_mean", "final_loss_std"} <= set(entry)
    assert results["optimizers"]["sgd:lr=0.01"]["hparams"]["lr"] == 0.01
    assert "lr" in results["optimizers"]["adam"]["hparams"]
    assert (cmp / "curves.png").stat().st_size > 0
    header = (cmp / "curves.csv").read_text().splitlines()[0]
    assert header.startswith("step,")
    assert "sum_loss" in out


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, capsys):
    # Job scripts pass --resume on every start; the first start has nothing to resume.
    argv = ["meta-train", "--task", "quadratic", "--out", str(tmp_path / "r"), "--resume",
            "--meta-steps", "2", "--set", "train.instances=4", "--set", "val.problems=4",
            "--set", "val.every=1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "no checkpoint in" in capsys.readouterr().err
    assert (tmp_path / "r" / "best" / "optimizer.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    argv = ["meta-train", "--task", "quadratic", "--out", str(tmp_path / "r"), "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
