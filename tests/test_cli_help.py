"""Help where users look: every command's --help ends with runnable examples; data errors
say which files are expected and where."""

import pytest

from l2o import cli
from l2o.errors import L2OError


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["quickstart"],
        ["meta-train"],
        ["compare"],
        ["study"],
        ["pretrained"],
        ["fewshot"],
        ["fewshot", "train"],
        ["fewshot", "eval"],
        ["fewshot", "gates"],
    ],
)
def test_help_shows_an_example(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out
    assert f"l2o {' '.join(argv)}".strip() in out.split("example", 1)[1]


def test_missing_mnist_directory_names_the_files_and_where(monkeypatch, tmp_path):
    from l2o.data import mnist

    monkeypatch.delenv("L2O_DATA", raising=False)
    with pytest.raises(L2OError) as e:
        mnist.find_files(None)
    message = str(e.value)
    assert "--data-dir" in message and "L2O_DATA" in message
    assert all(name in message for name in mnist.FILES.values())
    with pytest.raises(L2OError, match="t10k-labels-idx1-ubyte"):
        mnist.find_files(tmp_path / "absent")
