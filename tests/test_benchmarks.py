"""benchmarks/run.py --quick: every row of the table is produced, with a positive figure, in both files."""

import csv

import pytest

from tests.helpers import run_script

CPU_ROWS = {
    "cleaning_rate",
    "train_limit",
    "train_pipeline",
    "train_pipeline_vs_limit",
    "train_naive",
    "train_speedup_vs_naive",
    "prediction_rate",
    "prediction_seconds",
    "prediction_seconds_torch",
    "forward_torch",
    "forward_onnxruntime",
    "forward_onnxruntime_speedup",
    "forward_one_model",
    "forward_one_model_tta",
    "forward_5_ensemble",
    "forward_5_ensemble_tta",
    "cleaning_memory",
    "train_memory",
    "prediction_memory",
    "scaling_train_16x32",
    "scaling_train_32x48",
    "scaling_train_48x64",
    "scaling_cleaning_1_4",
    "scaling_cleaning_1_2",
    "scaling_cleaning_all",
}


@pytest.mark.slow
def test_quick_benchmark_writes_every_row(tmp_path):
    out = tmp_path / "results"
    result = run_script("benchmarks/run.py", "--quick", "--device", "cpu", "--out", str(out), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "results.csv", newline="", encoding="utf-8") as file:
        rows = {row["key"]: row for row in csv.DictReader(file)}
    assert set(rows) == CPU_ROWS
    for key, row in rows.items():
        assert float(row["value"]) > 0, key
    markdown = (out / "results.md").read_text(encoding="utf-8")
    for row in rows.values():
        assert f"| {row['benchmark']} |" in markdown
    assert "torch" in result.stdout and "MONAI" in result.stdout and "CPU:" in result.stdout
    assert "| Benchmark | Value | Unit |" in result.stdout  # the table is printed too
