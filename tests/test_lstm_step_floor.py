"""``benchmarks/lstm_step_floor.py`` runs and its parts add up (a small size, one repeat)."""

import json

from conftest import load_benchmark


def test_step_floor_benchmark_writes_every_part(tmp_path):
    bench = load_benchmark("lstm_step_floor")
    out = tmp_path / "floor.json"
    assert bench.main(["--coordinates", "8192", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rule_flops_per_coordinate"] == 9960  # 2x20 LSTM on log/sign features
    assert set(doc["per_step_s"]) == {"gemm", "sigmoid", "tanh", "cell"}
    assert all(v > 0 for v in doc["median_s"].values())
    assert doc["kernel_ratio_to_flop_floor"] == doc["median_s"]["kernel"] / doc["flop_floor_s"]
    assert doc["sum_of_parts_s"] == sum(doc["per_step_s"].values())
