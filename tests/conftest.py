"""Shared fixtures: small synthetic downloads made once per test session, and a script runner."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nerveseg import synthetic

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


@pytest.fixture(scope="session")
def tiny_download(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str]]]:
    """A TINY synthetic Kaggle download (folders), and its planted contradictory pairs. Do not modify it."""
    root = tmp_path_factory.mktemp("tiny") / "download"
    planted = synthetic.write_kaggle_download(root, synthetic.TINY, workers=1)
    return root, planted


@pytest.fixture(scope="session")
def train_download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic download for training tests: 6 subjects of 10 frames."""
    root = tmp_path_factory.mktemp("small") / "download"
    spec = synthetic.SyntheticSpec(n_subjects=6, frames_per_subject=10, n_test=6, n_contradictions=1, seed=3)
    synthetic.write_kaggle_download(root, spec, workers=1)
    return root


@pytest.fixture(scope="session")
def train_clean(train_download: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train_download, cleaned. Do not modify it."""
    output = tmp_path_factory.mktemp("small-clean") / "clean"
    result = run_script(
        "data_cleaning.py", "--source", str(train_download), "--output", str(output), "--quiet", cwd=output.parent
    )
    assert result.returncode == 0, result.stderr
    return output


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


@pytest.fixture(scope="session")
def trained_run(train_clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch training run on train_clean; returns its working folder (model at 2D_Nerve_Segmentation.pt)."""
    work = tmp_path_factory.mktemp("trained")
    result = run_script(
        "train.py", "--data-dir", str(train_clean), "--max-epochs", "2", "--run-name", "first", *FAST_TRAINING, cwd=work
    )
    assert result.returncode == 0, result.stderr
    return work
