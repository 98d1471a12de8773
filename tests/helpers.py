"""What the tests share besides fixtures: paths, the real data's whereabouts, a script runner, hashes."""

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
KAGGLE_SAMPLE = SHARED_DATA / "kaggle-sample"
USGRA = SHARED_DATA / "usgra-kaggle"
needs_kaggle_sample = pytest.mark.skipif(not KAGGLE_SAMPLE.is_dir(), reason="../shared/data/kaggle-sample is absent")


def run_script(
    script: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, in `cwd`; capture its output."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below a folder, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_metrics(run: Path) -> list[dict]:
    """The rows of a training run's metrics.csv."""
    with open(run / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


FAST_TRAINING = (
    "--image-height",
    "64",
    "--image-width",
    "96",
    "--batch-size",
    "8",
    "--val-batch-size",
    "16",
    "--min-steps-per-epoch",
    "1",  # an epoch is one pass over the few training images (the rule for small sets is tested on its own)
    "--quiet",
)
