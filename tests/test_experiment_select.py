"""The pre-registered selection rule (experiments/fewshot_select.py) on generated reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def select_mod():
    return load_benchmark("fewshot_select", "experiments")


def report(per_episode: list[float], seed: int = 7) -> dict:
    n = len(per_episode)
    mean = sum(per_episode) / n
    return {
        "accuracy": mean,
        "ci95": 0.5,
        "episodes": n,
        "episode_seed": seed,
        "per_episode_accuracy": per_episode,
    }


def write_run(folder: Path, learner: list[float], val: list[float]) -> Path:
    folder.mkdir(parents=True)
    results = {
        "finetune": report([90.0, 92.0, 91.0, 93.0]),
        "nearest-neighbour": report([88.0, 89.0, 90.0, 87.0]),
        "meta-lstm+pretrained": report(learner),
    }
    (folder / "fewshot_omniglot.json").write_text(json.dumps({"omniglot": {"5w5s": results}}))
    (folder / "val-350.json").write_text(json.dumps({"per_episode_accuracy": val}))
    return folder


def test_rule_ignores_the_skipped_episodes_and_the_test_scores(select_mod, tmp_path, capsys):
    # A: better on the first (skipped) validation episodes and on test, worse on the rest.
    a = write_run(tmp_path / "a", [99.0, 99.0, 99.0, 99.0], [100.0, 100.0, 90.0, 90.0])
    b = write_run(tmp_path / "b", [95.0, 96.0, 94.0, 95.0], [50.0, 50.0, 95.0, 95.0])
    out = tmp_path / "select.json"
    assert select_mod.main(["--skip", "2", "--json", str(out), f"A:{a}", f"B:{b}"]) == 0
    rep = json.loads(out.read_text())
    assert rep["chosen"] == "B"
    assert rep["validation"]["A"]["accuracy"] == pytest.approx(90.0)
    assert rep["validation"]["B"]["episodes"] == 2
    assert rep["test"]["chosen"]["accuracy"] == pytest.approx(95.0)
    assert rep["not_chosen_test"]["A"]["accuracy"] == pytest.approx(99.0)
    assert rep["paired"]["finetune"]["difference"] == pytest.approx(95.0 - 91.5)
    assert rep["target_met"] is True  # 95 ± 0.5 against 91.5 ± 0.5 and 88.5 ± 0.5
    assert "validation episodes 3-4" in rep["rule"]
    assert "chosen B" in capsys.readouterr().out


def test_tie_goes_to_the_first_listed_and_overlap_is_not_met(select_mod, tmp_path):
    a = write_run(tmp_path / "a", [91.5, 92.5, 91.0, 92.0], [90.0, 90.0])
    b = write_run(tmp_path / "b", [99.0, 99.0, 99.0, 99.0], [90.0, 90.0])
    out = tmp_path / "s.json"
    assert select_mod.main(["--skip", "0", "--json", str(out), f"T=15:{a}", f"T=20:{b}"]) == 0
    rep = json.loads(out.read_text())
    assert rep["chosen"] == "T=15"
    assert rep["target_met"] is False  # 91.75 ± 0.5 overlaps fine-tune's 91.5 ± 0.5


def test_bad_requests_are_named(select_mod, tmp_path, capsys):
    a = write_run(tmp_path / "a", [90.0] * 4, [90.0, 91.0])
    assert select_mod.main(["--skip", "2", f"A:{a}"]) == 2
    assert "has 2 episodes, skip is 2" in capsys.readouterr().err
    assert select_mod.main([f"A:{tmp_path / 'missing'}"]) == 2
    assert "candidate A: no" in capsys.readouterr().err
    assert select_mod.main(["A-without-folder"]) == 2
    assert "expected LABEL:DIR" in capsys.readouterr().err
    assert select_mod.main([f"A:{a}", f"A:{a}"]) == 2
    assert "labels repeat" in capsys.readouterr().err
    b = write_run(tmp_path / "b", [90.0] * 4, [90.0, 91.0, 92.0])
    assert select_mod.main(["--skip", "1", f"A:{a}", f"B:{b}"]) == 2
    assert "different numbers of validation episodes: {'A': 1, 'B': 2}" in capsys.readouterr().err
