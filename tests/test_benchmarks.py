"""benchmarks/: the options it passes to the project's scripts exist, its sizes suit train.py's network, its table
holds each row once in both files, and busy rows are marked (in seconds: the figures themselves are not judged)."""

import ast
import csv
import importlib
import math

import pytest

from nerveseg.settings import option_name, script_defaults
from nerveseg.training.runs import check_settings
from tests.helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture()
def benchmark_modules(monkeypatch: pytest.MonkeyPatch) -> tuple:
    """benchmarks/measure.py and report.py, imported as benchmarks/run.py imports them."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("measure"), importlib.import_module("report")


def script_options(source: str) -> dict[str, set[str]]:
    """The --options that the run_script calls in a source pass to each script."""
    options: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_script":
            script, *arguments = node.args
            if isinstance(script, ast.Constant):
                options.setdefault(script.value, set()).update(
                    a.value for a in arguments if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                )
    return options


def test_every_option_the_benchmark_passes_is_a_setting_of_its_script():
    options = script_options((BENCHMARKS / "measure.py").read_text())
    assert set(options) == {"data_cleaning.py", "train.py", "predict.py"}
    for script, passed in options.items():
        known = {option_name(name) for name in script_defaults(ROOT / script)}
        assert passed and passed <= known, (script, passed - known)
    assert {"--data-dir", "--val-interval", "--min-steps-per-epoch", "--model-path"} <= options["train.py"]


def test_every_profile_trains_at_sizes_the_network_takes(benchmark_modules):
    measure, _ = benchmark_modules
    assert set(measure.PROFILES) == {"quick", "default", "gpu-quick", "full"}
    for profile in measure.PROFILES.values():
        for height, width in {profile.image_size, *profile.scaling_sizes}:
            check_settings({**measure.TRAIN, "IMAGE_HEIGHT": height, "IMAGE_WIDTH": width,
                            "BATCH_SIZE": profile.batch_size})  # raises UserError for a size the UNet refuses
    assert measure.PROFILES["full"].batch_size == 128  # what train.py's automatic batch gives the full set


def test_the_table_holds_each_row_once_in_both_files_and_busy_timings_are_marked(benchmark_modules, tmp_path):
    _, report = benchmark_modules
    rows = [report.Row(section=2, key="train_limit", benchmark="Training, compute limit", value=43.6,
                       unit="images/s", goal="≥ 0.9", met=True, note="median of 5"),
            report.Row(section=6, key="train_memory", benchmark="Peak memory: training", value=2.4, unit="GB",
                       goal="≤ 3", met=False),
            report.Row(section=5, key="prediction_seconds", benchmark="Prediction: time", value=81.24, unit="s")]

    class Busy:  # a Watch that saw other processes keep 1.5 cores busy
        def busy(self) -> bool:
            return True

        def others(self) -> float:
            return 1.5

    report.flag_busy(rows, Busy())
    assert [row.note for row in rows] == ["median of 5; BUSY: other processes used 1.50 cores", "",
                                          "BUSY: other processes used 1.50 cores"]  # memory is not a timing
    markdown = report.write_results(tmp_path, ["machine line"], rows)
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as file:
        written = list(csv.DictReader(file))
    assert [row["key"] for row in written] == ["train_limit", "train_memory", "prediction_seconds"]
    assert [math.isclose(float(row["value"]), r.value) for row, r in zip(written, rows, strict=True)] == [True] * 3
    assert [row["met"] for row in written] == ["yes", "no", ""]
    assert markdown == (tmp_path / "results.md").read_text(encoding="utf-8") and "- machine line" in markdown
    assert "| Training, compute limit | 43.6 | images/s | ≥ 0.9 | yes |" in markdown
    assert "| Peak memory: training | 2.4 | GB | ≤ 3 | **no** |  |" in markdown
    assert "| Prediction: time | 81.2 | s |" in markdown and markdown.count("\n| ") == 2 + len(rows)
